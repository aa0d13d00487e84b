//! mor's own GGUF architecture (`general.architecture = "mor"`, see docs/gguf.md): any mor model — recursive and
//! MoR included — with its matmul weights quantized and everything else (norms, routers, the balancing bias) f32.
//!
//! Tensors keep mor's canonical parameter names (`model.layers.{u}.self_attn.q_proj.weight`, `model.routers.{r}.weight`,
//! …), so a shared layer is stored once, under its first unrolled index u, as in mor's safetensors checkpoints; q/k rows
//! stay in the Hugging Face order. The config is stored key by key under `mor.config.` (the `config.json` path of each
//! field, nulls omitted) and the parameter-sharing layout as `mor.layout.source`, checked against the config on read.
//! Vanilla models are written as llama.cpp's `llama` architecture instead, so llama.cpp reads them.
//!
//! The same code turns stored tensors into the engine's weights whether they come from a file or from
//! [`quantize_model`] (in memory, for `mor bench generate --quantized`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::export::{write_gguf, write_llama};
use super::tokenizer::tokenizer_metadata;
use super::{GgufFile, QuantizedLayer, QuantizedWeights};
use crate::config::ModelConfig;
use crate::data::Tokenizer;
use crate::engine::quant::QMatrix;
use crate::error::{MorError, Result};
use crate::model::params::ParamStore;
use crate::model::MorModel;

/// `general.architecture` of mor's files.
pub const ARCH: &str = "mor";
/// Prefix of the config keys: `mor.config.<config.json path>`.
pub const CONFIG_PREFIX: &str = "mor.config.";
/// The unrolled layer whose weights each unrolled layer uses (`Layout::source`), u32 array.
pub const SOURCE_KEY: &str = "mor.layout.source";
/// The `--type` the file was written with (string, e.g. `q4_0`).
pub const TYPE_KEY: &str = "mor.quantization.type";

/// The matmul weights of a layer, by mor suffix.
const LAYER_MATMULS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// A weight type of `mor quantize` / `mor bench generate --quantized`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    /// No quantization (32-bit floats).
    F32,
    /// 8 bits, one scale per 32 values.
    Q8_0,
    /// 4 bits, one scale per 32 values.
    Q4_0,
    /// 4 bits, a scale and a minimum per 32 values.
    Q4_1,
    /// 4 bits in super-blocks of 256 (Q5_0 for a tensor whose width is not a multiple of 256, as llama.cpp does).
    Q4K,
}

impl QuantType {
    /// The GGML type of the matmul weights.
    pub fn ggml(self) -> GgmlDType {
        match self {
            QuantType::F32 => GgmlDType::F32,
            QuantType::Q8_0 => GgmlDType::Q8_0,
            QuantType::Q4_0 => GgmlDType::Q4_0,
            QuantType::Q4_1 => GgmlDType::Q4_1,
            QuantType::Q4K => GgmlDType::Q4K,
        }
    }

    /// The flag value (`q4_0`, …).
    pub fn name(self) -> &'static str {
        match self {
            QuantType::F32 => "f32",
            QuantType::Q8_0 => "q8_0",
            QuantType::Q4_0 => "q4_0",
            QuantType::Q4_1 => "q4_1",
            QuantType::Q4K => "q4_k",
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_ALL_F32`, `MOSTLY_Q8_0`, `MOSTLY_Q4_0`, `MOSTLY_Q4_1`,
    /// `MOSTLY_Q4_K_S`).
    pub(super) fn file_type(self) -> u32 {
        match self {
            QuantType::F32 => 0,
            QuantType::Q4_0 => 2,
            QuantType::Q4_1 => 3,
            QuantType::Q8_0 => 7,
            QuantType::Q4K => 14,
        }
    }
}

impl std::str::FromStr for QuantType {
    type Err = MorError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "f32" => QuantType::F32,
            "q8_0" => QuantType::Q8_0,
            "q4_0" => QuantType::Q4_0,
            "q4_1" => QuantType::Q4_1,
            "q4_k" => QuantType::Q4K,
            _ => {
                return Err(MorError::Config(format!(
                    "unknown quantization type {s:?}: use f32, q8_0, q4_0, q4_1 or q4_k"
                )))
            }
        })
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether parameter `name` is a matmul weight (layer projections, token embedding, untied LM head): the tensors
/// that are quantized. Everything else stays f32.
fn is_matmul(name: &str) -> bool {
    name == "model.embed_tokens.weight"
        || name == "lm_head.weight"
        || name.strip_prefix("model.layers.").is_some_and(|rest| {
            LAYER_MATMULS
                .iter()
                .any(|m| rest.ends_with(&format!(".{m}.weight")))
        })
}

/// Quantize the [rows, cols] weight `t` named `name` as `ty`. A width that is not a whole number of 32-value blocks
/// is an error naming the tensor and type; under Q4_K a width that is not a multiple of 256 falls back to Q5_0
/// (llama.cpp's fallback), recorded in `notes`.
pub(super) fn quantize_weight(
    name: &str,
    t: &Tensor,
    ty: QuantType,
    notes: &mut Vec<String>,
) -> Result<QTensor> {
    let t = t.to_dtype(DType::F32)?;
    let cols = t.dims().last().copied().unwrap_or(0);
    let mut dtype = ty.ggml();
    if ty != QuantType::F32 && !cols.is_multiple_of(32) {
        return Err(MorError::Config(format!(
            "tensor {name}: {cols} columns are not a multiple of 32, the {ty} block; it cannot be stored as {ty}"
        )));
    }
    if ty == QuantType::Q4K && !cols.is_multiple_of(256) {
        dtype = GgmlDType::Q5_0;
        notes.push(format!(
            "{name}: {cols} columns are not a multiple of 256 (the Q4_K super-block), stored as Q5_0"
        ));
    }
    Ok(QTensor::quantize(&t, dtype)?)
}

/// Every parameter of `model` under its canonical name (shared layers once): matmul weights as `ty`, the rest f32.
fn model_tensors(
    model: &MorModel,
    ty: QuantType,
    notes: &mut Vec<String>,
) -> Result<Vec<(String, QTensor)>> {
    model
        .params()
        .iter()
        .map(|(name, v)| {
            let t = v.as_tensor();
            let q = if is_matmul(name) {
                quantize_weight(name, t, ty, notes)?
            } else {
                QTensor::quantize(&t.to_dtype(DType::F32)?, GgmlDType::F32)?
            };
            Ok((name.clone(), q))
        })
        .collect()
}

/// A model quantized in memory ([`quantize_model`]).
#[derive(Debug)]
pub struct QuantizedModel {
    /// The frame for [`CachedModel::quantized`](crate::engine::CachedModel::quantized): norms and routers f32, its
    /// matmul weights and embedding zero placeholders that occupy no memory.
    pub model: MorModel,
    /// The quantized matmul weights, one set per unique layer.
    pub weights: QuantizedWeights,
    /// Per-tensor fallbacks taken (e.g. Q4_K → Q5_0), one line each.
    pub notes: Vec<String>,
}

/// Quantize `model` in memory exactly as [`quantize_gguf`] stores it, without a file (`ty` must be quantized).
pub fn quantize_model(model: &MorModel, ty: QuantType) -> Result<QuantizedModel> {
    if ty == QuantType::F32 {
        return Err(MorError::Config(
            "quantize_model needs a quantized type (q8_0, q4_0, q4_1, q4_k)".into(),
        ));
    }
    let mut notes = Vec::new();
    let tensors = model_tensors(model, ty, &mut notes)?;
    let (model, weights) = frame(model.config(), tensors)?;
    Ok(QuantizedModel {
        model,
        weights,
        notes,
    })
}

/// The frame model and the engine's weights from stored tensors (canonical names): matmul weights stay as stored,
/// the rest is read as f32. Missing, unexpected or misshapen tensors are errors naming them.
fn frame(
    cfg: &ModelConfig,
    tensors: Vec<(String, QTensor)>,
) -> Result<(MorModel, QuantizedWeights)> {
    let mut store = ParamStore::new(&Device::Cpu, 0);
    let mut mats: HashMap<String, QMatrix> = HashMap::new();
    for (name, t) in tensors {
        if is_matmul(&name) {
            let dims = t.shape().dims().to_vec();
            let [rows, cols] = dims[..] else {
                return Err(MorError::Config(format!(
                    "tensor {name}: expected 2 dimensions, found {dims:?}"
                )));
            };
            store.insert_placeholder(&name, &dims)?;
            let data = t
                .data()
                .map_err(|e| MorError::Config(format!("tensor {name}: {e}")))?;
            let m = QMatrix::from_ggml(t.dtype(), rows, cols, &data)
                .map_err(|m| MorError::Config(format!("tensor {name} {m}")))?;
            mats.insert(name, m);
        } else {
            store.insert(&name, &t.dequantize(&Device::Cpu)?)?;
        }
    }
    let model = MorModel::from_params(cfg, store.frozen())?;
    let mut take = |name: &str| {
        mats.remove(name)
            .ok_or_else(|| MorError::Config(format!("missing tensor {name}")))
    };
    let mut layers = Vec::new();
    for u in model.layout().unique_layers() {
        let mut get = |m: &str| take(&format!("model.layers.{u}.{m}.weight"));
        let (q, k, v, o) = (
            get("self_attn.q_proj")?,
            get("self_attn.k_proj")?,
            get("self_attn.v_proj")?,
            get("self_attn.o_proj")?,
        );
        let (g, up, down) = (
            get("mlp.gate_proj")?,
            get("mlp.up_proj")?,
            get("mlp.down_proj")?,
        );
        layers.push(QuantizedLayer {
            qkv: QMatrix::stack(&[&q, &k, &v]).map_err(MorError::Config)?,
            gate_up: QMatrix::stack(&[&g, &up]).map_err(MorError::Config)?,
            q,
            o,
            down,
        });
    }
    let embed = Arc::new(take("model.embed_tokens.weight")?);
    let head = if cfg.tie_word_embeddings {
        Arc::clone(&embed)
    } else {
        Arc::new(take("lm_head.weight")?)
    };
    Ok((
        model,
        QuantizedWeights {
            layers,
            embed,
            head,
        },
    ))
}

/// Write `model` as a GGUF file with its matmul weights as `ty` and, if given, the tokenizer: a vanilla model as
/// llama.cpp's `llama` architecture (permuted q/k rows, `llama.*` metadata, so llama.cpp runs it), any other as
/// mor's architecture (module docs). The file is written beside `path` under a temporary name and renamed, so a
/// failure never leaves a partial `path`. Returns the per-tensor fallbacks taken (see [`quantize_weight`]).
pub fn quantize_gguf(
    model: &MorModel,
    tokenizer: Option<&Tokenizer>,
    ty: QuantType,
    path: &Path,
) -> Result<Vec<String>> {
    let cfg = model.config();
    if cfg.recursion.is_none() && cfg.mor.is_none() {
        return write_llama(model, tokenizer, ty, path);
    }
    let mut notes = Vec::new();
    let tensors = model_tensors(model, ty, &mut notes)?;
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(ARCH.into())),
        ("general.name".into(), Value::String("mor quantize".into())),
        ("general.file_type".into(), Value::U32(ty.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    meta.extend(config_metadata(model, ty)?);
    if let Some(tok) = tokenizer {
        meta.extend(tokenizer_metadata(tok, cfg)?);
    }
    write_gguf(path, &meta, &tensors)?;
    Ok(notes)
}

/// mor's own keys, written into every GGUF file mor writes (`llama` ones too, where llama.cpp ignores them): the
/// `--type`, the layout (`mor.layout.source`) and the config key by key (`mor.config.*`).
pub(super) fn config_metadata(model: &MorModel, ty: QuantType) -> Result<Vec<(String, Value)>> {
    let mut meta = vec![
        (TYPE_KEY.to_string(), Value::String(ty.name().into())),
        (
            SOURCE_KEY.to_string(),
            Value::Array(
                model
                    .layout()
                    .source
                    .iter()
                    .map(|&s| Value::U32(s as u32))
                    .collect(),
            ),
        ),
    ];
    let json = serde_json::to_value(model.config())
        .map_err(|e| MorError::Config(format!("config JSON: {e}")))?;
    flatten(CONFIG_PREFIX.trim_end_matches('.'), &json, &mut meta)?;
    Ok(meta)
}

/// `config.json` fields as GGUF metadata: objects become dotted keys, nulls are omitted (every nullable field
/// defaults to null).
fn flatten(key: &str, v: &serde_json::Value, out: &mut Vec<(String, Value)>) -> Result<()> {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                flatten(&format!("{key}.{k}"), x, out)?;
            }
        }
        serde_json::Value::Null => {}
        other => out.push((key.to_string(), json_to_gguf(key, other)?)),
    }
    Ok(())
}

fn json_to_gguf(key: &str, v: &serde_json::Value) -> Result<Value> {
    use serde_json::Value as J;
    Ok(match v {
        J::Bool(b) => Value::Bool(*b),
        J::String(s) => Value::String(s.clone()),
        J::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => Value::U64(u),
            (_, Some(i), _) => Value::I64(i),
            (_, _, Some(f)) => Value::F64(f),
            _ => {
                return Err(MorError::Config(format!(
                    "{key}: unrepresentable number {n}"
                )))
            }
        },
        J::Array(a) if !a.is_empty() => Value::Array(
            a.iter()
                .map(|x| json_to_gguf(key, x))
                .collect::<Result<_>>()?,
        ),
        other => {
            return Err(MorError::Config(format!(
                "{key}: {other} has no GGUF representation here"
            )))
        }
    })
}

fn gguf_to_json(v: &Value) -> Option<serde_json::Value> {
    use serde_json::Value as J;
    Some(match v {
        Value::Bool(b) => J::Bool(*b),
        Value::String(s) => J::String(s.clone()),
        Value::F32(x) => serde_json::Number::from_f64(f64::from(*x))?.into(),
        Value::F64(x) => serde_json::Number::from_f64(*x)?.into(),
        Value::I8(x) => (*x).into(),
        Value::I16(x) => (*x).into(),
        Value::I32(x) => (*x).into(),
        Value::I64(x) => (*x).into(),
        Value::Array(a) => J::Array(a.iter().map(gguf_to_json).collect::<Option<_>>()?),
        other => super::value_as_u64(other)?.into(),
    })
}

impl GgufFile {
    /// The file's `general.architecture` (`llama`, `mor`, …).
    pub fn architecture(&self) -> Result<&str> {
        self.string("general.architecture")
    }

    /// Whether the file carries mor's `mor.config.*` keys.
    pub(super) fn has_mor_config(&self) -> bool {
        self.content
            .metadata
            .keys()
            .any(|k| k.starts_with(CONFIG_PREFIX))
    }

    /// The config stored by mor: the `mor.config.*` keys back into `config.json`, validated, and the stored layout
    /// (`mor.layout.source`) checked against it; in a `llama` file also the `llama.*` shape.
    pub(super) fn mor_config(&self) -> Result<ModelConfig> {
        let mut keys: Vec<&String> = self
            .content
            .metadata
            .keys()
            .filter(|k| k.starts_with(CONFIG_PREFIX))
            .collect();
        keys.sort();
        let mut root = serde_json::Map::new();
        for key in keys {
            let value = gguf_to_json(&self.content.metadata[key])
                .ok_or_else(|| self.err(format!("metadata field {key}: not a config value")))?;
            let path: Vec<&str> = key[CONFIG_PREFIX.len()..].split('.').collect();
            let (last, parents) = path.split_last().unwrap_or((&"", &[]));
            let mut obj = &mut root;
            for p in parents {
                obj = obj
                    .entry(p.to_string())
                    .or_insert_with(|| serde_json::Value::Object(Default::default()))
                    .as_object_mut()
                    .ok_or_else(|| {
                        self.err(format!("metadata field {key}: {p} is not an object"))
                    })?;
            }
            obj.insert(last.to_string(), value);
        }
        let cfg = ModelConfig::from_json(&serde_json::Value::Object(root).to_string())
            .map_err(|e| self.err(format!("{CONFIG_PREFIX}*: {e}")))?;
        let stored: Vec<usize> = self
            .array(SOURCE_KEY)?
            .iter()
            .map(|v| super::value_as_u64(v).map(|x| x as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| self.err(format!("metadata field {SOURCE_KEY}: expected integers")))?;
        let layout = cfg.layout();
        if stored != layout.source {
            return Err(self.err(format!(
                "{SOURCE_KEY} = {stored:?} does not match the layout of the stored config {:?} (inconsistent or \
                 tampered file)",
                layout.source
            )));
        }
        if self.architecture()? == "llama" {
            let l = self.llama_config()?;
            let shape = |c: &ModelConfig| {
                (
                    c.vocab_size,
                    c.hidden_size,
                    c.intermediate_size,
                    c.num_hidden_layers,
                    c.num_attention_heads,
                    c.num_key_value_heads,
                    c.head_dim(),
                    c.tie_word_embeddings,
                )
            };
            if shape(&l) != shape(&cfg) || cfg.recursion.is_some() {
                return Err(self.err(format!(
                    "{CONFIG_PREFIX}* describe {}, the llama.* metadata another shape (inconsistent or tampered file)",
                    cfg.variant_name()
                )));
            }
        }
        Ok(cfg)
    }

    /// Every tensor of the file as stored, with its stored shape.
    fn raw_tensors(&mut self) -> Result<Vec<(String, QTensor)>> {
        self.tensor_names()
            .into_iter()
            .map(|name| {
                let dims = self.dims(&name).unwrap_or_default();
                let t = self.tensor_raw(&name, &dims)?;
                Ok((name, t))
            })
            .collect()
    }

    /// The model of a mor-architecture file, every tensor dequantized to f32.
    pub(super) fn mor_model(&mut self, device: &Device) -> Result<MorModel> {
        let cfg = self.mor_config()?;
        let mut store = ParamStore::new(device, 0);
        for name in self.tensor_names() {
            let dims = self.dims(&name).unwrap_or_default();
            let t = self.tensor_f32(&name, &dims)?;
            store.insert(&name, &t)?;
        }
        MorModel::from_params(&cfg, store).map_err(|e| self.err(e.to_string()))
    }

    /// The frame and stored weights of a mor-architecture file for quantized inference.
    pub(super) fn mor_quantized_model(&mut self) -> Result<(MorModel, QuantizedWeights)> {
        let cfg = self.mor_config()?;
        let tensors = self.raw_tensors()?;
        frame(&cfg, tensors).map_err(|e| self.err(e.to_string()))
    }
}
