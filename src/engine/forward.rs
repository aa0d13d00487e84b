//! The KV-cached, depth-wise batched forward (paper §3.3 / App. E, spec §4).
//!
//! One call consumes a chunk of new tokens for each of several sequences (a whole prompt for a prefill, one token
//! for a decode step; both may be mixed in one call). The new tokens of all sequences are flattened into one batch
//! of rows. Every unique layer, prefix and suffix layer runs once on all rows; recursion r runs once on the rows of
//! the tokens routed to depth r, whichever sequence they belong to (depth-wise batching: they share weights, so one
//! matmul serves them all), and tokens that exited earlier cost nothing there. Only attention is per sequence: each
//! row reads its own sequence's cache of that layer, up to its own position.
//!
//! Routing follows [`ForwardOptions::causal`](crate::model::ForwardOptions::causal) exactly (spec §10.4): each token
//! is routed from its own hidden state only, so the cached result equals the full-sequence causal forward.

use candle_core::{DType, Tensor};

use crate::config::{DecodeRule, Gating};
use crate::engine::cache::{LayerKv, SeqKv};
use crate::error::{MorError, Result};
use crate::model::layers::Rope;
use crate::model::{MorModel, Routing};

/// Fused, pre-transposed weights of one layer: `x @ w` is a plain row-major GEMM and q/k/v (gate/up) are one matmul.
#[derive(Debug, Clone)]
struct FusedLayer {
    /// [d, (H + 2·kv)·hd]: queries, keys, values.
    qkv: Tensor,
    /// [d, H·hd]: queries only (layers that read a shared cache).
    q: Tensor,
    /// [H·hd, d].
    o: Tensor,
    /// [d, 2f]: gate then up.
    gate_up: Tensor,
    /// [f, d].
    down: Tensor,
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
}

/// The new tokens of one step, flattened.
struct Rows<'a, 'b> {
    /// Sequence of each row.
    seq: Vec<usize>,
    /// Position of each row.
    pos: Vec<u32>,
    /// RoPE tables of every row, [N, 1, hd].
    cos: Tensor,
    sin: Tensor,
    caches: &'a mut [&'b mut SeqKv],
}

impl<'m> CachedModel<'m> {
    /// Prepare `model`. Errors on the configurations the cache does not support: the hybrid KV-sharing variant
    /// (`kv_sharing.update_cache`, whose overwritten K/V would need per-depth copies) and KV sharing under
    /// expert-choice whose first recursion does not keep every token (deeper depths would lack keys).
    pub fn new(model: &'m MorModel) -> Result<Self> {
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
        let mut by_source: std::collections::HashMap<usize, FusedLayer> = Default::default();
        let mut fused = Vec::with_capacity(model.layers().len());
        for (i, layer) in model.layers().iter().enumerate() {
            let src = model.layout().source[i];
            if let std::collections::hash_map::Entry::Vacant(e) = by_source.entry(src) {
                let [q, k, v, o] = layer.attn.weights();
                let [g, u, dn] = layer.mlp().weights();
                let f = FusedLayer {
                    qkv: Tensor::cat(&[q, k, v], 0)?.t()?.contiguous()?,
                    q: q.t()?.contiguous()?,
                    o: o.t()?.contiguous()?,
                    gate_up: Tensor::cat(&[g, u], 0)?.t()?.contiguous()?,
                    down: dn.t()?.contiguous()?,
                };
                e.insert(f);
            }
            fused.push(by_source[&src].clone());
        }
        let dims = model.layers().first().map_or((1, 1, 1), |l| l.attn.dims());
        Ok(CachedModel { model, fused, dims })
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
        let d = cfg.hidden_size;
        let x = self
            .model
            .embed(&Tensor::from_vec(ids, (1, n), dev)?)?
            .reshape((n, d))?;
        let (cos, sin) = self
            .model
            .rope()
            .at(&Tensor::from_vec(pos.clone(), (1, n), dev)?)?;
        let hd = self.dims.2;
        let mut rows = Rows {
            seq,
            pos,
            cos: cos.reshape((n, 1, hd))?,
            sin: sin.reshape((n, 1, hd))?,
            caches,
        };
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
                    let cand_t = index_tensor(&cand, dev)?;
                    let xc = x.index_select(&cand_t, 0)?;
                    let logits = ec.logits(r, &xc, false)?;
                    let probs = (ec.activate(&logits)? * ec.config().alpha)?;
                    let full = ec.capacity(r, None) >= 1.0;
                    let (chosen, traced) = match (&opts.expert_thresholds, opts.trace_router) {
                        (None, false) => (ec.causal_decision(r, &xc, &logits)?, None),
                        (thr, _) => {
                            let (rule_logits, base) = match ec.config().decode_rule {
                                DecodeRule::Threshold { threshold } => (logits.clone(), threshold),
                                DecodeRule::AuxRouter { threshold } => {
                                    (ec.logits(r, &xc, true)?, threshold)
                                }
                            };
                            let p: Vec<f32> = candle_nn::ops::sigmoid(&rule_logits)?
                                .to_dtype(DType::F32)?
                                .to_vec1()?;
                            let t = thr.as_ref().and_then(|t| t.get(r).copied()).unwrap_or(base);
                            // Same comparison as `ExpertChoice::causal_decision`.
                            let chosen = p.iter().map(|&v| full || f64::from(v) >= t).collect();
                            (chosen, Some(p))
                        }
                    };
                    if let Some(p) = traced.filter(|_| opts.trace_router) {
                        router_probs.push(p);
                    }
                    let local: Vec<usize> = (0..cand.len()).filter(|&i| chosen[i]).collect();
                    if local.is_empty() {
                        break;
                    }
                    let sel: Vec<usize> = local.iter().map(|&i| cand[i]).collect();
                    let gates = probs.index_select(&index_tensor(&local, dev)?, 0)?;
                    let mut h = xc.index_select(&index_tensor(&local, dev)?, 0)?;
                    for i in layout.recursion_layers(r) {
                        h = self.layer(i, &h, &sel, &mut rows)?;
                    }
                    let upd = match ec.config().gating {
                        Gating::Weighted => h.broadcast_mul(&gates.unsqueeze(1)?)?,
                        Gating::Additive => h,
                    };
                    x = x.index_add(&index_tensor(&sel, dev)?, &upd, 0)?;
                    for &t in &sel {
                        depths[t] += 1;
                    }
                    cand = sel;
                }
                x
            }
            Routing::Token(tc) => {
                let (_, _, expert, gate) = tc.route(&x, None)?;
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
                    let fin_local: Vec<usize> = (0..active.len())
                        .filter(|&i| expert[active[i]] as usize == r)
                        .collect();
                    if !fin_local.is_empty() {
                        let fin: Vec<usize> = fin_local.iter().map(|&i| active[i]).collect();
                        let fin_t = index_tensor(&fin, dev)?;
                        let y = h.index_select(&index_tensor(&fin_local, dev)?, 0)?;
                        let upd = match tc.config().gating {
                            Gating::Weighted => {
                                y.broadcast_mul(&gate.index_select(&fin_t, 0)?.unsqueeze(1)?)?
                            }
                            Gating::Additive => y,
                        };
                        // Finishing tokens end as H¹ + g·Block_r(…) (official token-choice code).
                        out = out.index_add(&fin_t, &upd, 0)?;
                        for &t in &fin {
                            depths[t] = r + 1;
                        }
                    }
                    let cont_local: Vec<usize> = (0..active.len())
                        .filter(|&i| expert[active[i]] as usize > r)
                        .collect();
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
        let logits = self.model.head(&x)?;
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
        let layer = &self.model.layers()[idx];
        let w = &self.fused[idx];
        let (nh, nkv, hd) = self.dims;
        let n = toks.len();
        let dev = x.device();
        let dtype = x.dtype();
        let src = self.model.kv_source_layer(idx);
        let writes = src == idx;
        let normed = layer.attn_input(x)?;
        let tok_t = index_tensor(toks, dev)?;
        let (cos, sin) = if n == rows.pos.len() {
            (rows.cos.clone(), rows.sin.clone())
        } else {
            (
                rows.cos.index_select(&tok_t, 0)?,
                rows.sin.index_select(&tok_t, 0)?,
            )
        };
        let proj = normed.matmul(if writes { &w.qkv } else { &w.q })?;
        let q = proj.narrow(1, 0, nh * hd)?.reshape((n, nh, hd))?;
        let q = to_f32_vec(&Rope::apply(&q, &cos, &sin)?)?;
        if writes {
            let k = proj.narrow(1, nh * hd, nkv * hd)?.reshape((n, nkv, hd))?;
            let k = to_f32_vec(&Rope::apply(&k, &cos, &sin)?)?;
            let v = to_f32_vec(&proj.narrow(1, (nh + nkv) * hd, nkv * hd)?)?;
            let row = nkv * hd;
            for (i, &t) in toks.iter().enumerate() {
                rows.caches[rows.seq[t]].layers[idx].push(
                    rows.pos[t],
                    &k[i * row..(i + 1) * row],
                    &v[i * row..(i + 1) * row],
                );
            }
        }
        let items: Vec<(&LayerKv, u32)> = toks
            .iter()
            .map(|&t| (&rows.caches[rows.seq[t]].layers[src], rows.pos[t]))
            .collect();
        let att = attend(&q, &items, nh, nkv, hd);
        let att = Tensor::from_vec(att, (n, nh * hd), dev)?.to_dtype(dtype)?;
        let h = (x + att.matmul(&w.o)?)?;
        let gu = layer.mlp_input(&h)?.matmul(&w.gate_up)?;
        let f = gu.dim(1)? / 2;
        let g = gu.narrow(1, 0, f)?;
        let act = ((&g * candle_nn::ops::sigmoid(&g)?)? * gu.narrow(1, f, f)?)?;
        Ok((h + act.matmul(&w.down)?)?)
    }
}

fn index_tensor(idx: &[usize], dev: &candle_core::Device) -> Result<Tensor> {
    let v: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    Ok(Tensor::from_vec(v, idx.len(), dev)?)
}

fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// Dot product in 8 independent lanes so the compiler vectorises it (a single f32 accumulator cannot be reordered).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Attention of query rows `q` ([n, H, hd], rotated) each over its own cache (`items[i]`: the cache and the query's
/// position; entries at positions ≤ it are visible). GQA: query head h reads key head h / (H / kv) (HF repeat_kv).
/// Returns [n, H·hd]. Rows are independent, so large batches are split across threads.
fn attend(q: &[f32], items: &[(&LayerKv, u32)], nh: usize, nkv: usize, hd: usize) -> Vec<f32> {
    let n = items.len();
    let mut out = vec![0f32; n * nh * hd];
    let work: usize = items.iter().map(|(c, p)| c.visible(*p)).sum::<usize>() * nh * hd;
    let threads = candle_core::utils::get_num_threads().clamp(1, n.max(1));
    // Below ~1 MFLOP a thread costs more than it saves.
    if threads == 1 || work < 250_000 {
        attend_rows(q, items, &mut out, nh, nkv, hd);
        return out;
    }
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        for ((qc, ic), oc) in q
            .chunks(per * nh * hd)
            .zip(items.chunks(per))
            .zip(out.chunks_mut(per * nh * hd))
        {
            s.spawn(move || attend_rows(qc, ic, oc, nh, nkv, hd));
        }
    });
    out
}

fn attend_rows(
    q: &[f32],
    items: &[(&LayerKv, u32)],
    out: &mut [f32],
    nh: usize,
    nkv: usize,
    hd: usize,
) {
    let rep = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    let row = nkv * hd;
    let mut scores: Vec<f32> = Vec::new();
    for (i, (cache, p)) in items.iter().enumerate() {
        let m = cache.visible(*p);
        let qi = &q[i * nh * hd..(i + 1) * nh * hd];
        let oi = &mut out[i * nh * hd..(i + 1) * nh * hd];
        scores.clear();
        scores.resize(nh * m, 0.0);
        for j in 0..m {
            let kj = &cache.k[j * row..(j + 1) * row];
            for h in 0..nh {
                let g = h / rep;
                scores[h * m + j] =
                    dot(&qi[h * hd..(h + 1) * hd], &kj[g * hd..(g + 1) * hd]) * scale;
            }
        }
        for h in 0..nh {
            let s = &mut scores[h * m..(h + 1) * m];
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for v in s.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            let inv = 1.0 / sum;
            for v in s.iter_mut() {
                *v *= inv;
            }
        }
        for j in 0..m {
            let vj = &cache.v[j * row..(j + 1) * row];
            for h in 0..nh {
                let g = h / rep;
                let w = scores[h * m + j];
                let (o, v) = (&mut oi[h * hd..(h + 1) * hd], &vj[g * hd..(g + 1) * hd]);
                for (a, b) in o.iter_mut().zip(v) {
                    *a += w * b;
                }
            }
        }
    }
}
