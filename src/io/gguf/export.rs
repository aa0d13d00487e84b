//! GGUF export of vanilla models (llama.cpp conventions), so llama.cpp-family tools can read mor checkpoints, and the
//! atomic GGUF writer every export uses.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};

use super::mor::{config_metadata, quantize_weight, QuantType};
use super::tokenizer::tokenizer_metadata;
use super::{permute_qk, LAYER_TENSORS};
use crate::data::Tokenizer;
use crate::error::{MorError, Result};
use crate::model::MorModel;

/// Write a vanilla `model` as an F32 GGUF file (llama.cpp conventions: `llama.*` metadata, `blk.N.*` names,
/// permuted q/k rows) with the tokenizer's vocabulary and merges if `tokenizer` is given (GPT-2 byte-level BPE
/// tokenizers only). Recursive and MoR models are refused: GGUF has no representation of shared layers or routers.
pub fn export_gguf(model: &MorModel, tokenizer: Option<&Tokenizer>, path: &Path) -> Result<()> {
    write_llama(model, tokenizer, QuantType::F32, path).map(drop)
}

/// [`export_gguf`] with the matmul weights (layers, embedding, LM head) as `ty` and the norms f32, as llama.cpp's
/// quantized files store them. Returns the per-tensor fallbacks taken.
pub(super) fn write_llama(
    model: &MorModel,
    tokenizer: Option<&Tokenizer>,
    ty: QuantType,
    path: &Path,
) -> Result<Vec<String>> {
    let cfg = model.config();
    if cfg.recursion.is_some() || cfg.mor.is_some() {
        return Err(MorError::Config(format!(
            "GGUF export supports vanilla models only, this is {}",
            cfg.variant_name()
        )));
    }
    let params = model.params();
    let get = |name: &str| -> Result<Tensor> {
        params
            .get(name)
            .map(|v| v.as_tensor().to_dtype(DType::F32))
            .transpose()?
            .ok_or_else(|| MorError::Config(format!("model has no parameter {name}")))
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut notes = Vec::new();
    let mut push = |name: String, t: Tensor| -> Result<()> {
        let q = if t.rank() == 2 {
            quantize_weight(&name, &t, ty, &mut notes)?
        } else {
            QTensor::quantize(&t, GgmlDType::F32)?
        };
        tensors.push((name, q));
        Ok(())
    };
    push(
        "token_embd.weight".into(),
        get("model.embed_tokens.weight")?,
    )?;
    push("output_norm.weight".into(), get("model.norm.weight")?)?;
    if !cfg.tie_word_embeddings {
        push("output.weight".into(), get("lm_head.weight")?)?;
    }
    for l in 0..cfg.num_hidden_layers {
        for (g, hf) in LAYER_TENSORS {
            let mut t = get(&format!("model.layers.{l}.{hf}.weight"))?;
            match g {
                "attn_q" => t = permute_qk(&t, cfg.num_attention_heads)?,
                "attn_k" => t = permute_qk(&t, cfg.num_key_value_heads)?,
                _ => {}
            }
            push(format!("blk.{l}.{g}.weight"), t)?;
        }
    }
    let u32v = |x: usize| Value::U32(x as u32);
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String("mor export".into())),
        ("llama.block_count".into(), u32v(cfg.num_hidden_layers)),
        (
            "llama.context_length".into(),
            u32v(cfg.max_position_embeddings),
        ),
        ("llama.embedding_length".into(), u32v(cfg.hidden_size)),
        (
            "llama.feed_forward_length".into(),
            u32v(cfg.intermediate_size),
        ),
        (
            "llama.attention.head_count".into(),
            u32v(cfg.num_attention_heads),
        ),
        (
            "llama.attention.head_count_kv".into(),
            u32v(cfg.num_key_value_heads),
        ),
        ("llama.attention.key_length".into(), u32v(cfg.head_dim())),
        ("llama.attention.value_length".into(), u32v(cfg.head_dim())),
        ("llama.rope.dimension_count".into(), u32v(cfg.head_dim())),
        (
            "llama.rope.freq_base".into(),
            Value::F32(cfg.rope_theta as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        ("llama.vocab_size".into(), u32v(cfg.vocab_size)),
        ("general.file_type".into(), Value::U32(ty.file_type())),
    ];
    meta.extend(config_metadata(model, ty)?);
    if let Some(tok) = tokenizer {
        meta.extend(tokenizer_metadata(tok, cfg)?);
    }
    write_gguf(path, &meta, &tensors)?;
    Ok(notes)
}

/// Write a GGUF file atomically: to a temporary file beside `path`, flushed and synced, then renamed over `path`.
/// On any error the temporary file is removed and `path` is left as it was.
pub(super) fn write_gguf(
    path: &Path,
    meta: &[(String, Value)],
    tensors: &[(String, QTensor)],
) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| MorError::Config(format!("{}: not a file path", path.display())))?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> Result<()> {
        let file = File::create(&tmp).map_err(|e| MorError::io(&tmp, e))?;
        let mut w = BufWriter::new(file);
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut w, &meta_refs, &tensor_refs)
            .map_err(|e| MorError::checkpoint(path, format!("writing GGUF: {e}")))?;
        let file = w
            .into_inner()
            .map_err(|e| MorError::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| MorError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| MorError::io(path, e))
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
