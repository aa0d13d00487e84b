//! `mor bench generate`: generation throughput of vanilla, recursive and MoR models of the same width and unrolled
//! depth under continuous batching, in the style of the paper's Fig. 4a / App. E (spec §4).
//!
//! Workload: for each batch size B, 3·B requests (at least 6) with empty prompts (generation starts from EOS, like
//! the paper's "no prefix" queries) and generation lengths ~ Normal(mean, std) clipped to [1, context − 1]; every
//! variant gets the same lengths and seeds. Models are random, so expert-choice routers are calibrated: per-recursion
//! thresholds are set on a calibration batch so the realised depth distribution matches the configured capacities
//! (N_r/N_r, …, 1/N_r), and the output says so. As in `mor bench train`, runs are interleaved round-robin and
//! repeated, and medians and ratios to vanilla from the same run are reported, with the load average.

use std::fmt;
use std::time::Instant;

use candle_core::Device;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::bench::{load_average, median, variant_config, TrainBenchOptions};
use crate::config::{DecodeRule, KvSharingConfig, ModelConfig};
use crate::engine::batch::{Engine, EngineOptions, EngineStats};
use crate::engine::forward::{CachedModel, StepOptions};
use crate::error::{MorError, Result};
use crate::model::MorModel;
use crate::sampling::SamplingParams;

/// Per-recursion decode thresholds for an expert-choice model such that, on `seqs` (prefilled causally), the
/// fraction of all tokens reaching recursion r+1 matches capacity r (hierarchically: recursion r is calibrated given
/// the thresholds already set for the recursions before it). Recursions at capacity ≥ 1 keep every token and get
/// the config's threshold.
pub fn calibrate_expert_thresholds(cm: &CachedModel, seqs: &[Vec<u32>]) -> Result<Vec<f64>> {
    let cfg = cm.model().config();
    let Some(ec) = cfg.expert_choice() else {
        return Err(MorError::Config(
            "threshold calibration needs an expert-choice model".into(),
        ));
    };
    let base = match ec.decode_rule {
        DecodeRule::Threshold { threshold } | DecodeRule::AuxRouter { threshold } => threshold,
    };
    let caps = cfg.capacities();
    let total: usize = seqs.iter().map(Vec::len).sum();
    let mut thr = vec![base; caps.len()];
    for r in 0..caps.len() {
        if caps[r] >= 1.0 {
            continue;
        }
        // Keep everything from r on, so the candidates of r are exactly the tokens the earlier thresholds pass.
        thr[r..].iter_mut().for_each(|t| *t = 0.0);
        let mut caches: Vec<_> = seqs.iter().map(|_| cm.new_cache()).collect();
        let mut refs: Vec<_> = caches.iter_mut().collect();
        let chunks: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let out = cm.step(
            &mut refs,
            &chunks,
            &StepOptions {
                expert_thresholds: Some(thr.clone()),
                trace_router: true,
                ..Default::default()
            },
        )?;
        let mut p = out.router_probs.get(r).cloned().unwrap_or_default();
        p.sort_by(|a, b| b.total_cmp(a));
        let k = (caps[r] * total as f64).round() as usize;
        thr[r] = if p.is_empty() || k == 0 {
            1.5
        } else if k >= p.len() {
            0.0
        } else {
            // Midway between the k-th and (k+1)-th largest probability.
            0.5 * (f64::from(p[k - 1]) + f64::from(p[k]))
        };
    }
    Ok(thr)
}

/// Options of the generation benchmark.
#[derive(Debug, Clone)]
pub struct GenerateBenchOptions {
    /// Model width.
    pub hidden_size: usize,
    /// Query heads (KV heads = heads / 2).
    pub heads: usize,
    /// Unrolled layers of every variant; (layers − 2) must be divisible by each N_r (14 serves N_r = 2, 3, 4).
    pub layers: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Context length.
    pub context: usize,
    /// Mean generation length.
    pub mean_len: f64,
    /// Standard deviation of the generation length (the paper does not give one).
    pub std_len: f64,
    /// Requests per batch slot (requests = max(6, this · B)).
    pub requests_per_slot: usize,
    /// Batch sizes (slots).
    pub batches: Vec<usize>,
    /// Rounds (each runs every variant at every batch size once, interleaved).
    pub rounds: usize,
    /// Variants by name (vanilla, recursive-N, mor-expert-N, mor-token-N; suffix `+kv` for recursive KV sharing);
    /// the first is the baseline.
    pub variants: Vec<String>,
}

impl Default for GenerateBenchOptions {
    fn default() -> Self {
        GenerateBenchOptions {
            hidden_size: 256,
            heads: 4,
            layers: 14,
            vocab: 4096,
            context: 512,
            mean_len: 64.0,
            std_len: 16.0,
            requests_per_slot: 3,
            batches: vec![1, 8, 32, 64],
            rounds: 3,
            variants: [
                "vanilla",
                "recursive-3",
                "mor-expert-2",
                "mor-expert-3",
                "mor-expert-4",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// The config of a benchmark variant.
pub fn generate_variant_config(name: &str, o: &GenerateBenchOptions) -> Result<ModelConfig> {
    let (base, kv) = match name.strip_suffix("+kv") {
        Some(b) => (b, true),
        None => (name, false),
    };
    let shape = TrainBenchOptions {
        hidden_size: o.hidden_size,
        heads: o.heads,
        layers: o.layers,
        vocab: o.vocab,
        seq_len: o.context,
        ..Default::default()
    };
    let mut cfg = variant_config(base, &shape)?;
    if kv {
        cfg.kv_sharing = Some(KvSharingConfig::default());
    }
    cfg.eos_token_id = Some(0);
    cfg.validate()?;
    Ok(cfg)
}

/// Measurements of one variant at one batch size.
#[derive(Debug, Clone)]
pub struct GenerateBenchRow {
    /// Variant name.
    pub name: String,
    /// Batch size (slots).
    pub batch: usize,
    /// Requests in the workload.
    pub requests: usize,
    /// Tokens generated per run.
    pub tokens: usize,
    /// Seconds per run, every round.
    pub secs: Vec<f64>,
    /// Fraction of processed tokens per recursion count (index = recursions run).
    pub depth_fractions: Vec<f64>,
    /// Peak K/V bytes (all layers, all running sequences).
    pub peak_kv_bytes: usize,
    /// Peak K/V bytes of the recursion block.
    pub peak_kv_block_bytes: usize,
    /// Peak heap bytes during the runs ([`crate::alloc`]).
    pub peak_bytes: usize,
    /// Calibrated thresholds (expert-choice).
    pub thresholds: Option<Vec<f64>>,
}

/// The result of [`bench_generate`].
#[derive(Debug, Clone)]
pub struct GenerateBenchReport {
    /// Options used.
    pub options: GenerateBenchOptions,
    /// One row per (batch, variant), batch-major; the first variant of each batch is the baseline.
    pub rows: Vec<GenerateBenchRow>,
    /// Load averages before and after.
    pub load: (Option<[f64; 3]>, Option<[f64; 3]>),
}

/// Requests of the workload at batch size `b`: (max_new_tokens, seed).
fn workload(o: &GenerateBenchOptions, b: usize) -> Vec<(usize, u64)> {
    let n = (o.requests_per_slot * b).max(6);
    let mut rng = StdRng::seed_from_u64(b as u64);
    (0..n)
        .map(|i| {
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            let len = (o.mean_len + o.std_len * z).round();
            (len.clamp(1.0, (o.context - 1) as f64) as usize, i as u64)
        })
        .collect()
}

/// Thresholds calibrated on text the model generates itself (the benchmark's own input distribution): start from
/// random tokens, then twice generate 32 sequences of the mean length with the current thresholds and recalibrate
/// on them.
fn calibrate_on_own_text(model: &MorModel, o: &GenerateBenchOptions) -> Result<Vec<f64>> {
    let cm = CachedModel::new(model)?;
    let len = (o.mean_len.round() as usize).clamp(8, o.context - 1);
    let mut rng = StdRng::seed_from_u64(17);
    let mut seqs: Vec<Vec<u32>> = (0..32)
        .map(|_| {
            (0..len)
                .map(|_| rng.random_range(0..o.vocab as u32))
                .collect()
        })
        .collect();
    let mut thr = calibrate_expert_thresholds(&cm, &seqs)?;
    for round in 0..2u64 {
        let mut engine = Engine::new(
            model,
            None,
            EngineOptions {
                max_batch: 32,
                eos_token_id: Some(0),
                expert_thresholds: Some(thr.clone()),
                ignore_eos: true,
                asynchronous: false,
            },
        )?;
        for i in 0..32u64 {
            engine.submit(
                Vec::new(),
                SamplingParams {
                    temperature: 1.0,
                    seed: 1_000 + 10 * round + i,
                    max_new_tokens: len - 1,
                    ..Default::default()
                },
            )?;
        }
        seqs = engine
            .run()?
            .into_iter()
            .map(|f| [f.prompt_tokens, f.tokens].concat())
            .collect();
        thr = calibrate_expert_thresholds(&cm, &seqs)?;
    }
    Ok(thr)
}

/// Run every variant at every batch size, interleaved, `rounds` times.
pub fn bench_generate(o: &GenerateBenchOptions) -> Result<GenerateBenchReport> {
    let load_before = load_average();
    let dev = Device::Cpu;
    let mut models = Vec::new();
    for name in &o.variants {
        let cfg = generate_variant_config(name, o)?;
        let model = MorModel::new(&cfg, &dev, 0)?;
        let thresholds = if cfg.expert_choice().is_some() {
            Some(calibrate_on_own_text(&model, o)?)
        } else {
            None
        };
        models.push((name.clone(), model, thresholds));
    }
    let mut rows: Vec<GenerateBenchRow> = Vec::new();
    for &b in &o.batches {
        let reqs = workload(o, b);
        for (name, _, thr) in &models {
            rows.push(GenerateBenchRow {
                name: name.clone(),
                batch: b,
                requests: reqs.len(),
                tokens: reqs.iter().map(|r| r.0).sum(),
                secs: Vec::new(),
                depth_fractions: Vec::new(),
                peak_kv_bytes: 0,
                peak_kv_block_bytes: 0,
                peak_bytes: 0,
                thresholds: thr.clone(),
            });
        }
    }
    let run = |model: &MorModel, thr: &Option<Vec<f64>>, b: usize| -> Result<(f64, EngineStats)> {
        let mut engine = Engine::new(
            model,
            None,
            EngineOptions {
                max_batch: b,
                eos_token_id: Some(0),
                expert_thresholds: thr.clone(),
                ignore_eos: true,
                asynchronous: false,
            },
        )?;
        for (len, seed) in workload(o, b) {
            engine.submit(
                Vec::new(),
                SamplingParams {
                    temperature: 1.0,
                    seed,
                    max_new_tokens: len,
                    ..Default::default()
                },
            )?;
        }
        let t0 = Instant::now();
        engine.run()?;
        let secs = t0.elapsed().as_secs_f64();
        Ok((secs, engine.stats().clone()))
    };
    // One untimed warm-up run per variant at the smallest batch.
    for (_, model, thr) in &models {
        run(model, thr, 1)?;
    }
    for _ in 0..o.rounds {
        let mut i = 0;
        for &b in &o.batches {
            for (_, model, thr) in &models {
                crate::alloc::reset_peak();
                let (secs, st) = run(model, thr, b)?;
                let row = &mut rows[i];
                row.peak_bytes = row.peak_bytes.max(crate::alloc::peak_bytes());
                row.secs.push(secs);
                let total = st.processed.max(1) as f64;
                row.depth_fractions = st.depths.iter().map(|&c| c as f64 / total).collect();
                row.peak_kv_bytes = row.peak_kv_bytes.max(st.peak_kv_bytes);
                row.peak_kv_block_bytes = row.peak_kv_block_bytes.max(st.peak_kv_block_bytes);
                i += 1;
            }
        }
    }
    Ok(GenerateBenchReport {
        options: o.clone(),
        rows,
        load: (load_before, load_average()),
    })
}

impl fmt::Display for GenerateBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        writeln!(
            f,
            "generation (KV cache, continuous batching; MoR: depth-wise), d={} heads={} layers={} (unrolled, all \
             variants) vocab={} context={}; empty prompts (start at EOS), lengths ~ N({}, {}²) clipped, EOS \
             ignored, temperature 1; {} rounds interleaved, medians; threads={}",
            o.hidden_size,
            o.heads,
            o.layers,
            o.vocab,
            o.context,
            o.mean_len,
            o.std_len,
            o.rounds,
            candle_core::utils::get_num_threads()
        )?;
        writeln!(
            f,
            "random weights: expert-choice thresholds calibrated on 32 sequences the model generated itself so the \
             depth distribution matches capacities (N_r−r)/N_r; time includes prefill, KV-cache updates and sampling"
        )?;
        let mut seen = std::collections::BTreeSet::new();
        for r in &self.rows {
            if let Some(t) = &r.thresholds {
                if seen.insert(r.name.clone()) {
                    writeln!(f, "  {}: calibrated thresholds {:.4?}", r.name, t)?;
                }
            }
        }
        writeln!(
            f,
            "| B | variant | requests | tokens | median s | tokens/s | vs vanilla | tokens per depth (0..N_r) | \
             peak KV MiB | KV vs vanilla | peak heap MiB |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|---|---|---|---|")?;
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        let mut base: Option<&GenerateBenchRow> = None;
        for r in &self.rows {
            if base.is_none_or(|b| b.batch != r.batch) {
                base = Some(r);
            }
            let b = base.unwrap_or(r);
            let t = median(&r.secs);
            let tps = r.tokens as f64 / t;
            let base_tps = b.tokens as f64 / median(&b.secs);
            let depths: Vec<String> = r
                .depth_fractions
                .iter()
                .map(|x| format!("{:.2}", x))
                .collect();
            writeln!(
                f,
                "| {} | {} | {} | {} | {:.3} | {:.0} | ×{:.2} | {} | {:.2} | {:.3} | {:.0} |",
                r.batch,
                r.name,
                r.requests,
                r.tokens,
                t,
                tps,
                tps / base_tps,
                depths.join(" / "),
                mib(r.peak_kv_bytes),
                r.peak_kv_bytes as f64 / b.peak_kv_bytes.max(1) as f64,
                mib(r.peak_bytes),
            )?;
        }
        writeln!(f, "{}", crate::bench::load_line(self.load))
    }
}
