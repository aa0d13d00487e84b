//! Log-likelihood scoring of task examples and the metrics lm-evaluation-harness reports for them.

use candle_core::{DType, Tensor, D};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::tasks::{build_example, Example, Task, TaskData};
use crate::data::Tokenizer;
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
pub struct ModelScorer<'a> {
    model: &'a MorModel,
    opts: ForwardOptions,
    pad: u32,
}

impl<'a> ModelScorer<'a> {
    /// Score with `model` using `opts` (e.g. [`ForwardOptions::eval`] or [`ForwardOptions::causal`]); `pad` is the
    /// id used to right-pad batches (any valid id: padded positions never influence scored positions when padding
    /// is used at all).
    pub fn new(model: &'a MorModel, opts: ForwardOptions, pad: u32) -> Self {
        ModelScorer { model, opts, pad }
    }

    /// Whether right padding is invisible to the scored positions: true unless expert-choice top-k routing is
    /// used, whose per-sequence top-k sees the whole (padded) length.
    fn padding_safe(&self) -> bool {
        !(matches!(self.model.routing(), Routing::Expert(_))
            && matches!(self.opts.mode, RouteMode::TopK { .. }))
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
            let rows = logits
                .get(b)?
                .narrow(0, *start, targets.len())?
                .to_dtype(DType::F32)?
                .contiguous()?;
            let logp = candle_nn::ops::log_softmax(&rows, D::Minus1)?;
            let argmax: Vec<u32> = logp.argmax(D::Minus1)?.to_vec1()?;
            let idx = Tensor::new(*targets, logp.device())?.unsqueeze(1)?;
            let lp: Vec<f32> = logp.gather(&idx, D::Minus1)?.squeeze(1)?.to_vec1()?;
            out.push(LogLik {
                logprob: lp.iter().map(|&x| x as f64).sum(),
                greedy: argmax.iter().zip(targets.iter()).all(|(a, b)| a == b),
            });
        }
        Ok(out)
    }
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
        if self.padding_safe() {
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
