//! The isoFLOP study (paper §3.1, Table 3 and Table 9; docs/isoflop.md): vanilla, recursive and MoR models of the same
//! width and unrolled depth trained at the same compute budgets, compared by held-out NLL.
//!
//! What "the same budget" means is the paper's convention (App. D, `--flops-count paper`): forward FLOPs per token
//! without the LM head, recursions weighted by the tokens they process, so a MoR model trains for more steps than a
//! vanilla one. Every run follows the paper's recipe: Middle-Cycle sharing and the final router settings (the presets'
//! [`crate::config::MorConfig::expert`] / [`crate::config::MorConfig::token`]), the trapezoid (WSD) schedule with a
//! warm-up of 5% of the steps at the study's *smallest* budget and a cool-down of 20% of each run's steps (App. B), and
//! one data order for all runs (one sampler seed: a run with more steps reads further down the same stream). Every
//! model is scored on the same held-out windows: `eval_sequences` windows spread evenly over the corpus's held-out
//! split ([`heldout_windows`]).
//!
//! A study directory holds one run directory per (budget, variant) (`runs/<budget>/<variant>/`, a normal trainer run
//! directory) with a `result.json` written atomically when the run is evaluated: a study started again skips runs that
//! have one, resumes runs that have a checkpoint, and refuses run directories made with other settings. After the
//! runs of a budget, the decode throughput of its models is measured with the engine, interleaved
//! (`runs/<budget>/decode.json`). Then `isoflop.md` (tables) and `isoflop.png` (NLL against FLOPs) are rewritten.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::bench::generate::{generate_variant_config, GenerateBenchOptions};
use crate::bench::{load_average, median};
use crate::config::flops::{forward_flops, steps_for_budget, BudgetCount};
use crate::config::ModelConfig;
use crate::data::{CorpusInfo, TokenFile};
use crate::engine::batch::{Engine, EngineOptions};
use crate::engine::sampling::SamplingParams;
use crate::error::{MorError, Result};
use crate::eval::routing::RoutingStats;
use crate::io::checkpoint::io::write_json_atomic;
use crate::io::checkpoint::load_model;
use crate::model::expert_choice::RouteMode;
use crate::model::MorModel;
use crate::train::plot::{plot_curves, Series};
use crate::train::trainer::{heldout_loss_traced, TrainConfig, Trainer};
use crate::train::{AdamWConfig, LrSchedule};

/// Per-run result file, written when the run is trained and evaluated.
pub const RESULT_FILE: &str = "result.json";
/// Per-budget decode-throughput file.
pub const DECODE_FILE: &str = "decode.json";
/// The study's markdown tables.
pub const TABLE_FILE: &str = "isoflop.md";
/// The study's plot of held-out NLL against FLOPs.
pub const PLOT_FILE: &str = "isoflop.png";
/// The variants of the issue: vanilla, recursive, MoR expert-choice with recursion-wise caching and with recursive KV
/// sharing, MoR token-choice, all N_r = 3.
pub const DEFAULT_VARIANTS: [&str; 5] = [
    "vanilla",
    "recursive-3",
    "mor-expert-3",
    "mor-expert-3+kv",
    "mor-token-3",
];
/// Budgets of the full study in forward FLOPs (paper convention): measured 36 min on 2 cores of an AVX-512 EPYC,
/// about twice that on an AVX2 one (docs/isoflop.md); the first is the `--quick` study.
pub const DEFAULT_BUDGETS: [f64; 3] = [1e12, 2e12, 4e12];

/// The engine workload used to measure each trained model's decode throughput.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecodeOptions {
    /// Sequences decoded together (slots).
    pub batch: usize,
    /// Requests (empty prompts: generation starts at EOS, as the paper's throughput runs).
    pub requests: usize,
    /// Tokens generated per request (EOS ignored, so every variant generates the same count).
    pub new_tokens: usize,
    /// Timed rounds; each round runs every model of the budget once, interleaved, and the median is reported.
    pub rounds: usize,
}

/// Settings of a study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyOptions {
    /// FLOPs budgets, forward FLOPs without the LM head (the paper's convention, [`BudgetCount::Paper`]).
    pub budgets: Vec<f64>,
    /// Variants: `vanilla`, `recursive-N`, `mor-expert-N`, `mor-token-N`, optionally `+kv` (recursive KV sharing).
    pub variants: Vec<String>,
    /// Model width (d); FFN 3d, heads `heads` of d / heads, KV heads heads / 2 (the `tiny-*` presets' shape).
    pub hidden_size: usize,
    /// Attention heads.
    pub heads: usize,
    /// Unrolled layers of every variant; (layers − 2) must divide by each N_r (Middle-Cycle, no remainder).
    pub layers: usize,
    /// Tokens per training and held-out sequence (also the models' context).
    pub seq_len: usize,
    /// Sequences per optimizer step.
    pub batch_size: usize,
    /// Peak learning rate (paper: 3e-3).
    pub lr: f64,
    /// Warm-up as a fraction of each variant's steps at the smallest budget (paper App. B: 5%).
    pub warmup_fraction: f64,
    /// Cool-down as a fraction of each run's steps (paper App. B: 20%).
    pub decay_fraction: f64,
    /// Seed of the model initialisation and of the (shared) data order.
    pub seed: u64,
    /// Held-out windows of `seq_len` scored for every model.
    pub eval_sequences: usize,
    /// Checkpoint interval in steps (what a killed study loses at most).
    pub save_every: usize,
    /// Decode-throughput workload.
    pub decode: DecodeOptions,
}

impl Default for StudyOptions {
    fn default() -> Self {
        StudyOptions {
            budgets: DEFAULT_BUDGETS.to_vec(),
            variants: DEFAULT_VARIANTS.iter().map(|s| s.to_string()).collect(),
            hidden_size: 128,
            heads: 4,
            layers: 8,
            seq_len: 256,
            batch_size: 8,
            lr: 3e-3,
            warmup_fraction: 0.05,
            decay_fraction: 0.2,
            seed: 0,
            eval_sequences: 64,
            save_every: 50,
            decode: DecodeOptions {
                batch: 8,
                requests: 16,
                new_tokens: 64,
                rounds: 3,
            },
        }
    }
}

/// One planned training run.
#[derive(Debug, Clone)]
pub struct RunPlan {
    /// Variant name as given.
    pub variant: String,
    /// Its budget (paper-convention FLOPs).
    pub budget: f64,
    /// Run directory.
    pub dir: PathBuf,
    /// Model config.
    pub model: ModelConfig,
    /// Trainer settings (steps derived from the budget).
    pub train: TrainConfig,
    /// Forward FLOPs per token without the LM head at `seq_len` (what the budget counts).
    pub flops_per_token: f64,
    /// Stored non-embedding parameters.
    pub unique_params: usize,
    /// Embedding parameters.
    pub embedding_params: usize,
}

impl RunPlan {
    /// Training tokens of the whole run.
    pub fn tokens(&self) -> u64 {
        (self.train.steps * self.train.tokens_per_step()) as u64
    }

    /// FLOPs the run spends, counted as its budget is (≤ the budget, by less than one step).
    pub fn flops(&self) -> f64 {
        self.tokens() as f64 * self.flops_per_token
    }

    /// A fresh trainer for this run (the model initialised with the study seed).
    pub fn start(&self, data_dir: &Path) -> Result<Trainer> {
        let model = MorModel::new(&self.model, &Device::Cpu, self.train.seed)?;
        Trainer::new(model, self.train.clone(), data_dir, &self.dir)
    }
}

/// What a finished run measured (`result.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// Variant name.
    pub variant: String,
    /// Budget.
    pub budget: f64,
    /// The run's model config (to recognise the run when the study is started again).
    pub model: ModelConfig,
    /// The run's trainer settings (likewise).
    pub train: TrainConfig,
    /// Steps trained.
    pub steps: usize,
    /// Training tokens seen.
    pub tokens: u64,
    /// FLOPs spent (paper convention).
    pub flops: f64,
    /// Stored non-embedding parameters.
    pub unique_params: usize,
    /// Embedding parameters.
    pub embedding_params: usize,
    /// Held-out NLL per token with the training-time routing (expert-choice: the paper's non-causal top-k).
    pub nll: f64,
    /// Expert-choice: held-out NLL with the causal decode rule (what generation uses).
    pub nll_causal: Option<f64>,
    /// MoR: fraction of held-out tokens that ran 0..=N_r recursions, with the routing generation uses (causal rule
    /// for expert-choice, the router's choice for token-choice).
    pub depth: Option<Vec<f64>>,
    /// Wall-clock training seconds (all sessions of the run).
    pub train_secs: f64,
}

/// Decode throughput of one trained model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecodeResult {
    /// Variant name.
    pub variant: String,
    /// Tokens generated per round.
    pub tokens: usize,
    /// Seconds of every round.
    pub secs: Vec<f64>,
    /// Fraction of processed tokens per recursion count (0..=N_r) in the engine.
    pub depth: Vec<f64>,
}

impl DecodeResult {
    /// Median tokens per second.
    pub fn tokens_per_sec(&self) -> f64 {
        self.tokens as f64 / median(&self.secs)
    }
}

/// The decode-throughput measurement of one budget's models (`decode.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecodeReport {
    /// The workload.
    pub options: DecodeOptions,
    /// candle's thread count.
    pub threads: usize,
    /// Load average before the measurement.
    pub load_before: Option<[f64; 3]>,
    /// Load average after it.
    pub load_after: Option<[f64; 3]>,
    /// One row per model, in variant order.
    pub results: Vec<DecodeResult>,
}

/// How a run was brought to completion in this invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// Trained from scratch.
    Trained,
    /// Continued from a checkpoint at this step.
    Resumed(usize),
    /// Already complete (its `result.json` was read).
    Skipped,
}

/// The outcome of [`Study::run`].
#[derive(Debug, Clone)]
pub struct StudyReport {
    /// Every run's result, in plan order, with how it was completed.
    pub runs: Vec<(RunResult, RunStatus)>,
    /// Decode throughput per budget, in budget order.
    pub decode: Vec<(f64, DecodeReport)>,
    /// The markdown written to [`TABLE_FILE`].
    pub table: String,
    /// Path of the tables.
    pub table_path: PathBuf,
    /// Path of the plot.
    pub plot_path: PathBuf,
}

/// A validated study: every run planned, nothing trained yet.
#[derive(Debug, Clone)]
pub struct Study {
    /// The settings.
    pub options: StudyOptions,
    /// Prepared corpus directory.
    pub data_dir: PathBuf,
    /// Study directory.
    pub out_dir: PathBuf,
    /// Runs, budget-major in ascending budget order, variants in the given order.
    pub runs: Vec<RunPlan>,
    /// The corpus description.
    pub corpus: CorpusInfo,
}

/// Directory name of a budget, e.g. `1e12`, `2.5e12`.
pub fn budget_label(budget: f64) -> String {
    format!("{budget:e}")
}

/// The model of `variant` at the study's shape, or why it cannot be built at that depth.
fn variant_model(variant: &str, o: &StudyOptions, vocab: usize, eos: u32) -> Result<ModelConfig> {
    if variant.contains('@') || variant.contains("+async") {
        return Err(MorError::Config(format!(
            "variant {variant:?}: every variant of a study has the study's unrolled depth (--layers) and is trained \
             the same way; drop the @L / +async suffix"
        )));
    }
    let shape = GenerateBenchOptions {
        hidden_size: o.hidden_size,
        heads: o.heads,
        layers: o.layers,
        vocab,
        context: o.seq_len,
        ..Default::default()
    };
    let mut cfg = generate_variant_config(variant, &shape).map_err(|e| {
        MorError::Config(format!("variant {variant:?} at {} layers: {e}", o.layers))
    })?;
    cfg.eos_token_id = Some(eos);
    cfg.bos_token_id = Some(eos);
    Ok(cfg)
}

impl Study {
    /// Check everything that can be checked before training and plan every run. Refuses: no or invalid budgets or
    /// variants, a variant that cannot be built at the chosen depth, a budget too small for one optimizer step of
    /// some variant, a corpus whose held-out split is a piece of a document or is smaller than the held-out set.
    pub fn plan(options: &StudyOptions, data_dir: &Path, out_dir: &Path) -> Result<Study> {
        let o = options;
        if o.budgets.is_empty() || o.variants.is_empty() {
            return Err(MorError::Config(
                "an isoFLOP study needs at least one budget and one variant".into(),
            ));
        }
        if let Some(b) = o.budgets.iter().find(|b| !(b.is_finite() && **b > 0.0)) {
            return Err(MorError::Config(format!(
                "budget {b} must be a positive number of FLOPs"
            )));
        }
        for (i, v) in o.variants.iter().enumerate() {
            if o.variants[..i].contains(v) {
                return Err(MorError::Config(format!("variant {v:?} is listed twice")));
            }
        }
        for (name, v) in [
            ("batch_size", o.batch_size),
            ("eval_sequences", o.eval_sequences),
            ("save_every", o.save_every),
            ("decode batch", o.decode.batch),
            ("decode requests", o.decode.requests),
            ("decode new_tokens", o.decode.new_tokens),
            ("decode rounds", o.decode.rounds),
        ] {
            if v == 0 {
                return Err(MorError::Config(format!("{name} must be positive")));
            }
        }
        if o.decode.new_tokens >= o.seq_len {
            return Err(MorError::Config(format!(
                "decode new_tokens {} must be below the context {}",
                o.decode.new_tokens, o.seq_len
            )));
        }
        let mut budgets = o.budgets.clone();
        budgets.sort_by(f64::total_cmp);
        budgets.dedup();

        let corpus = CorpusInfo::load(data_dir)?;
        if corpus.split_within_document {
            return Err(MorError::Data(format!(
                "{}: the held-out split is the tail of the corpus's only document; an isoFLOP study needs whole \
                 documents held out (prepare it from several documents)",
                data_dir.display()
            )));
        }
        let heldout = o.eval_sequences * o.seq_len;
        if (corpus.val_tokens as usize) < heldout {
            return Err(MorError::Data(format!(
                "{}: {} held-out tokens, fewer than the held-out set of {} sequences × {} tokens = {heldout}; \
                 prepare the corpus with a larger --val-fraction or lower eval_sequences",
                data_dir.display(),
                corpus.val_tokens,
                o.eval_sequences,
                o.seq_len
            )));
        }
        let step_tokens = o.seq_len * o.batch_size;
        if (corpus.train_tokens as usize) < step_tokens {
            return Err(MorError::Data(format!(
                "{}: {} training tokens, fewer than one batch of {step_tokens}",
                data_dir.display(),
                corpus.train_tokens
            )));
        }

        let models = o
            .variants
            .iter()
            .map(|v| variant_model(v, o, corpus.vocab_size, corpus.eos_id))
            .collect::<Result<Vec<_>>>()?;
        let mut runs = Vec::new();
        for (v, cfg) in o.variants.iter().zip(&models) {
            let report = forward_flops(cfg, o.seq_len)?;
            let steps_at = |budget: f64| {
                steps_for_budget(cfg, o.seq_len, step_tokens, budget, BudgetCount::Paper).map_err(
                    |e| MorError::Config(format!("budget {} for {v}: {e}", budget_label(budget))),
                )
            };
            // Paper App. B: warm-up is 5% of the steps of the smallest budget, the same for every budget.
            let warmup = (o.warmup_fraction * steps_at(budgets[0])? as f64).round() as usize;
            for &budget in &budgets {
                let steps = steps_at(budget)?;
                let train = TrainConfig {
                    seq_len: o.seq_len,
                    batch_size: o.batch_size,
                    grad_accum: 1,
                    steps,
                    lr: o.lr,
                    schedule: LrSchedule::Wsd {
                        warmup: Some(warmup.min(steps)),
                        total: steps,
                        decay_fraction: o.decay_fraction,
                    },
                    optimizer: AdamWConfig::default(),
                    max_grad_norm: 1.0,
                    seed: o.seed,
                    // The corpus is its sources one after another; a shuffled (seeded, hence shared) order makes
                    // every prefix of the stream a sample of all of them.
                    shuffle: true,
                    eval_every: 0,
                    eval_sequences: o.eval_sequences,
                    save_every: o.save_every,
                    keep_last: 1,
                    log_every: 10,
                };
                train.validate()?;
                runs.push(RunPlan {
                    variant: v.clone(),
                    budget,
                    dir: out_dir.join("runs").join(budget_label(budget)).join(v),
                    model: cfg.clone(),
                    train,
                    flops_per_token: report.per_token_excl_head,
                    unique_params: report.unique_nonembedding_params,
                    embedding_params: report.embedding_params,
                });
            }
        }
        // Budget-major: a killed study has finished whole budgets first.
        runs.sort_by(|a, b| a.budget.total_cmp(&b.budget));
        Ok(Study {
            options: o.clone(),
            data_dir: data_dir.to_path_buf(),
            out_dir: out_dir.to_path_buf(),
            runs,
            corpus,
        })
    }

    /// The budgets, ascending.
    pub fn budgets(&self) -> Vec<f64> {
        let mut b: Vec<f64> = self.runs.iter().map(|r| r.budget).collect();
        b.dedup();
        b
    }

    /// A markdown table of the plan: steps, tokens and FLOPs of every run.
    pub fn plan_table(&self) -> String {
        let mut s = String::from(
            "| budget | variant | FLOPs/token (fwd, no head) | steps | warm-up | tokens | FLOPs used | used / budget |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        for r in &self.runs {
            let _ = writeln!(
                s,
                "| {} | {} | {:.3e} | {} | {} | {} | {:.4e} | {:.4} |",
                budget_label(r.budget),
                r.variant,
                r.flops_per_token,
                r.train.steps,
                r.train.schedule.warmup_steps(),
                r.tokens(),
                r.flops(),
                r.flops() / r.budget
            );
        }
        s
    }

    /// Train, evaluate and measure every run not yet complete, then write the tables and the plot.
    pub fn run(&self, progress: bool) -> Result<StudyReport> {
        std::fs::create_dir_all(&self.out_dir).map_err(|e| MorError::io(&self.out_dir, e))?;
        let val = TokenFile::open(CorpusInfo::val_path(&self.data_dir))?;
        let mut runs = Vec::new();
        let mut decode = Vec::new();
        let n = self.runs.len();
        for budget in self.budgets() {
            let mut models = Vec::new();
            for plan in self.runs.iter().filter(|r| r.budget == budget) {
                let i = runs.len() + 1;
                tracing::info!(
                    "[{i}/{n}] budget {} {}: {} steps, {} tokens",
                    budget_label(budget),
                    plan.variant,
                    plan.train.steps,
                    plan.tokens()
                );
                let (result, status) = self.complete(plan, &val, progress)?;
                tracing::info!(
                    "[{i}/{n}] {} {}: held-out NLL {:.4} ({status:?})",
                    budget_label(budget),
                    plan.variant,
                    result.nll
                );
                models.push(plan);
                runs.push((result, status));
            }
            decode.push((budget, self.decode_throughput(budget, &models)?));
        }
        let table = self.tables(&runs, &decode);
        let table_path = self.out_dir.join(TABLE_FILE);
        crate::io::checkpoint::io::write_atomic(&table_path, table.as_bytes())?;
        let plot_path = self.out_dir.join(PLOT_FILE);
        self.plot(&runs, &plot_path)?;
        Ok(StudyReport {
            runs,
            decode,
            table,
            table_path,
            plot_path,
        })
    }

    /// Bring one run to completion: read its result, or resume / start training, then evaluate it.
    fn complete(
        &self,
        plan: &RunPlan,
        val: &TokenFile,
        progress: bool,
    ) -> Result<(RunResult, RunStatus)> {
        let result_path = plan.dir.join(RESULT_FILE);
        let mismatch = |what: &str| {
            MorError::Config(format!(
                "{}: this run was made with a different {what} than the study now asks for; remove the directory \
                 or use another study directory",
                plan.dir.display()
            ))
        };
        if result_path.exists() {
            let done: RunResult = read_json(&result_path)?;
            if done.model != plan.model {
                return Err(mismatch("model"));
            }
            if done.train != plan.train {
                return Err(mismatch("training configuration"));
            }
            return Ok((done, RunStatus::Skipped));
        }
        let (mut trainer, status) = if crate::io::checkpoint::latest(&plan.dir).is_some() {
            let saved: TrainConfig = read_json(&plan.dir.join("train_config.json"))?;
            if saved != plan.train {
                return Err(mismatch("training configuration"));
            }
            let t = Trainer::resume(&plan.dir, &self.data_dir, None)?;
            if !same_model(t.model().config(), &plan.model) {
                return Err(mismatch("model"));
            }
            let step = t.step();
            (t, RunStatus::Resumed(step))
        } else {
            (plan.start(&self.data_dir)?, RunStatus::Trained)
        };
        let started = Instant::now();
        trainer.run(progress)?;
        let train_secs = trainer_elapsed(&plan.dir).unwrap_or(started.elapsed().as_secs_f64());
        let model = trainer.model().frozen()?;
        let (nll, nll_causal, depth) = self.evaluate(&model, val)?;
        let result = RunResult {
            variant: plan.variant.clone(),
            budget: plan.budget,
            model: plan.model.clone(),
            train: plan.train.clone(),
            steps: trainer.step(),
            tokens: plan.tokens(),
            flops: plan.flops(),
            unique_params: plan.unique_params,
            embedding_params: plan.embedding_params,
            nll,
            nll_causal,
            depth,
            train_secs,
        };
        write_json_atomic(&result_path, &result)?;
        Ok((result, status))
    }

    /// Held-out NLL (training-time routing), the causal-rule NLL (expert-choice) and the depth distribution (MoR)
    /// on the study's fixed held-out windows.
    fn evaluate(
        &self,
        model: &MorModel,
        val: &TokenFile,
    ) -> Result<(f64, Option<f64>, Option<Vec<f64>>)> {
        let o = &self.options;
        let cfg = model.config();
        let starts = heldout_windows(val.len(), o.seq_len, o.eval_sequences);
        let run = |mode: RouteMode, stats: &mut RoutingStats| {
            heldout_loss_traced(
                model,
                val,
                &starts,
                o.seq_len,
                o.batch_size,
                mode,
                &mut |tr, b| stats.add(tr, b, o.seq_len),
            )
        };
        let mut stats = RoutingStats::default();
        let nll = run(RouteMode::TopK { step: None }, &mut stats)?;
        let nll_causal = if cfg.expert_choice().is_some() {
            stats = RoutingStats::default();
            Some(run(RouteMode::Causal, &mut stats)?)
        } else {
            None
        };
        let depth = cfg
            .mor
            .is_some()
            .then(|| depth_distribution(&stats.report(false).fraction_per_recursion));
        Ok((nll, nll_causal, depth))
    }

    /// Decode throughput of the budget's trained models, measured together (read from `decode.json` when it holds
    /// the same models and workload).
    fn decode_throughput(&self, budget: f64, plans: &[&RunPlan]) -> Result<DecodeReport> {
        let o = &self.options.decode;
        let path = self
            .out_dir
            .join("runs")
            .join(budget_label(budget))
            .join(DECODE_FILE);
        let names: Vec<&str> = plans.iter().map(|p| p.variant.as_str()).collect();
        if path.exists() {
            let f: DecodeReport = read_json(&path)?;
            let same: Vec<&str> = f.results.iter().map(|r| r.variant.as_str()).collect();
            if f.options == *o && same == names {
                return Ok(f);
            }
        }
        let models = plans
            .iter()
            .map(|p| {
                let ckpt = crate::io::checkpoint::latest(&p.dir)
                    .ok_or_else(|| MorError::checkpoint(&p.dir, "no checkpoint after training"))?;
                load_model(&ckpt, &Device::Cpu)?.frozen()
            })
            .collect::<Result<Vec<_>>>()?;
        tracing::info!(
            "decode throughput at budget {}: {} models, {} rounds",
            budget_label(budget),
            models.len(),
            o.rounds
        );
        let load_before = load_average();
        let timed = |model: &MorModel| -> Result<(f64, Vec<f64>)> {
            let mut engine = Engine::new(
                model,
                None,
                EngineOptions {
                    max_batch: o.batch,
                    eos_token_id: model.config().eos_token_id,
                    expert_thresholds: None,
                    ignore_eos: true,
                    asynchronous: false,
                    max_context: None,
                },
            )?;
            for i in 0..o.requests {
                engine.submit(
                    Vec::new(),
                    SamplingParams {
                        temperature: 1.0,
                        seed: i as u64,
                        max_new_tokens: o.new_tokens,
                        ..Default::default()
                    },
                )?;
            }
            let t0 = Instant::now();
            engine.run()?;
            let secs = t0.elapsed().as_secs_f64();
            let st = engine.stats();
            let total = st.processed.max(1) as f64;
            Ok((secs, st.depths.iter().map(|&c| c as f64 / total).collect()))
        };
        // One untimed warm-up each, then interleaved rounds so load changes hit every model alike.
        for m in &models {
            timed(m)?;
        }
        let mut results: Vec<DecodeResult> = plans
            .iter()
            .map(|p| DecodeResult {
                variant: p.variant.clone(),
                tokens: o.requests * o.new_tokens,
                secs: Vec::new(),
                depth: Vec::new(),
            })
            .collect();
        for _ in 0..o.rounds {
            for (m, r) in models.iter().zip(&mut results) {
                let (secs, depth) = timed(m)?;
                r.secs.push(secs);
                r.depth = depth;
            }
        }
        let report = DecodeReport {
            options: o.clone(),
            threads: crate::engine::num_threads(),
            load_before,
            load_after: load_average(),
            results,
        };
        write_json_atomic(&path, &report)?;
        Ok(report)
    }

    /// The markdown of [`TABLE_FILE`]: settings, the Table-9-style NLL table, run details and the MoR table.
    fn tables(&self, runs: &[(RunResult, RunStatus)], decode: &[(f64, DecodeReport)]) -> String {
        let o = &self.options;
        let budgets = self.budgets();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# isoFLOP study\n\nd = {}, {} heads, {} unrolled layers, context {}, batch {} × {} tokens, lr {}, WSD \
             (warm-up {:.0}% of the smallest budget's steps, cool-down {:.0}%), seed {}; corpus {} training / {} \
             held-out tokens ({} / {} documents), vocab {}; held-out NLL over {} held-out windows spread over the split \
             ({} tokens). Budgets count forward FLOPs without the LM head (paper App. D).\n",
            o.hidden_size,
            o.heads,
            o.layers,
            o.seq_len,
            o.batch_size,
            o.seq_len,
            o.lr,
            100.0 * o.warmup_fraction,
            100.0 * o.decay_fraction,
            o.seed,
            self.corpus.train_tokens,
            self.corpus.val_tokens,
            self.corpus.train_documents,
            self.corpus.val_documents,
            self.corpus.vocab_size,
            o.eval_sequences,
            o.eval_sequences * o.seq_len
        );
        let find = |v: &str, b: f64| {
            runs.iter()
                .map(|r| &r.0)
                .find(|r| r.variant == v && r.budget == b)
        };
        s.push_str(
            "## Held-out NLL (Table 9 style)\n\n| variant | unique params (non-emb) | emb params |",
        );
        for b in &budgets {
            let _ = write!(s, " {} |", budget_label(*b));
        }
        s.push_str("\n|---|---|---|");
        s.push_str(&"---|".repeat(budgets.len()));
        s.push('\n');
        for v in &o.variants {
            let first = find(v, budgets[0]);
            let _ = write!(
                s,
                "| {v} | {} | {} |",
                first.map_or("".into(), |r| millions(r.unique_params)),
                first.map_or("".into(), |r| millions(r.embedding_params))
            );
            for b in &budgets {
                let _ = write!(
                    s,
                    " {} |",
                    find(v, *b).map_or("".into(), |r| format!("{:.4}", r.nll))
                );
            }
            s.push('\n');
        }
        s.push_str(
            "\n## Runs\n\n| budget | variant | steps | tokens seen | epochs | FLOPs used | NLL | NLL (causal rule) | \
             train s | train tok/s |\n|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for (r, _) in runs {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.2} | {:.3e} | {:.4} | {} | {:.0} | {:.0} |",
                budget_label(r.budget),
                r.variant,
                r.steps,
                r.tokens,
                r.tokens as f64 / self.corpus.train_tokens as f64,
                r.flops,
                r.nll,
                r.nll_causal.map_or("".into(), |x| format!("{x:.4}")),
                r.train_secs,
                r.tokens as f64 / r.train_secs.max(1e-9)
            );
        }
        let _ = writeln!(
            s,
            "\n## Depth and decode throughput\n\nDepth: fraction of held-out tokens that ran 0, 1, …, N_r recursions \
             with the routing generation uses (expert-choice: the causal rule σ ≥ 0.5; token-choice: the router's \
             choice). Decode: the engine generating {} × {} tokens from empty prompts, {} slots, temperature 1, \
             EOS ignored, {} interleaved rounds, median.\n\n| budget | variant | depth (0..N_r) | decode \
             tok/s | vs vanilla |\n|---|---|---|---|---|",
            o.decode.requests,
            o.decode.new_tokens,
            o.decode.batch,
            o.decode.rounds,
        );
        for (b, d) in decode {
            let base = d
                .results
                .iter()
                .find(|r| r.variant == "vanilla")
                .map(DecodeResult::tokens_per_sec);
            for d in &d.results {
                let depth =
                    find(&d.variant, *b)
                        .and_then(|r| r.depth.as_ref())
                        .map_or("—".into(), |v| {
                            v.iter()
                                .map(|x| format!("{x:.2}"))
                                .collect::<Vec<_>>()
                                .join(" / ")
                        });
                let tps = d.tokens_per_sec();
                let _ = writeln!(
                    s,
                    "| {} | {} | {depth} | {tps:.0} | {} |",
                    budget_label(*b),
                    d.variant,
                    base.map_or("".into(), |v| format!("×{:.2}", tps / v))
                );
            }
        }
        for (b, d) in decode {
            let _ = writeln!(
                s,
                "\nDecode at {}: {} threads, {}.",
                budget_label(*b),
                d.threads,
                crate::bench::load_line((d.load_before, d.load_after))
            );
        }
        s
    }

    /// NLL against FLOPs, one line per variant.
    fn plot(&self, runs: &[(RunResult, RunStatus)], path: &Path) -> Result<()> {
        // x in units of the smallest budget's power of ten, so ticks read as plain numbers.
        let exp = self.budgets()[0].log10().floor();
        let unit = 10f64.powf(exp);
        let series: Vec<Series> = self
            .options
            .variants
            .iter()
            .map(|v| Series {
                name: v.clone(),
                points: runs
                    .iter()
                    .filter(|(r, _)| &r.variant == v)
                    .map(|(r, _)| (r.budget / unit, r.nll))
                    .collect(),
            })
            .collect();
        plot_curves(
            path,
            "isoFLOP: held-out NLL against training compute",
            &format!("budget: forward FLOPs without LM head (×1e{exp:.0})"),
            "held-out NLL",
            &series,
        )
    }
}

/// Whether a checkpoint's config is the planned model (a saved config also names the HF architecture and model type).
fn same_model(saved: &ModelConfig, plan: &ModelConfig) -> bool {
    let mut s = saved.clone();
    s.architectures.clone_from(&plan.architectures);
    s.model_type.clone_from(&plan.model_type);
    &s == plan
}

/// Seconds the trainer recorded for a run (across resumes), from its latest checkpoint.
fn trainer_elapsed(run_dir: &Path) -> Option<f64> {
    let ckpt = crate::io::checkpoint::latest(run_dir)?;
    let state: serde_json::Value =
        read_json(&ckpt.join(crate::io::checkpoint::io::TRAINER_STATE_FILE)).ok()?;
    state["elapsed_secs"].as_f64()
}

/// Start offsets of the study's held-out set: `n` of the non-overlapping `seq_len` windows of a held-out stream of
/// `len` tokens, spread evenly over it so every held-out document contributes in proportion to its length (the
/// stream is whole documents one after another; its first windows would all come from the first one).
pub fn heldout_windows(len: usize, seq_len: usize, n: usize) -> Vec<usize> {
    let windows = len / seq_len;
    let n = n.min(windows);
    (0..n).map(|i| i * windows / n * seq_len).collect()
}

/// Fraction of tokens that ran exactly 0..=N_r recursions, from the fraction processed at each recursion (tokens
/// reach recursion r + 1 only through recursion r, so the fractions are non-increasing).
pub fn depth_distribution(fraction_per_recursion: &[f64]) -> Vec<f64> {
    let f = fraction_per_recursion;
    let at = |r: usize| {
        if r == 0 {
            1.0
        } else {
            f.get(r - 1).copied().unwrap_or(0.0)
        }
    };
    (0..=f.len()).map(|d| at(d) - at(d + 1)).collect()
}

fn millions(n: usize) -> String {
    format!("{:.2}M", n as f64 / 1e6)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| MorError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| MorError::Json {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_distribution_from_fractions() {
        let d = depth_distribution(&[1.0, 2.0 / 3.0, 1.0 / 3.0]);
        let want = [0.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0];
        assert!(
            d.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12),
            "{d:?}"
        );
        assert_eq!(depth_distribution(&[0.5]), vec![0.5, 0.5]);
    }

    #[test]
    fn heldout_windows_are_spread_and_disjoint() {
        assert_eq!(heldout_windows(100, 10, 5), [0, 20, 40, 60, 80]);
        assert_eq!(
            heldout_windows(105, 10, 10),
            (0..10).map(|i| 10 * i).collect::<Vec<_>>()
        );
        assert_eq!(heldout_windows(1000, 10, 3), [0, 330, 660]);
        assert_eq!(heldout_windows(25, 10, 5), [0, 10]);
    }

    #[test]
    fn budget_labels_are_short_and_distinct() {
        assert_eq!(budget_label(1e12), "1e12");
        assert_eq!(budget_label(2.5e12), "2.5e12");
        assert_ne!(budget_label(1e12), budget_label(1.5e12));
    }
}
