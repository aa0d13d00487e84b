//! Asynchronous continuous depth-wise batching (paper §3.3, App. E; docs/architecture.md S7): one token per sequence is in flight
//! through the recursion block, and every engine step runs the shared block once over the tokens of all sequences,
//! whatever recursion each is at. The rows follow exactly the arithmetic of [`CachedModel::step`], so logits and
//! routing equal the synchronous path's.

use candle_core::{DType, Tensor};

use crate::engine::cache::SeqKv;
use crate::engine::kernels::to_f32_vec;
use crate::engine::step::{CachedModel, RowRef, StepOptions};
use crate::error::{MorError, Result};
use crate::model::{routing, Routing};

/// The token of one sequence in flight through the asynchronous depth-wise pipeline ([`CachedModel::pipeline_step`];
/// paper §3.3, App. E): it enters (embedding and prefix layers), runs one recursion per engine step, and exits (suffix
/// layers, LM head) when its router stops it or after the last recursion. One token per sequence is in flight, so
/// every earlier token of its sequence has finished all its depths and the caches it attends into are complete.
#[derive(Debug, Clone)]
pub struct Flight {
    token: u32,
    pos: u32,
    /// Recursions run so far; `None` until the token has passed the prefix layers.
    done: Option<usize>,
    /// Residual stream (expert-choice, recursive) or H¹ (token-choice: the output is H¹ + g·h at exit).
    x: Vec<f32>,
    /// Token-choice: the hidden state running through the recursions.
    h: Vec<f32>,
    /// Token-choice: recursions to run (its expert + 1); otherwise N_r.
    target: usize,
    /// Its gate: token-choice, fixed at entry; expert-choice, of the recursion it will run next.
    gate: f32,
    /// The routing decision for its next recursion has been taken (and it was chosen).
    decided: bool,
}

impl Flight {
    /// A new token entering the pipeline (its position is the sequence's next one).
    pub fn new(token: u32) -> Self {
        Flight {
            token,
            pos: 0,
            done: None,
            x: Vec::new(),
            h: Vec::new(),
            target: 0,
            gate: 1.0,
            decided: false,
        }
    }

    /// The token being processed.
    pub fn token(&self) -> u32 {
        self.token
    }

    /// The recursion depth it is at (recursions run so far), `None` before the prefix layers.
    pub fn depth(&self) -> Option<usize> {
        self.done
    }
}

/// The tokens that left the pipeline in one [`CachedModel::pipeline_step`].
#[derive(Debug, Clone, Default)]
pub struct PipelineOutput {
    /// Indices (into the step's flights) of the tokens that exited, ascending.
    pub exited: Vec<usize>,
    /// Their logits, one row of V each.
    pub logits: Vec<Vec<f32>>,
    /// Recursions each of them ran.
    pub depths: Vec<usize>,
    /// Rows the shared block ran on in this step (summed over its distinct weight groups).
    pub block_rows: usize,
}

impl<'m> CachedModel<'m> {
    /// One step of asynchronous continuous depth-wise batching (paper §3.3, App. E; docs/architecture.md S7). `flights[i]` is the
    /// token in flight of the sequence whose cache is `caches[i]`. In this step: tokens that just entered run the
    /// embedding and prefix layers and take the routing decision for recursion 1; all tokens chosen for a next
    /// recursion, whatever their depth, run the shared block in one call per block layer (rows with the same
    /// weights are batched; each attends into its own sequence's cache of its own depth); each then takes the
    /// decision for its following recursion at once (expert-choice, docs/architecture.md S5 causal rule; token-choice and
    /// recursive models fix the depth at entry), so a token of depth k spends exactly k steps in the block; tokens
    /// that are done run the suffix layers and LM head in the same step and are returned with their logits. The caller replaces an exited flight with the
    /// sequence's next token (or drops the sequence). Every row follows exactly the arithmetic of
    /// [`CachedModel::step`], so logits and routing equal the synchronous path's. Models without a recursion block
    /// (vanilla) are refused: use `step`.
    pub fn pipeline_step(
        &self,
        flights: &mut [Flight],
        caches: &mut [&mut SeqKv],
        opts: &StepOptions,
    ) -> Result<PipelineOutput> {
        if flights.len() != caches.len() {
            return Err(MorError::Request(format!(
                "{} flights for {} caches",
                flights.len(),
                caches.len()
            )));
        }
        let layout = self.model().layout();
        if layout.base_depth == 0 {
            return Err(MorError::Config(
                "the asynchronous pipeline needs a recursion block (vanilla models use step)"
                    .into(),
            ));
        }
        let cfg = self.model().config();
        let (d, n_r) = (cfg.hidden_size, layout.num_recursion);
        let dev = self.model().device();
        let dtype = self.dtype;
        let max_pos = self.model().rope().max_positions();

        // 1. Entering tokens: embedding and prefix layers, batched.
        let entering: Vec<usize> = (0..flights.len())
            .filter(|&i| flights[i].done.is_none())
            .collect();
        if !entering.is_empty() {
            let mut ids = Vec::with_capacity(entering.len());
            for &i in &entering {
                let (f, c) = (&mut flights[i], &caches[i]);
                c.check_fits(self.model())?;
                if c.seq_len >= max_pos {
                    return Err(MorError::Request(format!(
                        "sequence {i}: position {} is outside the context of {max_pos}",
                        c.seq_len
                    )));
                }
                if f.token as usize >= cfg.vocab_size {
                    return Err(MorError::Request(format!(
                        "token id {} is outside the vocabulary (size {})",
                        f.token, cfg.vocab_size
                    )));
                }
                f.pos = c.seq_len as u32;
                ids.push(f.token);
            }
            let n = ids.len();
            let mut xv = to_f32_vec(&self.embed(ids)?)?;
            for l in 0..layout.prefix {
                xv = self.layer_rows(l, &xv, &flight_rows(flights, &entering, l), caches)?;
            }
            let experts = match self.model().routing() {
                Routing::Token(tc) => {
                    let xt = Tensor::from_vec(xv.clone(), (n, d), dev)?.to_dtype(dtype)?;
                    let route = tc.route(&xt, None)?;
                    let gates: Vec<f32> = route.gate.to_dtype(DType::F32)?.to_vec1()?;
                    Some((route.expert, gates))
                }
                _ => None,
            };
            for (k, &i) in entering.iter().enumerate() {
                let f = &mut flights[i];
                f.x = xv[k * d..(k + 1) * d].to_vec();
                f.done = Some(0);
                f.target = n_r;
                if let Some((e, g)) = &experts {
                    f.target = routing::token_choice_depth(e[k]);
                    f.gate = g[k];
                    f.h = f.x.clone();
                }
            }
        }

        // 2. Routing decision of the entering tokens for recursion 1 (the others decided theirs at the end of the
        //    previous step, right after their last recursion).
        let mut exit = vec![false; flights.len()];
        self.route_flights(flights, &entering, &mut exit, opts)?;
        // 3. The shared block, once per block layer for every continuing token at every depth. Rows are grouped by
        //    the weights their layer uses: one group under (Middle-)Cycle sharing, one per depth under Sequence.
        let active: Vec<usize> = (0..flights.len())
            .filter(|&i| !exit[i] && flights[i].done.is_some_and(|r| r < flights[i].target))
            .collect();
        debug_assert!(active.iter().all(|&i| flights[i].decided));
        let mut block_rows = 0;
        if !active.is_empty() {
            let token_choice = matches!(self.model().routing(), Routing::Token(_));
            let mut hv = Vec::with_capacity(active.len() * d);
            for &i in &active {
                let f = &flights[i];
                hv.extend_from_slice(if token_choice { &f.h } else { &f.x });
            }
            for j in 0..layout.base_depth {
                let layer_of =
                    |i: usize| layout.recursion_layers(flights[i].done.unwrap_or(0)).start + j;
                let mut srcs: Vec<usize> =
                    active.iter().map(|&i| layout.source[layer_of(i)]).collect();
                srcs.sort_unstable();
                srcs.dedup();
                let mut next = vec![0f32; hv.len()];
                for &src in &srcs {
                    let members: Vec<usize> = (0..active.len())
                        .filter(|&k| layout.source[layer_of(active[k])] == src)
                        .collect();
                    let refs: Vec<RowRef> = members
                        .iter()
                        .map(|&k| RowRef {
                            seq: active[k],
                            pos: flights[active[k]].pos,
                            layer: layer_of(active[k]),
                        })
                        .collect();
                    let input: Vec<f32> = if members.len() == active.len() {
                        std::mem::take(&mut hv)
                    } else {
                        members
                            .iter()
                            .flat_map(|&k| hv[k * d..(k + 1) * d].iter().copied())
                            .collect()
                    };
                    if j == 0 {
                        block_rows += members.len();
                    }
                    let out = self.layer_rows(src, &input, &refs, caches)?;
                    for (m, &k) in members.iter().enumerate() {
                        next[k * d..(k + 1) * d].copy_from_slice(&out[m * d..(m + 1) * d]);
                    }
                }
                hv = next;
            }
            // 4. Fold the block output into each token's state (as `step`: x + g·h, x + h, or h).
            for (k, &i) in active.iter().enumerate() {
                let f = &mut flights[i];
                let h = &hv[k * d..(k + 1) * d];
                let r = f.done.unwrap_or(0) + 1;
                f.done = Some(r);
                match self.model().routing() {
                    Routing::Expert(ec) => add_gated(
                        &mut f.x,
                        h,
                        routing::gate_weight(ec.config().gating, f.gate),
                    ),
                    Routing::Token(tc) => {
                        f.h.copy_from_slice(h);
                        if r == f.target {
                            add_gated(
                                &mut f.x,
                                h,
                                routing::gate_weight(tc.config().gating, f.gate),
                            );
                        }
                    }
                    Routing::None => f.x.copy_from_slice(h),
                }
                f.decided = false;
                if r >= f.target {
                    exit[i] = true;
                }
            }
            // Decide the next recursion now, so a token the router stops leaves in this step, not the next one.
            let cont: Vec<usize> = active.iter().copied().filter(|&i| !exit[i]).collect();
            self.route_flights(flights, &cont, &mut exit, opts)?;
        }

        // 5. Exits: suffix layers and LM head, batched.
        let exited: Vec<usize> = (0..flights.len()).filter(|&i| exit[i]).collect();
        let mut out = PipelineOutput {
            block_rows,
            ..Default::default()
        };
        if exited.is_empty() {
            return Ok(out);
        }
        let mut xv = Vec::with_capacity(exited.len() * d);
        for &i in &exited {
            xv.extend_from_slice(&flights[i].x);
        }
        for l in layout.suffix_layers() {
            let refs = flight_rows(flights, &exited, l);
            xv = self.layer_rows(layout.source[l], &xv, &refs, caches)?;
        }
        let x = Tensor::from_vec(xv, (exited.len(), d), dev)?.to_dtype(dtype)?;
        out.logits = self.head(&x)?.to_dtype(DType::F32)?.to_vec2()?;
        for &i in &exited {
            caches[i].seq_len += 1;
            out.depths.push(flights[i].done.unwrap_or(0));
        }
        out.exited = exited;
        Ok(out)
    }

    /// The routing decision of the flights `idx` for their next recursion (expert-choice; docs/architecture.md S5 causal rule,
    /// or calibrated thresholds, exactly as in [`CachedModel::step`]): a token not chosen is marked in `exit`, a
    /// chosen one gets its gate. Token-choice and recursive models decided the depth at entry.
    fn route_flights(
        &self,
        flights: &mut [Flight],
        idx: &[usize],
        exit: &mut [bool],
        opts: &StepOptions,
    ) -> Result<()> {
        let Routing::Expert(ec) = self.model().routing() else {
            for &i in idx {
                flights[i].decided = true;
            }
            return Ok(());
        };
        let d = self.model().config().hidden_size;
        let dev = self.model().device();
        for r in 0..self.model().layout().num_recursion {
            let group: Vec<usize> = idx
                .iter()
                .copied()
                .filter(|&i| flights[i].done == Some(r))
                .collect();
            if group.is_empty() {
                continue;
            }
            let mut xs = Vec::with_capacity(group.len() * d);
            for &i in &group {
                xs.extend_from_slice(&flights[i].x);
            }
            let xc = Tensor::from_vec(xs, (group.len(), d), dev)?.to_dtype(self.dtype)?;
            let logits = ec.logits(r, &xc, false)?;
            let probs: Vec<f32> = ec.gates(&logits)?.to_dtype(DType::F32)?.to_vec1()?;
            let chosen = ec
                .causal_decision(r, &xc, &logits, opts.expert_thresholds.as_deref())?
                .chosen;
            for (k, &i) in group.iter().enumerate() {
                exit[i] = !chosen[k];
                flights[i].gate = probs[k];
                flights[i].decided = true;
            }
        }
        Ok(())
    }
}

/// The layer rows of the flights `idx` at unrolled layer `layer`.
fn flight_rows(flights: &[Flight], idx: &[usize], layer: usize) -> Vec<RowRef> {
    idx.iter()
        .map(|&i| RowRef {
            seq: i,
            pos: flights[i].pos,
            layer,
        })
        .collect()
}

/// x += g·h (g = 1 adds h exactly, as the tensor path does).
fn add_gated(x: &mut [f32], h: &[f32], g: f32) {
    for (a, &b) in x.iter_mut().zip(h) {
        *a += if g == 1.0 { b } else { b * g };
    }
}
