//! Named model presets: tiny models for the CPU quickstart and the paper's SmolLM-based shapes (paper Table 6; docs/architecture.md S2).
//!
//! Every MoR preset uses the paper's final recipe ([`MorConfig::expert`], [`MorConfig::token`]) and Middle-Cycle
//! sharing, the strategy of every MoR and Recursive result in the paper (docs/architecture.md S2).

use crate::config::{Initialization, ModelConfig, MorConfig, RecursionConfig, Sharing};
use crate::error::{MorError, Result};

/// Names accepted by [`preset`].
const NAMES: &[&str] = &[
    "tiny-vanilla",
    "tiny-recursive",
    "tiny-mor-expert",
    "tiny-mor-token",
    "smollm-135m-vanilla",
    "smollm-135m-recursive-3",
    "smollm-135m-mor-expert-3",
    "smollm-135m-mor-token-3",
    "smollm-360m-vanilla",
    "smollm-360m-recursive-2",
    "smollm-360m-recursive-3",
    "smollm-360m-recursive-4",
    "smollm-360m-mor-expert-2",
    "smollm-360m-mor-expert-3",
    "smollm-360m-mor-expert-4",
    "smollm-360m-mor-token-3",
];

/// All preset names, in a stable order.
pub fn preset_names() -> &'static [&'static str] {
    NAMES
}

/// The routing added on top of a shape.
#[derive(Clone, Copy)]
enum Kind {
    Vanilla,
    Recursive(usize),
    Expert(usize),
    Token(usize),
}

/// A Llama shape with the SmolLM v1 conventions (docs/architecture.md S1).
struct Shape {
    vocab: usize,
    d: usize,
    ffn: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    ctx: usize,
    /// SmolLM's `<|endoftext|>` (id 0) is BOS and EOS in its HF config; the tiny tokenizer defines its own ids.
    special: Option<u32>,
}

/// Tiny shape for the quickstart on 2 CPU cores: a few hundred steps in a few minutes.
///
/// d = 128 with 4 heads of 32 and 2 KV heads keeps GQA in play; FFN 384 = 3d (≈ the 8/3·d SwiGLU rule rounded to a
/// multiple of 128); 8 layers are exactly 1 + 2×3 + 1 for N_r = 3 under Middle-Cycle; context 256 keeps attention
/// cheap while leaving room for routing to matter; vocab 4096 fits a byte-level BPE trained on a small bundled corpus
/// (the embedding is then ~40% of the parameters, a small-SmolLM-like share).
const TINY: Shape = Shape {
    vocab: 4096,
    d: 128,
    ffn: 384,
    layers: 8,
    heads: 4,
    kv_heads: 2,
    ctx: 256,
    special: None,
};

/// SmolLM-135M (paper Table 6): 30 layers, d 576, 9/3 heads, FFN 1536.
fn smollm_135m(layers: usize) -> Shape {
    Shape {
        vocab: 49152,
        d: 576,
        ffn: 1536,
        layers,
        heads: 9,
        kv_heads: 3,
        ctx: 2048,
        special: Some(0),
    }
}

/// SmolLM-360M (paper Table 6): 32 layers, d 960, 15/5 heads, FFN 2560.
fn smollm_360m(layers: usize) -> Shape {
    Shape {
        vocab: 49152,
        d: 960,
        ffn: 2560,
        layers,
        heads: 15,
        kv_heads: 5,
        ctx: 2048,
        special: Some(0),
    }
}

fn build(s: Shape, kind: Kind) -> ModelConfig {
    let recursion = |n| {
        Some(RecursionConfig {
            sharing: Sharing::MiddleCycle,
            num_recursion: n,
            initialization: Initialization::Random,
        })
    };
    let (recursion, mor) = match kind {
        Kind::Vanilla => (None, None),
        Kind::Recursive(n) => (recursion(n), None),
        Kind::Expert(n) => (recursion(n), Some(MorConfig::expert())),
        Kind::Token(n) => (recursion(n), Some(MorConfig::token())),
    };
    ModelConfig {
        vocab_size: s.vocab,
        hidden_size: s.d,
        intermediate_size: s.ffn,
        num_hidden_layers: s.layers,
        num_attention_heads: s.heads,
        num_key_value_heads: s.kv_heads,
        head_dim: None,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: s.ctx,
        tie_word_embeddings: true,
        initializer_range: 0.02,
        bos_token_id: s.special,
        eos_token_id: s.special,
        pad_token_id: None,
        recursion,
        mor,
        kv_sharing: None,
        architectures: None,
        model_type: None,
        hidden_act: None,
        attention_bias: None,
        mlp_bias: None,
        rope_scaling: None,
        attention_dropout: None,
        torch_dtype: None,
        transformers_version: None,
        use_cache: None,
        pretraining_tp: None,
    }
}

/// The configuration of a named preset (see [`preset_names`]).
///
/// Layer counts follow the paper's main runs, which add layers so that N_r divides the middle exactly (docs/architecture.md S2):
/// 135M recursive/MoR use 32 layers (1+10×3+1); 360M uses 32 layers for N_r = 2 (1+15×2+1) and 3 (1+10×3+1) and
/// 34 layers for N_r = 4 (1+8×4+1). The vanilla presets keep the SmolLM depths (30 and 32).
pub fn preset(name: &str) -> Result<ModelConfig> {
    let cfg = match name {
        "tiny-vanilla" => build(TINY, Kind::Vanilla),
        "tiny-recursive" => build(TINY, Kind::Recursive(3)),
        "tiny-mor-expert" => build(TINY, Kind::Expert(3)),
        "tiny-mor-token" => build(TINY, Kind::Token(3)),
        "smollm-135m-vanilla" => build(smollm_135m(30), Kind::Vanilla),
        "smollm-135m-recursive-3" => build(smollm_135m(32), Kind::Recursive(3)),
        "smollm-135m-mor-expert-3" => build(smollm_135m(32), Kind::Expert(3)),
        "smollm-135m-mor-token-3" => build(smollm_135m(32), Kind::Token(3)),
        "smollm-360m-vanilla" => build(smollm_360m(32), Kind::Vanilla),
        "smollm-360m-recursive-2" => build(smollm_360m(32), Kind::Recursive(2)),
        "smollm-360m-recursive-3" => build(smollm_360m(32), Kind::Recursive(3)),
        "smollm-360m-recursive-4" => build(smollm_360m(34), Kind::Recursive(4)),
        "smollm-360m-mor-expert-2" => build(smollm_360m(32), Kind::Expert(2)),
        "smollm-360m-mor-expert-3" => build(smollm_360m(32), Kind::Expert(3)),
        "smollm-360m-mor-expert-4" => build(smollm_360m(34), Kind::Expert(4)),
        "smollm-360m-mor-token-3" => build(smollm_360m(32), Kind::Token(3)),
        other => {
            return Err(MorError::Config(format!(
                "unknown preset {other:?}; valid presets: {}",
                NAMES.join(", ")
            )))
        }
    };
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::flops::forward_flops;

    #[test]
    fn every_preset_validates_and_round_trips() {
        for name in preset_names() {
            let c = preset(name).unwrap();
            assert_eq!(ModelConfig::from_json(&c.to_json()).unwrap(), c, "{name}");
        }
    }

    #[test]
    fn unknown_preset_lists_the_valid_names() {
        let e = preset("smollm-1b").unwrap_err().to_string();
        assert!(
            e.contains("smollm-1b")
                && e.contains("tiny-mor-expert")
                && e.contains("smollm-360m-vanilla")
        );
    }

    #[test]
    fn paper_presets_match_table_3_parameters_without_layout_remainder() {
        // Non-embedding parameters, paper Table 3 (360M), Table 6 (vanilla 135M) and Table 9 (135M MoR: 42M).
        let want = [
            ("smollm-135m-vanilla", 106e6, 30, 30),
            ("smollm-135m-recursive-3", 42e6, 32, 12),
            ("smollm-135m-mor-expert-3", 42e6, 32, 12),
            ("smollm-135m-mor-token-3", 42e6, 32, 12),
            ("smollm-360m-vanilla", 315e6, 32, 32),
            ("smollm-360m-recursive-2", 167e6, 32, 17),
            ("smollm-360m-recursive-3", 118e6, 32, 12),
            ("smollm-360m-recursive-4", 98e6, 34, 10),
            ("smollm-360m-mor-expert-2", 167e6, 32, 17),
            ("smollm-360m-mor-expert-3", 118e6, 32, 12),
            ("smollm-360m-mor-expert-4", 98e6, 34, 10),
            ("smollm-360m-mor-token-3", 118e6, 32, 12),
        ];
        for (name, params, unrolled, unique) in want {
            let c = preset(name).unwrap();
            assert!(c.layout_warning().is_none(), "{name}");
            let r = forward_flops(&c, 2048).unwrap();
            let got = r.unique_nonembedding_params as f64;
            // The tables round to the million (42.48M prints as 42M), so allow 1% or that rounding.
            assert!(
                (got - params).abs() < (0.01 * params).max(0.5e6),
                "{name}: {got} vs {params}"
            );
            assert_eq!(
                (r.unrolled_layers, r.unique_layers),
                (unrolled, unique),
                "{name}"
            );
        }
        // Embedding parameters, Table 6: 28M (135M) and 47M (360M).
        let e135 = forward_flops(&preset("smollm-135m-vanilla").unwrap(), 2048).unwrap();
        let e360 = forward_flops(&preset("smollm-360m-vanilla").unwrap(), 2048).unwrap();
        assert_eq!(e135.embedding_params, 49152 * 576);
        assert_eq!(e360.embedding_params, 49152 * 960);
    }

    #[test]
    fn docs_example_is_the_expert_preset() {
        // docs/config.md shows this preset verbatim; keep the two in sync.
        let doc = include_str!("../../docs/config.md");
        let start = doc.find("<!-- example-config -->\n```json\n").unwrap();
        let body = &doc[start..];
        let body = &body[body.find('{').unwrap()..];
        let json = &body[..body.find("```").unwrap()];
        assert_eq!(
            ModelConfig::from_json(json).unwrap(),
            preset("smollm-360m-mor-expert-3").unwrap()
        );
        for name in preset_names() {
            assert!(
                doc.contains(&format!("`{name}`")),
                "{name} missing from docs"
            );
        }
    }

    #[test]
    fn tiny_presets_are_small_and_exact() {
        for name in ["tiny-recursive", "tiny-mor-expert", "tiny-mor-token"] {
            let c = preset(name).unwrap();
            assert!(c.layout_warning().is_none(), "{name}");
            assert_eq!(c.layout().unique_layers().len(), 4, "{name}");
        }
        let r = forward_flops(&preset("tiny-vanilla").unwrap(), 256).unwrap();
        assert!(r.unique_nonembedding_params < 2_000_000);
    }
}
