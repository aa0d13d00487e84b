//! `mor bench train`: training step time and peak memory of vanilla, recursive and MoR models at the same shape,
//! as ratios to vanilla.

use std::fmt;
use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::bench::{load_average, load_line, median};
use crate::config::{ModelConfig, MorConfig, RecursionConfig, Sharing};
use crate::error::{MorError, Result};
use crate::model::{ForwardOptions, MorModel};
use crate::train::{AdamW, AdamWConfig, NamedParam};

/// Options of the training benchmark.
#[derive(Debug, Clone)]
pub struct TrainBenchOptions {
    /// Model width.
    pub hidden_size: usize,
    /// Query heads (KV heads = heads / 2).
    pub heads: usize,
    /// Unrolled layers of every variant; (layers − 2) must be divisible by each N_r benchmarked.
    pub layers: usize,
    /// Vocabulary size.
    pub vocab: usize,
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
            layers: 8,
            vocab: 4096,
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

/// Build the config of a named variant at the benchmark's shape.
pub fn variant_config(name: &str, o: &TrainBenchOptions) -> Result<ModelConfig> {
    let mut cfg = ModelConfig::from_json(
        &serde_json::json!({
            "vocab_size": o.vocab, "hidden_size": o.hidden_size, "intermediate_size": 3 * o.hidden_size,
            "num_hidden_layers": o.layers, "num_attention_heads": o.heads,
            "num_key_value_heads": (o.heads / 2).max(1), "max_position_embeddings": o.seq_len.max(2),
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
                "unknown variant {name:?}: use vanilla, recursive-N, mor-expert-N or mor-token-N"
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
    /// Peak heap bytes during the measured steps (needs [`crate::alloc::CountingAlloc`] as global allocator).
    pub peak_bytes: usize,
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
    for name in &o.variants {
        let cfg = variant_config(name, o)?;
        let model = MorModel::new(&cfg, &dev, 0)?;
        let params: Vec<NamedParam> = model
            .params()
            .iter()
            .map(|(n, v)| NamedParam::new(n.clone(), v.clone()))
            .collect();
        let opt = AdamW::new(params, AdamWConfig::default())?;
        runs.push((name.clone(), model, opt, Vec::new(), 0usize));
    }
    let step = |model: &MorModel, opt: &mut AdamW| -> Result<()> {
        let out = model.forward(&ids, &ForwardOptions::train(1000))?;
        let loss = model.loss(&out, &ids, o.batch * o.seq_len)?;
        let grads = loss.total.backward()?;
        opt.step(&grads, 1e-4)
    };
    // One untimed warm-up step each.
    for (_, model, opt, _, _) in runs.iter_mut() {
        step(model, opt)?;
    }
    for _ in 0..o.rounds {
        for (_, model, opt, times, peak) in runs.iter_mut() {
            crate::alloc::reset_peak();
            for _ in 0..o.steps {
                let t0 = Instant::now();
                step(model, opt)?;
                times.push(t0.elapsed().as_secs_f64());
            }
            *peak = (*peak).max(crate::alloc::peak_bytes());
        }
    }
    let rows = runs
        .into_iter()
        .map(|(name, model, _, step_secs, peak_bytes)| TrainBenchRow {
            name,
            params: model.params().num_scalars(),
            step_secs,
            peak_bytes,
        })
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
            "training step (fwd+bwd+AdamW), d={} heads={} layers={} vocab={} batch={}x{} tokens; \
             {} rounds x {} steps, interleaved; threads={}",
            o.hidden_size,
            o.heads,
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
            "| variant | params | median s/step | tokens/s | time vs vanilla | peak MiB | peak vs vanilla |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|")?;
        let base = self.rows.first();
        let base_t = base.map_or(f64::NAN, |r| median(&r.step_secs));
        let base_m = base.map_or(0, |r| r.peak_bytes) as f64;
        for r in &self.rows {
            let t = median(&r.step_secs);
            writeln!(
                f,
                "| {} | {:.2}M | {:.3} | {:.0} | {:+.1}% | {:.0} | {:+.1}% |",
                r.name,
                r.params as f64 / 1e6,
                t,
                tokens / t,
                100.0 * (t / base_t - 1.0),
                r.peak_bytes as f64 / (1 << 20) as f64,
                100.0 * (r.peak_bytes as f64 / base_m - 1.0),
            )?;
        }
        writeln!(f, "{}", load_line(self.load))
    }
}
