//! Continuous batching (paper §3.3, App. E; docs/architecture.md S7): a queue of requests, a fixed number of slots, and a step that
//! advances the running sequences.
//!
//! Synchronous mode (default): each step feeds, in one [`CachedModel::step`], the prompt of every newly admitted
//! sequence (its prefill) and the last sampled token of every running one, so every running sequence advances by one
//! token. For vanilla and recursive models that is continuous sequence-wise batching; for MoR the same call batches
//! the tokens of all sequences depth by depth, so the shared block runs once per recursion with shrinking batches.
//!
//! Asynchronous mode ([`EngineOptions::asynchronous`], the paper's scheme): each sequence has one token in flight
//! ([`Flight`]), and every step runs the shared block once over all of them, whatever recursion each is at
//! ([`CachedModel::pipeline_step`]); a token that exits goes through the last layer, LM head and sampling in the same
//! step, and its sequence's next token enters at the next step. The block thus runs at (near) full batch and its
//! weights are read once per step for all depths. Same logits as the synchronous mode (`tests/engine.rs`).
//!
//! In both modes a slot freed by a finished sequence is refilled from the queue at the start of the next step.
//! Requests are validated on [`Engine::submit`] so a bad one is refused with a [`MorError::Request`] and never
//! reaches the batch; a sampling failure at run time ends only its own sequence ([`Finish::Failed`]).

use std::collections::VecDeque;

use candle_core::DType;

use crate::data::Tokenizer;
use crate::engine::cache::{recursion_block, SeqKv};
use crate::engine::pipeline::Flight;
use crate::engine::sampling::{Sampler, SamplingParams, StopCheck, StopMatcher};
use crate::engine::step::{CachedModel, StepOptions};
use crate::error::{MorError, Result};
use crate::model::MorModel;

/// Settings of an [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Sequences decoded together at most (slots).
    pub max_batch: usize,
    /// End-of-sequence token: generation stops when it is sampled, and an empty prompt starts from it (as in the
    /// paper's unconditional throughput runs). `None`: the model config's `eos_token_id`.
    pub eos_token_id: Option<u32>,
    /// Expert-choice only: calibrated per-recursion thresholds (see [`StepOptions::expert_thresholds`]); `None` uses
    /// the model's decode rule.
    pub expert_thresholds: Option<Vec<f64>>,
    /// Keep generating after EOS until `max_new_tokens` (benchmarks: fixed generation lengths).
    pub ignore_eos: bool,
    /// Asynchronous depth-wise batching (paper §3.3, App. E) for models with a recursion block: every step runs the
    /// shared block once over the tokens of all sequences at whatever recursion depth each is, instead of once per
    /// depth with shrinking batches; a token that exits goes to the suffix layers, LM head and sampling at once and
    /// its sequence's next token enters at the next step. Same logits as the synchronous mode. Ignored for vanilla
    /// models (no recursion block).
    pub asynchronous: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_batch: 8,
            eos_token_id: None,
            expert_thresholds: None,
            ignore_eos: false,
            asynchronous: false,
        }
    }
}

/// Identifies a submitted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// Why a sequence ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// `max_new_tokens` reached (or the context filled up).
    Length,
    /// EOS was sampled (it is not part of the output).
    Eos,
    /// A stop sequence appeared in the decoded text.
    Stop,
    /// This sequence failed at run time (e.g. its logits could not be sampled); others were not affected.
    Failed(String),
}

/// A finished request.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Its id.
    pub id: RequestId,
    /// Prompt tokens (an empty prompt becomes `[eos]`).
    pub prompt_tokens: Vec<u32>,
    /// Generated tokens.
    pub tokens: Vec<u32>,
    /// Decoded text without a matched stop sequence (with a tokenizer only).
    pub text: Option<String>,
    /// Why it ended.
    pub finish: Finish,
}

/// Counters of an [`Engine`] since it was created.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    /// Calls of [`Engine::step`] that ran the model.
    pub steps: usize,
    /// Tokens sampled (EOS included).
    pub generated: usize,
    /// Tokens fed to the model (prompts and sampled tokens).
    pub processed: usize,
    /// `depths[k]`: processed tokens that ran k recursions.
    pub depths: Vec<usize>,
    /// Largest K/V bytes held by all running sequences together, measured after each step.
    pub peak_kv_bytes: usize,
    /// Largest K/V bytes of the recursion-block layers alone.
    pub peak_kv_block_bytes: usize,
    /// Token-recursions run by the recursion block (Σ depths); with [`Self::steps`] this gives the mean rows per
    /// call of the shared block.
    pub block_rows: usize,
}

struct Queued {
    id: RequestId,
    prompt: Vec<u32>,
    params: SamplingParams,
    max_new: usize,
}

struct Running {
    id: RequestId,
    sampler: Sampler,
    stop: Option<StopMatcher>,
    prompt: Vec<u32>,
    context: Vec<u32>,
    tokens: Vec<u32>,
    max_new: usize,
    cache: SeqKv,
    pending: Vec<u32>,
    decoded_len: usize,
    /// Asynchronous mode: the token in flight (`None` until the prompt's prefill is done).
    flight: Option<Flight>,
}

/// A continuous-batching generation engine over one model.
pub struct Engine<'m> {
    model: CachedModel<'m>,
    tokenizer: Option<&'m Tokenizer>,
    opts: EngineOptions,
    eos: Option<u32>,
    queue: VecDeque<Queued>,
    running: Vec<Running>,
    finished: Vec<Finished>,
    next_id: u64,
    stats: EngineStats,
}

impl<'m> Engine<'m> {
    /// An engine for `model`. `tokenizer` is needed for stop sequences and decoded text.
    pub fn new(
        model: &'m MorModel,
        tokenizer: Option<&'m Tokenizer>,
        opts: EngineOptions,
    ) -> Result<Self> {
        if opts.max_batch == 0 {
            return Err(MorError::Config("max_batch must be >= 1".into()));
        }
        let eos = opts
            .eos_token_id
            .or(model.config().eos_token_id)
            .or(tokenizer.map(Tokenizer::eos_id));
        Ok(Engine {
            model: CachedModel::new(model)?,
            tokenizer,
            opts,
            eos,
            queue: VecDeque::new(),
            running: Vec::new(),
            finished: Vec::new(),
            next_id: 0,
            stats: EngineStats {
                depths: vec![0; model.layout().num_recursion + 1],
                ..Default::default()
            },
        })
    }

    /// Validate a request and queue it. Errors ([`MorError::Request`]) on an empty prompt without an EOS token to
    /// start from, tokens outside the vocabulary, a prompt that leaves no room in the context, invalid sampling
    /// values (including `max_new_tokens` 0 or absurdly large), and stop sequences without a tokenizer.
    /// `max_new_tokens` beyond the remaining context is clamped to it.
    pub fn submit(&mut self, prompt: Vec<u32>, params: SamplingParams) -> Result<RequestId> {
        let cfg = self.model.model().config();
        let ctx = self.model.model().rope().max_positions();
        let prompt = if prompt.is_empty() {
            match self.eos {
                Some(e) => vec![e],
                None => {
                    return Err(MorError::Request(
                        "empty prompt and no EOS token to start from".into(),
                    ))
                }
            }
        } else {
            prompt
        };
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(MorError::Request(format!(
                "prompt token {bad} is outside the model's vocabulary ({})",
                cfg.vocab_size
            )));
        }
        params.validate(prompt.len())?;
        if prompt.len() >= ctx {
            return Err(MorError::Request(format!(
                "prompt of {} tokens leaves no room in the model's context of {ctx}",
                prompt.len()
            )));
        }
        if !params.stop.is_empty() && self.tokenizer.is_none() {
            return Err(MorError::Request(
                "stop sequences need a tokenizer (the engine has none)".into(),
            ));
        }
        // Fail now rather than at admission.
        Sampler::new(params.clone())?;
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let max_new = params.max_new_tokens.min(ctx - prompt.len());
        self.queue.push_back(Queued {
            id,
            prompt,
            params,
            max_new,
        });
        Ok(id)
    }

    /// Requests waiting for a slot.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Sequences being decoded.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// True when nothing is queued or running.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.running.is_empty()
    }

    /// Counters so far.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// K/V bytes held by the running sequences.
    pub fn kv_bytes(&self) -> usize {
        self.running.iter().map(|r| r.cache.bytes()).sum()
    }

    /// Take the requests finished so far.
    pub fn take_finished(&mut self) -> Vec<Finished> {
        std::mem::take(&mut self.finished)
    }

    /// Fill free slots from the queue, then advance every running sequence by one token (new ones by their whole
    /// prompt). Returns the number of tokens sampled. A model error fails every running sequence (their caches may
    /// be inconsistent) and is returned; queued requests stay queued.
    pub fn step(&mut self) -> Result<usize> {
        while self.running.len() < self.opts.max_batch {
            let Some(q) = self.queue.pop_front() else {
                break;
            };
            let sampler = Sampler::new(q.params.clone())?;
            self.running.push(Running {
                id: q.id,
                sampler,
                stop: self.tokenizer.map(|_| StopMatcher::new(&q.params.stop)),
                context: q.prompt.clone(),
                pending: q.prompt.clone(),
                prompt: q.prompt,
                tokens: Vec::new(),
                max_new: q.max_new,
                cache: self.model.new_cache(),
                decoded_len: 0,
                flight: None,
            });
        }
        if self.running.is_empty() {
            return Ok(0);
        }
        if self.opts.asynchronous && self.model.model().layout().base_depth > 0 {
            return self.step_async();
        }
        let opts = StepOptions {
            expert_thresholds: self.opts.expert_thresholds.clone(),
            ..Default::default()
        };
        let result = {
            let (mut caches, toks): (Vec<&mut SeqKv>, Vec<&[u32]>) = self
                .running
                .iter_mut()
                .map(|r| (&mut r.cache, r.pending.as_slice()))
                .unzip();
            self.model.step(&mut caches, &toks, &opts)
        };
        let (out, rows) = match result.and_then(|o| {
            let rows: Vec<Vec<f32>> = o.logits.to_dtype(DType::F32)?.to_vec2()?;
            Ok((o, rows))
        }) {
            Ok(o) => o,
            Err(e) => {
                self.fail_all(&e);
                return Err(e);
            }
        };
        self.stats.steps += 1;
        for &d in &out.depths {
            if d >= self.stats.depths.len() {
                self.stats.depths.resize(d + 1, 0);
            }
            self.stats.depths[d] += 1;
        }
        self.stats.processed += out.depths.len();
        self.stats.block_rows += out.depths.iter().sum::<usize>();
        self.record_kv();
        let all: Vec<usize> = (0..self.running.len()).collect();
        self.sample_and_retire(&all, &rows)
    }

    /// Asynchronous step (see [`EngineOptions::asynchronous`]): prefill the prompts of newly admitted sequences
    /// but their last token (synchronously, as one batched step), then one [`CachedModel::pipeline_step`] over the
    /// tokens in flight of all running sequences; sample for the tokens that exited and put each sequence's next
    /// token in flight.
    fn step_async(&mut self) -> Result<usize> {
        let opts = StepOptions {
            expert_thresholds: self.opts.expert_thresholds.clone(),
            ..Default::default()
        };
        let result = (|| -> Result<_> {
            // Prompts longer than one token: everything but the last token is prefilled now.
            let (mut caches, toks): (Vec<&mut SeqKv>, Vec<&[u32]>) = self
                .running
                .iter_mut()
                .filter(|r| r.flight.is_none() && r.pending.len() > 1)
                .map(|r| (&mut r.cache, &r.pending[..r.pending.len() - 1]))
                .unzip();
            if !caches.is_empty() {
                let out = self.model.step(&mut caches, &toks, &opts)?;
                self.stats.processed += out.depths.len();
                for &d in &out.depths {
                    if d >= self.stats.depths.len() {
                        self.stats.depths.resize(d + 1, 0);
                    }
                    self.stats.depths[d] += 1;
                }
            }
            for r in self.running.iter_mut().filter(|r| r.flight.is_none()) {
                let last = *r.pending.last().ok_or_else(|| {
                    MorError::Request("a running sequence has no token to feed".into())
                })?;
                r.flight = Some(Flight::new(last));
            }
            let (mut caches, mut flights): (Vec<&mut SeqKv>, Vec<Flight>) = self
                .running
                .iter_mut()
                .map(|r| {
                    (
                        &mut r.cache,
                        r.flight.take().unwrap_or_else(|| Flight::new(0)),
                    )
                })
                .unzip();
            let out = self.model.pipeline_step(&mut flights, &mut caches, &opts);
            drop(caches);
            for (r, f) in self.running.iter_mut().zip(flights) {
                r.flight = Some(f);
            }
            out
        })();
        let out = match result {
            Ok(o) => o,
            Err(e) => {
                self.fail_all(&e);
                return Err(e);
            }
        };
        self.stats.steps += 1;
        self.stats.block_rows += out.block_rows;
        for &d in &out.depths {
            if d >= self.stats.depths.len() {
                self.stats.depths.resize(d + 1, 0);
            }
            self.stats.depths[d] += 1;
        }
        self.stats.processed += out.depths.len();
        self.record_kv();
        for &i in &out.exited {
            self.running[i].flight = None;
        }
        self.sample_and_retire(&out.exited, &out.logits)
    }

    /// Fail every running sequence after a model error (their caches may be inconsistent).
    fn fail_all(&mut self, e: &MorError) {
        for r in std::mem::take(&mut self.running) {
            self.finished.push(Finished {
                id: r.id,
                prompt_tokens: r.prompt,
                tokens: r.tokens,
                text: None,
                finish: Finish::Failed(format!("model step failed: {e}")),
            });
        }
    }

    /// Update the peak K/V counters after a step.
    fn record_kv(&mut self) {
        let block = recursion_block(self.model.model());
        let (kv, kv_block) = self.running.iter().fold((0, 0), |(a, b), r| {
            (a + r.cache.bytes(), b + r.cache.bytes_in(block.clone()))
        });
        self.stats.peak_kv_bytes = self.stats.peak_kv_bytes.max(kv);
        self.stats.peak_kv_block_bytes = self.stats.peak_kv_block_bytes.max(kv_block);
    }

    /// Sample the next token of the running sequences `idx` (ascending) from their logits `rows`, and retire the
    /// ones that finished. Returns the number of tokens sampled.
    fn sample_and_retire(&mut self, idx: &[usize], rows: &[Vec<f32>]) -> Result<usize> {
        let mut sampled = 0;
        let mut done = Vec::new();
        for (&i, row) in idx.iter().zip(rows) {
            let r = &mut self.running[i];
            let next = match r.sampler.sample(row, &r.context) {
                Ok(t) => t,
                Err(e) => {
                    done.push((i, Finish::Failed(e.to_string())));
                    continue;
                }
            };
            sampled += 1;
            if Some(next) == self.eos && !self.opts.ignore_eos {
                done.push((i, Finish::Eos));
                continue;
            }
            r.context.push(next);
            r.tokens.push(next);
            r.pending.clear();
            r.pending.push(next);
            if let (Some(tok), Some(stop)) = (self.tokenizer, r.stop.as_mut()) {
                match tok.decode(&r.tokens) {
                    Ok(full) => {
                        let piece = full.get(r.decoded_len..).unwrap_or("");
                        r.decoded_len = full.len();
                        if let StopCheck::Stop { .. } = stop.push(piece) {
                            done.push((i, Finish::Stop));
                            continue;
                        }
                    }
                    Err(e) => {
                        done.push((i, Finish::Failed(e.to_string())));
                        continue;
                    }
                }
            }
            if r.tokens.len() >= r.max_new {
                done.push((i, Finish::Length));
            }
        }
        self.stats.generated += sampled;
        for (i, finish) in done.into_iter().rev() {
            let r = self.running.remove(i);
            self.finished.push(Finished {
                id: r.id,
                prompt_tokens: r.prompt,
                tokens: r.tokens,
                text: r.stop.map(|s| s.text().to_string()),
                finish,
            });
        }
        Ok(sampled)
    }

    /// Step until every queued and running request has finished; returns them in completion order.
    pub fn run(&mut self) -> Result<Vec<Finished>> {
        while !self.is_idle() {
            self.step()?;
        }
        Ok(self.take_finished())
    }
}
