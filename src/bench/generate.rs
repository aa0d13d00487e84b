//! `mor bench generate`: generation throughput of vanilla, recursive and MoR models of the same width and unrolled
//! depth under continuous batching, in the style of the paper's Fig. 4a / App. E.
//!
//! Workload: for each batch size B, 3·B requests (at least 6) with empty prompts (generation starts from EOS, like
//! the paper's "no prefix" queries) and generation lengths ~ Normal(mean, std) clipped to [1, context − 1]; every
//! variant gets the same lengths and seeds. B=Max is the paper's: 32 × the ratio of the variant's largest batch to
//! vanilla's under one memory budget (parameters + K/V at full context), so vanilla runs at 32 and MoR-4 at ~50.
//! Variants with `+async` use the asynchronous depth-wise batching of the paper's App. E. Models are random, so
//! expert-choice routers are calibrated: per-recursion thresholds are set on a calibration batch so the realised
//! depth distribution matches the configured capacities (N_r/N_r, …, 1/N_r), and the output says so. As in
//! `mor bench train`, runs are interleaved round-robin and repeated, and medians and ratios to vanilla from the same
//! run are reported, with the load average.
//!
//! With several weight precisions (`precisions`, `mor bench generate --quantized f32,q8_0,q4_0`) every variant also
//! runs quantized in memory exactly as `mor quantize` stores it ([`quantize_model`]), on the engine's integer
//! kernels, calibrated on its own generations; each row's baseline is vanilla at the same precision.

use std::fmt;
use std::time::Instant;

use candle_core::Device;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::bench::train::{variant_config, TrainBenchOptions};
use crate::bench::{load_average, median};
use crate::config::{DecodeRule, KvSharingConfig, ModelConfig};
use crate::engine::batch::{Engine, EngineOptions, EngineStats};
use crate::engine::sampling::SamplingParams;
use crate::engine::step::{CachedModel, StepOptions};
use crate::error::{MorError, Result};
use crate::io::gguf::{quantize_model, QuantType, QuantizedWeights};
use crate::model::MorModel;

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
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (`None`: heads / 2).
    pub kv_heads: Option<usize>,
    /// FFN width (`None`: 3 × width).
    pub intermediate_size: Option<usize>,
    /// Unrolled layers of every variant unless `@L`; (layers − 2) must be divisible by each N_r (34: the paper's
    /// MoR-4 against a 34-layer vanilla; 26 serves N_r = 2, 3, 4).
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
    /// Batch sizes (slots); [`BatchSize::Max`] is the paper's B=Max.
    pub batches: Vec<BatchSize>,
    /// Memory budget (bytes) for B=Max: parameters plus K/V at full context (the paper: the GPU's memory).
    pub memory_budget: usize,
    /// Rounds (each runs every variant at every batch size once, interleaved).
    pub rounds: usize,
    /// Variants by name: vanilla, recursive-N, mor-expert-N, mor-token-N, optionally followed by `@L` (unrolled
    /// layers, instead of `layers`), `+kv` (recursive KV sharing) and `+async` (asynchronous depth-wise batching,
    /// [`EngineOptions::asynchronous`]). A row's baseline is the first `vanilla` variant with the same unrolled
    /// depth, else the first variant.
    pub variants: Vec<String>,
    /// Weight precisions every variant runs at ([`QuantType::F32`]: the dense f32 engine; others quantized in
    /// memory, [`quantize_model`]).
    pub precisions: Vec<QuantType>,
}

impl GenerateBenchOptions {
    /// Apply a named width preset: `smollm2` is SmolLM2-135M's shape (d = 576, 9 heads of 64, 3 KV heads, FFN 1536,
    /// vocabulary 49152, 30 unrolled layers: vanilla-30, MoR-4 as 1 + 7×4 + 1; MoR-3 as 1 + 9×3 + 1 needs
    /// `mor-expert-3@29`, the paper's Table 10 layout of SmolLM2-135M).
    pub fn with_shape(mut self, name: &str) -> Result<Self> {
        match name {
            "smollm2" => {
                self.hidden_size = 576;
                self.heads = 9;
                self.kv_heads = Some(3);
                self.intermediate_size = Some(1536);
                self.vocab = 49152;
                self.layers = 30;
                Ok(self)
            }
            other => Err(MorError::Config(format!(
                "unknown shape {other:?}: use smollm2"
            ))),
        }
    }
}

impl Default for GenerateBenchOptions {
    fn default() -> Self {
        GenerateBenchOptions {
            hidden_size: 256,
            heads: 4,
            kv_heads: None,
            intermediate_size: None,
            layers: 34,
            vocab: 4096,
            context: 512,
            mean_len: 128.0,
            std_len: 32.0,
            requests_per_slot: 3,
            batches: vec![
                BatchSize::Fixed(1),
                BatchSize::Fixed(8),
                BatchSize::Fixed(32),
                BatchSize::Max,
            ],
            memory_budget: 16 << 30,
            rounds: 3,
            variants: [
                "vanilla",
                "recursive-4",
                "mor-expert-2",
                "mor-expert-2+async",
                "mor-expert-4",
                "mor-expert-4+async",
            ]
            .map(String::from)
            .to_vec(),
            precisions: vec![QuantType::F32],
        }
    }
}

/// A batch size of the generation benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSize {
    /// This many slots for every variant.
    Fixed(usize),
    /// The paper's B=Max (§3.3, docs/architecture.md S7): 32 × (largest batch of the variant / largest batch of vanilla) under the
    /// same memory budget, counting parameters and K/V at full context; vanilla runs at 32.
    Max,
}

impl std::str::FromStr for BatchSize {
    type Err = MorError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "max" | "Max" | "MAX" => Ok(BatchSize::Max),
            t => match t.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(BatchSize::Fixed(n)),
                _ => Err(MorError::Config(format!(
                    "batch size {t:?}: use a positive integer or `max`"
                ))),
            },
        }
    }
}

impl fmt::Display for BatchSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchSize::Fixed(n) => write!(f, "{n}"),
            BatchSize::Max => write!(f, "Max"),
        }
    }
}

/// A parsed variant name: (base kind such as `mor-expert-4`, unrolled layers, KV sharing, asynchronous).
fn parse_variant(name: &str, o: &GenerateBenchOptions) -> Result<(String, usize, bool, bool)> {
    let mut parts = name.split('+');
    let head = parts.next().unwrap_or_default();
    let (mut kv, mut asy) = (false, false);
    for p in parts {
        match p {
            "kv" => kv = true,
            "async" => asy = true,
            _ => {
                return Err(MorError::Config(format!(
                    "variant {name:?}: unknown suffix +{p} (use +kv, +async)"
                )))
            }
        }
    }
    let (base, layers) = match head.split_once('@') {
        Some((b, l)) => (
            b,
            l.parse::<usize>().map_err(|_| {
                MorError::Config(format!("variant {name:?}: bad layer count {l:?}"))
            })?,
        ),
        None => (head, o.layers),
    };
    Ok((base.to_string(), layers, kv, asy))
}

/// The config of a benchmark variant.
pub fn generate_variant_config(name: &str, o: &GenerateBenchOptions) -> Result<ModelConfig> {
    let (base, layers, kv, _) = parse_variant(name, o)?;
    let shape = TrainBenchOptions {
        hidden_size: o.hidden_size,
        heads: o.heads,
        kv_heads: o.kv_heads,
        intermediate_size: o.intermediate_size,
        layers,
        vocab: o.vocab,
        seq_len: o.context,
        ..Default::default()
    };
    let mut cfg = variant_config(&base, &shape)?;
    if kv {
        cfg.kv_sharing = Some(KvSharingConfig::default());
    }
    cfg.eos_token_id = Some(0);
    cfg.validate()?;
    Ok(cfg)
}

/// K/V bytes one sequence holds at full context (`context` tokens) in f32, from the configured depth distribution:
/// every token in the prefix/suffix layers; in recursion r a fraction equal to its capacity (expert-choice), the
/// balanced share (N_r − r)/N_r (token-choice), 1 (recursive); only recursion 1 under KV sharing (paper Table 2).
pub fn full_context_kv_bytes(cfg: &ModelConfig, context: usize) -> usize {
    let l = cfg.layout();
    let per_token_layer = 2 * cfg.num_key_value_heads * cfg.head_dim() * 4;
    let layers: f64 = if l.base_depth == 0 {
        l.num_layers() as f64
    } else {
        let n_r = l.num_recursion;
        let frac: Vec<f64> = if cfg.expert_choice().is_some() {
            cfg.capacities()
        } else if cfg.mor.is_some() {
            (0..n_r).map(|r| (n_r - r) as f64 / n_r as f64).collect()
        } else {
            vec![1.0; n_r]
        };
        let block: f64 = if cfg.kv_sharing.is_some() {
            frac.first().copied().unwrap_or(1.0)
        } else {
            frac.iter().sum()
        };
        (l.num_layers() - l.base_depth * n_r) as f64 + l.base_depth as f64 * block
    };
    (layers * per_token_layer as f64 * context as f64).round() as usize
}

/// The largest batch of `model` under `budget` bytes: (budget − parameter bytes) / K/V bytes per sequence at full
/// context.
pub fn max_batch(model: &MorModel, context: usize, budget: usize) -> usize {
    let params = model.params().num_scalars() * model.params().dtype().size_in_bytes();
    max_batch_for(params, model.config(), context, budget)
}

/// [`max_batch`] for a model whose parameters hold `param_bytes` (e.g. quantized).
fn max_batch_for(param_bytes: usize, cfg: &ModelConfig, context: usize, budget: usize) -> usize {
    budget.saturating_sub(param_bytes) / full_context_kv_bytes(cfg, context).max(1)
}

/// Measurements of one variant at one batch size.
#[derive(Debug, Clone)]
pub struct GenerateBenchRow {
    /// Variant name.
    pub name: String,
    /// Weight precision.
    pub precision: QuantType,
    /// Batch size as requested (a number or B=Max).
    pub batch_label: BatchSize,
    /// Batch size (slots) this variant ran at.
    pub batch: usize,
    /// Unrolled layers.
    pub layers: usize,
    /// Largest batch under the memory budget ([`max_batch`]).
    pub max_batch: usize,
    /// Mean rows per call of the shared block (token-recursions per step; 0 for vanilla).
    pub block_rows_per_step: f64,
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
    /// One row per (batch, variant), batch-major.
    pub rows: Vec<GenerateBenchRow>,
    /// Index of each row's baseline row (same batch label; the first `vanilla` variant with the same unrolled
    /// depth, else the first variant).
    pub baseline: Vec<usize>,
    /// Load averages before and after.
    pub load: (Option<[f64; 3]>, Option<[f64; 3]>),
    /// Per-tensor quantization fallbacks, one line each.
    pub notes: Vec<String>,
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
pub fn calibrate_on_own_text(model: &MorModel, o: &GenerateBenchOptions) -> Result<Vec<f64>> {
    calibrate_cached(&CachedModel::new(model)?, o)
}

/// [`calibrate_on_own_text`] on a prepared (e.g. quantized) model.
pub fn calibrate_cached(cm: &CachedModel, o: &GenerateBenchOptions) -> Result<Vec<f64>> {
    let len = (o.mean_len.round() as usize).clamp(8, o.context - 1);
    let mut rng = StdRng::seed_from_u64(17);
    let mut seqs: Vec<Vec<u32>> = (0..32)
        .map(|_| {
            (0..len)
                .map(|_| rng.random_range(0..o.vocab as u32))
                .collect()
        })
        .collect();
    let mut thr = calibrate_expert_thresholds(cm, &seqs)?;
    for round in 0..2u64 {
        let mut engine = Engine::with_cached(
            cm.clone(),
            None,
            EngineOptions {
                max_batch: 32,
                eos_token_id: Some(0),
                expert_thresholds: Some(thr.clone()),
                ignore_eos: true,
                asynchronous: false,
                max_context: None,
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
        thr = calibrate_expert_thresholds(cm, &seqs)?;
    }
    Ok(thr)
}

/// A variant of the run at one precision.
struct Variant {
    name: String,
    precision: QuantType,
    /// Index into the prepared models.
    model: usize,
    asynchronous: bool,
    layers: usize,
    vanilla: bool,
    max_batch: usize,
}

/// A model of the run: (key, precision, the model or quantized frame, its quantized weights, parameter bytes).
type Built = (String, QuantType, MorModel, Option<QuantizedWeights>, usize);

/// Run every variant at every precision and batch size, interleaved, `rounds` times.
pub fn bench_generate(o: &GenerateBenchOptions) -> Result<GenerateBenchReport> {
    let load_before = load_average();
    let dev = Device::Cpu;
    if o.precisions.is_empty() {
        return Err(MorError::Config("no weight precision to run".into()));
    }
    // Variants differing only by `+async` share one model (same weights and calibration) per precision; every
    // precision quantizes the same f32 model.
    let mut dense: Vec<(String, MorModel)> = Vec::new();
    let mut built: Vec<Built> = Vec::new();
    let mut notes = Vec::new();
    let mut variants = Vec::new();
    for &ty in &o.precisions {
        for name in &o.variants {
            let (base, layers, kv, asy) = parse_variant(name, o)?;
            let key = format!("{base}@{layers}{}", if kv { "+kv" } else { "" });
            let mi = match built.iter().position(|m| m.0 == key && m.1 == ty) {
                Some(i) => i,
                None => {
                    let di = match dense.iter().position(|m| m.0 == key) {
                        Some(i) => i,
                        None => {
                            let cfg = generate_variant_config(name, o)?;
                            dense.push((key.clone(), MorModel::new(&cfg, &dev, 0)?.frozen()?));
                            dense.len() - 1
                        }
                    };
                    let m = &dense[di].1;
                    let f32_bytes = |m: &MorModel| {
                        m.params().num_scalars() * m.params().dtype().size_in_bytes()
                    };
                    built.push(if ty == QuantType::F32 {
                        (key.clone(), ty, m.clone(), None, f32_bytes(m))
                    } else {
                        let q = quantize_model(m, ty)?;
                        notes.extend(q.notes.iter().map(|n| format!("{key} {ty}: {n}")));
                        let bytes = q.weights.bytes() + f32_bytes(&q.model);
                        (key.clone(), ty, q.model, Some(q.weights), bytes)
                    });
                    built.len() - 1
                }
            };
            let m = &built[mi];
            variants.push(Variant {
                name: if o.precisions == [QuantType::F32] {
                    name.clone()
                } else {
                    format!("{name} [{ty}]")
                },
                precision: ty,
                model: mi,
                asynchronous: asy,
                layers,
                vanilla: base == "vanilla",
                max_batch: max_batch_for(m.4, m.2.config(), o.context, o.memory_budget),
            });
        }
    }
    drop(dense);
    let mut weights: Vec<Option<QuantizedWeights>> = built.iter_mut().map(|b| b.3.take()).collect();
    let mut models: Vec<(CachedModel, Option<Vec<f64>>)> = Vec::new();
    for (b, w) in built.iter().zip(&mut weights) {
        let cm = match w.take() {
            Some(w) => CachedModel::quantized(&b.2, w)?,
            None => CachedModel::new(&b.2)?,
        };
        // Calibrated on the model as it runs (quantized or not), so every precision realises the capacities.
        let thresholds = if b.2.config().expert_choice().is_some() {
            Some(calibrate_cached(&cm, o)?)
        } else {
            None
        };
        models.push((cm, thresholds));
    }
    let baseline_of = |v: &Variant| {
        variants
            .iter()
            .position(|w| w.vanilla && w.layers == v.layers && w.precision == v.precision)
            .or_else(|| variants.iter().position(|w| w.precision == v.precision))
            .unwrap_or(0)
    };
    let mut rows: Vec<GenerateBenchRow> = Vec::new();
    let mut baseline = Vec::new();
    let mut plan = Vec::new();
    for &bl in &o.batches {
        let first = rows.len();
        // B=Max: the workload of the largest B=Max, the same for every variant.
        let batch_of = |v: &Variant| -> usize {
            match bl {
                BatchSize::Fixed(n) => n,
                BatchSize::Max => {
                    let vb = variants[baseline_of(v)].max_batch;
                    ((32.0 * v.max_batch as f64 / vb.max(1) as f64).round() as usize).max(1)
                }
            }
        };
        let wl = variants.iter().map(batch_of).max().unwrap_or(1);
        let reqs = workload(o, wl);
        for v in &variants {
            let b = batch_of(v);
            baseline.push(first + baseline_of(v));
            plan.push((v.model, v.asynchronous, b, wl));
            rows.push(GenerateBenchRow {
                name: v.name.clone(),
                precision: v.precision,
                batch_label: bl,
                batch: b,
                layers: v.layers,
                max_batch: v.max_batch,
                block_rows_per_step: 0.0,
                requests: reqs.len(),
                tokens: reqs.iter().map(|r| r.0).sum(),
                secs: Vec::new(),
                depth_fractions: Vec::new(),
                peak_kv_bytes: 0,
                peak_kv_block_bytes: 0,
                peak_bytes: 0,
                thresholds: models[v.model].1.clone(),
            });
        }
    }
    let run = |cm: &CachedModel,
               thr: &Option<Vec<f64>>,
               asynchronous: bool,
               b: usize,
               wl: usize|
     -> Result<(f64, EngineStats)> {
        let mut engine = Engine::with_cached(
            cm.clone(),
            None,
            EngineOptions {
                max_batch: b,
                eos_token_id: Some(0),
                expert_thresholds: thr.clone(),
                ignore_eos: true,
                asynchronous,
                max_context: None,
            },
        )?;
        for (len, seed) in workload(o, wl) {
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
    // One untimed warm-up run per variant at batch 1.
    for v in &variants {
        let (cm, thr) = &models[v.model];
        run(cm, thr, v.asynchronous, 1, 1)?;
    }
    for _ in 0..o.rounds {
        for (i, &(mi, asy, b, wl)) in plan.iter().enumerate() {
            crate::alloc::reset_peak();
            let (cm, thr) = &models[mi];
            let (secs, st) = run(cm, thr, asy, b, wl)?;
            let layout = cm.model().layout();
            let row = &mut rows[i];
            row.peak_bytes = row.peak_bytes.max(crate::alloc::peak_bytes());
            row.secs.push(secs);
            let total = st.processed.max(1) as f64;
            row.depth_fractions = st.depths.iter().map(|&c| c as f64 / total).collect();
            row.peak_kv_bytes = row.peak_kv_bytes.max(st.peak_kv_bytes);
            row.peak_kv_block_bytes = row.peak_kv_block_bytes.max(st.peak_kv_block_bytes);
            row.block_rows_per_step = if layout.base_depth == 0 {
                0.0
            } else if asy {
                st.block_rows as f64 / st.steps.max(1) as f64
            } else {
                // Synchronous: the block is called once per recursion per step.
                st.block_rows as f64 / (st.steps.max(1) * layout.num_recursion) as f64
            };
        }
    }
    Ok(GenerateBenchReport {
        options: o.clone(),
        rows,
        baseline,
        load: (load_before, load_average()),
        notes,
    })
}

impl fmt::Display for GenerateBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        writeln!(
            f,
            "generation (KV cache, continuous batching; MoR: depth-wise, `+async` = asynchronous), d={} heads={} \
             layers={} (unrolled, unless @L) vocab={} context={}; empty prompts (start at EOS), lengths ~ N({}, {}²) \
             clipped, EOS ignored, temperature 1; {} rounds interleaved, medians; threads={}",
            o.hidden_size,
            o.heads,
            o.layers,
            o.vocab,
            o.context,
            o.mean_len,
            o.std_len,
            o.rounds,
            crate::engine::num_threads()
        )?;
        writeln!(
            f,
            "random weights: expert-choice thresholds calibrated on 32 sequences the model generated itself so the \
             depth distribution matches capacities (N_r−r)/N_r; time includes prefill, KV-cache updates and sampling"
        )?;
        writeln!(
            f,
            "B=Max = 32 × (max batch of the variant / max batch of vanilla) under {:.1} GiB for parameters + f32 K/V \
             at full context ({} tokens); absolute max batch in the `max B` column",
            o.memory_budget as f64 / (1u64 << 30) as f64,
            o.context
        )?;
        if o.precisions != [QuantType::F32] {
            let names: Vec<&str> = o.precisions.iter().map(|p| p.name()).collect();
            writeln!(
                f,
                "weights: {} (quantized in memory as `mor quantize` stores them, matmuls on the integer kernels, \
                 routers and norms f32; `vs vanilla` = against vanilla at the same precision; max B counts the \
                 stored bytes)",
                names.join(", ")
            )?;
        }
        for n in &self.notes {
            writeln!(f, "  fallback: {n}")?;
        }
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
            "| B | variant | slots | requests | tokens | median s | tokens/s | vs vanilla | tokens per depth (0..N_r) | \
             block rows/call | peak KV MiB | KV vs vanilla | peak heap MiB | max B |"
        )?;
        writeln!(
            f,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        )?;
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        for (r, &bi) in self.rows.iter().zip(&self.baseline) {
            let b = &self.rows[bi];
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
                "| {} | {} | {} | {} | {} | {:.3} | {:.0} | ×{:.2} | {} | {:.1} | {:.2} | {:.3} | {:.0} | {} |",
                r.batch_label,
                r.name,
                r.batch,
                r.requests,
                r.tokens,
                t,
                tps,
                tps / base_tps,
                depths.join(" / "),
                r.block_rows_per_step,
                mib(r.peak_kv_bytes),
                r.peak_kv_bytes as f64 / b.peak_kv_bytes.max(1) as f64,
                mib(r.peak_bytes),
                r.max_batch,
            )?;
        }
        writeln!(f, "{}", crate::bench::load_line(self.load))
    }
}
