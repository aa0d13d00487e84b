//! GGUF (llama.cpp) import and export of vanilla Llama models, and mor's own GGUF architecture for every variant
//! (`mor.rs`, docs/gguf.md).
//!
//! Import reads the `llama.*` metadata into a [`ModelConfig`], dequantizes every tensor to f32 (candle handles
//! F32/F16/BF16 and the Q4/Q5/Q8/K quantizations), renames llama.cpp tensors to the Hugging Face names mor uses,
//! undoes llama.cpp's q/k row permutation, and rebuilds the byte-level BPE tokenizer from
//! `tokenizer.ggml.*`, so a GGUF file alone runs the model.
//!
//! The q/k permutation: llama.cpp's HF converter reorders the rows of each q/k head from the HF "rotate half"
//! layout (first half of the head's rows = real parts, second half = imaginary parts) to the interleaved layout
//! its RoPE kernel expects: HF row `h·hd + j·hd/2 + i` (j ∈ {0,1}, i < hd/2) becomes GGUF row `h·hd + 2i + j`.
//! [`unpermute_qk`] is the inverse, [`permute_qk`] the forward map; the tests check both against an independent
//! implementation that uses the interleaved RoPE on the permuted weights.
//!
//! Files: this module reads the header, config and tensors; `tokenizer.rs` rebuilds the tokenizer from
//! `tokenizer.ggml.*` (and writes it back); `export.rs` writes GGUF files; `quantized.rs` gives the engine the stored
//! quantized weights; `mor.rs` quantizes any mor model into mor's architecture (vanilla ones into `llama`) and reads
//! it back.
//!
//! Export ([`export_gguf`]) writes a vanilla model as an F32 GGUF with the same conventions (and, if given, the
//! tokenizer), so llama.cpp-family tools can read mor checkpoints.

mod export;
mod mor;
mod quantized;
mod tokenizer;

pub use export::export_gguf;
pub use mor::{quantize_gguf, quantize_model, QuantType, QuantizedModel};
pub use quantized::{QuantizedLayer, QuantizedWeights};

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor, Var};

use crate::config::ModelConfig;
use crate::data::Tokenizer;
use crate::error::{MorError, Result};
use crate::model::params::ParamStore;
use crate::model::MorModel;

/// An opened GGUF file: its parsed header (metadata and tensor directory) and a reader for tensor data.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .field("metadata", &self.content.metadata.len())
            .finish()
    }
}

/// The per-layer tensors: (llama.cpp suffix, HF suffix).
const LAYER_TENSORS: [(&str, &str); 9] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

impl GgufFile {
    /// Parse the header of `path` and check that every tensor's data lies inside the file (so a truncated download
    /// fails here, naming the first tensor that is cut off, instead of half-way through loading).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| MorError::io(path, e))?;
        let file_len = file.metadata().map_err(|e| MorError::io(path, e))?.len();
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| {
            MorError::checkpoint(
                path,
                format!(
                    "not a readable GGUF file (truncated or corrupt header?): {}",
                    first_line(&e)
                ),
            )
        })?;
        let mut infos: Vec<(&String, &gguf_file::TensorInfo)> =
            content.tensor_infos.iter().collect();
        infos.sort_by_key(|(_, i)| i.offset);
        for (name, info) in infos {
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            if !elems.is_multiple_of(block) {
                return Err(MorError::checkpoint(
                    path,
                    format!(
                        "tensor {name}: {elems} elements is not a multiple of the {:?} block size {block}",
                        info.ggml_dtype
                    ),
                ));
            }
            let bytes = (elems / block * info.ggml_dtype.type_size()) as u64;
            let end = content
                .tensor_data_offset
                .saturating_add(info.offset)
                .saturating_add(bytes);
            if end > file_len {
                return Err(MorError::checkpoint(
                    path,
                    format!(
                        "truncated file: tensor {name} needs bytes up to {end}, the file has {file_len}"
                    ),
                ));
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All metadata entries.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// The chat template (`tokenizer.chat_template`, Jinja), if the file has one.
    pub fn chat_template(&self) -> Option<&str> {
        match self.content.metadata.get("tokenizer.chat_template") {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// Tensor names in the file, sorted.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        v.sort();
        v
    }

    fn err(&self, msg: impl Into<String>) -> MorError {
        MorError::checkpoint(&self.path, msg)
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| self.err(format!("missing metadata field {key}")))
    }

    /// An integer metadata field of any integer type.
    fn uint(&self, key: &str) -> Result<u64> {
        let v = self.get(key)?;
        value_as_u64(v).ok_or_else(|| {
            self.err(format!(
                "metadata field {key}: expected a non-negative integer, found {v:?}"
            ))
        })
    }

    fn opt_uint(&self, key: &str) -> Result<Option<u64>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(_) => self.uint(key).map(Some),
        }
    }

    fn float(&self, key: &str) -> Result<f64> {
        match self.get(key)? {
            Value::F32(x) => Ok(f64::from(*x)),
            Value::F64(x) => Ok(*x),
            v => value_as_u64(v).map(|x| x as f64).ok_or_else(|| {
                self.err(format!(
                    "metadata field {key}: expected a number, found {v:?}"
                ))
            }),
        }
    }

    fn string(&self, key: &str) -> Result<&str> {
        match self.get(key)? {
            Value::String(s) => Ok(s),
            v => Err(self.err(format!(
                "metadata field {key}: expected a string, found {:?}",
                v.value_type()
            ))),
        }
    }

    fn array(&self, key: &str) -> Result<&Vec<Value>> {
        match self.get(key)? {
            Value::Array(a) => Ok(a),
            v => Err(self.err(format!(
                "metadata field {key}: expected an array, found {:?}",
                v.value_type()
            ))),
        }
    }

    fn dims(&self, name: &str) -> Option<Vec<usize>> {
        self.content
            .tensor_infos
            .get(name)
            .map(|i| i.shape.dims().to_vec())
    }

    /// The model configuration: from the `llama.*` metadata (a vanilla model) or from the `mor.config.*` keys of
    /// mor's architecture (any variant).
    pub fn config(&self) -> Result<ModelConfig> {
        match self.architecture()? {
            // Vanilla files written by mor carry the exact config too (llama.cpp ignores it).
            "llama" if self.has_mor_config() => self.mor_config(),
            "llama" => self.llama_config(),
            mor::ARCH => self.mor_config(),
            arch => Err(self.err(format!(
                "general.architecture = {arch:?}: only llama and mor models are supported"
            ))),
        }
    }

    /// Whether the file carries a tokenizer (`tokenizer.ggml.model`).
    pub fn has_tokenizer(&self) -> bool {
        self.content.metadata.contains_key("tokenizer.ggml.model")
    }

    fn llama_config(&self) -> Result<ModelConfig> {
        let n = |k: &str| -> Result<usize> { Ok(self.uint(&format!("llama.{k}"))? as usize) };
        let d = n("embedding_length")?;
        let heads = n("attention.head_count")?;
        let kv_heads = match self.opt_uint("llama.attention.head_count_kv")? {
            Some(k) => k as usize,
            None => heads,
        };
        if heads == 0 || kv_heads == 0 {
            return Err(self.err("llama.attention.head_count(_kv) must be positive"));
        }
        let head_dim = match self.opt_uint("llama.attention.key_length")? {
            Some(k) => k as usize,
            None => d / heads,
        };
        if let Some(r) = self.opt_uint("llama.rope.dimension_count")? {
            if r as usize != head_dim {
                return Err(self.err(format!(
                    "llama.rope.dimension_count = {r} differs from head_dim = {head_dim}: partial RoPE is not supported"
                )));
            }
        }
        if self
            .content
            .metadata
            .contains_key("llama.rope.scaling.type")
            && self.string("llama.rope.scaling.type")? != "none"
        {
            return Err(self.err("llama.rope.scaling.type: RoPE scaling is not supported"));
        }
        if self.content.metadata.contains_key("llama.expert_count")
            && self.uint("llama.expert_count")? > 0
        {
            return Err(self.err("llama.expert_count: mixture-of-experts models are not supported"));
        }
        let embd = self
            .dims("token_embd.weight")
            .ok_or_else(|| self.err("missing tensor token_embd.weight"))?;
        let vocab = match self.opt_uint("llama.vocab_size")? {
            Some(v) => v as usize,
            None => embd[0],
        };
        let rope_theta = if self.content.metadata.contains_key("llama.rope.freq_base") {
            self.float("llama.rope.freq_base")?
        } else {
            10000.0
        };
        let rms = self.float("llama.attention.layer_norm_rms_epsilon")?;
        let ctx = match self.opt_uint("llama.context_length")? {
            Some(c) => c as usize,
            None => 2048,
        };
        let tok = |k: &str| -> Result<Option<u32>> {
            Ok(self
                .opt_uint(&format!("tokenizer.ggml.{k}"))?
                .map(|x| x as u32))
        };
        let cfg = serde_json::json!({
            "vocab_size": vocab,
            "hidden_size": d,
            "intermediate_size": n("feed_forward_length")?,
            "num_hidden_layers": n("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "rms_norm_eps": rms,
            "rope_theta": rope_theta,
            "max_position_embeddings": ctx,
            "tie_word_embeddings": !self.content.tensor_infos.contains_key("output.weight"),
            "bos_token_id": tok("bos_token_id")?,
            "eos_token_id": tok("eos_token_id")?,
            "pad_token_id": tok("padding_token_id")?,
        });
        ModelConfig::from_json(&cfg.to_string()).map_err(|e| self.err(e.to_string()))
    }

    /// Read tensor `name` dequantized to f32, checking its shape (HF [out, in] order) against `shape`.
    pub fn tensor_f32(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let q = self.tensor_raw(name, shape)?;
        let dtype = q.dtype();
        q.dequantize(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| {
                MorError::checkpoint(
                    &self.path,
                    format!(
                        "tensor {name}: cannot dequantize {dtype:?}: {}",
                        first_line(&e)
                    ),
                )
            })
    }

    /// All weights as f32 under mor's (HF Llama) names, with q/k rows restored to the HF layout.
    pub fn params(&mut self, cfg: &ModelConfig, device: &Device) -> Result<ParamStore> {
        self.params_as(cfg, device, DType::F32)
    }

    /// [`GgufFile::params`] in `dtype`: each tensor is converted as it is read, so loading bf16 weights never holds
    /// an f32 copy of the whole model (peak memory: the model in `dtype` plus one f32 tensor).
    fn params_as(
        &mut self,
        cfg: &ModelConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<ParamStore> {
        let d = cfg.hidden_size;
        let hd = cfg.head_dim();
        let (nh, nkv, ffn) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
        );
        let mut store = ParamStore::with_dtype(device, 0, dtype);
        let v = cfg.vocab_size;
        self.read_param(
            &mut store,
            "token_embd.weight",
            "model.embed_tokens.weight",
            &[v, d],
            None,
        )?;
        self.read_param(
            &mut store,
            "output_norm.weight",
            "model.norm.weight",
            &[d],
            None,
        )?;
        if !cfg.tie_word_embeddings {
            self.read_param(&mut store, "output.weight", "lm_head.weight", &[v, d], None)?;
        }
        for l in 0..cfg.num_hidden_layers {
            for (g, hf) in LAYER_TENSORS {
                let (shape, heads): (Vec<usize>, _) = match g {
                    "attn_q" => (vec![nh * hd, d], Some(nh)),
                    "attn_k" => (vec![nkv * hd, d], Some(nkv)),
                    "attn_v" => (vec![nkv * hd, d], None),
                    "attn_output" => (vec![d, nh * hd], None),
                    "ffn_gate" | "ffn_up" => (vec![ffn, d], None),
                    "ffn_down" => (vec![d, ffn], None),
                    _ => (vec![d], None),
                };
                let (name, hf) = (
                    format!("blk.{l}.{g}.weight"),
                    format!("model.layers.{l}.{hf}.weight"),
                );
                self.read_param(&mut store, &name, &hf, &shape, heads)?;
            }
        }
        Ok(store)
    }

    /// Read tensor `name` into `store` as parameter `hf` in the store's dtype, undoing llama.cpp's q/k row
    /// permutation when `heads` is given. Float tensors (F32, F16, BF16) stream from the file straight into the
    /// parameter's own buffer, so a tensor costs one allocation (llama.cpp maps the file instead; a copy per tensor
    /// would raise peak memory by the largest tensors); quantized ones are dequantized through candle.
    fn read_param(
        &mut self,
        store: &mut ParamStore,
        name: &str,
        hf: &str,
        shape: &[usize],
        heads: Option<usize>,
    ) -> Result<()> {
        match (self.read_float(name, shape, store.dtype())?, heads) {
            (Some(v), None) => store.insert_var(hf, v),
            (Some(v), Some(h)) => store.insert(hf, &unpermute_qk(v.as_tensor(), h)?),
            (None, heads) => {
                let t = self.tensor_f32(name, shape)?;
                let t = match heads {
                    Some(h) => unpermute_qk(&t, h)?,
                    None => t,
                };
                store.insert(hf, &t)
            }
        }
    }

    /// Tensor `name` stored as F32, F16 or BF16, converted to `dtype` (F32 or BF16) while it is read in chunks;
    /// `None` for other stored or requested types.
    fn read_float(&mut self, name: &str, shape: &[usize], dtype: DType) -> Result<Option<Var>> {
        use candle_core::quantized::GgmlDType as G;
        use std::io::{Read, Seek, SeekFrom};
        self.check_shape(name, shape)?;
        let info = &self.content.tensor_infos[name];
        let (stored, width) = match info.ggml_dtype {
            G::F32 => (G::F32, 4),
            G::F16 => (G::F16, 2),
            G::BF16 => (G::BF16, 2),
            _ => return Ok(None),
        };
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Ok(None);
        }
        let n: usize = shape.iter().product();
        let start = self.content.tensor_data_offset + info.offset;
        let io_err = |e: std::io::Error| {
            MorError::checkpoint(&self.path, format!("reading tensor {name}: {e}"))
        };
        self.reader.seek(SeekFrom::Start(start)).map_err(io_err)?;
        let decode = |b: &[u8]| -> f32 {
            match stored {
                G::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                G::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                _ => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            }
        };
        let mut buf = vec![0u8; (1 << 16) * width];
        let mut f32s = Vec::with_capacity(if dtype == DType::F32 { n } else { 0 });
        let mut bf16s = Vec::with_capacity(if dtype == DType::BF16 { n } else { 0 });
        let mut left = n;
        while left > 0 {
            let k = left.min(1 << 16);
            let chunk = &mut buf[..k * width];
            self.reader.read_exact(chunk).map_err(io_err)?;
            for b in chunk.chunks_exact(width) {
                match (dtype, stored) {
                    (DType::F32, _) => f32s.push(decode(b)),
                    // bf16 → bf16 is a copy of the bits; f32 / f16 → bf16 rounds to nearest even like candle's
                    // `to_dtype`.
                    (_, G::BF16) => bf16s.push(half::bf16::from_le_bytes([b[0], b[1]])),
                    _ => bf16s.push(half::bf16::from_f32(decode(b))),
                }
            }
            left -= k;
        }
        let v = if dtype == DType::F32 {
            Var::from_vec(f32s, shape, &Device::Cpu)?
        } else {
            Var::from_vec(bf16s, shape, &Device::Cpu)?
        };
        Ok(Some(v))
    }

    /// Check that tensor `name` exists with `shape` (HF [out, in] order).
    fn check_shape(&self, name: &str, shape: &[usize]) -> Result<()> {
        let dims = self
            .dims(name)
            .ok_or_else(|| self.err(format!("missing tensor {name}")))?;
        if dims != shape {
            return Err(self.err(format!(
                "tensor {name}: expected shape {shape:?}, found {dims:?}"
            )));
        }
        Ok(())
    }

    /// Read tensor `name` as stored (quantized or not), checking its shape (HF [out, in] order) against `shape`.
    fn tensor_raw(&mut self, name: &str, shape: &[usize]) -> Result<QTensor> {
        self.check_shape(name, shape)?;
        self.content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| {
                MorError::checkpoint(
                    &self.path,
                    format!("reading tensor {name}: {}", first_line(&e)),
                )
            })
    }

    /// The model stored in the file, all weights dequantized to f32.
    pub fn model(&mut self, device: &Device) -> Result<MorModel> {
        self.model_as(device, DType::F32)
    }

    /// The model stored in the file with its weights in `dtype` (f32, or bf16 for the engine's bf16 path); a
    /// llama-architecture file is converted tensor by tensor as it is read.
    pub fn model_as(&mut self, device: &Device, dtype: DType) -> Result<MorModel> {
        if self.architecture()? == mor::ARCH {
            let m = self.mor_model(device)?;
            return if dtype == DType::F32 {
                Ok(m)
            } else {
                m.to_dtype(dtype)
            };
        }
        let cfg = self.config()?;
        let store = self.params_as(&cfg, device, dtype)?;
        MorModel::from_params(&cfg, store).map_err(|e| match e {
            MorError::Config(m) => self.err(m),
            other => other,
        })
    }
}

/// The first line of a candle error (its message, without the backtrace candle appends when `RUST_BACKTRACE` is
/// set), so file errors stay one line.
fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

fn value_as_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(u64::from(x)),
        Value::U16(x) => Some(u64::from(x)),
        Value::U32(x) => Some(u64::from(x)),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

/// Import a GGUF file: the vanilla model (f32) and its tokenizer.
pub fn import_gguf(path: &Path, device: &Device) -> Result<(MorModel, Tokenizer)> {
    let mut f = GgufFile::open(path)?;
    let tok = f.tokenizer()?;
    let model = f.model(device)?;
    Ok((model, tok))
}

/// Check that `w` [n_head·hd, d] splits into heads of even width.
fn head_split(w: &Tensor, n_head: usize) -> Result<(usize, usize, usize)> {
    let (rows, cols) = w.dims2()?;
    if n_head == 0 || !rows.is_multiple_of(n_head) || !(rows / n_head).is_multiple_of(2) {
        return Err(MorError::Config(format!(
            "q/k weight with {rows} rows cannot be split into {n_head} heads of even width"
        )));
    }
    Ok((rows / n_head, cols, rows))
}

/// HF → llama.cpp row order of a q/k projection (the converter's `permute`): per head, rows
/// (2, hd/2) become (hd/2, 2), i.e. HF row `j·hd/2 + i` moves to `2i + j`.
pub fn permute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (hd, cols, rows) = head_split(w, n_head)?;
    Ok(w.reshape((n_head, 2, hd / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// llama.cpp → HF row order of a q/k projection: the inverse of [`permute_qk`]. Per head, rows (hd/2, 2)
/// become (2, hd/2), i.e. GGUF row `2i + j` moves back to `j·hd/2 + i`.
pub fn unpermute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (hd, cols, rows) = head_split(w, n_head)?;
    Ok(w.reshape((n_head, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_moves_rows_as_documented_and_inverts() {
        // 2 heads of width 4, 1 column holding the row index.
        let w = Tensor::arange(0f32, 8.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        let p: Vec<f32> = permute_qk(&w, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // HF row j·2 + i → GGUF row 2i + j within each head.
        assert_eq!(p, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        let back: Vec<f32> = unpermute_qk(&permute_qk(&w, 2).unwrap(), 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(back, (0..8).map(|x| x as f32).collect::<Vec<_>>());
        assert!(permute_qk(&w, 3).is_err());
    }
}
