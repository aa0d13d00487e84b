//! Language-modelling loss over fixed-length windows: NLL, perplexity and bits per byte.
//!
//! Byte counting (the denominator of bits per byte):
//! - text / JSONL inputs: the stream is `EOS, doc₁, EOS, doc₂, EOS, …` (the training format of `mor prepare`, with a
//!   leading EOS so the first document token is scored too); the bytes are the UTF-8 bytes of the documents. The
//!   EOS after each document is scored and counts 0 bytes.
//! - token files: the scored tokens (all but the first) are decoded with the tokenizer, special tokens skipped, and
//!   the UTF-8 bytes of that text are counted.

use std::path::Path;

use candle_core::{DType, Tensor, D};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::routing::RoutingStats;
use crate::data::{read_documents, DocumentSplit, EvalWindow, EvalWindows, TokenFile, Tokenizer};
use crate::model::{ForwardOptions, MorModel};
use crate::{MorError, Result};

/// An evaluation token stream and the number of bytes its scored tokens stand for.
#[derive(Debug, Clone)]
pub struct LossInput {
    /// The token stream.
    pub file: TokenFile,
    /// UTF-8 bytes of the scored text (see the module docs).
    pub bytes: u64,
}

/// Open `path` for loss evaluation: a `.tokens` file (raw little-endian u32) is used as is; anything else is read as
/// text / JSONL documents (optionally gzipped; JSONL field `field`), tokenized with `tok` and written to `scratch`.
pub fn prepare_input(
    path: &Path,
    tok: &Tokenizer,
    field: &str,
    scratch: &Path,
) -> Result<LossInput> {
    if !path.exists() {
        return Err(MorError::Data(format!("{}: no such file", path.display())));
    }
    if path.extension().is_some_and(|e| e == "tokens") {
        let file = TokenFile::open(path)?;
        let ids = file.get(1.min(file.len())..file.len())?;
        let text = tok
            .inner()
            .decode(&ids, true)
            .map_err(|e| MorError::Data(format!("{}: decoding: {e}", path.display())))?;
        return Ok(LossInput {
            file,
            bytes: text.len() as u64,
        });
    }
    let eos = tok.eos_id();
    let mut ids = vec![eos];
    let mut bytes = 0u64;
    for doc in read_documents(path, DocumentSplit::WholeFile, field)? {
        let doc = doc?;
        bytes += doc.len() as u64;
        ids.extend(tok.encode(&doc)?);
        ids.push(eos);
    }
    TokenFile::write(scratch, &ids)?;
    Ok(LossInput {
        file: TokenFile::open(scratch)?,
        bytes,
    })
}

/// Window settings.
#[derive(Debug, Clone)]
pub struct LossOptions {
    /// Tokens per window (paper: 2048).
    pub window: usize,
    /// New tokens scored per window; `None` = `window - 1` (non-overlapping, see [`EvalWindows`]).
    pub stride: Option<usize>,
    /// Windows per forward (only equal-length windows share a batch).
    pub batch: usize,
    /// Evaluate at most this many windows (paper: 500).
    pub max_windows: Option<usize>,
    /// Show a progress bar.
    pub progress: bool,
}

/// Loss of one routing mode.
#[derive(Debug, Clone, Serialize)]
pub struct LossReport {
    /// Routing rule: "top-k" (paper, non-causal), "causal" (generation rule) or "none".
    pub routing: String,
    /// Windows evaluated.
    pub windows: usize,
    /// Tokens scored.
    pub tokens: usize,
    /// Bytes the scored tokens stand for.
    pub bytes: u64,
    /// Σ NLL in nats.
    pub nll_sum: f64,
    /// Mean NLL per token (nats).
    pub nll: f64,
    /// exp(mean NLL).
    pub perplexity: f64,
    /// Σ NLL / ln 2 / bytes.
    pub bits_per_byte: f64,
}

/// Bits per byte of a summed NLL (nats) over `bytes` bytes.
pub fn bits_per_byte(nll_sum: f64, bytes: u64) -> f64 {
    nll_sum / std::f64::consts::LN_2 / bytes as f64
}

/// Evaluate `model` on `input` with forward options `fwd`; routing statistics of each forward go to `stats`.
/// When only part of the stream is evaluated (`max_windows`), the byte count is scaled by the fraction of tokens
/// scored.
pub fn eval_loss(
    model: &MorModel,
    input: &LossInput,
    opts: &LossOptions,
    fwd: ForwardOptions,
    routing: &str,
    mut stats: Option<&mut RoutingStats>,
) -> Result<LossReport> {
    let vocab = model.config().vocab_size;
    if let Some(max) = input.file.max_token() {
        if max as usize >= vocab {
            return Err(MorError::Data(format!(
                "{}: token id {max} does not fit the model's vocabulary of {vocab}",
                input.file.path().display()
            )));
        }
    }
    let window = opts.window.min(model.config().max_position_embeddings);
    let stride = opts.stride.unwrap_or(window.saturating_sub(1));
    let windows = EvalWindows::new(&input.file, window, stride)?;
    let total_scored = windows.scored_tokens();
    let all: Vec<EvalWindow> = match opts.max_windows {
        Some(n) => windows.take(n).collect(),
        None => windows.collect(),
    };
    if all.is_empty() {
        return Err(MorError::Data(format!(
            "{}: fewer than 2 tokens, nothing to score",
            input.file.path().display()
        )));
    }
    let pb = if opts.progress {
        let pb = ProgressBar::new(all.len() as u64);
        pb.set_style(
            ProgressStyle::with_template("{msg:>8} [{bar:30}] {pos}/{len} windows eta {eta}")
                .map_err(|e| MorError::Request(e.to_string()))?
                .progress_chars("=> "),
        );
        pb.set_message(routing.to_string());
        pb
    } else {
        ProgressBar::hidden()
    };
    let (mut nll_sum, mut tokens) = (0.0f64, 0usize);
    for group in all.chunk_by(|a, b| a.tokens.len() == b.tokens.len()) {
        for batch in group.chunks(opts.batch.max(1)) {
            let t = batch[0].tokens.len();
            let flat: Vec<u32> = batch
                .iter()
                .flat_map(|w| w.tokens.iter().copied())
                .collect();
            let ids = Tensor::from_vec(flat, (batch.len(), t), model.device())?;
            let out = model.forward(&ids, &fwd)?;
            let logits = out
                .logits
                .narrow(1, 0, t - 1)?
                .to_dtype(DType::F32)?
                .contiguous()?;
            let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let targets = ids
                .narrow(1, 1, t - 1)?
                .to_dtype(DType::U32)?
                .contiguous()?
                .unsqueeze(2)?;
            let lp: Vec<Vec<f32>> = logp.gather(&targets, D::Minus1)?.squeeze(2)?.to_vec2()?;
            for (w, row) in batch.iter().zip(&lp) {
                let scored = &row[w.first_scored - 1..];
                nll_sum -= scored.iter().map(|&x| x as f64).sum::<f64>();
                tokens += scored.len();
            }
            if let Some(s) = stats.as_deref_mut() {
                s.add(&out.routing, batch.len(), t)?;
            }
            pb.inc(batch.len() as u64);
        }
    }
    pb.finish_and_clear();
    let bytes = if tokens == total_scored {
        input.bytes
    } else {
        (input.bytes as f64 * tokens as f64 / total_scored.max(1) as f64).round() as u64
    };
    let nll = nll_sum / tokens as f64;
    Ok(LossReport {
        routing: routing.to_string(),
        windows: all.len(),
        tokens,
        bytes,
        nll_sum,
        nll,
        perplexity: nll.exp(),
        bits_per_byte: bits_per_byte(nll_sum, bytes),
    })
}
