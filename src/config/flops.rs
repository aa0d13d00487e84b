//! FLOPs and parameter calculator (paper App. D, docs/architecture.md S8).
//!
//! Forward FLOPs per token are counted Kaplan-style: 2 × the parameters of every linear layer a token passes through,
//! plus causal attention over the lower triangle only (QKᵀ and AV, 2·d_attn FLOPs each per query–key pair). Embedding
//! look-ups cost nothing; the LM head (2·d·vocab) is reported separately because the paper's budgets exclude it.
//!
//! MoR models route only part of the sequence through each recursion (paper §2.2.1), so a recursion's linear FLOPs are
//! weighted by the fraction of tokens it processes and its attention by that fraction squared (attention runs among the
//! selected tokens only). With recursive KV sharing (paper §2.2.2, Table 2) deeper recursions reuse the first
//! recursion's K/V: they skip the K/V projections and their queries attend to the full sequence, so attention scales
//! with the fraction, not its square.
//!
//! What reproduces the official step counts (docs/architecture.md S8): the vanilla/MoR ratios of the per-token forward FLOPs excluding
//! the LM head match the 360M configs' step ratios within 0.4% (see the tests). The KV-sharing run does not match; see
//! `kv_sharing_step_count_is_not_reproduced`.

use std::fmt;

use crate::config::{ModelConfig, RouterType, Sampling, Sharing};
use crate::error::{MorError, Result};
use crate::model::capacity::top_k;

/// FLOPs of one group of unrolled layers that see the same tokens (e.g. the layers of one recursion).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupFlops {
    /// Human-readable name, e.g. "recursion 2".
    pub name: String,
    /// Number of unrolled layers in the group.
    pub layers: usize,
    /// Fraction of the sequence's tokens the group's linear layers process (capacity, or the perfectly balanced
    /// token-choice share).
    pub token_fraction: f64,
    /// Whether the group computes its own K/V projections (false for deeper recursions under recursive KV sharing).
    pub computes_kv: bool,
    /// Attention query–key pairs relative to full causal attention over the sequence (capacity² with recursion-wise
    /// caching, capacity with recursive KV sharing).
    pub attention_fraction: f64,
    /// Linear-layer FLOPs per sequence token, all layers of the group.
    pub linear_flops: f64,
    /// Attention (QKᵀ + AV) FLOPs per sequence token, all layers of the group.
    pub attention_flops: f64,
}

impl GroupFlops {
    /// Linear plus attention FLOPs per token.
    pub fn total(&self) -> f64 {
        self.linear_flops + self.attention_flops
    }
}

/// Forward-pass FLOPs per token and parameter counts of a model at one sequence length.
///
/// All FLOPs are per token of the sequence, averaged over the sequence (a token that skips a recursion contributes
/// nothing to it).
#[derive(Debug, Clone, PartialEq)]
pub struct FlopsReport {
    /// Model variant, as [`ModelConfig::variant_name`].
    pub variant: String,
    /// Sequence length the attention and top-k capacities were evaluated at.
    pub seq_len: usize,
    /// Per-group breakdown, in forward order.
    pub groups: Vec<GroupFlops>,
    /// Router FLOPs per token (MoR routers and, with `sampling: aux_router`, the auxiliary routers).
    pub router_flops: f64,
    /// Embedding FLOPs per token: always 0 (a look-up, not a matmul); kept so the breakdown is explicit.
    pub embedding_flops: f64,
    /// LM head FLOPs per token, 2·d·vocab (the final RMSNorm is not counted).
    pub lm_head_flops: f64,
    /// Forward FLOPs per token without the LM head: the quantity whose ratios reproduce the paper's step counts.
    pub per_token_excl_head: f64,
    /// Forward FLOPs per token including the LM head: the real forward cost.
    pub per_token_incl_head: f64,
    /// Unrolled layer count (after any remainder is dropped, docs/architecture.md S2).
    pub unrolled_layers: usize,
    /// Distinct (stored) layer count.
    pub unique_layers: usize,
    /// Stored non-embedding parameters: unique layers (linear + both RMSNorms), final norm and routers.
    pub unique_nonembedding_params: usize,
    /// Embedding parameters: vocab·d, twice if the LM head is untied.
    pub embedding_params: usize,
    /// Effective non-embedding parameters per token, N_nonemb,eff: linear and router parameters applied to a token,
    /// weighted by the fraction of tokens that reach them (docs/architecture.md S8).
    pub effective_params: f64,
    /// Effective attention layer count n_layer,eff: Σ layers × attention fraction.
    pub effective_attention_layers: f64,
}

impl FlopsReport {
    /// Forward FLOPs per token, with or without the LM head.
    pub fn per_token(&self, include_head: bool) -> f64 {
        if include_head {
            self.per_token_incl_head
        } else {
            self.per_token_excl_head
        }
    }
}

impl fmt::Display for FlopsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = |x: f64| x / 1e6;
        writeln!(
            f,
            "{} — forward FLOPs per token at seq_len {} (MFLOPs)",
            self.variant, self.seq_len
        )?;
        writeln!(
            f,
            "{:<22} {:>6} {:>8} {:>5} {:>8} {:>11} {:>11} {:>11}",
            "group", "layers", "tokens", "K/V", "attn", "linear", "attention", "total"
        )?;
        for g in &self.groups {
            writeln!(
                f,
                "{:<22} {:>6} {:>8.4} {:>5} {:>8.4} {:>11.3} {:>11.3} {:>11.3}",
                g.name,
                g.layers,
                g.token_fraction,
                if g.computes_kv { "yes" } else { "no" },
                g.attention_fraction,
                m(g.linear_flops),
                m(g.attention_flops),
                m(g.total())
            )?;
        }
        writeln!(f, "{:<22} {:>66.3}", "routers", m(self.router_flops))?;
        writeln!(
            f,
            "{:<22} {:>66.3}",
            "embedding (look-up)",
            m(self.embedding_flops)
        )?;
        writeln!(
            f,
            "{:<22} {:>66.3}",
            "total excl. LM head",
            m(self.per_token_excl_head)
        )?;
        writeln!(f, "{:<22} {:>66.3}", "LM head", m(self.lm_head_flops))?;
        writeln!(
            f,
            "{:<22} {:>66.3}",
            "total incl. LM head",
            m(self.per_token_incl_head)
        )?;
        writeln!(
            f,
            "layers: {} unrolled, {} unique; effective attention layers {:.3}",
            self.unrolled_layers, self.unique_layers, self.effective_attention_layers
        )?;
        write!(
            f,
            "params: {:.3}M unique non-embedding, {:.3}M embedding, {:.3}M effective per token",
            self.unique_nonembedding_params as f64 / 1e6,
            self.embedding_params as f64 / 1e6,
            self.effective_params / 1e6
        )
    }
}

/// Matmul parameter counts of one decoder layer.
struct LayerParams {
    /// q and o projections plus the SwiGLU MLP: applied to every token the layer processes.
    per_token: usize,
    /// k and v projections: skipped by deeper recursions under recursive KV sharing.
    kv: usize,
    /// Query width h·d_head (d_attn in Kaplan's notation).
    d_attn: usize,
}

fn layer_params(cfg: &ModelConfig) -> LayerParams {
    let d = cfg.hidden_size;
    let hd = cfg.head_dim();
    let q = d * cfg.num_attention_heads * hd;
    let kv = 2 * d * cfg.num_key_value_heads * hd;
    let mlp = 3 * d * cfg.intermediate_size;
    LayerParams {
        per_token: 2 * q + mlp,
        kv,
        d_attn: cfg.num_attention_heads * hd,
    }
}

/// Parameters of one router with `out` outputs (no biases, as the official `util.py`).
fn router_params(cfg: &ModelConfig, out: usize) -> usize {
    let d = cfg.hidden_size;
    match cfg.mor.as_ref() {
        Some(m) if m.router_type != RouterType::Linear => {
            let h = m.router_hidden_width(d);
            d * h + h * out
        }
        _ => d * out,
    }
}

/// How a group's queries see keys.
#[derive(Clone, Copy)]
enum Keys {
    /// Causal among the k processed tokens only (recursion-wise caching, or a plain layer).
    Own,
    /// The k processed queries attend causally to the whole sequence (recursive KV sharing).
    Shared,
}

/// Forward FLOPs per token of `cfg` on sequences of `seq_len` tokens, with the parameter counts (paper App. D).
///
/// Expert-choice recursions process `max(1, ⌊capacity·seq_len⌋)` tokens, exactly as the model's top-k does;
/// token-choice recursion r is assumed perfectly balanced, reached by (N_r − r)/N_r of the tokens; recursive models
/// without routing run every recursion on every token. Capacity warm-up is ignored (steady state).
pub fn forward_flops(cfg: &ModelConfig, seq_len: usize) -> Result<FlopsReport> {
    cfg.validate()?;
    if seq_len == 0 || seq_len > cfg.max_position_embeddings {
        return Err(MorError::Request(format!(
            "seq_len = {seq_len} must be in 1..={} (max_position_embeddings)",
            cfg.max_position_embeddings
        )));
    }
    let t = seq_len as f64;
    let lp = layer_params(cfg);
    let layout = cfg.layout();
    let n_r = layout.num_recursion;
    let kv_shared = cfg.kv_sharing.as_ref();

    // Fraction of the sequence processed by each recursion.
    let fractions: Vec<f64> = if cfg.expert_choice().is_some() {
        cfg.capacities()
            .iter()
            .map(|&c| top_k(c, seq_len) as f64 / t)
            .collect()
    } else if cfg.token_choice().is_some() {
        (0..n_r).map(|r| (n_r - r) as f64 / n_r as f64).collect()
    } else {
        vec![1.0; n_r]
    };

    let group = |name: String, layers: usize, frac: f64, computes_kv: bool, keys: Keys| {
        let k = frac * t;
        // Query–key pairs, including the diagonal. Shared keys: k queries spread over the sequence see (T+1)/2 keys
        // on average (paper Table 2: attention ∝ k/N_ctx instead of (k/N_ctx)²).
        let pairs = match keys {
            Keys::Own => k * (k + 1.0) / 2.0,
            Keys::Shared => k * (t + 1.0) / 2.0,
        };
        let full = t * (t + 1.0) / 2.0;
        let kv_frac = if computes_kv { frac } else { 0.0 };
        GroupFlops {
            name,
            layers,
            token_fraction: frac,
            computes_kv,
            attention_fraction: pairs / full,
            linear_flops: layers as f64
                * 2.0
                * (frac * lp.per_token as f64 + kv_frac * lp.kv as f64),
            // 2·d_attn for QKᵀ and 2·d_attn for AV per pair, spread over the T tokens.
            attention_flops: layers as f64 * 4.0 * lp.d_attn as f64 * pairs / t,
        }
    };

    let mut groups = Vec::new();
    match &cfg.recursion {
        None => groups.push(group(
            "layers".into(),
            layout.num_layers(),
            1.0,
            true,
            Keys::Own,
        )),
        Some(rec) => {
            if layout.prefix > 0 {
                groups.push(group(
                    "first (unique)".into(),
                    layout.prefix,
                    1.0,
                    true,
                    Keys::Own,
                ));
            }
            let cyclic = matches!(rec.sharing, Sharing::Cycle | Sharing::MiddleCycle);
            if cyclic {
                for (r, &frac) in fractions.iter().enumerate() {
                    // Recursive KV sharing: recursion 1 writes the cache, deeper ones read it (docs/architecture.md S6). The hybrid
                    // "†" variant recomputes K/V for the selected tokens, so it keeps their K/V projections.
                    let deeper_shared = r > 0 && kv_shared.is_some();
                    let computes_kv = !deeper_shared || kv_shared.is_some_and(|k| k.update_cache);
                    let keys = if deeper_shared {
                        Keys::Shared
                    } else {
                        Keys::Own
                    };
                    groups.push(group(
                        format!("recursion {}", r + 1),
                        layout.base_depth,
                        frac,
                        computes_kv,
                        keys,
                    ));
                }
            } else {
                // Sequence sharing: no routing or KV sharing is allowed (validated), every layer sees every token.
                groups.push(group(
                    format!("shared ({n_r} × {})", layout.base_depth),
                    n_r * layout.base_depth,
                    1.0,
                    true,
                    Keys::Own,
                ));
            }
            let suffix = layout.suffix_layers().len();
            if suffix > 0 {
                groups.push(group("last (unique)".into(), suffix, 1.0, true, Keys::Own));
            }
        }
    }

    // Routers (tiny). Expert-choice: the router of recursion r scores the candidates, i.e. the survivors of r−1 (all
    // tokens at r = 0); the auxiliary router, when trained, scores the same tokens. Token-choice: one router with N_r
    // outputs on every token, after the first layer.
    let (router_param_count, router_eff_params) = if let Some(ec) = cfg.expert_choice() {
        let copies = if ec.sampling == Sampling::AuxRouter {
            2
        } else {
            1
        };
        let p = router_params(cfg, 1);
        let candidates: f64 = (0..n_r)
            .map(|r| if r == 0 { 1.0 } else { fractions[r - 1] })
            .sum();
        (copies * n_r * p, copies as f64 * p as f64 * candidates)
    } else if cfg.token_choice().is_some() {
        let p = router_params(cfg, n_r);
        (p, p as f64)
    } else {
        (0, 0.0)
    };
    let router_flops = 2.0 * router_eff_params;

    let d = cfg.hidden_size;
    let lm_head_flops = 2.0 * (d * cfg.vocab_size) as f64;
    let per_token_excl_head = groups.iter().map(GroupFlops::total).sum::<f64>() + router_flops;
    let unique_layers = layout.unique_layers().len();
    let per_layer_stored = lp.per_token + lp.kv + 2 * d;
    let effective_params =
        groups.iter().map(|g| g.linear_flops).sum::<f64>() / 2.0 + router_eff_params;
    Ok(FlopsReport {
        variant: cfg.variant_name(),
        seq_len,
        router_flops,
        embedding_flops: 0.0,
        lm_head_flops,
        per_token_excl_head,
        per_token_incl_head: per_token_excl_head + lm_head_flops,
        unrolled_layers: layout.num_layers(),
        unique_layers,
        unique_nonembedding_params: unique_layers * per_layer_stored + d + router_param_count,
        embedding_params: d * cfg.vocab_size * if cfg.tie_word_embeddings { 1 } else { 2 },
        effective_params,
        effective_attention_layers: groups
            .iter()
            .map(|g| g.layers as f64 * g.attention_fraction)
            .sum(),
        groups,
    })
}

/// Training FLOPs per token: 3 × the forward FLOPs including the LM head (backward ≈ 2 × forward, Kaplan et al.).
///
/// This is the real training cost. The paper's budget labels count forward FLOPs only (App. D, docs/architecture.md S8), so a paper
/// budget corresponds to a third of this.
pub fn training_flops_per_token(cfg: &ModelConfig, seq_len: usize) -> Result<f64> {
    Ok(3.0 * forward_flops(cfg, seq_len)?.per_token_incl_head)
}

/// How a FLOPs budget counts the cost of a training token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetCount {
    /// Forward + backward: 3 × forward FLOPs including the LM head ([`training_flops_per_token`]).
    Training,
    /// The paper's isoFLOP convention (App. D, docs/architecture.md S8): forward FLOPs only, without the LM head; the step ratios
    /// of the official configs follow it to within 1%.
    Paper,
}

/// Whole optimizer steps of `tokens_per_step` tokens (sequences of `seq_len`) that fit in `budget_flops`, counted
/// as `count` says. Errors if the budget does not cover a single step.
pub fn steps_for_budget(
    cfg: &ModelConfig,
    seq_len: usize,
    tokens_per_step: usize,
    budget_flops: f64,
    count: BudgetCount,
) -> Result<usize> {
    if tokens_per_step == 0 {
        return Err(MorError::Request("tokens_per_step must be positive".into()));
    }
    if !(budget_flops.is_finite() && budget_flops > 0.0) {
        return Err(MorError::Request(format!(
            "FLOPs budget {budget_flops} must be a positive finite number"
        )));
    }
    let per_token = match count {
        BudgetCount::Training => training_flops_per_token(cfg, seq_len)?,
        BudgetCount::Paper => forward_flops(cfg, seq_len)?.per_token_excl_head,
    };
    let per_step = per_token * tokens_per_step as f64;
    let steps = (budget_flops / per_step).floor();
    if steps < 1.0 {
        return Err(MorError::Request(format!(
            "FLOPs budget {budget_flops:.3e} is smaller than one training step ({per_step:.3e} FLOPs: \
             {tokens_per_step} tokens × {:.3e} FLOPs/token for {})",
            per_step / tokens_per_step as f64,
            cfg.variant_name()
        )));
    }
    Ok(steps as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::presets::preset;
    use crate::config::KvSharingConfig;

    /// Per-token forward FLOPs excluding the LM head at the paper's 2048-token context.
    fn fwd(name: &str) -> f64 {
        forward_flops(&preset(name).unwrap(), 2048)
            .unwrap()
            .per_token_excl_head
    }

    /// Steps of the vanilla 360M run (docs/architecture.md S8): Vanilla / Rec-2 / Rec-3.
    const VANILLA_STEPS: f64 = 9438.0;

    #[test]
    fn closed_form_flops_per_token_are_reproduced() {
        // Closed form (paper App. D): vanilla 360M = 755M and MoR-3 = 501.5M FLOPs per token (excl. LM head). Our count differs from the
        // closed form only by exact integers (⌊c·T⌋ tokens, (T+1)/2 keys incl. the diagonal) and the routers.
        let v = fwd("smollm-360m-vanilla");
        let m3 = fwd("smollm-360m-mor-expert-3");
        assert!((v / 755.0e6 - 1.0).abs() < 1e-3, "{v}");
        assert!((m3 / 501.5e6 - 1.0).abs() < 1e-3, "{m3}");
        // Effective parameters: 22 effective layers × 9.83M (+ routers).
        let r = forward_flops(&preset("smollm-360m-mor-expert-3").unwrap(), 2048).unwrap();
        assert!((r.effective_params / (22.0 * 9_830_400.0) - 1.0).abs() < 1e-3);
    }

    #[test]
    fn forward_flops_ratios_reproduce_the_official_step_counts() {
        // Equal budgets ⇒ steps ∝ 1 / FLOPs per token. The ratio of forward FLOPs per token *excluding the LM head*
        // (recursion layers weighted by capacity for linear layers and by capacity² for attention) reproduces the
        // official 360M configs' step ratios within 0.4%; the model-side ratio is systematically ~0.3% higher, i.e.
        // the authors' count gave MoR slightly more FLOPs (e.g. the head or norms counted somewhere); not resolved.
        // Found: MoR-2 1.3403 vs 1.3370, MoR-E3 1.5055 / MoR-T3 1.5052 vs 1.5004, MoR-4 1.5118 vs 1.5063, Rec-4
        // 0.9412 vs 0.9412, Rec-2 and Rec-3 exactly 1 (same unrolled depth as vanilla).
        let v = fwd("smollm-360m-vanilla");
        for (name, steps, tol) in [
            ("smollm-360m-recursive-2", 9438.0, 1e-9),
            ("smollm-360m-recursive-3", 9438.0, 1e-9),
            ("smollm-360m-recursive-4", 8883.0, 0.001),
            ("smollm-360m-mor-expert-2", 12619.0, 0.005),
            ("smollm-360m-mor-expert-3", 14161.0, 0.005),
            ("smollm-360m-mor-token-3", 14161.0, 0.005),
            ("smollm-360m-mor-expert-4", 14216.0, 0.005),
        ] {
            let ratio = v / fwd(name);
            let want = steps / VANILLA_STEPS;
            assert!(
                (ratio / want - 1.0).abs() < tol,
                "{name}: FLOPs ratio {ratio:.4} vs step ratio {want:.4}"
            );
        }
    }

    #[test]
    fn kv_sharing_step_count_is_not_reproduced() {
        // Honest negative result. The official MoR-3 + recursive KV sharing config trains 14672 steps (ratio 1.5546 to
        // vanilla). Counting KV sharing as paper Table 2 describes it (deeper recursions skip K/V projections and
        // attend over the full sequence, attention ∝ capacity) gives 1.490: 4.2% too few steps. Keeping attention
        // ∝ capacity² while dropping the K/V projections would give 1.543 (0.7% low); nothing we tried gives 1.5546.
        // The calculator implements Table 2 (what mor actually executes, docs/architecture.md S6), and this test pins the gap.
        let mut c = preset("smollm-360m-mor-expert-3").unwrap();
        c.kv_sharing = Some(KvSharingConfig::default());
        let r = forward_flops(&c, 2048).unwrap();
        let ratio = fwd("smollm-360m-vanilla") / r.per_token_excl_head;
        assert!((ratio - 1.490).abs() < 0.002, "{ratio}");
        assert!((14672.0 / VANILLA_STEPS / ratio - 1.0) > 0.04);
        // Deeper recursions: no K/V projections, attention linear in capacity.
        let g = &r.groups[2];
        assert!(!g.computes_kv);
        assert!((g.attention_fraction - g.token_fraction).abs() < 1e-9);
        // The hybrid "†" variant recomputes the selected tokens' K/V.
        c.kv_sharing = Some(KvSharingConfig { update_cache: true });
        let h = forward_flops(&c, 2048).unwrap();
        assert!(h.groups[2].computes_kv && h.per_token_excl_head > r.per_token_excl_head);
    }

    #[test]
    fn parameter_counts_match_paper_table_6() {
        let c = preset("smollm-360m-vanilla").unwrap();
        let r = forward_flops(&c, 2048).unwrap();
        // 9.83M matmul parameters per layer (paper Table 6), ×32 = 315M.
        assert_eq!(r.effective_params, 32.0 * 9_830_400.0);
        assert_eq!(
            r.unique_nonembedding_params,
            32 * (9_830_400 + 2 * 960) + 960
        );
        for (name, want) in [
            ("smollm-360m-mor-expert-2", 167e6),
            ("smollm-360m-mor-expert-3", 118e6),
            ("smollm-360m-mor-expert-4", 98e6),
        ] {
            let got = forward_flops(&preset(name).unwrap(), 2048)
                .unwrap()
                .unique_nonembedding_params as f64;
            assert!((got / want - 1.0).abs() < 0.005, "{name}: {got}");
        }
    }

    #[test]
    fn attention_and_capacity_accounting() {
        let c = preset("tiny-mor-expert").unwrap();
        let r = forward_flops(&c, 256).unwrap();
        let names: Vec<&str> = r.groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "first (unique)",
                "recursion 1",
                "recursion 2",
                "recursion 3",
                "last (unique)"
            ]
        );
        // ⌊(2/3)·256⌋ = 170 and ⌊(1/3)·256⌋ = 85 tokens, as the model's top-k.
        assert!((r.groups[2].token_fraction - 170.0 / 256.0).abs() < 1e-12);
        assert!((r.groups[3].token_fraction - 85.0 / 256.0).abs() < 1e-12);
        let pairs = |k: f64| k * (k + 1.0) / 2.0;
        assert!((r.groups[3].attention_fraction - pairs(85.0) / pairs(256.0)).abs() < 1e-12);
        // Plain layer: attention 4·d_attn·(T+1)/2 per token.
        assert!((r.groups[0].attention_flops - 4.0 * 128.0 * 257.0 / 2.0).abs() < 1e-6);
        // Routers: 3 linear routers on 256, 256 and 170 tokens.
        assert!((r.router_flops - 2.0 * 128.0 * (1.0 + 1.0 + 170.0 / 256.0)).abs() < 1e-9);
        assert!(r.per_token_incl_head - r.per_token_excl_head == 2.0 * 128.0 * 4096.0);
        // Token-choice: perfect balance 1, 2/3, 1/3 (not floored).
        let t = forward_flops(&preset("tiny-mor-token").unwrap(), 256).unwrap();
        assert!((t.groups[2].token_fraction - 2.0 / 3.0).abs() < 1e-12);
        // Recursive and vanilla of the same depth cost the same.
        let rec = forward_flops(&preset("tiny-recursive").unwrap(), 256).unwrap();
        let van = forward_flops(&preset("tiny-vanilla").unwrap(), 256).unwrap();
        assert!((rec.per_token_incl_head - van.per_token_incl_head).abs() < 1e-6);
        assert!(rec.unique_nonembedding_params < van.unique_nonembedding_params);
        assert!(r.to_string().contains("recursion 3"));
    }

    #[test]
    fn budgets_and_bad_input() {
        let c = preset("smollm-360m-vanilla").unwrap();
        let per_token = training_flops_per_token(&c, 2048).unwrap();
        let fwd = forward_flops(&c, 2048).unwrap().per_token_incl_head;
        assert_eq!(per_token, 3.0 * fwd);
        let tokens = 1024 * 2048;
        let step = per_token * tokens as f64;
        assert_eq!(
            steps_for_budget(&c, 2048, tokens, 10.5 * step, BudgetCount::Training).unwrap(),
            10
        );
        let e = steps_for_budget(&c, 2048, tokens, 0.5 * step, BudgetCount::Training)
            .unwrap_err()
            .to_string();
        assert!(e.contains("smaller than one training step"), "{e}");
        assert!(steps_for_budget(&c, 2048, 0, 1e20, BudgetCount::Paper).is_err());
        assert!(steps_for_budget(&c, 2048, tokens, f64::NAN, BudgetCount::Paper).is_err());
        assert!(forward_flops(&c, 0).is_err());
        assert!(forward_flops(&c, 4096).is_err());
    }

    #[test]
    fn paper_budget_reproduces_the_official_step_ratio() {
        // Official 360M configs at the same 16.5e18 budget: vanilla 9438 steps, MoR-3 expert 14161 (docs/architecture.md S8).
        let tokens = 1024 * 2048;
        let steps = |name: &str| {
            let c = preset(name).unwrap();
            steps_for_budget(&c, 2048, tokens, 16.5e18, BudgetCount::Paper).unwrap() as f64
        };
        let ratio = steps("smollm-360m-mor-expert-3") / steps("smollm-360m-vanilla");
        assert!((ratio / (14161.0 / 9438.0) - 1.0).abs() < 0.01, "{ratio}");
        // The training convention costs 3× forward plus the head, so fewer steps fit.
        let c = preset("smollm-360m-vanilla").unwrap();
        let training = steps_for_budget(&c, 2048, tokens, 16.5e18, BudgetCount::Training).unwrap();
        assert!((training as f64) < steps("smollm-360m-vanilla") / 3.0);
    }
}
