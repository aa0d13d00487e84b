//! The Llama decoder layer (docs/architecture.md S1): pre-RMSNorm, GQA attention with RoPE, SwiGLU MLP, no biases.
//!
//! Two implementations of the norm, RoPE, attention and the SwiGLU gate: the fused ops of [`crate::model::ops`]
//! (the default: they keep far less for the backward pass) and the reference composition of primitives whose
//! gradients were checked (`tests/gradcheck.rs`; candle's own fused `rms_norm`, `softmax_last_dim` and `rope` drop
//! gradients silently, docs/architecture.md S10). `set_fused(false)` selects the composition; `tests/fused.rs`
//! checks that both agree.

use candle_core::{DType, Device, Tensor, D};

use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::ops;
use crate::model::params::{Init, ParamStore};

/// `x @ wᵀ` for x of any rank ≥ 2 and a [out, in] weight.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inner = dims[dims.len() - 1];
    let rows = x.elem_count() / inner;
    let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
    let mut out = dims;
    let last = out.len() - 1;
    out[last] = w.dim(0)?;
    Ok(y.reshape(out)?)
}

/// Softmax over the last dim, composed (max-subtracted) so autograd sees it.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::softmax(x, D::Minus1)?)
}

/// log-softmax over the last dim, composed.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// RMSNorm: x / sqrt(mean(x²) + ε) · w.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
    fused: bool,
}

impl RmsNorm {
    /// Load or create the norm weight `name`.
    pub fn new(store: &mut ParamStore, name: &str, d: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: store.get_or_init(name, &[d], Init::Ones)?,
            eps,
            fused: true,
        })
    }

    /// Use the fused op (default) or the composed reference.
    pub fn set_fused(&mut self, on: bool) {
        self.fused = on;
    }

    /// The scale weight `[d]` and ε (the KV-cached engine applies the norm row by row, `crate::engine`).
    pub fn parts(&self) -> (&Tensor, f64) {
        (&self.weight, self.eps)
    }

    /// Normalise over the last dim.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.fused {
            return ops::rms_norm(x, &self.weight, self.eps);
        }
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (ms + self.eps)?.sqrt()?.recip()?;
        Ok(x.broadcast_mul(&inv)?.broadcast_mul(&self.weight)?)
    }
}

/// RoPE tables (HF "rotate_half" convention): cos/sin of shape [max_pos, head_dim].
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Precompute tables for `max_pos` positions.
    pub fn new(cfg: &ModelConfig, max_pos: usize, device: &Device, dtype: DType) -> Result<Self> {
        let hd = cfg.head_dim();
        let half = hd / 2;
        let mut cos = Vec::with_capacity(max_pos * hd);
        let mut sin = Vec::with_capacity(max_pos * hd);
        for p in 0..max_pos {
            let row: Vec<f64> = (0..half)
                .map(|i| p as f64 / cfg.rope_theta.powf(2.0 * i as f64 / hd as f64))
                .collect();
            for _ in 0..2 {
                cos.extend(row.iter().map(|a| a.cos() as f32));
                sin.extend(row.iter().map(|a| a.sin() as f32));
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (max_pos, hd), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (max_pos, hd), device)?.to_dtype(dtype)?,
        })
    }

    /// Number of positions the tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// cos/sin gathered at `positions` ([B, n] u32), shaped [B, 1, n, head_dim] to broadcast over heads.
    pub fn at(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, n) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let hd = self.cos.dim(1)?;
        let c = self.cos.index_select(&flat, 0)?.reshape((b, 1, n, hd))?;
        let s = self.sin.index_select(&flat, 0)?.reshape((b, 1, n, hd))?;
        Ok((c, s))
    }

    /// Rotate x [B, H, n, hd] by the gathered tables.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let hd = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
        let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?)?)
    }
}

/// Keys and values of one attention layer, after RoPE, shaped [B, n_kv, n, head_dim].
#[derive(Debug, Clone)]
pub struct KeyValue {
    /// Keys (rotated).
    pub k: Tensor,
    /// Values.
    pub v: Tensor,
}

/// Grouped-query attention with RoPE.
#[derive(Debug, Clone)]
pub struct Attention {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    fused: bool,
}

impl Attention {
    fn new(store: &mut ParamStore, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim());
        let (h, kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let init = Init::Normal(cfg.initializer_range);
        Ok(Attention {
            q: store.get_or_init(&format!("{prefix}.q_proj.weight"), &[h * hd, d], init)?,
            k: store.get_or_init(&format!("{prefix}.k_proj.weight"), &[kv * hd, d], init)?,
            v: store.get_or_init(&format!("{prefix}.v_proj.weight"), &[kv * hd, d], init)?,
            o: store.get_or_init(&format!("{prefix}.o_proj.weight"), &[d, h * hd], init)?,
            n_heads: h,
            n_kv: kv,
            head_dim: hd,
            fused: true,
        })
    }

    /// Use the fused ops (default) or the composed reference.
    pub fn set_fused(&mut self, on: bool) {
        self.fused = on;
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if self.fused {
            ops::rope(x, cos, sin)
        } else {
            Rope::apply(x, cos, sin)
        }
    }

    /// (query heads, key/value heads, head width).
    pub fn dims(&self) -> (usize, usize, usize) {
        (self.n_heads, self.n_kv, self.head_dim)
    }

    /// The q, k, v and o projection weights ([out, in]); the KV-cached engine fuses them (`crate::engine`).
    pub fn weights(&self) -> [&Tensor; 4] {
        [&self.q, &self.k, &self.v, &self.o]
    }

    fn heads(&self, x: &Tensor, n_heads: usize) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        Ok(x.reshape((b, n, n_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// Project x [B, n, d] to rotated keys and values.
    pub fn key_value(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<KeyValue> {
        let k = self.heads(&linear(x, &self.k)?, self.n_kv)?;
        let v = self.heads(&linear(x, &self.v)?, self.n_kv)?;
        Ok(KeyValue {
            k: self.rope(&k, cos, sin)?,
            v,
        })
    }

    /// Attention of the queries of x [B, n, d] over `kv` ([B, n_kv, m, hd]) with an additive mask [B, 1, n, m].
    pub fn attend(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        kv: &KeyValue,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let m = kv.k.dim(2)?;
        let rep = self.n_heads / self.n_kv;
        let q = self.rope(&self.heads(&linear(x, &self.q)?, self.n_heads)?, cos, sin)?;
        // Query heads kv·rep .. kv·rep+rep share key head kv (HF repeat_kv), so group them without copying K/V.
        let q = q.reshape((b, self.n_kv, rep * n, self.head_dim))?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = if self.fused {
            ops::attention(&q, &kv.k, &kv.v, mask, scale)?
        } else {
            let scores = (q.matmul(&kv.k.t()?)? * scale)?
                .reshape((b, self.n_heads, n, m))?
                .broadcast_add(mask)?;
            softmax_last(&scores)?
                .reshape((b, self.n_kv, rep * n, m))?
                .matmul(&kv.v)?
        };
        let out = out
            .reshape((b, self.n_heads, n, self.head_dim))?
            .transpose(1, 2)?
            .reshape((b, n, self.n_heads * self.head_dim))?;
        linear(&out, &self.o)
    }
}

/// SwiGLU MLP: down(silu(gate(x)) · up(x)).
#[derive(Debug, Clone)]
pub struct Mlp {
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    fused: bool,
}

impl Mlp {
    fn new(store: &mut ParamStore, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        let init = Init::Normal(cfg.initializer_range);
        Ok(Mlp {
            gate: store.get_or_init(&format!("{prefix}.gate_proj.weight"), &[f, d], init)?,
            up: store.get_or_init(&format!("{prefix}.up_proj.weight"), &[f, d], init)?,
            down: store.get_or_init(&format!("{prefix}.down_proj.weight"), &[d, f], init)?,
            fused: true,
        })
    }

    /// Use the fused gate (default) or the composed reference.
    pub fn set_fused(&mut self, on: bool) {
        self.fused = on;
    }

    /// The gate, up and down projection weights ([out, in]); the KV-cached engine fuses them (`crate::engine`).
    pub fn weights(&self) -> [&Tensor; 3] {
        [&self.gate, &self.up, &self.down]
    }

    /// Apply the MLP.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = linear(x, &self.gate)?;
        let u = linear(x, &self.up)?;
        let act = if self.fused {
            ops::swiglu(&g, &u)?
        } else {
            ((&g * candle_nn::ops::sigmoid(&g)?)? * u)?
        };
        linear(&act, &self.down)
    }
}

/// One pre-norm decoder layer: h = x + Attn(norm(x)); out = h + MLP(norm(h)).
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    /// Self-attention.
    pub attn: Attention,
    mlp: Mlp,
    input_norm: RmsNorm,
    post_attn_norm: RmsNorm,
}

/// Where a layer's attention takes its keys and values from.
pub enum KvSource<'a> {
    /// Compute them from this layer's own input.
    Own,
    /// Reuse another layer's (recursive KV sharing); only queries are computed.
    Shared(&'a KeyValue),
}

impl DecoderLayer {
    /// Load or create the layer whose parameters live under `prefix` (e.g. `model.layers.3`).
    pub fn new(store: &mut ParamStore, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(DecoderLayer {
            attn: Attention::new(store, &format!("{prefix}.self_attn"), cfg)?,
            mlp: Mlp::new(store, &format!("{prefix}.mlp"), cfg)?,
            input_norm: RmsNorm::new(store, &format!("{prefix}.input_layernorm.weight"), d, eps)?,
            post_attn_norm: RmsNorm::new(
                store,
                &format!("{prefix}.post_attention_layernorm.weight"),
                d,
                eps,
            )?,
        })
    }

    /// The normalised attention input, from which keys/values are projected.
    pub fn attn_input(&self, x: &Tensor) -> Result<Tensor> {
        self.input_norm.forward(x)
    }

    /// The input (pre-attention) and post-attention norms.
    pub fn norms(&self) -> (&RmsNorm, &RmsNorm) {
        (&self.input_norm, &self.post_attn_norm)
    }

    /// The MLP.
    pub fn mlp(&self) -> &Mlp {
        &self.mlp
    }

    /// Every weight of the layer: q, k, v, o, gate, up, down projections and the two norm scales.
    pub fn weights(&self) -> [&Tensor; 9] {
        let [q, k, v, o] = self.attn.weights();
        let [g, u, d] = self.mlp.weights();
        [
            q,
            k,
            v,
            o,
            g,
            u,
            d,
            &self.input_norm.weight,
            &self.post_attn_norm.weight,
        ]
    }

    /// Use the fused ops of [`crate::model::ops`] (default) or the composed reference in every part of the layer.
    pub fn set_fused(&mut self, on: bool) {
        self.attn.set_fused(on);
        self.mlp.set_fused(on);
        self.input_norm.set_fused(on);
        self.post_attn_norm.set_fused(on);
    }

    /// Run the layer on x [B, n, d]; returns the output and the K/V it attended over.
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        kv: KvSource,
    ) -> Result<(Tensor, KeyValue)> {
        let normed = self.input_norm.forward(x)?;
        let kv = match kv {
            KvSource::Own => self.attn.key_value(&normed, cos, sin)?,
            KvSource::Shared(kv) => kv.clone(),
        };
        let h = (x + self.attn.attend(&normed, cos, sin, &kv, mask)?)?;
        let out = (&h + self.mlp.forward(&self.post_attn_norm.forward(&h)?)?)?;
        Ok((out, kv))
    }
}

/// Additive attention mask [B, 1, nq, nk]: query i may see key j iff `k_pos[j] <= q_pos[i]` and key j is valid, or
/// j == i (so padding rows never see an empty set). Positions are original sequence positions, which keeps
/// attention causal for any sorted subset of tokens (docs/architecture.md S3).
pub fn position_mask(
    q_pos: &[Vec<u32>],
    q_valid: &[usize],
    k_pos: &[Vec<u32>],
    k_valid: &[usize],
    device: &Device,
    dtype: DType,
) -> Result<Tensor> {
    let b = q_pos.len();
    let nq = q_pos.first().map_or(0, |v| v.len());
    let nk = k_pos.first().map_or(0, |v| v.len());
    let mut data = vec![f32::NEG_INFINITY; b * nq * nk];
    for bi in 0..b {
        for i in 0..nq {
            let row = &mut data[(bi * nq + i) * nk..(bi * nq + i + 1) * nk];
            for j in 0..nk {
                let ok = (j < k_valid[bi] && k_pos[bi][j] <= q_pos[bi][i])
                    || (i == j && i >= q_valid[bi]);
                if ok {
                    row[j] = 0.0;
                }
            }
        }
    }
    Ok(Tensor::from_vec(data, (b, 1, nq, nk), device)?.to_dtype(dtype)?)
}
