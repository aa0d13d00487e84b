//! GGUF weights kept in their stored (quantized) format for the engine's quantized kernels
//! ([`crate::engine::quant`]): the q/k row permutation is undone by moving whole quantized rows, and q/k/v and
//! gate/up are stacked by rows like the engine's dense weights (parts in different formats stay separate parts),
//! so no block is dequantized or re-quantized.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use super::GgufFile;
use crate::config::ModelConfig;
use crate::engine::quant::QMatrix;
use crate::error::Result;
use crate::model::params::ParamStore;
use crate::model::MorModel;

impl GgufFile {
    /// The model for quantized inference (any variant in mor's architecture, vanilla in `llama`'s): its config,
    /// norms, routers and RoPE from the file, and its matmul weights (with
    /// the token embedding) as stored, for [`CachedModel::quantized`](crate::engine::CachedModel::quantized). The
    /// returned [`MorModel`]'s own matmul weights and embedding are zero placeholders that occupy no memory (see
    /// [`ParamStore::insert_placeholder`]): it is only a frame for that engine, which never reads them, so the process
    /// holds the quantized weights alone.
    pub fn quantized_model(&mut self) -> Result<(MorModel, QuantizedWeights)> {
        if self.architecture()? == super::mor::ARCH {
            return self.mor_quantized_model();
        }
        let cfg = self.config()?;
        let weights = self.quantized_weights(&cfg)?;
        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        let mut store = ParamStore::new(&Device::Cpu, 0);
        store.insert_placeholder("model.embed_tokens.weight", &[v, d])?;
        if !cfg.tie_word_embeddings {
            store.insert_placeholder("lm_head.weight", &[v, d])?;
        }
        store.insert(
            "model.norm.weight",
            &self.tensor_f32("output_norm.weight", &[d])?,
        )?;
        let (hd, nh, nkv, f) = (
            cfg.head_dim(),
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
        );
        for l in 0..cfg.num_hidden_layers {
            let p = |n: &str| format!("model.layers.{l}.{n}.weight");
            for (hf, shape) in [
                ("self_attn.q_proj", [nh * hd, d]),
                ("self_attn.k_proj", [nkv * hd, d]),
                ("self_attn.v_proj", [nkv * hd, d]),
                ("self_attn.o_proj", [d, nh * hd]),
                ("mlp.gate_proj", [f, d]),
                ("mlp.up_proj", [f, d]),
                ("mlp.down_proj", [d, f]),
            ] {
                store.insert_placeholder(&p(hf), &shape)?;
            }
            for (g, hf) in [
                ("attn_norm", "input_layernorm"),
                ("ffn_norm", "post_attention_layernorm"),
            ] {
                let t = self.tensor_f32(&format!("blk.{l}.{g}.weight"), &[d])?;
                store.insert(&p(hf), &t)?;
            }
        }
        let model =
            MorModel::from_params(&cfg, store.frozen()).map_err(|e| self.err(e.to_string()))?;
        Ok((model, weights))
    }

    /// The matmul weights of every layer, the token embedding and the LM head as stored in the file, for the
    /// engine's quantized kernels ([`QuantizedWeights`]). A tensor in a format they do not run (including F32 / F16)
    /// is an error naming it and its type. Q/K rows are restored to the HF layout by moving whole quantized
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
            let qm = |r: &RawRows, what: &str| {
                r.to_qmatrix()
                    .map_err(|m| self.err(format!("tensor {what} {m}")))
            };
            let (qm_q, qm_k, qm_v) = (
                qm(&q, &format!("blk.{l}.attn_q.weight"))?,
                qm(&k, &format!("blk.{l}.attn_k.weight"))?,
                qm(&v, &format!("blk.{l}.attn_v.weight"))?,
            );
            let (qm_g, qm_u) = (
                qm(&gate, &format!("blk.{l}.ffn_gate.weight"))?,
                qm(&up, &format!("blk.{l}.ffn_up.weight"))?,
            );
            let stack = |parts: &[&QMatrix]| QMatrix::stack(parts).map_err(|m| self.err(m));
            layers.push(QuantizedLayer {
                qkv: stack(&[&qm_q, &qm_k, &qm_v])?,
                gate_up: stack(&[&qm_g, &qm_u])?,
                q: qm_q,
                o: qm(&o, &format!("blk.{l}.attn_output.weight"))?,
                down: qm(&down, &format!("blk.{l}.ffn_down.weight"))?,
            });
        }
        let mut table = |name: &str| -> Result<Arc<QMatrix>> {
            let t = self.tensor_raw(name, &[cfg.vocab_size, d])?;
            let r = RawRows::new(name, &t).map_err(|m| self.err(m))?;
            drop(t);
            Ok(Arc::new(
                r.to_qmatrix()
                    .map_err(|m| self.err(format!("tensor {name} {m}")))?,
            ))
        };
        let embed = table("token_embd.weight")?;
        let head = if cfg.tie_word_embeddings {
            Arc::clone(&embed)
        } else {
            table("output.weight")?
        };
        Ok(QuantizedWeights {
            layers,
            embed,
            head,
        })
    }
}

/// The matmul weights of one layer as stored in a GGUF file, in HF [out, in] row order (see
/// [`GgufFile::quantized_weights`]); fused like the inference engine's dense weights.
#[derive(Debug)]
pub struct QuantizedLayer {
    /// Queries, keys, values stacked by rows: [(H + 2·kv)·hd, d].
    pub qkv: QMatrix,
    /// Queries only: [H·hd, d].
    pub q: QMatrix,
    /// Output projection: [d, H·hd].
    pub o: QMatrix,
    /// Gate then up projection: [2f, d].
    pub gate_up: QMatrix,
    /// Down projection: [d, f].
    pub down: QMatrix,
}

/// Every matmul weight of a model kept in its stored format (e.g. Q4_1), for the engine's quantized kernels.
#[derive(Debug)]
pub struct QuantizedWeights {
    /// One entry per unique layer, in [`Layout::unique_layers`](crate::config::layout::Layout::unique_layers) order
    /// (every layer of a vanilla model); unrolled layers sharing weights share these blocks.
    pub layers: Vec<QuantizedLayer>,
    /// The token embedding [vocab, d] (rows are dequantized on lookup).
    pub embed: Arc<QMatrix>,
    /// The LM head [vocab, d] (the token embedding itself when tied).
    pub head: Arc<QMatrix>,
}

impl QuantizedWeights {
    /// Bytes held by the stored weights (a tied head counted once).
    pub fn bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| l.qkv.bytes() + l.o.bytes() + l.gate_up.bytes() + l.down.bytes())
            .sum();
        let head = if Arc::ptr_eq(&self.embed, &self.head) {
            0
        } else {
            self.head.bytes()
        };
        layers + self.embed.bytes() + head
    }

    /// The stored formats, most frequent (by bytes) first, e.g. "Q4_1" or "Q5_0+Q6_K+Q4_K".
    pub fn formats(&self) -> String {
        let mut by: Vec<(crate::engine::quant::QFormat, usize)> = Vec::new();
        let all = self
            .layers
            .iter()
            .flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down])
            .chain([&*self.embed, &*self.head]);
        for (fmt, bytes) in all.flat_map(QMatrix::formats) {
            match by.iter_mut().find(|(f, _)| *f == fmt) {
                Some(e) => e.1 += bytes,
                None => by.push((fmt, bytes)),
            }
        }
        by.sort_by_key(|e| std::cmp::Reverse(e.1));
        let names: Vec<String> = by.iter().map(|(f, _)| f.to_string()).collect();
        names.join("+")
    }
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

    /// Repack for the quantized kernels; the error names the type when they cannot run it.
    fn to_qmatrix(&self) -> std::result::Result<QMatrix, String> {
        QMatrix::from_ggml(self.dtype, self.rows(), self.cols, &self.data)
    }
}
