//! Log-likelihood scoring of task examples and the metrics lm-evaluation-harness reports for them.

use candle_core::{DType, Tensor, D};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::tasks::{build_example, Example, Task, TaskData};
use crate::data::Tokenizer;
use crate::engine::step::{CachedModel, StepOptions};
use crate::model::expert_choice::RouteMode;
use crate::model::{ForwardOptions, MorModel, Routing};
use crate::{MorError, Result};

/// One log-likelihood request in token ids: score `continuation` given `context`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Conditioning tokens (never empty: an empty context is replaced by EOS, as lm-eval does).
    pub context: Vec<u32>,
    /// Scored tokens (never empty).
    pub continuation: Vec<u32>,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogLik {
    /// Σ log p(continuation token | everything before it), in nats.
    pub logprob: f64,
    /// Whether every continuation token is the argmax at its position (greedy decoding reproduces it).
    pub greedy: bool,
}

/// Anything that scores log-likelihood requests: a model, or a stub in tests.
pub trait Scorer {
    /// Score a batch of requests (the candidates of one example), in order.
    fn score(&mut self, requests: &[Request]) -> Result<Vec<LogLik>>;
}

/// lm-eval's `_encode_pair`: trailing whitespace of the context moves to the continuation, the pair is encoded
/// whole, and the continuation tokens are what follows the context's own encoding. An empty context becomes
/// `[eos]`.
pub fn encode_pair(tok: &Tokenizer, context: &str, continuation: &str) -> Result<Request> {
    let trimmed = context.trim_end();
    let moved = &context[trimmed.len()..];
    let continuation = format!("{moved}{continuation}");
    if continuation.is_empty() {
        return Err(MorError::Request(format!(
            "empty continuation for context {context:?}"
        )));
    }
    let whole = tok.encode(&format!("{trimmed}{continuation}"))?;
    let mut context = if trimmed.is_empty() {
        Vec::new()
    } else {
        tok.encode(trimmed)?
    };
    // A merge across the boundary can make the whole encoding's prefix differ from the context's own encoding.
    // lm-eval then still conditions on the context's own encoding and scores the whole encoding's tokens after
    // the context's length; so do we, so that the model sees exactly what lm-eval feeds it.
    let cont = whole.get(context.len()..).unwrap_or_default().to_vec();
    if cont.is_empty() {
        return Err(MorError::Request(format!(
            "continuation {continuation:?} encodes to no tokens after context {trimmed:?}"
        )));
    }
    if context.is_empty() {
        context.push(tok.eos_id());
    }
    Ok(Request {
        context,
        continuation: cont,
    })
}

/// Scores requests with a [`MorModel`] under a routing mode.
///
/// By default every candidate runs as its own (right-padded) full sequence. With
/// [`ModelScorer::with_prefix_reuse`], when routing is causal, the token prefix the candidates of an example share runs
/// once through the KV-cached engine and each candidate continues from a copy of that cache.
pub struct ModelScorer<'a> {
    model: &'a MorModel,
    opts: ForwardOptions,
    pad: u32,
    /// The KV-cached engine, present when shared-prefix reuse is on and possible.
    cached: Option<CachedModel<'a>>,
    /// Token positions not recomputed thanks to the shared prefix (prefix length × (candidates − 1), summed).
    reused_tokens: usize,
}

impl<'a> ModelScorer<'a> {
    /// Score with `model` using `opts` (e.g. [`ForwardOptions::eval`] or [`ForwardOptions::causal`]); `pad` is the
    /// id used to right-pad batches (any valid id: padded positions never influence scored positions when padding
    /// is used at all).
    pub fn new(model: &'a MorModel, opts: ForwardOptions, pad: u32) -> Self {
        ModelScorer {
            model,
            opts,
            pad,
            cached: None,
            reused_tokens: 0,
        }
    }

    /// Turn on shared-prefix reuse where it is exact: the common prefix of a batch of requests runs once through the
    /// KV-cached engine ([`CachedModel`]) and each request's remaining tokens run on a clone of that cache, all in
    /// one depth-wise batched step. The engine routes each token from its own hidden state (docs/architecture.md S5), which is
    /// what the full forward does for vanilla, recursive and token-choice models and for expert-choice under
    /// [`RouteMode::Causal`]. Expert-choice under the paper's top-k is left on the full-sequence path: its per-sequence
    /// top-k looks at every token of the sequence, so a prefix's hidden states depend on what follows it and cannot
    /// be shared. Configurations the engine refuses (hybrid KV sharing) also stay on the full path; see
    /// [`ModelScorer::reuses_prefix`]. Where it pays: a batch takes the cached path only when that computes at least
    /// 1.5× fewer positions than the padded full batch (the engine costs more per position), so single requests and
    /// short shared prefixes stay on the full path.
    pub fn with_prefix_reuse(mut self) -> Result<Self> {
        if !self.causal_routing() {
            return Ok(self);
        }
        match CachedModel::new(self.model) {
            Ok(c) => self.cached = Some(c),
            // An unsupported cache configuration is not an error of the evaluation: the full path is exact.
            Err(MorError::Config(_)) => {}
            Err(e) => return Err(e),
        }
        Ok(self)
    }

    /// Whether shared-prefix reuse is active.
    pub fn reuses_prefix(&self) -> bool {
        self.cached.is_some()
    }

    /// Token positions computed once instead of once per candidate so far (0 without reuse).
    pub fn reused_tokens(&self) -> usize {
        self.reused_tokens
    }

    /// Whether every token is routed from its own past only: true unless expert-choice top-k routing is used, whose
    /// per-sequence top-k sees the whole (padded) length. Right padding is invisible to the scored positions and
    /// the shared prefix's state is independent of what follows it exactly when this holds.
    fn causal_routing(&self) -> bool {
        !(matches!(self.model.routing(), Routing::Expert(_))
            && matches!(self.opts.mode, RouteMode::TopK { .. }))
    }

    /// Score `inputs` (input ids, index of the first scored position, targets) on top of their first `p` tokens,
    /// which they share ([`shared_prefix`]).
    fn run_cached(
        &self,
        engine: &CachedModel<'_>,
        inputs: &[(Vec<u32>, usize, &[u32])],
        p: usize,
    ) -> Result<Vec<LogLik>> {
        let first = &inputs[0].0;
        let mut prefix = engine.new_cache();
        engine.step(&mut [&mut prefix], &[&first[..p]], &StepOptions::default())?;
        let mut caches: Vec<_> = inputs.iter().map(|_| prefix.clone()).collect();
        let mut refs: Vec<&mut _> = caches.iter_mut().collect();
        let chunks: Vec<&[u32]> = inputs.iter().map(|(ids, _, _)| &ids[p..]).collect();
        let opts = StepOptions {
            all_logits: true,
            ..Default::default()
        };
        let logits = engine.step(&mut refs, &chunks, &opts)?.logits;
        let mut off = 0;
        let mut out = Vec::with_capacity(inputs.len());
        for (ids, start, targets) in inputs {
            // The chunk holds positions p..len; the scored ones are start..start + targets.len().
            let rows = logits.narrow(0, off + start - p, targets.len())?;
            out.push(loglik(&rows, targets)?);
            off += ids.len() - p;
        }
        Ok(out)
    }

    fn run(&self, inputs: &[(Vec<u32>, usize, &[u32])]) -> Result<Vec<LogLik>> {
        let t = inputs
            .iter()
            .map(|(ids, _, _)| ids.len())
            .max()
            .unwrap_or(0);
        let mut flat = Vec::with_capacity(inputs.len() * t);
        for (ids, _, _) in inputs {
            flat.extend_from_slice(ids);
            flat.resize(flat.len() + t - ids.len(), self.pad);
        }
        let ids = Tensor::from_vec(flat, (inputs.len(), t), self.model.device())?;
        let logits = self.model.forward(&ids, &self.opts)?.logits;
        let mut out = Vec::with_capacity(inputs.len());
        for (b, (_, start, targets)) in inputs.iter().enumerate() {
            out.push(loglik(
                &logits.get(b)?.narrow(0, *start, targets.len())?,
                targets,
            )?);
        }
        Ok(out)
    }
}

/// The cached engine costs more per position than the batched full forward (measured on SmolLM2-135M with one
/// thread, see docs/evaluation.md: PIQA, with 1.3× fewer positions, ran no faster), so an example takes the cached
/// path only when it computes at least this many times fewer positions.
const REUSE_MIN_SAVING: f64 = 1.5;

/// Length of the token prefix all `inputs` share, capped at the first scored position of each: the scored positions'
/// logits come out of the per-input step, so every input keeps a non-empty remainder.
fn shared_prefix(inputs: &[(Vec<u32>, usize, &[u32])]) -> usize {
    let Some((first, _, _)) = inputs.first() else {
        return 0;
    };
    let mut p = inputs.iter().map(|(_, s, _)| *s).min().unwrap_or(0);
    for (ids, _, _) in &inputs[1..] {
        p = p.min(first.iter().zip(ids).take_while(|(a, b)| a == b).count());
    }
    p
}

/// Log-likelihood of `targets` under logit rows [K, V] (row k predicts `targets[k]`).
fn loglik(rows: &Tensor, targets: &[u32]) -> Result<LogLik> {
    let rows = rows.to_dtype(DType::F32)?.contiguous()?;
    let logp = candle_nn::ops::log_softmax(&rows, D::Minus1)?;
    let argmax: Vec<u32> = logp.argmax(D::Minus1)?.to_vec1()?;
    let idx = Tensor::new(targets, logp.device())?.unsqueeze(1)?;
    let lp: Vec<f32> = logp.gather(&idx, D::Minus1)?.squeeze(1)?.to_vec1()?;
    Ok(LogLik {
        logprob: lp.iter().map(|&x| x as f64).sum(),
        greedy: argmax.iter().zip(targets).all(|(a, b)| a == b),
    })
}

impl Scorer for ModelScorer<'_> {
    fn score(&mut self, requests: &[Request]) -> Result<Vec<LogLik>> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let max = self.model.config().max_position_embeddings;
        // lm-eval: inp = (context + continuation)[-(max_len + 1):][:-1]; the continuation's predictions are the
        // last len(continuation) positions of the input.
        let mut inputs = Vec::with_capacity(requests.len());
        for r in requests {
            if r.continuation.len() > max {
                return Err(MorError::Request(format!(
                    "continuation of {} tokens exceeds the context length {max}",
                    r.continuation.len()
                )));
            }
            let mut all: Vec<u32> = r.context.iter().chain(&r.continuation).copied().collect();
            let keep = all.len().min(max + 1);
            all.drain(..all.len() - keep);
            all.pop();
            let start = all.len() - r.continuation.len();
            inputs.push((all, start, r.continuation.as_slice()));
        }
        if let Some(engine) = &self.cached {
            let p = shared_prefix(&inputs);
            // Positions each path computes: the full path pads every input to the longest, the cached path runs the
            // prefix once and then each input's own remainder.
            let full = inputs.len()
                * inputs
                    .iter()
                    .map(|(ids, _, _)| ids.len())
                    .max()
                    .unwrap_or(0);
            let cached = p + inputs
                .iter()
                .map(|(ids, _, _)| ids.len() - p)
                .sum::<usize>();
            if p > 0 && full as f64 >= REUSE_MIN_SAVING * cached as f64 {
                let out = self.run_cached(engine, &inputs, p)?;
                self.reused_tokens += p * (inputs.len() - 1);
                return Ok(out);
            }
        }
        if self.causal_routing() {
            return self.run(&inputs);
        }
        // Top-k routing depends on the sequence length, so only equal-length inputs share a batch.
        let mut out = vec![None; inputs.len()];
        let mut order: Vec<usize> = (0..inputs.len()).collect();
        order.sort_by_key(|&i| inputs[i].0.len());
        for group in order.chunk_by(|&a, &b| inputs[a].0.len() == inputs[b].0.len()) {
            let batch: Vec<_> = group.iter().map(|&i| inputs[i].clone()).collect();
            for (&i, ll) in group.iter().zip(self.run(&batch)?) {
                out[i] = Some(ll);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }
}

/// Per-example outcome.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExampleResult {
    /// Log-likelihood of each candidate.
    pub logprobs: Vec<f64>,
    /// Whether the raw argmax (or, for LAMBADA, the greedy match) is correct.
    pub correct: bool,
    /// Whether the byte-length-normalised argmax is correct.
    pub correct_norm: bool,
    /// Tokens of each candidate's context (before left truncation), kept so that per-example dumps can be
    /// compared token for token with another implementation.
    pub context_tokens: Vec<usize>,
    /// Token ids of each candidate's scored continuation.
    pub continuation_tokens: Vec<Vec<u32>>,
}

/// Score one example: all its candidates in one batch.
pub fn score_example(
    scorer: &mut dyn Scorer,
    tok: &Tokenizer,
    ex: &Example,
) -> Result<ExampleResult> {
    let reqs = ex
        .candidates
        .iter()
        .map(|c| encode_pair(tok, &c.context, &c.continuation))
        .collect::<Result<Vec<_>>>()?;
    let lls = scorer.score(&reqs)?;
    if lls.len() != reqs.len() {
        return Err(MorError::Request(format!(
            "scorer returned {} results for {} requests",
            lls.len(),
            reqs.len()
        )));
    }
    let logprobs: Vec<f64> = lls.iter().map(|l| l.logprob).collect();
    let norm: Vec<f64> = logprobs
        .iter()
        .zip(&ex.candidates)
        .map(|(lp, c)| lp / c.norm_bytes.max(1) as f64)
        .collect();
    let (correct, correct_norm) = if ex.greedy {
        (lls[0].greedy, lls[0].greedy)
    } else {
        (argmax(&logprobs) == ex.gold, argmax(&norm) == ex.gold)
    };
    Ok(ExampleResult {
        logprobs,
        correct,
        correct_norm,
        context_tokens: reqs.iter().map(|r| r.context.len()).collect(),
        continuation_tokens: reqs.into_iter().map(|r| r.continuation).collect(),
    })
}

/// Index of the largest value (the first on ties, as `np.argmax`).
pub fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// Mean and standard error of the mean (sample standard deviation / √n, lm-eval's `mean_stderr`).
pub fn mean_stderr(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// A task's scores.
#[derive(Debug, Clone, Serialize)]
pub struct TaskResult {
    /// Task name.
    pub task: String,
    /// Shots.
    pub num_fewshot: usize,
    /// Examples scored.
    pub n: usize,
    /// Accuracy (LAMBADA: greedy final-word match).
    pub acc: f64,
    /// Standard error of `acc`.
    pub acc_stderr: f64,
    /// Byte-length-normalised accuracy (`None` for LAMBADA).
    pub acc_norm: Option<f64>,
    /// Standard error of `acc_norm`.
    pub acc_norm_stderr: Option<f64>,
    /// LAMBADA: perplexity of the final word, exp(−mean log-likelihood).
    pub perplexity: Option<f64>,
    /// The metric the paper reports for this task.
    pub paper_metric: String,
}

/// Options of a task run.
#[derive(Debug, Clone)]
pub struct TaskOptions {
    /// Shots per example.
    pub num_fewshot: usize,
    /// Seed of the shot sample.
    pub seed: u64,
    /// Cap on examples (the first N).
    pub limit: Option<usize>,
    /// Show a progress bar.
    pub progress: bool,
}

/// Score a task's examples and aggregate acc / acc_norm with standard errors.
pub fn run_task(
    scorer: &mut dyn Scorer,
    tok: &Tokenizer,
    data: &TaskData,
    opts: &TaskOptions,
) -> Result<(TaskResult, Vec<ExampleResult>)> {
    let n = opts.limit.unwrap_or(usize::MAX).min(data.docs.len());
    let pb = if opts.progress {
        let pb = ProgressBar::new(n as u64);
        pb.set_style(
            ProgressStyle::with_template(
                "{msg:>14} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
            )
            .map_err(|e| MorError::Request(e.to_string()))?
            .progress_chars("=> "),
        );
        pb.set_message(data.task.name());
        pb
    } else {
        ProgressBar::hidden()
    };
    let mut results = Vec::with_capacity(n);
    for i in 0..n {
        let ex = build_example(data, i, opts.num_fewshot, opts.seed);
        results.push(score_example(scorer, tok, &ex)?);
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok((aggregate(data.task, opts.num_fewshot, &results), results))
}

/// Aggregate per-example results into a [`TaskResult`].
pub fn aggregate(task: Task, num_fewshot: usize, results: &[ExampleResult]) -> TaskResult {
    let acc: Vec<f64> = results.iter().map(|r| r.correct as u8 as f64).collect();
    let norm: Vec<f64> = results
        .iter()
        .map(|r| r.correct_norm as u8 as f64)
        .collect();
    let (acc, acc_stderr) = mean_stderr(&acc);
    let lambada = task == Task::Lambada;
    let (acc_norm, acc_norm_stderr) = mean_stderr(&norm);
    let perplexity = lambada.then(|| {
        let ll: f64 = results.iter().map(|r| r.logprobs[0]).sum();
        (-ll / results.len().max(1) as f64).exp()
    });
    TaskResult {
        task: task.name().to_string(),
        num_fewshot,
        n: results.len(),
        acc,
        acc_stderr,
        acc_norm: (!lambada).then_some(acc_norm),
        acc_norm_stderr: (!lambada).then_some(acc_norm_stderr),
        perplexity,
        paper_metric: task.paper_metric().to_string(),
    }
}

fn pct(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{:.2}", 100.0 * x)
    }
}

/// Markdown table of task results (percentages ± standard error).
pub fn markdown_table(title: &str, results: &[TaskResult]) -> String {
    let mut s = format!(
        "### {title}\n\n| task | shots | n | acc | acc_norm | paper metric | ppl |\n|---|---|---|---|---|---|---|\n"
    );
    for r in results {
        let norm = match (r.acc_norm, r.acc_norm_stderr) {
            (Some(a), Some(e)) => format!("{} ± {}", pct(a), pct(e)),
            _ => "-".into(),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} ± {} | {} | {} | {} |\n",
            r.task,
            r.num_fewshot,
            r.n,
            pct(r.acc),
            pct(r.acc_stderr),
            norm,
            r.paper_metric,
            r.perplexity
                .map(|p| format!("{p:.2}"))
                .unwrap_or_else(|| "-".into())
        ));
    }
    let paper: Vec<f64> = results
        .iter()
        .map(|r| match r.paper_metric.as_str() {
            "acc_norm" => r.acc_norm.unwrap_or(r.acc),
            _ => r.acc,
        })
        .collect();
    if !paper.is_empty() {
        s.push_str(&format!(
            "\nAverage of the paper metrics over {} tasks: {}\n",
            paper.len(),
            pct(paper.iter().sum::<f64>() / paper.len() as f64)
        ));
    }
    s
}
