//! The KV-cached, depth-wise batched forward (paper §3.3 / App. E, docs/architecture.md S7).
//!
//! One call consumes a chunk of new tokens for each of several sequences (a whole prompt for a prefill, one token
//! for a decode step; both may be mixed in one call). The new tokens of all sequences are flattened into one batch
//! of rows. Every unique layer, prefix and suffix layer runs once on all rows; recursion r runs once on the rows of
//! the tokens routed to depth r, whichever sequence they belong to (depth-wise batching: they share weights, so one
//! matmul serves them all), and tokens that exited earlier cost nothing there. Only attention is per sequence: each
//! row reads its own sequence's cache of that layer, up to its own position.
//!
//! Routing follows [`ForwardOptions::causal`](crate::model::ForwardOptions::causal) exactly (docs/architecture.md S5): each token
//! is routed from its own hidden state only, so the cached result equals the full-sequence causal forward.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::engine::attention::attend;
use crate::engine::cache::{LayerKv, SeqKv};
use crate::engine::kernels::{
    matmul_rows, rms_rows, rope_in_place, swiglu_rows, to_f32_vec, Weight,
};
use crate::engine::quant::QMatrix;
use crate::error::{MorError, Result};
use crate::model::{routing, MorModel, Routing};

/// One layer prepared for decoding: fused weights (q/k/v, gate/up are one matmul each) and the norm scales. Everything between the matmuls runs as plain loops over
/// the rows: at decode sizes candle's per-op overhead, not arithmetic, dominates (measured, see the report).
#[derive(Debug, Clone)]
struct FusedLayer {
    /// [d, (H + 2·kv)·hd]: queries, keys, values.
    qkv: Weight,
    /// [d, H·hd]: queries only (layers that read a shared cache).
    q: Weight,
    /// [H·hd, d].
    o: Weight,
    /// [d, 2f]: gate then up.
    gate_up: Weight,
    /// [f, d].
    down: Weight,
    /// Input and post-attention norm scales [d].
    norm_in: Vec<f32>,
    norm_post: Vec<f32>,
}

/// Options of [`CachedModel::step`].
#[derive(Debug, Clone, Default)]
pub struct StepOptions {
    /// Return the logits of every new token ([N, V]) instead of the last one of each sequence ([S, V]).
    pub all_logits: bool,
    /// Expert-choice only: per-recursion probability thresholds replacing the config's decode-rule threshold (for
    /// routers calibrated to a target depth distribution, e.g. the synthetic throughput benchmark). A recursion at
    /// capacity ≥ 1 still keeps every token.
    pub expert_thresholds: Option<Vec<f64>>,
    /// Record, per recursion, σ(decision logit) of each candidate (for threshold calibration).
    pub trace_router: bool,
}

/// The result of one [`CachedModel::step`].
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// Logits [S, V] (last new token per sequence) or [N, V] (every new token).
    pub logits: Tensor,
    /// Recursions each new token ran (flat, sequences in order; N_r for unrouted models, 1 for vanilla).
    pub depths: Vec<usize>,
    /// With `trace_router`: per recursion, σ(decision logit) of each candidate token (expert-choice only).
    pub router_probs: Vec<Vec<f32>>,
}

/// A model prepared for KV-cached, depth-wise batched decoding.
#[derive(Debug, Clone)]
pub struct CachedModel<'m> {
    model: &'m MorModel,
    /// One entry per unrolled layer (shared layers share the tensors).
    fused: Vec<FusedLayer>,
    dims: (usize, usize, usize),
    eps: f32,
    /// The model's activation dtype.
    pub(super) dtype: DType,
    /// RoPE tables [max_pos, hd] (the model's, in f32).
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// The token embedding and LM head as stored in a GGUF file ([`CachedModel::quantized`]); `None`: the model's
    /// own.
    quantized_tables: Option<QuantizedTables>,
}

/// The token embedding and LM head of a quantized model (the same matrix when tied).
#[derive(Debug, Clone)]
struct QuantizedTables {
    embed: Arc<QMatrix>,
    head: Arc<QMatrix>,
}

/// The new tokens of one step, flattened.
struct Rows<'a, 'b> {
    /// Sequence of each row.
    seq: Vec<usize>,
    /// Position of each row.
    pos: Vec<u32>,
    caches: &'a mut [&'b mut SeqKv],
}

/// One row of a layer call: its sequence (index into the caches), position, and the unrolled layer whose cache it
/// reads and writes.
pub(super) struct RowRef {
    pub(super) seq: usize,
    pub(super) pos: u32,
    pub(super) layer: usize,
}

impl<'m> CachedModel<'m> {
    /// Prepare `model`. Errors on the configurations the cache does not support: the hybrid KV-sharing variant
    /// (`kv_sharing.update_cache`, whose overwritten K/V would need per-depth copies) and KV sharing under
    /// expert-choice whose first recursion does not keep every token (deeper depths would lack keys).
    pub fn new(model: &'m MorModel) -> Result<Self> {
        Self::check(model)?;
        let mut by_source: std::collections::HashMap<usize, FusedLayer> = Default::default();
        let mut fused = Vec::with_capacity(model.layers().len());
        for (i, layer) in model.layers().iter().enumerate() {
            let src = model.layout().source[i];
            if let std::collections::hash_map::Entry::Vacant(e) = by_source.entry(src) {
                let [q, k, v, o] = layer.attn.weights();
                let [g, u, dn] = layer.mlp().weights();
                // [out, in] as stored, stacked without a copy (none at all for weights already f32 or bf16 and
                // contiguous; other dtypes run in f32).
                let dense = |ts: &[&Tensor]| -> Result<Weight> {
                    let blocks = ts
                        .iter()
                        .map(|t| match t.dtype() {
                            DType::BF16 => t.contiguous(),
                            _ => t.to_dtype(DType::F32)?.contiguous(),
                        })
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    Ok(Weight::Dense(blocks))
                };
                let (n_in, n_post) = layer.norms();
                let f = FusedLayer {
                    qkv: dense(&[q, k, v])?,
                    q: dense(&[q])?,
                    o: dense(&[o])?,
                    gate_up: dense(&[g, u])?,
                    down: dense(&[dn])?,
                    norm_in: to_f32_vec(n_in.parts().0)?,
                    norm_post: to_f32_vec(n_post.parts().0)?,
                };
                e.insert(f);
            }
            fused.push(by_source[&src].clone());
        }
        Self::assemble(model, fused, None)
    }

    /// Prepare `model` (any variant) whose matmul weights are `weights` in their stored format (read from a GGUF
    /// file or quantized in memory, [`crate::io::gguf::quantize_model`]): every matmul (layers and LM head) and the
    /// embedding lookup run on the quantized blocks with the engine's integer kernels ([`crate::engine::quant`]);
    /// unrolled layers that share a unique layer share its blocks (built once), no dense copy of a matmul weight is
    /// made, and the model's own dense matmul weights and embedding are never read (so they may be placeholders, as
    /// [`GgufFile::quantized_model`](crate::io::gguf::GgufFile::quantized_model) makes them). Routers, norms, RoPE
    /// and attention stay f32, and routing runs the model's own routing code. Checked by layer count and shape.
    pub fn quantized(
        model: &'m MorModel,
        weights: crate::io::gguf::QuantizedWeights,
    ) -> Result<Self> {
        Self::check(model)?;
        let cfg = model.config();
        let unique = model.layout().unique_layers();
        if weights.layers.len() != unique.len() {
            return Err(MorError::Config(format!(
                "{} quantized layers for a model with {} unique layers",
                weights.layers.len(),
                unique.len()
            )));
        }
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
        );
        let qw = |w: QMatrix, what: &str, rows: usize, cols: usize| -> Result<Weight> {
            if (w.rows(), w.cols()) != (rows, cols) {
                return Err(MorError::Config(format!(
                    "quantized {what} of shape [{}, {}], expected [{rows}, {cols}]",
                    w.rows(),
                    w.cols()
                )));
            }
            Ok(Weight::Quantized(Arc::new(w)))
        };
        let mut by_source = std::collections::HashMap::new();
        for (&u, q) in unique.iter().zip(weights.layers) {
            let (n_in, n_post) = model.layers()[u].norms();
            by_source.insert(
                u,
                FusedLayer {
                    qkv: qw(q.qkv, "q/k/v", (nh + 2 * nkv) * hd, d)?,
                    q: qw(q.q, "q", nh * hd, d)?,
                    o: qw(q.o, "o", d, nh * hd)?,
                    gate_up: qw(q.gate_up, "gate/up", 2 * f, d)?,
                    down: qw(q.down, "down", d, f)?,
                    norm_in: to_f32_vec(n_in.parts().0)?,
                    norm_post: to_f32_vec(n_post.parts().0)?,
                },
            );
        }
        let fused = model
            .layout()
            .source
            .iter()
            .map(|s| by_source[s].clone())
            .collect();
        let v = cfg.vocab_size;
        for (t, what) in [(&weights.embed, "embedding"), (&weights.head, "LM head")] {
            if (t.rows(), t.cols()) != (v, d) {
                return Err(MorError::Config(format!(
                    "quantized {what} of shape [{}, {}], expected [{v}, {d}]",
                    t.rows(),
                    t.cols()
                )));
            }
        }
        let tables = QuantizedTables {
            embed: weights.embed,
            head: weights.head,
        };
        Self::assemble(model, fused, Some(tables))
    }

    /// The configurations the cache does not support.
    fn check(model: &MorModel) -> Result<()> {
        let cfg = model.config();
        if let Some(kv) = &cfg.kv_sharing {
            if kv.update_cache {
                return Err(MorError::Config(
                    "the KV-cached engine does not support kv_sharing.update_cache (hybrid †); use the \
                     full-recompute reference generate_reference"
                        .into(),
                ));
            }
            if cfg.expert_choice().is_some() && cfg.capacities().first().is_some_and(|&c| c < 1.0) {
                return Err(MorError::Config(
                    "KV sharing needs the first recursion at capacity 1 (every token writes the shared cache)"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    fn assemble(
        model: &'m MorModel,
        fused: Vec<FusedLayer>,
        quantized_tables: Option<QuantizedTables>,
    ) -> Result<Self> {
        let dims = model.layers().first().map_or((1, 1, 1), |l| l.attn.dims());
        let eps = model
            .layers()
            .first()
            .map_or(1e-5, |l| l.norms().0.parts().1) as f32;
        let max_pos = model.rope().max_positions();
        let all = Tensor::arange(0u32, max_pos as u32, model.device())?.reshape((1, max_pos))?;
        let (cos, sin) = model.rope().at(&all)?;
        let dtype = model.params().dtype();
        Ok(CachedModel {
            model,
            dtype,
            fused,
            dims,
            eps,
            cos: to_f32_vec(&cos)?,
            sin: to_f32_vec(&sin)?,
            quantized_tables,
        })
    }

    /// Final norm and LM head.
    pub(super) fn head(&self, x: &Tensor) -> Result<Tensor> {
        match &self.quantized_tables {
            Some(t) => {
                let n = x.dim(0)?;
                let h = to_f32_vec(&self.model.final_norm(x)?)?;
                Ok(Tensor::from_vec(
                    t.head.matmul(&h, n),
                    (n, t.head.rows()),
                    x.device(),
                )?)
            }
            None => {
                let w = self.model.head_weight();
                if !matches!(w.dtype(), DType::F32 | DType::BF16) {
                    return self.model.head(x);
                }
                // Through the engine's matmul: its row kernels at decode sizes, on the model's own table.
                let (n, v) = (x.dim(0)?, w.dim(0)?);
                let h = to_f32_vec(&self.model.final_norm(x)?)?;
                let w = Weight::Dense(vec![w.contiguous()?]);
                Ok(Tensor::from_vec(
                    matmul_rows(&h, n, &w)?,
                    (n, v),
                    x.device(),
                )?)
            }
        }
    }

    /// Embedding rows [n, d] of the token ids (on the quantized table when there is one).
    pub(super) fn embed(&self, ids: Vec<u32>) -> Result<Tensor> {
        let dev = self.model.device();
        let n = ids.len();
        match &self.quantized_tables {
            Some(t) => {
                let d = t.embed.cols();
                let mut x = crate::alloc::filled_vec(n * d);
                for (row, &id) in x.chunks_exact_mut(d).zip(&ids) {
                    t.embed.dequantize_row(id as usize, row);
                }
                Ok(Tensor::from_vec(x, (n, d), dev)?.to_dtype(self.dtype)?)
            }
            None => {
                let d = self.model.config().hidden_size;
                Ok(self
                    .model
                    .embed(&Tensor::from_vec(ids, (1, n), dev)?)?
                    .reshape((n, d))?)
            }
        }
    }

    /// The underlying model.
    pub fn model(&self) -> &MorModel {
        self.model
    }

    /// An empty cache for one sequence.
    pub fn new_cache(&self) -> SeqKv {
        SeqKv::new(self.model)
    }

    /// Consume `tokens[s]` (non-empty) for the sequence whose cache is `caches[s]`, for every s, and return logits.
    /// Positions continue from each cache's [`SeqKv::seq_len`]. On error the caches may hold part of the step and
    /// should be discarded.
    pub fn step(
        &self,
        caches: &mut [&mut SeqKv],
        tokens: &[&[u32]],
        opts: &StepOptions,
    ) -> Result<StepOutput> {
        if caches.len() != tokens.len() {
            return Err(MorError::Request(format!(
                "{} caches for {} token chunks",
                caches.len(),
                tokens.len()
            )));
        }
        let cfg = self.model.config();
        let max_pos = self.model.rope().max_positions();
        let mut ids = Vec::new();
        let mut seq = Vec::new();
        let mut pos = Vec::new();
        for (s, (c, t)) in caches.iter().zip(tokens).enumerate() {
            c.check_fits(self.model)?;
            if t.is_empty() {
                return Err(MorError::Request(format!("sequence {s}: no new tokens")));
            }
            if c.seq_len + t.len() > max_pos {
                return Err(MorError::Request(format!(
                    "sequence {s}: {} tokens exceed the context of {max_pos}",
                    c.seq_len + t.len()
                )));
            }
            if let Some(&bad) = t.iter().find(|&&x| x as usize >= cfg.vocab_size) {
                return Err(MorError::Request(format!(
                    "token id {bad} is outside the vocabulary (size {})",
                    cfg.vocab_size
                )));
            }
            for (j, &x) in t.iter().enumerate() {
                ids.push(x);
                seq.push(s);
                pos.push((c.seq_len + j) as u32);
            }
        }
        let n = ids.len();
        let dev = self.model.device();
        let x = self.embed(ids)?;
        let mut rows = Rows { seq, pos, caches };
        let all: Vec<usize> = (0..n).collect();
        let layout = self.model.layout();
        let mut x = x;
        for i in 0..layout.prefix {
            x = self.layer(i, &x, &all, &mut rows)?;
        }
        let n_r = layout.num_recursion;
        let mut depths = vec![if layout.base_depth == 0 { 1 } else { n_r }; n];
        let mut router_probs = Vec::new();
        x = match self.model.routing() {
            Routing::None => {
                for i in layout.prefix..layout.suffix_layers().start {
                    x = self.layer(i, &x, &all, &mut rows)?;
                }
                x
            }
            Routing::Expert(ec) => {
                let mut cand = all.clone();
                depths.iter_mut().for_each(|v| *v = 0);
                for r in 0..n_r {
                    if cand.is_empty() {
                        break;
                    }
                    let xc = x.index_select(&index_tensor(&cand, dev)?, 0)?;
                    let logits = ec.logits(r, &xc, false)?;
                    let decision =
                        ec.causal_decision(r, &xc, &logits, opts.expert_thresholds.as_deref())?;
                    let local: Vec<usize> =
                        (0..cand.len()).filter(|&i| decision.chosen[i]).collect();
                    if opts.trace_router {
                        router_probs.push(decision.probs);
                    }
                    if local.is_empty() {
                        break;
                    }
                    let sel: Vec<usize> = local.iter().map(|&i| cand[i]).collect();
                    let local_t = index_tensor(&local, dev)?;
                    let gates = ec.gates(&logits.index_select(&local_t, 0)?)?;
                    let mut h = xc.index_select(&local_t, 0)?;
                    for i in layout.recursion_layers(r) {
                        h = self.layer(i, &h, &sel, &mut rows)?;
                    }
                    let upd = routing::apply_gate(ec.config().gating, h, &gates)?;
                    x = x.index_add(&index_tensor(&sel, dev)?, &upd, 0)?;
                    for &t in &sel {
                        depths[t] += 1;
                    }
                    cand = sel;
                }
                x
            }
            Routing::Token(tc) => {
                let route = tc.route(&x, None)?;
                let mut out = x.clone();
                let mut active = all.clone();
                let mut h = x;
                for r in 0..n_r {
                    if active.is_empty() {
                        break;
                    }
                    for i in layout.recursion_layers(r) {
                        h = self.layer(i, &h, &active, &mut rows)?;
                    }
                    let (fin_local, cont_local) =
                        routing::token_choice_exits(&route.expert, &active, r);
                    if !fin_local.is_empty() {
                        let fin: Vec<usize> = fin_local.iter().map(|&i| active[i]).collect();
                        let fin_t = index_tensor(&fin, dev)?;
                        let y = h.index_select(&index_tensor(&fin_local, dev)?, 0)?;
                        let gates = route.gate.index_select(&fin_t, 0)?;
                        // Finishing tokens end as H¹ + g·Block_r(…) (official token-choice code).
                        let upd = routing::apply_gate(tc.config().gating, y, &gates)?;
                        out = out.index_add(&fin_t, &upd, 0)?;
                        for &t in &fin {
                            depths[t] = r + 1;
                        }
                    }
                    if cont_local.len() < active.len() && !cont_local.is_empty() {
                        h = h.index_select(&index_tensor(&cont_local, dev)?, 0)?;
                    }
                    active = cont_local.iter().map(|&i| active[i]).collect();
                }
                out
            }
        };
        for i in layout.suffix_layers() {
            x = self.layer(i, &x, &all, &mut rows)?;
        }
        let x = if opts.all_logits {
            x
        } else {
            let mut last = Vec::with_capacity(tokens.len());
            let mut off = 0;
            for t in tokens {
                off += t.len();
                last.push(off - 1);
            }
            x.index_select(&index_tensor(&last, dev)?, 0)?
        };
        let logits = self.head(&x)?;
        for (c, t) in rows.caches.iter_mut().zip(tokens) {
            c.seq_len += t.len();
        }
        Ok(StepOutput {
            logits,
            depths,
            router_probs,
        })
    }

    /// One decoder layer on the rows `toks` (indices into the step's rows) whose hidden states are `x` [n, d]:
    /// writes their K/V into this layer's cache (unless it reads a shared cache) and attends each row over its own
    /// sequence's cache up to its position.
    fn layer(
        &self,
        idx: usize,
        x: &Tensor,
        toks: &[usize],
        rows: &mut Rows<'_, '_>,
    ) -> Result<Tensor> {
        let refs: Vec<RowRef> = toks
            .iter()
            .map(|&t| RowRef {
                seq: rows.seq[t],
                pos: rows.pos[t],
                layer: idx,
            })
            .collect();
        let d = x.dim(1)?;
        let h = self.layer_rows(idx, &to_f32_vec(x)?, &refs, rows.caches)?;
        Ok(Tensor::from_vec(h, (toks.len(), d), x.device())?.to_dtype(x.dtype())?)
    }

    /// One decoder layer with the weights of unrolled layer `wi` on f32 rows `xv` [n, d]; row i belongs to sequence
    /// `refs[i].seq` at position `refs[i].pos` and uses the K/V cache of unrolled layer `refs[i].layer` (which must
    /// share `wi`'s weights). Rows may sit at different recursion depths: that is what lets the asynchronous
    /// pipeline run every depth in one call (paper App. E). Same arithmetic as `DecoderLayer::forward` (pre-norm,
    /// RoPE, GQA, SwiGLU), with the elementwise parts as loops.
    pub(super) fn layer_rows(
        &self,
        wi: usize,
        xv: &[f32],
        refs: &[RowRef],
        caches: &mut [&mut SeqKv],
    ) -> Result<Vec<f32>> {
        let w = &self.fused[wi];
        let (nh, nkv, hd) = self.dims;
        let n = refs.len();
        let srcs: Vec<usize> = refs
            .iter()
            .map(|r| self.model.kv_source_layer(r.layer))
            .collect();
        // Under KV sharing only recursion-1 rows write K/V; when none does, project queries only.
        let any_writes = refs.iter().zip(&srcs).any(|(r, &s)| s == r.layer);
        let normed = rms_rows(xv, &w.norm_in, self.eps);
        let mut proj = matmul_rows(&normed, n, if any_writes { &w.qkv } else { &w.q })?;
        let pw = proj.len() / n.max(1);
        // RoPE on queries and keys in place (HF rotate_half: [x1, x2] → [x1·c − x2·s, x2·c + x1·s]).
        let heads = if any_writes { nh + nkv } else { nh };
        for (i, r) in refs.iter().enumerate() {
            let p = r.pos as usize;
            let (c, s) = (
                &self.cos[p * hd..(p + 1) * hd],
                &self.sin[p * hd..(p + 1) * hd],
            );
            for h in 0..heads {
                rope_in_place(&mut proj[i * pw + h * hd..i * pw + (h + 1) * hd], c, s);
            }
        }
        if any_writes {
            let (ko, vo, row) = (nh * hd, (nh + nkv) * hd, nkv * hd);
            for (i, (r, &src)) in refs.iter().zip(&srcs).enumerate() {
                if src != r.layer {
                    continue;
                }
                let p = &proj[i * pw..(i + 1) * pw];
                caches[r.seq].layers[r.layer].push(r.pos, &p[ko..ko + row], &p[vo..vo + row]);
            }
        }
        let items: Vec<(&LayerKv, u32)> = refs
            .iter()
            .zip(&srcs)
            .map(|(r, &src)| (&caches[r.seq].layers[src], r.pos))
            .collect();
        let att = attend(&proj, pw, &items, nh, nkv, hd);
        let mut h = matmul_rows(&att, n, &w.o)?;
        for (a, b) in h.iter_mut().zip(xv) {
            *a += b;
        }
        let gu = matmul_rows(&rms_rows(&h, &w.norm_post, self.eps), n, &w.gate_up)?;
        let act = swiglu_rows(&gu, gu.len() / n.max(1) / 2);
        let down = matmul_rows(&act, n, &w.down)?;
        for (a, b) in h.iter_mut().zip(&down) {
            *a += b;
        }
        Ok(h)
    }
}

fn index_tensor(idx: &[usize], dev: &candle_core::Device) -> Result<Tensor> {
    let v: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    Ok(Tensor::from_vec(v, idx.len(), dev)?)
}
