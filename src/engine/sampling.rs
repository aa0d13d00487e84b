//! Next-token sampling for text generation, independent of the model.
//!
//! The generation loops call [`Sampler::sample`] once per step and per sequence with that sequence's last-position
//! logits row. The pipeline is: repetition penalty (CTRL / Hugging Face semantics) -> greedy if `temperature == 0`,
//! else temperature -> top-k -> top-p (nucleus) -> draw from the renormalised distribution. [`StopMatcher`] decides
//! from the decoded text when a stop sequence has been produced.

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{MorError, Result};

/// Largest accepted `max_new_tokens`; anything above is almost certainly a unit or typo error.
pub const MAX_NEW_TOKENS_LIMIT: usize = 1_000_000;

/// Most alternatives [`SamplingParams::logprobs`] may ask for (OpenAI's chat limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Logits are `f32`, so probabilities derived from them carry ~1e-7 relative error. A nucleus whose cumulative
/// probability reaches `top_p` up to that rounding counts as reaching it; otherwise e.g. `[0.5, 0.3, 0.15, 0.05]` with
/// `top_p = 0.8` would admit the third token or not depending on rounding.
const TOP_P_SLACK: f64 = 1e-6;

/// How to pick the next token and when to stop generating.
///
/// Missing fields take their [`Default`] values; unknown fields are rejected so that a typo never silently falls
/// back to a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Softmax temperature; `0` means greedy (argmax, ties to the lowest token id).
    pub temperature: f64,
    /// Keep only the `k` highest-scoring tokens before sampling.
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of most probable tokens whose cumulative probability is at least `p`.
    pub top_p: Option<f64>,
    /// CTRL / Hugging Face repetition penalty over the context tokens; `1.0` disables it.
    pub repetition_penalty: f64,
    /// Seed of the sampler's random number generator.
    pub seed: u64,
    /// Maximum number of tokens to generate.
    pub max_new_tokens: usize,
    /// Stop sequences, matched on the decoded text; the matched sequence is not part of the output.
    pub stop: Vec<String>,
    /// Keep generating after an end-of-sequence token until `max_new_tokens` (fixed generation lengths, e.g. for
    /// load tests).
    pub ignore_eos: bool,
    /// Report, for each sampled token, its log-probability and the `n` most likely tokens with theirs
    /// ([`token_logprobs`]); `None`: nothing is computed.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    /// Greedy decoding of at most 128 new tokens, no penalty, no stop sequences.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 0,
            max_new_tokens: 128,
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

fn request(msg: String) -> MorError {
    MorError::Request(msg)
}

impl SamplingParams {
    /// Check every parameter for a request whose prompt holds `context_len` tokens.
    ///
    /// The prompt must be non-empty because the first sampled token is conditioned on the last prompt position.
    pub fn validate(&self, context_len: usize) -> Result<()> {
        self.validate_values()?;
        if context_len == 0 {
            return Err(request(
                "context is empty: generation needs at least one prompt token".into(),
            ));
        }
        Ok(())
    }

    /// The context-independent part of [`validate`](Self::validate).
    fn validate_values(&self) -> Result<()> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(request(format!(
                "temperature must be finite and >= 0 (0 = greedy), got {t}"
            )));
        }
        if self.top_k == Some(0) {
            return Err(request(
                "top_k must be >= 1 (omit it to disable), got 0".into(),
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(request(format!("top_p must be in (0, 1], got {p}")));
            }
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            return Err(request(format!(
                "repetition_penalty must be finite and > 0 (1 = off), got {r}"
            )));
        }
        if self.max_new_tokens == 0 {
            return Err(request("max_new_tokens must be >= 1, got 0".into()));
        }
        if self.max_new_tokens > MAX_NEW_TOKENS_LIMIT {
            return Err(request(format!(
                "max_new_tokens must be <= {MAX_NEW_TOKENS_LIMIT}, got {}",
                self.max_new_tokens
            )));
        }
        if let Some(i) = self.stop.iter().position(|s| s.is_empty()) {
            // An empty stop sequence would match before any token is generated.
            return Err(request(format!("stop[{i}] is an empty string")));
        }
        if let Some(n) = self.logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
            return Err(request(format!(
                "logprobs must be <= {MAX_TOP_LOGPROBS}, got {n}"
            )));
        }
        Ok(())
    }
}

/// The log-probabilities reported for one sampled token ([`SamplingParams::logprobs`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The sampled token.
    pub token: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens with their log-probabilities, most likely first (ties to the lowest id, as greedy
    /// decoding picks).
    pub top: Vec<(u32, f32)>,
}

/// The log-probability of `token` and of the `n` most likely tokens under the log-softmax of the raw `logits` row:
/// before repetition penalty, temperature and top-k/top-p, i.e. the model's own distribution. NaN logits count as
/// `-inf`; a row without any finite logit gives `-inf` everywhere.
pub fn token_logprobs(logits: &[f32], token: u32, n: usize) -> TokenLogprobs {
    let finite = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
    let max = logits
        .iter()
        .map(|&x| finite(x))
        .fold(f32::NEG_INFINITY, f32::max);
    let lse = if max.is_finite() {
        let sum: f64 = logits
            .iter()
            .map(|&x| (f64::from(finite(x)) - f64::from(max)).exp())
            .sum();
        f64::from(max) + sum.ln()
    } else {
        f64::INFINITY
    };
    let lp = |x: f32| (f64::from(finite(x)) - lse) as f32;
    // The n best by a bounded insertion: n is small (<= MAX_TOP_LOGPROBS) and the vocabulary is large.
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (i, &x) in logits.iter().enumerate() {
        let x = finite(x);
        if top.len() == n && top.last().is_none_or(|&(_, worst)| x <= worst) {
            continue;
        }
        let at = top.partition_point(|&(_, y)| y >= x);
        top.insert(at, (i as u32, x));
        top.truncate(n);
    }
    TokenLogprobs {
        token,
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&x| lp(x)),
        top: top.into_iter().map(|(i, x)| (i, lp(x))).collect(),
    }
}

fn out_of_vocab(id: u32, vocab: usize) -> MorError {
    request(format!(
        "context token id {id} is outside the vocabulary of {vocab} logits"
    ))
}

/// Apply the CTRL / Hugging Face repetition penalty in place: every token id occurring in `context` (once, however
/// often it occurs) has its logit divided by `penalty` if positive, multiplied by it otherwise, so that
/// `penalty > 1` always makes a repeated token less likely.
///
/// Errors on a non-finite or non-positive `penalty` and on a context id outside the logits row.
pub fn apply_repetition_penalty(logits: &mut [f32], context: &[u32], penalty: f64) -> Result<()> {
    if !(penalty.is_finite() && penalty > 0.0) {
        return Err(request(format!(
            "repetition_penalty must be finite and > 0 (1 = off), got {penalty}"
        )));
    }
    if penalty == 1.0 {
        // Still reject out-of-range ids so that a bad context fails the same way with the penalty off.
        return match context.iter().find(|&&id| id as usize >= logits.len()) {
            Some(&id) => Err(out_of_vocab(id, logits.len())),
            None => Ok(()),
        };
    }
    let mut seen = vec![false; logits.len()];
    for &id in context {
        let i = id as usize;
        let Some(done) = seen.get_mut(i) else {
            return Err(out_of_vocab(id, logits.len()));
        };
        if *done {
            continue;
        }
        *done = true;
        let x = f64::from(logits[i]);
        logits[i] = if x > 0.0 { x / penalty } else { x * penalty } as f32;
    }
    Ok(())
}

/// A token still eligible for sampling: id, (penalised, unscaled) logit, unnormalised weight.
struct Candidate {
    id: u32,
    logit: f64,
    weight: f64,
}

/// Highest logit first, ties to the lowest id, so every filter is deterministic.
fn by_logit_desc(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// Per-sequence next-token sampler with its own seeded random number generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler for `params`, seeded with `params.seed`. Errors if a parameter is invalid (see
    /// [`SamplingParams::validate`]; the context length is not checked here).
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate_values()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Sampler { params, rng })
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Pick the next token from one logits row, given the token ids already in the sequence (prompt and generated).
    ///
    /// NaN and `-inf` logits are never picked; if some logits are `+inf`, one of them is picked uniformly. Errors on an
    /// empty row, a row without any finite-probability token, or a context id outside the row.
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(request("logits row is empty".into()));
        }
        let mut row = logits.to_vec();
        apply_repetition_penalty(&mut row, context, self.params.repetition_penalty)?;

        let mut cands: Vec<Candidate> = row
            .iter()
            .enumerate()
            .filter(|(_, x)| !x.is_nan() && **x != f32::NEG_INFINITY)
            .map(|(i, &x)| Candidate {
                id: i as u32,
                logit: f64::from(x),
                weight: 0.0,
            })
            .collect();
        if cands.is_empty() {
            return Err(request(format!(
                "all {} logits are NaN or -inf: no token can be sampled",
                row.len()
            )));
        }

        let temperature = self.params.temperature;
        if temperature == 0.0 {
            let best = cands
                .iter()
                .min_by(|a, b| by_logit_desc(a, b))
                .expect("candidates are non-empty");
            return Ok(best.id);
        }

        if let Some(k) = self.params.top_k {
            if k < cands.len() {
                // Partial selection: O(V) instead of sorting the whole vocabulary.
                cands.select_nth_unstable_by(k - 1, by_logit_desc);
                cands.truncate(k);
            }
        }

        // exp((x - max) / T) rather than exp(x / T - max / T): the exponent is <= 0 for every temperature, so a tiny T
        // cannot overflow. `+inf` logits are the limit of a distribution concentrated on them.
        let max = cands
            .iter()
            .map(|c| c.logit)
            .fold(f64::NEG_INFINITY, f64::max);
        for c in &mut cands {
            c.weight = if max == f64::INFINITY {
                if c.logit == f64::INFINITY {
                    1.0
                } else {
                    0.0
                }
            } else {
                ((c.logit - max) / temperature).exp()
            };
        }

        if let Some(p) = self.params.top_p {
            if p < 1.0 {
                cands.sort_unstable_by(by_logit_desc);
                let total: f64 = cands.iter().map(|c| c.weight).sum();
                let mut cum = 0.0;
                let mut keep = cands.len();
                for (i, c) in cands.iter().enumerate() {
                    cum += c.weight / total;
                    if cum >= p - TOP_P_SLACK {
                        keep = i + 1;
                        break;
                    }
                }
                cands.truncate(keep);
            }
        }

        // The maximum-logit candidate always survives the filters with weight 1, so `total >= 1`.
        let total: f64 = cands.iter().map(|c| c.weight).sum();
        let u = self.rng.random::<f64>() * total;
        let mut acc = 0.0;
        for c in &cands {
            acc += c.weight;
            if u < acc {
                return Ok(c.id);
            }
        }
        // Rounding can leave `u` just above the final sum; fall back to the last token with non-zero weight.
        let last = cands
            .iter()
            .rev()
            .find(|c| c.weight > 0.0)
            .expect("at least one candidate has weight 1");
        Ok(last.id)
    }

    /// [`sample`](Self::sample) for a logits tensor of shape `[vocab]` (any float dtype, any device).
    pub fn sample_tensor(&mut self, logits: &Tensor, context: &[u32]) -> Result<u32> {
        if logits.rank() != 1 {
            return Err(request(format!(
                "logits tensor must have shape [vocab], got {:?}",
                logits.dims()
            )));
        }
        let row = logits.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        self.sample(&row, context)
    }
}

/// Outcome of feeding one decoded chunk to a [`StopMatcher`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCheck {
    /// No stop sequence yet: keep generating.
    Continue,
    /// A stop sequence starts at byte `truncate_at` of the accumulated text; the output is the text before it.
    Stop {
        /// Byte offset into the concatenation of all pushed chunks.
        truncate_at: usize,
    },
}

/// Incremental stop-sequence detection over decoded text.
///
/// Feed each newly decoded chunk to [`push`](Self::push). A stop sequence split over several chunks is found once its
/// last part arrives; when several match, the earliest in the text wins. For streaming, only the first
/// [`stable_len`](Self::stable_len) bytes should be emitted, since the rest may turn out to start a stop sequence.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    max_stop_len: usize,
    text: String,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops`. Empty strings are ignored ([`SamplingParams::validate`] rejects them).
    pub fn new<S: AsRef<str>>(stops: &[S]) -> Self {
        let stops: Vec<String> = stops
            .iter()
            .map(|s| s.as_ref().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        let max_stop_len = stops.iter().map(String::len).max().unwrap_or(0);
        StopMatcher {
            stops,
            max_stop_len,
            text: String::new(),
            stopped: false,
        }
    }

    /// Append a decoded chunk and report whether a stop sequence is now complete. Once stopped, further chunks are
    /// ignored and the same answer is returned.
    pub fn push(&mut self, chunk: &str) -> StopCheck {
        if self.stopped {
            return StopCheck::Stop {
                truncate_at: self.text.len(),
            };
        }
        let prev_len = self.text.len();
        self.text.push_str(chunk);
        if self.stops.is_empty() {
            return StopCheck::Continue;
        }
        // Any match not seen before must end inside the new chunk, so it starts at most `max_stop_len - 1` bytes
        // before it.
        let mut start = prev_len.saturating_sub(self.max_stop_len - 1);
        while !self.text.is_char_boundary(start) {
            start -= 1;
        }
        let window = &self.text[start..];
        let found = self
            .stops
            .iter()
            .filter_map(|s| window.find(s.as_str()))
            .min();
        match found {
            Some(i) => {
                let at = start + i;
                self.text.truncate(at);
                self.stopped = true;
                StopCheck::Stop { truncate_at: at }
            }
            None => StopCheck::Continue,
        }
    }

    /// Whether a stop sequence has been found.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// The accumulated text, truncated before the stop sequence once stopped.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Length in bytes of the prefix of [`text`](Self::text) that can no longer become part of a stop sequence: all
    /// of it once stopped, otherwise the text minus its longest suffix that is a proper prefix of a stop sequence.
    pub fn stable_len(&self) -> usize {
        let len = self.text.len();
        if self.stopped || self.stops.is_empty() {
            return len;
        }
        let longest = (self.max_stop_len - 1).min(len);
        for l in (1..=longest).rev() {
            let from = len - l;
            if self.text.is_char_boundary(from) {
                let tail = &self.text[from..];
                if self.stops.iter().any(|s| s.starts_with(tail)) {
                    return from;
                }
            }
        }
        len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn params(temperature: f64) -> SamplingParams {
        SamplingParams {
            temperature,
            ..Default::default()
        }
    }

    fn draw(p: SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(p).unwrap();
        (0..n).map(|_| s.sample(logits, &[]).unwrap()).collect()
    }

    fn counts(draws: &[u32], v: usize) -> Vec<usize> {
        let mut c = vec![0; v];
        for &d in draws {
            c[d as usize] += 1;
        }
        c
    }

    /// Deterministic pseudo-random logits in [-5, 5) without another RNG stream.
    fn logits_row(v: usize, salt: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(salt);
        (0..v).map(|_| rng.random::<f32>() * 10.0 - 5.0).collect()
    }

    #[test]
    fn greedy_picks_argmax_ties_lowest() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, -2.0, 2.9], &[]).unwrap(), 1);
        assert_eq!(s.sample(&[1.0, 5.0, 5.0, 5.0], &[]).unwrap(), 1);
        assert_eq!(
            s.sample(&[f32::NAN, f32::NEG_INFINITY, -7.0], &[]).unwrap(),
            2
        );
        assert_eq!(s.sample(&[0.0, f32::INFINITY, 1.0], &[]).unwrap(), 1);
        for salt in 0..20 {
            let row = logits_row(257, salt);
            let argmax = (0..row.len())
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap();
            assert_eq!(s.sample(&row, &[]).unwrap() as usize, argmax);
        }
    }

    #[test]
    fn same_seed_same_sequence_different_seed_differs() {
        let flat = vec![0.0f32; 100];
        let with_seed = |seed| {
            draw(
                SamplingParams {
                    temperature: 1.0,
                    seed,
                    ..Default::default()
                },
                &flat,
                500,
            )
        };
        let a = with_seed(7);
        assert_eq!(a, with_seed(7));
        let b = with_seed(8);
        assert_ne!(a, b);
        // A flat distribution must actually be explored, not collapse onto a few ids.
        let distinct = counts(&a, 100).iter().filter(|&&c| c > 0).count();
        assert!(
            distinct > 90,
            "only {distinct} distinct tokens in 500 draws"
        );
        let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert!(agree < 25, "{agree} of 500 draws agree across seeds");
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let mut greedy = Sampler::new(SamplingParams::default()).unwrap();
        let mut k1 = Sampler::new(SamplingParams {
            temperature: 1.5,
            top_k: Some(1),
            seed: 3,
            ..Default::default()
        })
        .unwrap();
        for salt in 0..50 {
            let mut row = logits_row(1000, salt);
            if salt % 5 == 0 {
                // Exact ties must resolve the same way in both paths.
                let hi = row.iter().copied().fold(f32::MIN, f32::max);
                row[3] = hi;
                row[900] = hi;
            }
            assert_eq!(
                k1.sample(&row, &[]).unwrap(),
                greedy.sample(&row, &[]).unwrap()
            );
        }
    }

    #[test]
    fn top_k_restricts_to_k_best() {
        let logits = [0.0f32, 3.0, 1.0, 2.9, -1.0, 2.8];
        let p = SamplingParams {
            temperature: 5.0,
            top_k: Some(3),
            ..Default::default()
        };
        let c = counts(&draw(p, &logits, 3000), logits.len());
        assert_eq!(c[0] + c[2] + c[4], 0, "{c:?}");
        assert!(c[1] > 0 && c[3] > 0 && c[5] > 0, "{c:?}");
    }

    #[test]
    fn top_p_keeps_smallest_nucleus() {
        let probs = [0.5f64, 0.3, 0.15, 0.05];
        let logits: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
        let with_p = |top_p, seed| SamplingParams {
            temperature: 1.0,
            top_p: Some(top_p),
            seed,
            ..Default::default()
        };
        let c = counts(&draw(with_p(0.8, 1), &logits, 5000), 4);
        assert_eq!(c[2] + c[3], 0, "{c:?}");
        // Renormalised over {0, 1}: 0.625 / 0.375.
        let f0 = c[0] as f64 / 5000.0;
        assert!((f0 - 0.625).abs() < 0.03, "{c:?}");

        let c = counts(&draw(with_p(0.9, 2), &logits, 5000), 4);
        assert_eq!(c[3], 0, "{c:?}");
        assert!(c[2] > 0, "{c:?}");

        // A p below the top probability keeps exactly one token.
        let c = counts(&draw(with_p(0.1, 3), &logits, 500), 4);
        assert_eq!(c[0], 500, "{c:?}");
    }

    #[test]
    fn temperature_matches_softmax_frequencies() {
        let logits = [1.0f32, 0.5, 0.0, -0.5, -1.0, 2.0];
        let n = 20_000;
        for (t, seed) in [(0.7, 11u64), (2.0, 12)] {
            let c = counts(
                &draw(
                    SamplingParams {
                        temperature: t,
                        seed,
                        ..Default::default()
                    },
                    &logits,
                    n,
                ),
                logits.len(),
            );
            let w: Vec<f64> = logits.iter().map(|&x| (f64::from(x) / t).exp()).collect();
            let z: f64 = w.iter().sum();
            let chi2: f64 = c
                .iter()
                .zip(&w)
                .map(|(&o, &wi)| {
                    let e = wi / z * n as f64;
                    (o as f64 - e).powi(2) / e
                })
                .sum();
            // 5 degrees of freedom: P(chi2 > 20.5) = 0.001. A wrong temperature (e.g. T vs 1/T) gives chi2 in the
            // thousands.
            assert!(chi2 < 20.5, "T={t}: chi2={chi2}, counts {c:?}");
        }
    }

    #[test]
    fn infinite_logits() {
        // +inf tokens share all the mass; -inf and NaN are never drawn.
        let logits = [
            f32::INFINITY,
            0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        let c = counts(&draw(params(1.0), &logits, 2000), 5);
        assert_eq!(c[1] + c[3] + c[4], 0, "{c:?}");
        assert!(c[0] > 800 && c[2] > 800, "{c:?}");
        // A tiny temperature behaves like greedy instead of overflowing.
        let c = counts(&draw(params(1e-300), &[1.0, 3.0, 2.0], 200), 3);
        assert_eq!(c[1], 200, "{c:?}");
    }

    #[test]
    fn bad_logits_are_errors() {
        for t in [0.0, 1.0] {
            let mut s = Sampler::new(params(t)).unwrap();
            let empty = s.sample(&[], &[]).unwrap_err().to_string();
            assert!(empty.contains("empty"), "{empty}");
            let nan = s.sample(&[f32::NAN; 4], &[]).unwrap_err().to_string();
            assert!(nan.contains("NaN"), "{nan}");
            assert!(s.sample(&[f32::NEG_INFINITY; 3], &[]).is_err());
            let oob = s.sample(&[0.0; 4], &[1, 4]).unwrap_err().to_string();
            assert!(oob.contains("token id 4"), "{oob}");
        }
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 1.3,
            ..Default::default()
        })
        .unwrap();
        assert!(s.sample(&[0.0; 4], &[9]).is_err());
    }

    #[test]
    fn repetition_penalty_lowers_repeated_logits() {
        let mut row = [2.0f32, -1.0, 0.5, -3.0, 0.0];
        // Token 0 occurs twice but is penalised once.
        apply_repetition_penalty(&mut row, &[0, 1, 0, 4], 2.0).unwrap();
        assert_eq!(row, [1.0, -2.0, 0.5, -3.0, 0.0]);

        let mut row = [2.0f32, -1.0];
        apply_repetition_penalty(&mut row, &[0, 1], 1.0).unwrap();
        assert_eq!(row, [2.0, -1.0]);
        assert!(apply_repetition_penalty(&mut row, &[0], 0.0).is_err());

        // Through the sampler: the repeated argmax loses to the runner-up, positive and negative alike.
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 1.5,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.sample(&[3.0, 2.5, 0.0], &[]).unwrap(), 0);
        assert_eq!(s.sample(&[3.0, 2.5, 0.0], &[0]).unwrap(), 1);
        assert_eq!(s.sample(&[-1.0, -1.2, -5.0], &[0]).unwrap(), 1);
    }

    #[test]
    fn sample_tensor_matches_slice() {
        let row = logits_row(64, 5);
        let t = Tensor::new(row.as_slice(), &Device::Cpu).unwrap();
        let p = SamplingParams {
            temperature: 0.8,
            top_k: Some(10),
            seed: 9,
            ..Default::default()
        };
        let mut a = Sampler::new(p.clone()).unwrap();
        let mut b = Sampler::new(p).unwrap();
        for _ in 0..50 {
            assert_eq!(
                a.sample_tensor(&t, &[1, 2]).unwrap(),
                b.sample(&row, &[1, 2]).unwrap()
            );
        }
        let bf = t.to_dtype(DType::BF16).unwrap();
        let mut g = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(
            g.sample_tensor(&bf, &[]).unwrap(),
            g.sample(&row, &[]).unwrap()
        );
        let t2 = t.reshape((1, 64)).unwrap();
        let err = a.sample_tensor(&t2, &[]).unwrap_err().to_string();
        assert!(err.contains("[vocab]"), "{err}");
    }

    #[test]
    fn invalid_params_name_the_field() {
        let cases: Vec<(SamplingParams, &str)> = vec![
            (params(-0.5), "temperature"),
            (params(f64::NAN), "temperature"),
            (params(f64::INFINITY), "temperature"),
            (
                SamplingParams {
                    top_k: Some(0),
                    ..Default::default()
                },
                "top_k",
            ),
            (
                SamplingParams {
                    top_p: Some(0.0),
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: Some(1.5),
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: Some(f64::NAN),
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: -1.2,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: f64::NAN,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    max_new_tokens: 0,
                    ..Default::default()
                },
                "max_new_tokens",
            ),
            (
                SamplingParams {
                    max_new_tokens: MAX_NEW_TOKENS_LIMIT + 1,
                    ..Default::default()
                },
                "max_new_tokens",
            ),
            (
                SamplingParams {
                    stop: vec!["\n\n".into(), String::new()],
                    ..Default::default()
                },
                "stop[1]",
            ),
        ];
        for (p, field) in cases {
            let err = p.validate(4).unwrap_err();
            assert!(matches!(err, MorError::Request(_)), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains(field), "{field}: {msg}");
            assert!(Sampler::new(p).is_err(), "{field}");
        }
        let err = SamplingParams::default().validate(0).unwrap_err();
        assert!(err.to_string().contains("context"), "{err}");

        let ok = SamplingParams {
            temperature: 0.7,
            top_k: Some(40),
            top_p: Some(1.0),
            repetition_penalty: 1.1,
            max_new_tokens: MAX_NEW_TOKENS_LIMIT,
            stop: vec!["</s>".into()],
            ..Default::default()
        };
        ok.validate(1).unwrap();
    }

    #[test]
    fn params_serde_defaults_and_unknown_fields() {
        let p: SamplingParams =
            serde_json::from_str(r#"{"temperature": 0.5, "stop": ["x"]}"#).unwrap();
        assert_eq!(p.temperature, 0.5);
        assert_eq!(p.max_new_tokens, 128);
        assert_eq!(p.repetition_penalty, 1.0);
        assert_eq!(p.stop, vec!["x".to_string()]);
        let back: SamplingParams =
            serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        assert!(serde_json::from_str::<SamplingParams>(r#"{"temprature": 0.5}"#).is_err());
    }

    #[test]
    fn stop_matcher_across_chunks() {
        let mut m = StopMatcher::new(&["<|end|>"]);
        assert_eq!(m.push("Hello"), StopCheck::Continue);
        assert_eq!(m.stable_len(), 5);
        assert_eq!(m.push(" <|e"), StopCheck::Continue);
        // The partial stop sequence is held back from streaming.
        assert_eq!(m.stable_len(), 6);
        assert_eq!(m.push("nd"), StopCheck::Continue);
        assert_eq!(m.push("|>tail"), StopCheck::Stop { truncate_at: 6 });
        assert!(m.is_stopped());
        assert_eq!(m.text(), "Hello ");
        assert_eq!(m.push("more"), StopCheck::Stop { truncate_at: 6 });
        assert_eq!(m.text(), "Hello ");
    }

    #[test]
    fn stop_matcher_false_prefix_and_earliest_match() {
        let mut m = StopMatcher::new(&["\n\n", "User:"]);
        assert_eq!(m.push("a\nb"), StopCheck::Continue);
        assert_eq!(m.stable_len(), 3);
        assert_eq!(m.push("\n"), StopCheck::Continue);
        assert_eq!(m.stable_len(), 3);
        // Both stops complete in one chunk; the earlier one in the text wins.
        assert_eq!(m.push("User:\n\n"), StopCheck::Stop { truncate_at: 4 });
        assert_eq!(m.text(), "a\nb\n");

        // A stop that is a whole single chunk, and multi-byte text around the boundary.
        let mut m = StopMatcher::new(&["é!"]);
        assert_eq!(m.push("café"), StopCheck::Continue);
        assert_eq!(m.stable_len(), "caf".len());
        assert_eq!(m.push("!"), StopCheck::Stop { truncate_at: 3 });
        assert_eq!(m.text(), "caf");

        let mut m = StopMatcher::new::<String>(&[]);
        assert_eq!(m.push("anything"), StopCheck::Continue);
        assert_eq!(m.stable_len(), 8);
    }

    #[test]
    fn token_logprobs_are_log_softmax_with_the_top_n_in_order() {
        let row = [1.0f32, 3.0, f32::NAN, 3.0, -2.0];
        let lse = [1.0f64, 3.0, 3.0, -2.0]
            .iter()
            .map(|x| x.exp())
            .sum::<f64>()
            .ln();
        let lp = token_logprobs(&row, 4, 3);
        assert_eq!(lp.token, 4);
        assert!((f64::from(lp.logprob) - (-2.0 - lse)).abs() < 1e-6);
        // Ties to the lowest id; NaN is -inf and never ranks.
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 0]);
        assert!((f64::from(lp.top[0].1) - (3.0 - lse)).abs() < 1e-6);
        assert!(token_logprobs(&row, 0, 0).top.is_empty());
        assert_eq!(token_logprobs(&row, 2, 1).logprob, f32::NEG_INFINITY);
        let too_many = SamplingParams {
            logprobs: Some(MAX_TOP_LOGPROBS + 1),
            ..Default::default()
        };
        assert!(too_many.validate(1).is_err());
    }
}
