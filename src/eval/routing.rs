//! Routing diagnostics of MoR models (paper App. G.2) and a per-token depth picture.
//!
//! - Dead-token ratio: the fraction of window positions never selected at the last recursion over all evaluated
//!   windows (expert-choice; counted over full-length windows only, since a position index means the same thing
//!   only at one window length).
//! - Sampling accuracy: agreement of the causal rule σ(logit) ≥ 0.5 with the top-k choice (the official
//!   `sampling_acc`), averaged over forwards.
//! - MaxVio = (max_i load_i − mean load) / mean load, and the mean per-token entropy of the router distribution
//!   (token-choice), plus the entropy of the load distribution.

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::data::Tokenizer;
use crate::model::expert_choice::sampling_accuracy;
use crate::model::{ForwardOptions, MorModel, RoutingTrace};
use crate::{MorError, Result};

/// Routing statistics accumulated over forwards.
#[derive(Debug, Clone, Default)]
pub struct RoutingStats {
    window: usize,
    /// Expert-choice: per position, how often it was selected at the last recursion (full-length windows).
    last_counts: Vec<u64>,
    full_windows: u64,
    /// Per recursion: tokens selected and tokens seen.
    selected: Vec<u64>,
    seen: u64,
    sampling_acc_sum: f64,
    forwards: u64,
    /// Token-choice: tokens per expert and Σ per-token router entropy.
    expert_counts: Vec<u64>,
    entropy_sum: f64,
    tokens: u64,
    expert: bool,
    token: bool,
}

/// The summary of [`RoutingStats`].
#[derive(Debug, Clone, Serialize)]
pub struct RoutingReport {
    /// Window length the position statistics refer to.
    pub window: usize,
    /// Fraction of tokens processed at each recursion.
    pub fraction_per_recursion: Vec<f64>,
    /// Expert-choice: fraction of positions never selected at the last recursion.
    pub dead_token_ratio: Option<f64>,
    /// Expert-choice: full-length windows behind `dead_token_ratio`.
    pub dead_token_windows: Option<u64>,
    /// Expert-choice (top-k forwards): agreement of σ(logit) ≥ 0.5 with the top-k.
    pub sampling_accuracy: Option<f64>,
    /// Token-choice: tokens per expert.
    pub expert_counts: Option<Vec<u64>>,
    /// Token-choice: MaxVio of the expert loads.
    pub max_vio: Option<f64>,
    /// Token-choice: mean entropy (nats) of each token's normalised router distribution.
    pub router_entropy: Option<f64>,
    /// Token-choice: entropy (nats) of the load distribution over experts.
    pub load_entropy: Option<f64>,
}

/// MaxVio of expert loads.
pub fn max_vio(counts: &[u64]) -> f64 {
    let mean = counts.iter().sum::<u64>() as f64 / counts.len().max(1) as f64;
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    if mean == 0.0 {
        0.0
    } else {
        (max - mean) / mean
    }
}

/// Entropy (nats) of a distribution given by non-negative weights (normalised here).
pub fn entropy(weights: &[f64]) -> f64 {
    let s: f64 = weights.iter().sum();
    if s <= 0.0 {
        return 0.0;
    }
    weights
        .iter()
        .map(|w| w / s)
        .filter(|p| *p > 0.0)
        .map(|p| -p * p.ln())
        .sum()
}

impl RoutingStats {
    /// Add the routing trace of one forward over `b` windows of `t` tokens.
    pub fn add(&mut self, trace: &RoutingTrace, b: usize, t: usize) -> Result<()> {
        if self.window == 0 {
            self.window = t;
        }
        self.forwards += 1;
        self.seen += (b * t) as u64;
        match trace {
            RoutingTrace::None => {}
            RoutingTrace::Expert(steps) => {
                self.expert = true;
                self.selected.resize(steps.len(), 0);
                for (r, s) in steps.iter().enumerate() {
                    self.selected[r] += s.selected.count() as u64;
                }
                self.sampling_acc_sum += sampling_accuracy(steps)?;
                if let Some(last) = steps.last() {
                    if t == self.window {
                        self.last_counts.resize(t, 0);
                        self.full_windows += b as u64;
                        for row in &last.selected.rows {
                            for &p in row {
                                self.last_counts[p as usize] += 1;
                            }
                        }
                    }
                }
            }
            RoutingTrace::Token(tr) => {
                self.token = true;
                let n = tr.counts.len();
                self.expert_counts.resize(n, 0);
                self.selected.resize(n, 0);
                for (i, c) in tr.counts.iter().enumerate() {
                    self.expert_counts[i] += *c as u64;
                    // Expert i runs i + 1 recursions, so it counts at recursions 0..=i.
                    for r in 0..=i {
                        self.selected[r] += *c as u64;
                    }
                }
                let probs: Vec<Vec<f32>> = tr.probs.to_dtype(DType::F32)?.to_vec2()?;
                for p in &probs {
                    let w: Vec<f64> = p.iter().map(|&x| x as f64).collect();
                    self.entropy_sum += entropy(&w);
                }
                self.tokens += probs.len() as u64;
            }
        }
        Ok(())
    }

    /// Summarise; `sampling` says whether the forwards used top-k routing (sampling accuracy is only meaningful
    /// then).
    pub fn report(&self, sampling: bool) -> RoutingReport {
        let (expert, token) = (self.expert, self.token);
        RoutingReport {
            window: self.window,
            fraction_per_recursion: self
                .selected
                .iter()
                .map(|&s| s as f64 / self.seen.max(1) as f64)
                .collect(),
            dead_token_ratio: (expert && self.full_windows > 0).then(|| {
                self.last_counts.iter().filter(|&&c| c == 0).count() as f64
                    / self.last_counts.len().max(1) as f64
            }),
            dead_token_windows: (expert && self.full_windows > 0).then_some(self.full_windows),
            sampling_accuracy: (expert && sampling && self.forwards > 0)
                .then(|| self.sampling_acc_sum / self.forwards as f64),
            expert_counts: token.then(|| self.expert_counts.clone()),
            max_vio: token.then(|| max_vio(&self.expert_counts)),
            router_entropy: token.then(|| self.entropy_sum / self.tokens.max(1) as f64),
            load_entropy: token.then(|| {
                entropy(
                    &self
                        .expert_counts
                        .iter()
                        .map(|&c| c as f64)
                        .collect::<Vec<_>>(),
                )
            }),
        }
    }
}

/// Recursion depth (number of recursions run, 1..=N_r) of each position of a single-sequence trace of `t` tokens;
/// models without routing run every recursion.
pub fn token_depths(trace: &RoutingTrace, t: usize, num_recursion: usize) -> Result<Vec<usize>> {
    Ok(match trace {
        RoutingTrace::None => vec![num_recursion; t],
        RoutingTrace::Expert(steps) => {
            let mut d = vec![0; t];
            for s in steps {
                let row = s.selected.rows.first().ok_or_else(|| {
                    MorError::Request("depth picture needs a batch of one sequence".into())
                })?;
                for &p in row {
                    d[p as usize] += 1;
                }
            }
            d
        }
        RoutingTrace::Token(tr) => tr.expert.iter().take(t).map(|&e| e as usize + 1).collect(),
    })
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Colour of depth `d` of `max`: light yellow (shallow) to dark red (deepest).
fn colour(d: usize, max: usize) -> String {
    let f = if max <= 1 {
        1.0
    } else {
        (d.saturating_sub(1)) as f64 / (max - 1) as f64
    };
    let (r, g, b) = (255.0 - 75.0 * f, 245.0 - 205.0 * f, 200.0 - 160.0 * f);
    format!("rgb({:.0},{:.0},{:.0})", r, g, b)
}

/// Render tokens with their depths as a self-contained HTML page (tokens coloured by depth, depth on hover).
pub fn depth_html(title: &str, pieces: &[String], depths: &[usize], max_depth: usize) -> String {
    let mut s = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title>\n<style>\
body{{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.9}}\
.tok{{white-space:pre-wrap;padding:1px 0;border-radius:2px}}.legend span{{padding:2px 8px;margin-right:4px}}\
</style></head><body>\n<h2>{t}</h2>\n<p class=\"legend\">recursion depth: ",
        t = escape(title)
    );
    for d in 1..=max_depth.max(1) {
        s.push_str(&format!(
            "<span style=\"background:{}\">{d}</span>",
            colour(d, max_depth)
        ));
    }
    let mean = depths.iter().sum::<usize>() as f64 / depths.len().max(1) as f64;
    s.push_str(&format!(
        "</p>\n<p>{} tokens, mean depth {mean:.2}</p>\n<div>",
        depths.len()
    ));
    for (p, d) in pieces.iter().zip(depths) {
        s.push_str(&format!(
            "<span class=\"tok\" style=\"background:{}\" title=\"depth {d}\">{}</span>",
            colour(*d, max_depth),
            escape(p)
        ));
    }
    s.push_str("</div>\n</body></html>\n");
    s
}

/// Run `model` on `text` (truncated to the context length) with `opts` and render the per-token depths as HTML.
pub fn depth_picture(
    model: &MorModel,
    tok: &Tokenizer,
    text: &str,
    opts: ForwardOptions,
    title: &str,
) -> Result<String> {
    let mut ids = tok.encode(text)?;
    ids.truncate(model.config().max_position_embeddings);
    if ids.is_empty() {
        return Err(MorError::Request(
            "depth picture: the passage has no tokens".into(),
        ));
    }
    let t = ids.len();
    let input = Tensor::from_vec(ids.clone(), (1, t), model.device())?;
    let out = model.forward(&input, &opts)?;
    let n_r = model.layout().num_recursion;
    let depths = token_depths(&out.routing, t, n_r)?;
    // Decode incrementally so multi-byte characters split across tokens render whole where possible.
    let mut pieces = Vec::with_capacity(t);
    let mut prev = String::new();
    for i in 0..t {
        let text = tok
            .inner()
            .decode(&ids[..=i], false)
            .map_err(|e| MorError::Data(format!("decoding: {e}")))?;
        let piece = text
            .strip_prefix(prev.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| tok.decode(&ids[i..=i]).unwrap_or_default());
        prev = text;
        pieces.push(piece);
    }
    Ok(depth_html(title, &pieces, &depths, n_r))
}
