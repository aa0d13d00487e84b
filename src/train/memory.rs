//! Peak memory of a training step, estimated before the first one, so that a run that cannot fit is refused with
//! the flags that would make it fit instead of being ended by the kernel's OOM killer.
//!
//! candle keeps every tensor of the autograd graph alive until the loss is dropped, so a step's peak is reached at
//! the end of the backward pass: the parameters, AdamW's two moments, the parameter gradients, every activation of
//! the graph and the gradients in flight. Activations are counted per token and layer from the tensors each op
//! allocates (`crate::model::layers`, `crate::model::ops`), with the token fraction each layer sees (the routing
//! capacities of `crate::config::flops`). The counts are checked against measured peaks in `tests/memory.rs`.

use crate::config::flops::forward_flops;
use crate::config::ModelConfig;
use crate::error::{MorError, Result};

/// What a training step keeps besides the model: shape and options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepShape {
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Fused training ops (`crate::model::ops`).
    pub fused: bool,
    /// Activation checkpointing per layer.
    pub checkpointing: bool,
}

/// The estimated peak of one training step, by part (bytes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    /// Parameters.
    pub params: usize,
    /// AdamW moments.
    pub optimizer: usize,
    /// Parameter gradients.
    pub grads: usize,
    /// Activations the graph holds at the end of the forward pass.
    pub activations: usize,
    /// Largest transient on top (LM head chunk or logits gradients, a recomputed layer, gradients in flight).
    pub transient: usize,
}

impl MemoryEstimate {
    /// The estimated peak.
    pub fn total(&self) -> usize {
        self.params + self.optimizer + self.grads + self.activations + self.transient
    }
}

/// Bytes per f32.
const F32: usize = 4;

/// Floats one token keeps per decoder layer: (with own K/V, reading shared K/V).
fn per_token_layer(cfg: &ModelConfig, fused: bool, keys: usize) -> (f64, f64) {
    let d = cfg.hidden_size as f64;
    let kvd = (cfg.num_key_value_heads * cfg.head_dim()) as f64;
    let f = cfg.intermediate_size as f64;
    let h = cfg.num_attention_heads as f64;
    // Fused (ops/): both norm outputs, q (projection, head layout, rotated), the attention output and its token
    // layout, the o projection, both residual sums, gate, up, gated product and down projection.
    let common = 11.0 * d + 3.0 * f;
    // Own keys/values: k (projection, head layout, rotated) and v (projection, head layout).
    let own = 5.0 * kvd;
    if fused {
        return (common + own, common);
    }
    // Composed: each norm keeps x², x·inv and the product (+4d); each rotation −x₂, the concatenation and two
    // products (+3.5 per rotated width); the gate σ(g) and g·σ(g) (+2F); attention the scores, scaled, masked, and
    // the softmax's shifted, exponentiated and normalised copies: six [heads × keys] per query.
    let extra = 4.0 * d + 3.5 * d + 2.0 * f + 6.0 * h * keys as f64;
    (common + own + extra + 3.5 * kvd, common + extra)
}

/// Estimate the peak memory of a training step of `cfg` (with `n_params` distinct parameters) at `shape`.
pub fn estimate(cfg: &ModelConfig, n_params: usize, shape: &StepShape) -> Result<MemoryEstimate> {
    let t = shape.seq_len;
    let tokens = (shape.batch * t) as f64;
    let report = forward_flops(cfg, t)?;
    let d = cfg.hidden_size as f64;
    let v = cfg.vocab_size as f64;
    // Activations the graph keeps, and the largest single layer's (what a checkpointed layer recomputes).
    let mut act = 0.0f64;
    let mut largest_layer = 0.0f64;
    for g in &report.groups {
        let n = g.token_fraction * tokens;
        let keys = if g.computes_kv {
            (g.token_fraction * t as f64).ceil() as usize
        } else {
            t
        };
        let (own, shared) = per_token_layer(cfg, shape.fused, keys);
        let per_layer = n * if g.computes_kv { own } else { shared };
        largest_layer = largest_layer.max(per_layer);
        act += g.layers as f64
            * if shape.checkpointing {
                // A checkpointed layer keeps its output only.
                n * d
            } else {
                per_layer
            };
        if g.name.starts_with("recursion") {
            // Routing a recursion step: the gathered subset, the gated output and the scattered-back sum.
            act += 3.0 * n * d;
        }
    }
    // Embeddings and the final norm.
    act += 2.0 * tokens * d;
    let logits = tokens * v;
    let (head_act, head_transient) = if shape.fused {
        // Gradients of h and W computed in the forward pass; one chunk's logits, exponentials, softmax and
        // gradient at a time.
        let rows = (crate::model::ops::cross_entropy::CHUNK_ELEMS as f64 / v)
            .max(1.0)
            .min(tokens);
        (tokens * d + v * d, 4.0 * rows * v)
    } else {
        // Logits, their shifted-row copy and the log-softmax's shifted, exponentiated and output copies; the
        // backward pass adds two logits-sized gradients.
        (5.0 * logits, 2.0 * logits)
    };
    act += head_act;
    // Gradients in flight during the backward pass: a few activations of the layer being differentiated, or a
    // checkpointed layer recomputed with its gradients.
    let backward = if shape.checkpointing {
        2.0 * largest_layer
    } else {
        0.5 * largest_layer
    };
    let p = n_params * F32;
    Ok(MemoryEstimate {
        params: p,
        optimizer: 2 * p,
        grads: p,
        activations: (act * F32 as f64) as usize,
        transient: (head_transient.max(backward) * F32 as f64) as usize,
    })
}

/// `MemAvailable` of /proc/meminfo in bytes (Linux), the memory a new allocation can get without swapping.
pub fn available_bytes() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn gib(b: usize) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// Refuse a step of `cfg` at `shape` whose estimated peak exceeds `available` bytes, naming the flags that would
/// make it fit: a smaller `--batch-size` with `--grad-accum` (same tokens per step), `--checkpointing`, or a
/// shorter `--seq-len`. Returns the estimate when it fits.
pub fn check_fits(
    cfg: &ModelConfig,
    n_params: usize,
    shape: &StepShape,
    grad_accum: usize,
    available: usize,
) -> Result<MemoryEstimate> {
    let est = estimate(cfg, n_params, shape)?;
    if est.total() <= available {
        return Ok(est);
    }
    let fits =
        |s: &StepShape| estimate(cfg, n_params, s).map(|e| (e.total() <= available, e.total()));
    let mut options = Vec::new();
    // The largest micro-batch that fits, keeping the tokens per step with more accumulation.
    let mut b = shape.batch;
    while b > 1 {
        b = b.div_ceil(2);
        let (ok, total) = fits(&StepShape { batch: b, ..*shape })?;
        if ok {
            let accum = grad_accum * shape.batch.div_ceil(b);
            options.push(format!(
                "--batch-size {b} --grad-accum {accum} (~{:.1} GiB)",
                gib(total)
            ));
            break;
        }
    }
    if !shape.checkpointing {
        let (ok, total) = fits(&StepShape {
            checkpointing: true,
            ..*shape
        })?;
        if ok {
            options.push(format!("--checkpointing (~{:.1} GiB)", gib(total)));
        }
    }
    let mut t = shape.seq_len;
    while t > 2 {
        t /= 2;
        let (ok, total) = fits(&StepShape {
            seq_len: t,
            ..*shape
        })?;
        if ok {
            options.push(format!("--seq-len {t} (~{:.1} GiB)", gib(total)));
            break;
        }
    }
    let hint = if options.is_empty() {
        "no smaller batch, sequence or checkpointing fits either".to_string()
    } else {
        format!("try {}", options.join(", or "))
    };
    Err(MorError::Memory(format!(
        "a training step of {} at batch {} x {} tokens needs ~{:.1} GiB (parameters + AdamW {:.1}, activations {:.1}, \
         transient {:.1}), more than the {:.1} GiB available; {hint} (or --skip-memory-check)",
        cfg.variant_name(),
        shape.batch,
        shape.seq_len,
        gib(est.total()),
        gib(est.params + est.optimizer + est.grads),
        gib(est.activations),
        gib(est.transient),
        gib(available)
    )))
}
