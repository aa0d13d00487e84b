//! GGUF weights kept in their stored (quantized) format for candle's quantized matmul: the q/k row permutation
//! is undone by moving whole quantized rows, and q/k/v and gate/up are stacked by rows like the engine's dense
//! weights, so no block is dequantized or re-quantized.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use super::GgufFile;
use crate::config::ModelConfig;
use crate::error::Result;

impl GgufFile {
    /// The matmul weights of every layer and the LM head as stored in the file, for inference with candle's
    /// quantized matmul ([`QuantizedWeights`]). Q/K rows are restored to the HF layout by moving whole quantized
    /// rows (blocks never straddle rows), so nothing is dequantized or re-quantized.
    pub fn quantized_weights(&mut self, cfg: &ModelConfig) -> Result<QuantizedWeights> {
        let (d, hd, ffn) = (cfg.hidden_size, cfg.head_dim(), cfg.intermediate_size);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let mut get = |g: &str, shape: &[usize]| -> Result<RawRows> {
                let name = format!("blk.{l}.{g}.weight");
                let t = self.tensor_raw(&name, shape)?;
                RawRows::new(&name, &t).map_err(|m| self.err(m))
            };
            let q = get("attn_q", &[nh * hd, d])?.unpermute_qk(nh);
            let k = get("attn_k", &[nkv * hd, d])?.unpermute_qk(nkv);
            let v = get("attn_v", &[nkv * hd, d])?;
            let o = get("attn_output", &[d, nh * hd])?;
            let gate = get("ffn_gate", &[ffn, d])?;
            let up = get("ffn_up", &[ffn, d])?;
            let down = get("ffn_down", &[d, ffn])?;
            let cat = |parts: &[&RawRows], what: &str| {
                RawRows::cat(parts)
                    .map_err(|m| self.err(format!("layer {l} {what}: {m}")))?
                    .to_qtensor()
            };
            layers.push(QuantizedLayer {
                qkv: cat(&[&q, &k, &v], "q/k/v")?,
                q: q.to_qtensor()?,
                o: o.to_qtensor()?,
                gate_up: cat(&[&gate, &up], "gate/up")?,
                down: down.to_qtensor()?,
            });
        }
        let head_name = if cfg.tie_word_embeddings {
            "token_embd.weight"
        } else {
            "output.weight"
        };
        let head = self.tensor_raw(head_name, &[cfg.vocab_size, d])?;
        Ok(QuantizedWeights { layers, head })
    }
}

/// The matmul weights of one layer as stored in a GGUF file, in HF [out, in] row order (see
/// [`GgufFile::quantized_weights`]); fused like the inference engine's dense weights.
#[derive(Debug)]
pub struct QuantizedLayer {
    /// Queries, keys, values stacked by rows: [(H + 2·kv)·hd, d].
    pub qkv: QTensor,
    /// Queries only: [H·hd, d].
    pub q: QTensor,
    /// Output projection: [d, H·hd].
    pub o: QTensor,
    /// Gate then up projection: [2f, d].
    pub gate_up: QTensor,
    /// Down projection: [d, f].
    pub down: QTensor,
}

/// Every matmul weight of a vanilla GGUF model kept in its stored format (e.g. Q4_1), for inference with candle's
/// quantized matmul.
#[derive(Debug)]
pub struct QuantizedWeights {
    /// One entry per layer.
    pub layers: Vec<QuantizedLayer>,
    /// The LM head [vocab, d] (the token embedding when tied).
    pub head: QTensor,
}

/// A 2-D GGUF tensor as raw bytes, one row after another; rows can be moved and stacked without touching the
/// quantized blocks inside them.
struct RawRows {
    dtype: GgmlDType,
    cols: usize,
    row_bytes: usize,
    data: Vec<u8>,
}

impl RawRows {
    fn new(name: &str, t: &QTensor) -> std::result::Result<Self, String> {
        let dims = t.shape().dims().to_vec();
        let dtype = t.dtype();
        let [rows, cols] = dims[..] else {
            return Err(format!(
                "tensor {name}: expected 2 dimensions, found {dims:?}"
            ));
        };
        if cols % dtype.block_size() != 0 {
            return Err(format!(
                "tensor {name}: {cols} columns are not a whole number of {dtype:?} blocks"
            ));
        }
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        let data = t
            .data()
            .map_err(|e| format!("tensor {name}: {e}"))?
            .into_owned();
        if data.len() != rows * row_bytes {
            return Err(format!(
                "tensor {name}: {} bytes for {rows} rows of {row_bytes}",
                data.len()
            ));
        }
        Ok(RawRows {
            dtype,
            cols,
            row_bytes,
            data,
        })
    }

    fn rows(&self) -> usize {
        self.data.len() / self.row_bytes
    }

    /// Undo llama.cpp's q/k row permutation (the byte-level counterpart of [`unpermute_qk`]): HF row
    /// `h·hd + j·hd/2 + i` is GGUF row `h·hd + 2i + j`.
    fn unpermute_qk(self, n_head: usize) -> Self {
        let hd = self.rows() / n_head;
        let half = hd / 2;
        let mut data = Vec::with_capacity(self.data.len());
        for r in 0..self.rows() {
            let (h, rem) = (r / hd, r % hd);
            let src = h * hd + 2 * (rem % half) + rem / half;
            data.extend_from_slice(&self.data[src * self.row_bytes..(src + 1) * self.row_bytes]);
        }
        RawRows { data, ..self }
    }

    /// Stack tensors of the same format and width by rows.
    fn cat(parts: &[&RawRows]) -> std::result::Result<RawRows, String> {
        let first = parts[0];
        if let Some(p) = parts
            .iter()
            .find(|p| p.dtype != first.dtype || p.cols != first.cols)
        {
            return Err(format!(
                "mixed storage ({:?} × {} and {:?} × {}) cannot be fused for quantized inference",
                first.dtype, first.cols, p.dtype, p.cols
            ));
        }
        Ok(RawRows {
            dtype: first.dtype,
            cols: first.cols,
            row_bytes: first.row_bytes,
            data: parts.iter().flat_map(|p| p.data.iter().copied()).collect(),
        })
    }

    fn to_qtensor(&self) -> Result<QTensor> {
        Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
            self.dtype,
            &self.data,
            vec![self.rows(), self.cols],
            &Device::Cpu,
        )?)
    }
}
