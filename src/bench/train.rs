//! `mor bench train`: training step time and peak memory of vanilla, recursive and MoR models at the same shape,
//! as ratios to vanilla.

use std::fmt;
use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::bench::{load_average, load_line, median};
use crate::config::{ModelConfig, MorConfig, RecursionConfig, Sharing};
use crate::error::{MorError, Result};
use crate::model::{ForwardOptions, MorModel};
use crate::train::memory::{self, StepShape};
use crate::train::{AdamW, AdamWConfig, NamedParam};

/// Peak resident set size of this process so far (Linux `VmHWM`), in bytes.
///
/// The `mor` binary keeps freed memory mapped (`crate::alloc::keep_freed_memory`), so RSS never shrinks: in a run
/// of several variants this is the largest one's peak, and one variant per process gives each its own.
pub fn peak_rss_bytes() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Options of the training benchmark.
#[derive(Debug, Clone)]
pub struct TrainBenchOptions {
    /// Model width of the variants named by kind (`vanilla`, `mor-expert-3`, ...; preset names bring their own
    /// shape).
    pub hidden_size: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (default heads / 2).
    pub kv_heads: Option<usize>,
    /// FFN width (default 3 × width).
    pub intermediate_size: Option<usize>,
    /// Unrolled layers; (layers − 2) must be divisible by each N_r benchmarked.
    pub layers: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Fused training ops (`crate::model::ops`) instead of the composed reference ops.
    pub fused: bool,
    /// Activation checkpointing per layer.
    pub checkpointing: bool,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Measured steps per variant per round.
    pub steps: usize,
    /// Rounds (each round runs every variant once, in turn).
    pub rounds: usize,
    /// Variants by name: vanilla, recursive-N, mor-expert-N, mor-token-N.
    pub variants: Vec<String>,
}

impl Default for TrainBenchOptions {
    fn default() -> Self {
        TrainBenchOptions {
            hidden_size: 256,
            heads: 4,
            kv_heads: None,
            intermediate_size: None,
            layers: 8,
            vocab: 4096,
            fused: true,
            checkpointing: false,
            batch: 4,
            seq_len: 256,
            steps: 2,
            rounds: 5,
            variants: [
                "vanilla",
                "recursive-2",
                "mor-expert-2",
                "mor-expert-3",
                "mor-token-3",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// Build the config of a named variant: a preset name (`crate::config::presets`), or a kind at the benchmark's shape.
pub fn variant_config(name: &str, o: &TrainBenchOptions) -> Result<ModelConfig> {
    if crate::config::presets::preset_names().contains(&name) {
        let mut cfg = crate::config::presets::preset(name)?;
        cfg.max_position_embeddings = cfg.max_position_embeddings.max(o.seq_len);
        return Ok(cfg);
    }
    let mut cfg = ModelConfig::from_json(
        &serde_json::json!({
            "vocab_size": o.vocab, "hidden_size": o.hidden_size,
            "intermediate_size": o.intermediate_size.unwrap_or(3 * o.hidden_size),
            "num_hidden_layers": o.layers, "num_attention_heads": o.heads,
            "num_key_value_heads": o.kv_heads.unwrap_or((o.heads / 2).max(1)),
            "max_position_embeddings": o.seq_len.max(2),
        })
        .to_string(),
    )?;
    let (kind, n) = match name.rsplit_once('-') {
        Some((k, n)) if n.parse::<usize>().is_ok() => (k, n.parse::<usize>().unwrap_or(1)),
        _ => (name, 1),
    };
    let rec = |n| {
        Some(RecursionConfig {
            sharing: Sharing::MiddleCycle,
            num_recursion: n,
            initialization: Default::default(),
        })
    };
    match kind {
        "vanilla" => {}
        "recursive" => cfg.recursion = rec(n),
        "mor-expert" => {
            cfg.recursion = rec(n);
            cfg.mor = Some(MorConfig::expert());
        }
        "mor-token" => {
            cfg.recursion = rec(n);
            cfg.mor = Some(MorConfig::token());
        }
        _ => {
            return Err(MorError::Config(format!(
                "unknown variant {name:?}: use a preset name or vanilla, recursive-N, mor-expert-N, mor-token-N"
            )))
        }
    }
    cfg.validate()?;
    if let Some(w) = cfg.layout_warning() {
        return Err(MorError::Config(format!(
            "{name}: {w}; pick layers so (layers − 2) divides by N_r"
        )));
    }
    Ok(cfg)
}

/// Measured numbers of one variant.
#[derive(Debug, Clone)]
pub struct TrainBenchRow {
    /// Variant name.
    pub name: String,
    /// Distinct parameters.
    pub params: usize,
    /// Seconds per optimizer step, every measurement.
    pub step_secs: Vec<f64>,
    /// Seconds of the forward pass (with the loss), the backward pass and the AdamW update, every measurement.
    pub phase_secs: Vec<[f64; 3]>,
    /// Peak heap bytes during the measured steps (needs [`crate::alloc::CountingAlloc`] as global allocator).
    pub peak_bytes: usize,
    /// Peak RSS of the process after this variant's steps ([`peak_rss_bytes`]).
    pub peak_rss: Option<usize>,
    /// The peak `crate::train::memory` estimates for this step.
    pub estimate: usize,
}

/// The result of [`bench_train`].
#[derive(Debug, Clone)]
pub struct TrainBenchReport {
    /// Options used.
    pub options: TrainBenchOptions,
    /// One row per variant; the first is the baseline.
    pub rows: Vec<TrainBenchRow>,
    /// Load averages before and after.
    pub load: (Option<[f64; 3]>, Option<[f64; 3]>),
}

/// Time training steps (forward, backward, AdamW) of each variant on the same random tokens, interleaved.
pub fn bench_train(o: &TrainBenchOptions) -> Result<TrainBenchReport> {
    let load_before = load_average();
    let dev = Device::Cpu;
    let tokens: Vec<u32> = (0..o.batch * o.seq_len)
        .map(|i| ((i as u64 * 2654435761) % o.vocab as u64) as u32)
        .collect();
    let ids = Tensor::from_vec(tokens, (o.batch, o.seq_len), &dev)?;
    let mut runs = Vec::new();
    let mut phases: Vec<Vec<[f64; 3]>> = Vec::new();
    for name in &o.variants {
        let cfg = variant_config(name, o)?;
        let mut model = MorModel::new(&cfg, &dev, 0)?;
        model.set_fused_ops(o.fused);
        model.set_checkpointing(o.checkpointing);
        let shape = StepShape {
            batch: o.batch,
            seq_len: o.seq_len,
            fused: o.fused,
            checkpointing: o.checkpointing,
        };
        let estimate = memory::estimate(&cfg, model.params().num_scalars(), &shape)?.total();
        let params: Vec<NamedParam> = model
            .params()
            .iter()
            .map(|(n, v)| NamedParam::new(n.clone(), v.clone()))
            .collect();
        let opt = AdamW::new(params, AdamWConfig::default())?;
        runs.push((name.clone(), model, opt, Vec::new(), 0usize, None, estimate));
        // Phases, by run index.
        phases.push(Vec::new());
    }
    let step = |model: &MorModel, opt: &mut AdamW| -> Result<[f64; 3]> {
        let t0 = Instant::now();
        let out = model.forward_loss(&ids, &ForwardOptions::train(1000), o.batch * o.seq_len)?;
        let t1 = Instant::now();
        let grads = out.backward()?;
        drop(out);
        let t2 = Instant::now();
        opt.step(&grads, 1e-4)?;
        let t3 = Instant::now();
        Ok([t1 - t0, t2 - t1, t3 - t2].map(|d| d.as_secs_f64()))
    };
    // One untimed warm-up step each (its peak counts: the first step allocates the optimizer state).
    for (_, model, opt, _, peak, rss, _) in runs.iter_mut() {
        crate::alloc::reset_peak();
        step(model, opt)?;
        *peak = crate::alloc::peak_bytes();
        *rss = peak_rss_bytes();
    }
    for _ in 0..o.rounds {
        for ((_, model, opt, times, peak, rss, _), ph) in runs.iter_mut().zip(phases.iter_mut()) {
            crate::alloc::reset_peak();
            for _ in 0..o.steps {
                let p = step(model, opt)?;
                times.push(p.iter().sum());
                ph.push(p);
            }
            *peak = (*peak).max(crate::alloc::peak_bytes());
            *rss = peak_rss_bytes();
        }
    }
    let rows = runs
        .into_iter()
        .zip(phases)
        .map(
            |((name, model, _, step_secs, peak_bytes, peak_rss, estimate), phase_secs)| {
                TrainBenchRow {
                    name,
                    params: model.params().num_scalars(),
                    step_secs,
                    phase_secs,
                    peak_bytes,
                    peak_rss,
                    estimate,
                }
            },
        )
        .collect();
    Ok(TrainBenchReport {
        options: o.clone(),
        rows,
        load: (load_before, load_average()),
    })
}

impl fmt::Display for TrainBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        let tokens = (o.batch * o.seq_len) as f64;
        writeln!(
            f,
            "training step (fwd+bwd+AdamW, f32, {} ops{}), shape d={} heads={}/{} ffn={} layers={} vocab={} \
             (preset variants bring their own), batch={}x{} tokens; {} rounds x {} steps, interleaved; threads={}",
            if o.fused { "fused" } else { "composed" },
            if o.checkpointing { ", checkpointing" } else { "" },
            o.hidden_size,
            o.heads,
            o.kv_heads.unwrap_or((o.heads / 2).max(1)),
            o.intermediate_size.unwrap_or(3 * o.hidden_size),
            o.layers,
            o.vocab,
            o.batch,
            o.seq_len,
            o.rounds,
            o.steps,
            candle_core::utils::get_num_threads()
        )?;
        writeln!(
            f,
            "| variant | params | median s/step | tokens/s | time vs first | peak heap MiB | peak vs first | \
             process peak RSS MiB | estimated peak MiB | fwd / bwd / AdamW s |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|---|---|---|")?;
        let base = self.rows.first();
        let base_t = base.map_or(f64::NAN, |r| median(&r.step_secs));
        let base_m = base.map_or(0, |r| r.peak_bytes) as f64;
        for r in &self.rows {
            let t = median(&r.step_secs);
            writeln!(
                f,
                "| {} | {:.2}M | {:.3} | {:.0} | {:+.1}% | {:.0} | {:+.1}% | {} | {:.0} | {} |",
                r.name,
                r.params as f64 / 1e6,
                t,
                tokens / t,
                100.0 * (t / base_t - 1.0),
                r.peak_bytes as f64 / (1 << 20) as f64,
                100.0 * (r.peak_bytes as f64 / base_m - 1.0),
                r.peak_rss.map_or("n/a".into(), |b| format!(
                    "{:.0}",
                    b as f64 / (1 << 20) as f64
                )),
                r.estimate as f64 / (1 << 20) as f64,
                (0..3)
                    .map(|k| format!(
                        "{:.2}",
                        median(&r.phase_secs.iter().map(|p| p[k]).collect::<Vec<_>>())
                    ))
                    .collect::<Vec<_>>()
                    .join(" / "),
            )?;
        }
        writeln!(
            f,
            "peak heap: per variant, the warm-up step included; process peak RSS is cumulative (freed memory \
             stays mapped), exact for the first variant or one variant per run"
        )?;
        writeln!(f, "{}", load_line(self.load))
    }
}
