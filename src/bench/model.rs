//! `mor bench model`: what llama.cpp's `llama-bench` and `llama-batched-bench` measure, on any model mor loads.
//! For each batch size B: prefill (B prompts of `prompt_len` random tokens in one step, fresh caches) and decode
//! (`gen_len` steps of one token per sequence, starting from an empty context as `llama-bench`'s tg test does, or
//! with `decode_from_prompt` after the prefilled prompts as `llama-batched-bench` does), repeated, with the median and the spread (min–max) of tokens per second, and the process's peak
//! resident memory.

use std::fmt;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::bench::{load_average, median};
use crate::engine::{CachedModel, StepOptions};
use crate::error::{MorError, Result};

/// Options of [`bench_model`].
#[derive(Debug, Clone)]
pub struct ModelBenchOptions {
    /// Name of the model (the file), for the report.
    pub model: String,
    /// Weight precision, for the report (e.g. "f32", "Q4_1 (quantized kernels)").
    pub precision: String,
    /// Prompt tokens per sequence for the prefill measurement (0: skip it).
    pub prompt_len: usize,
    /// Decoded tokens per sequence (0: skip).
    pub gen_len: usize,
    /// Batch sizes (sequences in flight).
    pub batches: Vec<usize>,
    /// Repetitions of each measurement.
    pub reps: usize,
    /// Decode on the prefilled caches (context prompt_len..prompt_len + gen_len) instead of from an empty one.
    pub decode_from_prompt: bool,
    /// Threads of the engine's matmuls (for the report; set before the model is prepared).
    pub threads: usize,
}

/// One batch size's measurements.
#[derive(Debug, Clone)]
pub struct ModelBenchRow {
    /// Sequences in flight.
    pub batch: usize,
    /// Prefill tokens/s of each repetition (all sequences' prompt tokens over the step's time).
    pub pp: Vec<f64>,
    /// Decode tokens/s of each repetition (all sequences' new tokens over the decode time).
    pub tg: Vec<f64>,
}

/// The report of [`bench_model`].
#[derive(Debug, Clone)]
pub struct ModelBenchReport {
    /// The options measured.
    pub opts: ModelBenchOptions,
    /// One row per batch size.
    pub rows: Vec<ModelBenchRow>,
    /// Peak resident memory of the process (VmHWM), MiB.
    pub peak_rss_mib: Option<f64>,
    /// Load averages before and after.
    pub load: (Option<[f64; 3]>, Option<[f64; 3]>),
}

/// Peak resident set size of this process (VmHWM of /proc/self/status), MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The CPU's model name (/proc/cpuinfo) and the SIMD features the kernels detect at run time.
pub fn cpu_line() -> String {
    let name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|n| n.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!(
        "{name}; features: {}; kernels: {:?}",
        crate::engine::quant::cpu_features().join(" "),
        crate::engine::quant::Isa::detected()
    )
}

/// Measure prefill and decode throughput of `cm` (see the module docs).
pub fn bench_model(cm: &CachedModel, opts: &ModelBenchOptions) -> Result<ModelBenchReport> {
    if opts.batches.is_empty() || opts.batches.contains(&0) || opts.reps == 0 {
        return Err(MorError::Config(
            "batch sizes and repetitions must be positive".into(),
        ));
    }
    let cfg = cm.model().config();
    let ctx = cfg.max_position_embeddings;
    let need = if opts.decode_from_prompt {
        opts.prompt_len + opts.gen_len
    } else {
        opts.prompt_len.max(opts.gen_len)
    };
    if need > ctx {
        return Err(MorError::Config(format!(
            "prompt length {} / generation length {} exceed the model's context of {ctx}",
            opts.prompt_len, opts.gen_len
        )));
    }
    let before = load_average();
    let mut rng = StdRng::seed_from_u64(0);
    let vocab = cfg.vocab_size as u32;
    let step_opts = StepOptions::default();
    let mut rows = Vec::new();
    for &b in &opts.batches {
        let mut row = ModelBenchRow {
            batch: b,
            pp: Vec::new(),
            tg: Vec::new(),
        };
        // One untimed warm-up run at this batch's sizes, as llama-bench does (first-touch page faults of the
        // activation buffers, thread start-up): b prompts of the prompt length, then one decode step.
        {
            let mut caches: Vec<_> = (0..b).map(|_| cm.new_cache()).collect();
            let warm: Vec<u32> = (0..opts.prompt_len.max(1) as u32)
                .map(|i| i % vocab)
                .collect();
            let mut refs: Vec<_> = caches.iter_mut().collect();
            cm.step(&mut refs, &vec![&warm[..]; b], &step_opts)?;
            if warm.len() < ctx {
                cm.step(&mut refs, &vec![&warm[..1]; b], &step_opts)?;
            }
        }
        for _ in 0..opts.reps {
            let mut caches: Vec<_> = (0..b).map(|_| cm.new_cache()).collect();
            if opts.prompt_len > 0 {
                let prompts: Vec<Vec<u32>> = (0..b)
                    .map(|_| {
                        (0..opts.prompt_len)
                            .map(|_| rng.random_range(0..vocab))
                            .collect()
                    })
                    .collect();
                let mut refs: Vec<_> = caches.iter_mut().collect();
                let chunks: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
                let t = Instant::now();
                cm.step(&mut refs, &chunks, &step_opts)?;
                row.pp
                    .push((b * opts.prompt_len) as f64 / t.elapsed().as_secs_f64());
            }
            if opts.gen_len > 0 {
                if !opts.decode_from_prompt {
                    caches = (0..b).map(|_| cm.new_cache()).collect();
                }
                let mut toks: Vec<u32> = (0..b).map(|_| rng.random_range(0..vocab)).collect();
                let t = Instant::now();
                for _ in 0..opts.gen_len {
                    let mut refs: Vec<_> = caches.iter_mut().collect();
                    let chunks: Vec<&[u32]> = toks.chunks(1).collect();
                    let out = cm.step(&mut refs, &chunks, &step_opts)?;
                    // Greedy, so the decode reads the logits as generation does.
                    toks = out.logits.argmax(1)?.to_vec1::<u32>()?;
                }
                row.tg
                    .push((b * opts.gen_len) as f64 / t.elapsed().as_secs_f64());
            }
        }
        rows.push(row);
    }
    Ok(ModelBenchReport {
        opts: opts.clone(),
        rows,
        peak_rss_mib: peak_rss_mib(),
        load: (before, load_average()),
    })
}

/// (median, min, max), or None when empty.
fn stats(xs: &[f64]) -> Option<(f64, f64, f64)> {
    (!xs.is_empty()).then(|| {
        (
            median(xs),
            xs.iter().copied().fold(f64::INFINITY, f64::min),
            xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        )
    })
}

impl ModelBenchReport {
    /// One JSON object per batch size (the `--json` output).
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        let o = &self.opts;
        self.rows
            .iter()
            .map(|r| {
                let (pp, tg) = (stats(&r.pp), stats(&r.tg));
                serde_json::json!({
                    "model": o.model,
                    "precision": o.precision,
                    "threads": o.threads,
                    "batch": r.batch,
                    "prompt_len": o.prompt_len,
                    "gen_len": o.gen_len,
                    "decode_from_prompt": o.decode_from_prompt,
                    "reps": o.reps,
                    "pp_tokens_per_s": pp.map(|s| s.0),
                    "pp_min": pp.map(|s| s.1),
                    "pp_max": pp.map(|s| s.2),
                    "tg_tokens_per_s": tg.map(|s| s.0),
                    "tg_min": tg.map(|s| s.1),
                    "tg_max": tg.map(|s| s.2),
                    "peak_rss_mib": self.peak_rss_mib,
                    "cpu": cpu_line(),
                    "load_before": self.load.0,
                    "load_after": self.load.1,
                })
            })
            .collect()
    }
}

impl fmt::Display for ModelBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.opts;
        writeln!(
            f,
            "model: {} ({}), {} threads",
            o.model, o.precision, o.threads
        )?;
        writeln!(f, "cpu: {}", cpu_line())?;
        writeln!(
            f,
            "prefill: {} tokens per sequence; decode: {} tokens per sequence from {}; {} reps",
            o.prompt_len,
            o.gen_len,
            if o.decode_from_prompt {
                "the prompt"
            } else {
                "an empty context"
            },
            o.reps
        )?;
        writeln!(
            f,
            "| batch | prefill tokens/s (median, min–max) | decode tokens/s (median, min–max) |"
        )?;
        writeln!(f, "|---|---|---|")?;
        let cell = |xs: &[f64]| {
            stats(xs).map_or("—".to_string(), |(m, lo, hi)| {
                format!("{m:.1} ({lo:.1}–{hi:.1})")
            })
        };
        for r in &self.rows {
            writeln!(f, "| {} | {} | {} |", r.batch, cell(&r.pp), cell(&r.tg))?;
        }
        if let Some(m) = self.peak_rss_mib {
            writeln!(f, "peak RSS: {m:.0} MiB")?;
        }
        write!(f, "{}", crate::bench::load_line(self.load))
    }
}
