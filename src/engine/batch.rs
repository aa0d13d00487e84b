//! Continuous batching (paper §3.3, App. E; docs/architecture.md S7): a queue of requests, a fixed number of slots, and a step that
//! advances the running sequences. It is the one generation front end: [`crate::engine::generate`] is this engine with one
//! slot, and `mor serve` drives it from its engine thread.
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
//! In both modes a slot freed by a finished (or cancelled, [`Engine::cancel`]) sequence is refilled from the queue at
//! the start of the next step. Requests are validated on [`Engine::submit`] by [`RequestCheck`] so a bad one is
//! refused with a [`MorError::Request`] and never reaches the batch; a sampling failure at run time ends only its own
//! sequence ([`Finish::Failed`]). Each sampled token is reported as a [`Progress`] with the text it completes, for
//! streaming.

use std::collections::VecDeque;

use candle_core::DType;

use crate::data::Tokenizer;
use crate::engine::cache::{recursion_block, SeqKv};
use crate::engine::pipeline::Flight;
use crate::engine::sampling::{
    token_logprobs, Sampler, SamplingParams, StopCheck, StopMatcher, TokenLogprobs,
};
use crate::engine::step::{CachedModel, StepOptions};
use crate::error::{MorError, Result};
use crate::model::MorModel;

/// Settings of an [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Sequences decoded together at most (slots).
    pub max_batch: usize,
    /// An end-of-sequence token besides the model config's `eos_token_id` and the tokenizer's EOS (see
    /// [`EosRule`]); it is also the token an empty prompt starts from (as in the paper's unconditional throughput
    /// runs).
    pub eos_token_id: Option<u32>,
    /// Expert-choice only: calibrated per-recursion thresholds (see [`StepOptions::expert_thresholds`]); `None` uses
    /// the model's decode rule.
    pub expert_thresholds: Option<Vec<f64>>,
    /// Keep generating after EOS until `max_new_tokens` for every request (benchmarks: fixed generation lengths);
    /// a single request can ask for it with [`SamplingParams::ignore_eos`].
    pub ignore_eos: bool,
    /// Asynchronous depth-wise batching (paper §3.3, App. E) for models with a recursion block: every step runs the
    /// shared block once over the tokens of all sequences at whatever recursion depth each is, instead of once per
    /// depth with shrinking batches; a token that exits goes to the suffix layers, LM head and sampling at once and
    /// its sequence's next token enters at the next step. Same logits as the synchronous mode. Ignored for vanilla
    /// models (no recursion block).
    pub asynchronous: bool,
    /// Per-sequence context limit (prompt + generated tokens); `None` or anything larger: the model's
    /// `max_position_embeddings`.
    pub max_context: Option<usize>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_batch: 8,
            eos_token_id: None,
            expert_thresholds: None,
            ignore_eos: false,
            asynchronous: false,
            max_context: None,
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
    /// Cancelled by [`Engine::cancel`] (e.g. its client went away).
    Cancelled,
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

/// What one request produced since the last [`Engine::take_progress`]: one entry per sampled token, plus a final one
/// without a token for text held back until the sequence ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// The request.
    pub id: RequestId,
    /// The sampled token (not reported for EOS); `None` for the final flush.
    pub token: Option<u32>,
    /// Text that became final with it (with a tokenizer; may be empty): a character spanning several tokens comes
    /// out whole, and text that may start a stop sequence is held back until it cannot.
    pub text: String,
    /// The token's log-probabilities, if its request asked for them ([`SamplingParams::logprobs`]).
    pub logprobs: Option<TokenLogprobs>,
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
    /// `depths[k]`: processed tokens that ran k recursions (exited at depth k).
    pub depths: Vec<usize>,
    /// Largest K/V bytes held by all running sequences together, measured after each step.
    pub peak_kv_bytes: usize,
    /// Largest K/V bytes of the recursion-block layers alone.
    pub peak_kv_block_bytes: usize,
    /// Token-recursions run by the recursion block (Σ depths).
    pub block_rows: usize,
    /// Calls of the shared recursion block that had rows (synchronous: one per recursion some token of the step
    /// reached; asynchronous: one per step); `block_rows / block_calls` is the mean rows per shared-block call.
    pub block_calls: usize,
}

impl EngineStats {
    fn count_depths(&mut self, depths: &[usize]) {
        for &d in depths {
            if d >= self.depths.len() {
                self.depths.resize(d + 1, 0);
            }
            self.depths[d] += 1;
        }
        self.processed += depths.len();
    }
}

/// The one end-of-sequence rule of generation: a sequence ends when it samples the model config's `eos_token_id`
/// (e.g. SmolLM2-Instruct's `<|im_end|>`), the tokenizer's EOS (its document separator) or an extra id of
/// [`EngineOptions::eos_token_id`]. The EOS token is not part of the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EosRule {
    ids: Vec<u32>,
    /// The token an empty prompt starts from: the extra id, else the tokenizer's EOS, else the config's.
    start: Option<u32>,
}

impl EosRule {
    /// The rule for a model (its config's `eos_token_id`), an optional tokenizer and an optional extra id.
    pub fn new(model: &MorModel, tokenizer: Option<&Tokenizer>, extra: Option<u32>) -> Self {
        let cfg = model.config().eos_token_id;
        let tok = tokenizer.map(Tokenizer::eos_id);
        let mut ids: Vec<u32> = [extra, cfg, tok].into_iter().flatten().collect();
        ids.sort_unstable();
        ids.dedup();
        EosRule {
            ids,
            start: extra.or(tok).or(cfg),
        }
    }

    /// Whether `token` ends a sequence.
    pub fn is_eos(&self, token: u32) -> bool {
        self.ids.contains(&token)
    }
}

/// The one request validator of generation, usable away from the engine (e.g. by an HTTP front end before it
/// queues a request).
#[derive(Debug, Clone)]
pub struct RequestCheck {
    vocab_size: usize,
    context: usize,
    start: Option<u32>,
    has_tokenizer: bool,
}

/// A request that passed [`RequestCheck::check`].
#[derive(Debug, Clone)]
pub struct Checked {
    /// The prompt (an empty one becomes the EOS start token).
    pub prompt: Vec<u32>,
    /// `max_new_tokens` clamped to the context that remains after the prompt.
    pub max_new: usize,
}

impl RequestCheck {
    /// The validator for `model` under `eos`, with or without a tokenizer, and a per-sequence context limit
    /// (`None` or anything larger: the model's `max_position_embeddings`).
    pub fn new(
        model: &MorModel,
        eos: &EosRule,
        has_tokenizer: bool,
        max_context: Option<usize>,
    ) -> Self {
        let positions = model.rope().max_positions();
        RequestCheck {
            vocab_size: model.config().vocab_size,
            context: max_context.map_or(positions, |c| c.min(positions)),
            start: eos.start,
            has_tokenizer,
        }
    }

    /// The per-sequence context limit (prompt + generated tokens).
    pub fn context(&self) -> usize {
        self.context
    }

    /// Validate a request. Errors ([`MorError::Request`]) on an empty prompt without an EOS token to start from,
    /// tokens outside the vocabulary, a prompt that leaves no room in the context, invalid sampling values
    /// (including `max_new_tokens` 0 or absurdly large), and stop sequences without a tokenizer.
    pub fn check(&self, prompt: Vec<u32>, params: &SamplingParams) -> Result<Checked> {
        let prompt = if prompt.is_empty() {
            match self.start {
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
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(MorError::Request(format!(
                "prompt token {bad} is outside the model's vocabulary ({})",
                self.vocab_size
            )));
        }
        params.validate(prompt.len())?;
        if prompt.len() >= self.context {
            return Err(MorError::Request(format!(
                "prompt of {} tokens leaves no room in the context of {}",
                prompt.len(),
                self.context
            )));
        }
        if !params.stop.is_empty() && !self.has_tokenizer {
            return Err(MorError::Request(
                "stop sequences need a tokenizer (the engine has none)".into(),
            ));
        }
        let max_new = params.max_new_tokens.min(self.context - prompt.len());
        Ok(Checked { prompt, max_new })
    }
}

/// A tokenizer with more tokens than the model has logits cannot belong to it.
pub(crate) fn check_tokenizer(model: &MorModel, tokenizer: &Tokenizer) -> Result<()> {
    let vocab = model.config().vocab_size;
    if tokenizer.vocab_size() > vocab {
        return Err(MorError::Config(format!(
            "the tokenizer has {} tokens but the model's vocabulary has {vocab}: they do not belong together",
            tokenizer.vocab_size()
        )));
    }
    Ok(())
}

/// The decoding state of one sequence, shared by the engine and the full-recompute reference
/// ([`crate::engine::generate::generate_reference`]): sampler, context, stop sequences and the text streamed so far.
pub(crate) struct Decoder {
    sampler: Sampler,
    /// Stop matching and decoded text (with a tokenizer only).
    stop: Option<StopMatcher>,
    prompt: Vec<u32>,
    context: Vec<u32>,
    tokens: Vec<u32>,
    max_new: usize,
    decoded_len: usize,
    streamed: usize,
}

/// What [`Decoder::advance`] did with one logits row.
pub(crate) struct Advance {
    /// The sampled token; `None` if sampling failed.
    pub token: Option<u32>,
    /// Text that became final (empty without a tokenizer).
    pub text: String,
    /// The token's log-probabilities, if asked for ([`SamplingParams::logprobs`]).
    pub logprobs: Option<TokenLogprobs>,
    /// Set when the sequence ended.
    pub finish: Option<Finish>,
}

impl Decoder {
    /// A decoder for a checked request.
    pub fn new(req: Checked, params: &SamplingParams, with_text: bool) -> Result<Self> {
        Ok(Decoder {
            sampler: Sampler::new(params.clone())?,
            stop: with_text.then(|| StopMatcher::new(&params.stop)),
            context: req.prompt.clone(),
            prompt: req.prompt,
            tokens: Vec::new(),
            max_new: req.max_new,
            decoded_len: 0,
            streamed: 0,
        })
    }

    /// The prompt and every token generated so far.
    pub fn context(&self) -> &[u32] {
        &self.context
    }

    /// Sample the next token from `row` and apply the EOS rule, stop sequences and the length limit.
    pub fn advance(
        &mut self,
        row: &[f32],
        eos: &EosRule,
        ignore_eos: bool,
        tokenizer: Option<&Tokenizer>,
    ) -> Advance {
        let next = match self.sampler.sample(row, &self.context) {
            Ok(t) => t,
            Err(e) => return Self::end(Finish::Failed(e.to_string())),
        };
        if eos.is_eos(next) && !(ignore_eos || self.sampler.params().ignore_eos) {
            return Self::end(Finish::Eos);
        }
        let logprobs = self
            .sampler
            .params()
            .logprobs
            .map(|n| token_logprobs(row, next, n));
        self.context.push(next);
        self.tokens.push(next);
        let mut text = String::new();
        if let (Some(tok), Some(stop)) = (tokenizer, self.stop.as_mut()) {
            // Decode the whole continuation so characters spanning several tokens come out whole.
            let full = match tok.decode(&self.tokens) {
                Ok(f) => f,
                Err(e) => return Self::end(Finish::Failed(e.to_string())),
            };
            let piece = full.get(self.decoded_len..).unwrap_or("");
            self.decoded_len = full.len();
            let check = stop.push(piece);
            let safe = stop.stable_len();
            if safe > self.streamed {
                text = stop.text()[self.streamed..safe].to_string();
                self.streamed = safe;
            }
            if let StopCheck::Stop { .. } = check {
                return Advance {
                    token: Some(next),
                    text,
                    logprobs,
                    finish: Some(Finish::Stop),
                };
            }
        }
        let finish = (self.tokens.len() >= self.max_new).then_some(Finish::Length);
        Advance {
            token: Some(next),
            text,
            logprobs,
            finish,
        }
    }

    /// The sequence ended without a token to report (EOS, or a failure).
    fn end(finish: Finish) -> Advance {
        Advance {
            token: None,
            text: String::new(),
            logprobs: None,
            finish: Some(finish),
        }
    }

    /// Text not streamed yet (held back in case it started a stop sequence); empty once taken.
    pub fn flush(&mut self) -> String {
        let Some(stop) = &self.stop else {
            return String::new();
        };
        let rest = stop.text().get(self.streamed..).unwrap_or("").to_string();
        self.streamed = stop.text().len();
        rest
    }

    /// The finished request.
    pub fn finished(self, id: RequestId, finish: Finish) -> Finished {
        Finished {
            id,
            prompt_tokens: self.prompt,
            tokens: self.tokens,
            text: self.stop.map(|s| s.text().to_string()),
            finish,
        }
    }
}

struct Queued {
    id: RequestId,
    req: Checked,
    params: SamplingParams,
}

struct Running {
    id: RequestId,
    decoder: Decoder,
    cache: SeqKv,
    pending: Vec<u32>,
    /// Asynchronous mode: the token in flight (`None` until the prompt's prefill is done).
    flight: Option<Flight>,
}

/// A continuous-batching generation engine over one model.
pub struct Engine<'m> {
    model: CachedModel<'m>,
    tokenizer: Option<&'m Tokenizer>,
    opts: EngineOptions,
    eos: EosRule,
    check: RequestCheck,
    queue: VecDeque<Queued>,
    running: Vec<Running>,
    finished: Vec<Finished>,
    progress: Vec<Progress>,
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
        Self::with_cached(CachedModel::new(model)?, tokenizer, opts)
    }

    /// An engine on a prepared [`CachedModel`] (e.g. one running quantized weights).
    pub fn with_cached(
        model: CachedModel<'m>,
        tokenizer: Option<&'m Tokenizer>,
        opts: EngineOptions,
    ) -> Result<Self> {
        if opts.max_batch == 0 {
            return Err(MorError::Config("max_batch must be >= 1".into()));
        }
        let m = model.model();
        if let Some(tok) = tokenizer {
            check_tokenizer(m, tok)?;
        }
        let eos = EosRule::new(m, tokenizer, opts.eos_token_id);
        let check = RequestCheck::new(m, &eos, tokenizer.is_some(), opts.max_context);
        let stats = EngineStats {
            depths: vec![0; m.layout().num_recursion + 1],
            ..Default::default()
        };
        Ok(Engine {
            model,
            tokenizer,
            opts,
            eos,
            check,
            queue: VecDeque::new(),
            running: Vec::new(),
            finished: Vec::new(),
            progress: Vec::new(),
            next_id: 0,
            stats,
        })
    }

    /// The validator [`submit`](Self::submit) applies.
    pub fn request_check(&self) -> &RequestCheck {
        &self.check
    }

    /// Validate a request ([`RequestCheck::check`]) and queue it. `max_new_tokens` beyond the remaining context is
    /// clamped to it.
    pub fn submit(&mut self, prompt: Vec<u32>, params: SamplingParams) -> Result<RequestId> {
        let req = self.check.check(prompt, &params)?;
        // Fail now rather than at admission.
        Sampler::new(params.clone())?;
        let id = RequestId(self.next_id);
        self.next_id += 1;
        self.queue.push_back(Queued { id, req, params });
        Ok(id)
    }

    /// Stop a queued or running request now: its slot and K/V cache are freed and it finishes with
    /// [`Finish::Cancelled`]. Returns false if it is not queued or running (e.g. already finished).
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.queue.iter().position(|q| q.id == id) {
            let q = self.queue.remove(i).expect("index from position");
            self.finished.push(Finished {
                id,
                prompt_tokens: q.req.prompt,
                tokens: Vec::new(),
                text: None,
                finish: Finish::Cancelled,
            });
            return true;
        }
        if let Some(i) = self.running.iter().position(|r| r.id == id) {
            let r = self.running.remove(i);
            self.finished
                .push(r.decoder.finished(id, Finish::Cancelled));
            return true;
        }
        false
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

    /// Take the tokens and text produced so far, in order. A request's entries all precede its [`Finished`].
    pub fn take_progress(&mut self) -> Vec<Progress> {
        std::mem::take(&mut self.progress)
    }

    /// Fill free slots from the queue, then advance every running sequence by one token (new ones by their whole
    /// prompt). Returns the number of tokens sampled. A model error fails every running sequence (their caches may
    /// be inconsistent) and is returned; queued requests stay queued.
    pub fn step(&mut self) -> Result<usize> {
        while self.running.len() < self.opts.max_batch {
            let Some(q) = self.queue.pop_front() else {
                break;
            };
            let pending = q.req.prompt.clone();
            let decoder = Decoder::new(q.req, &q.params, self.tokenizer.is_some())?;
            self.running.push(Running {
                id: q.id,
                decoder,
                cache: self.model.new_cache(),
                pending,
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
        self.stats.count_depths(&out.depths);
        self.stats.block_rows += out.depths.iter().sum::<usize>();
        self.stats.block_calls += out.depths.iter().copied().max().unwrap_or(0);
        self.record_kv();
        let all: Vec<usize> = (0..self.running.len()).collect();
        Ok(self.sample_and_retire(&all, &rows))
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
                self.stats.count_depths(&out.depths);
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
        self.stats.block_calls += usize::from(out.block_rows > 0);
        self.stats.count_depths(&out.depths);
        self.record_kv();
        for &i in &out.exited {
            self.running[i].flight = None;
        }
        Ok(self.sample_and_retire(&out.exited, &out.logits))
    }

    /// Fail every running sequence after a model error (their caches may be inconsistent).
    fn fail_all(&mut self, e: &MorError) {
        for r in std::mem::take(&mut self.running) {
            let f = Finish::Failed(format!("model step failed: {e}"));
            self.finished.push(r.decoder.finished(r.id, f));
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
    fn sample_and_retire(&mut self, idx: &[usize], rows: &[Vec<f32>]) -> usize {
        let mut sampled = 0;
        let mut done = Vec::new();
        for (&i, row) in idx.iter().zip(rows) {
            let r = &mut self.running[i];
            let adv = r
                .decoder
                .advance(row, &self.eos, self.opts.ignore_eos, self.tokenizer);
            if adv.token.is_some() || adv.finish == Some(Finish::Eos) {
                sampled += 1;
            }
            if let Some(t) = adv.token {
                r.pending.clear();
                r.pending.push(t);
                self.progress.push(Progress {
                    id: r.id,
                    token: Some(t),
                    text: adv.text,
                    logprobs: adv.logprobs,
                });
            }
            if let Some(f) = adv.finish {
                done.push((i, f));
            }
        }
        self.stats.generated += sampled;
        for (i, finish) in done.into_iter().rev() {
            let mut r = self.running.remove(i);
            let rest = r.decoder.flush();
            if !rest.is_empty() {
                self.progress.push(Progress {
                    id: r.id,
                    token: None,
                    text: rest,
                    logprobs: None,
                });
            }
            self.finished.push(r.decoder.finished(r.id, finish));
        }
        sampled
    }

    /// Step until every queued and running request has finished; returns them in completion order.
    pub fn run(&mut self) -> Result<Vec<Finished>> {
        while !self.is_idle() {
            self.step()?;
        }
        Ok(self.take_finished())
    }
}
