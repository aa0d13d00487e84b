//! The pretraining loop (docs/architecture.md S8): packed sequences, AdamW with a WSD/cosine schedule, gradient clipping and
//! accumulation, the MoR auxiliary losses, loss-free bias updates, periodic held-out loss, metrics as JSONL,
//! atomic checkpoints and exact resume.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::data::{BatchSampler, CorpusInfo, PackedDataset, TokenFile};
use crate::error::{MorError, Result};
use crate::io::checkpoint::io::{
    load_safetensors, save_safetensors_atomic, write_json_atomic, CheckpointDir, OPTIMIZER_FILE,
    TRAINER_STATE_FILE,
};
use crate::io::checkpoint::{load_model, save_model};
use crate::model::expert_choice::{sampling_accuracy, RouteMode};
use crate::model::token_choice::BIAS_NAME;
use crate::model::{ForwardOptions, MorModel, RoutingTrace};
use crate::train::metrics::{metric_points, read_metrics, truncate_after_step, MetricsWriter};
use crate::train::plot::{plot_loss_curves, Series};
use crate::train::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule, NamedParam};

/// Metrics log file inside a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Loss-curve plot inside a run directory.
pub const PLOT_FILE: &str = "loss.png";
/// Tokenizer file name in corpus and checkpoint directories.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Hyper-parameters of a training run (saved with every checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Peak learning rate (paper: 3e-3 at 360M; small models tolerate more).
    pub lr: f64,
    /// Learning-rate schedule.
    pub schedule: LrSchedule,
    /// AdamW settings (paper: β (0.9, 0.95), weight decay 0.1, ε 1e-8).
    pub optimizer: AdamWConfig,
    /// Gradient clipping norm (paper: 1.0).
    pub max_grad_norm: f64,
    /// Seed of the data order (model init has its own seed).
    pub seed: u64,
    /// Shuffle sequences each epoch (the paper's configs do not).
    pub shuffle: bool,
    /// Held-out evaluation every this many steps (0 = only at the end).
    pub eval_every: usize,
    /// Held-out sequences per evaluation.
    pub eval_sequences: usize,
    /// Checkpoint every this many steps (0 = only at the end).
    pub save_every: usize,
    /// Checkpoints kept.
    pub keep_last: usize,
    /// Write a metrics line every this many steps.
    pub log_every: usize,
}

impl TrainConfig {
    /// Reject unusable values, naming the field.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("seq_len", self.seq_len),
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("steps", self.steps),
            ("keep_last", self.keep_last),
            ("log_every", self.log_every),
        ] {
            if v == 0 {
                return Err(MorError::Config(format!("train: {name} must be positive")));
            }
        }
        if self.seq_len < 2 {
            return Err(MorError::Config("train: seq_len must be at least 2".into()));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(MorError::Config(format!(
                "train: lr = {} must be positive",
                self.lr
            )));
        }
        self.schedule.validate()?;
        self.optimizer.validate()?;
        Ok(())
    }

    /// Tokens consumed per optimizer step.
    pub fn tokens_per_step(&self) -> usize {
        self.seq_len * self.batch_size * self.grad_accum
    }
}

/// Everything besides weights and optimizer moments needed to continue a run exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Completed optimizer steps.
    pub step: usize,
    /// Training tokens consumed.
    pub tokens: u64,
    /// Data order position.
    pub sampler: BatchSampler,
    /// The run's hyper-parameters.
    pub train: TrainConfig,
    /// Wall-clock seconds spent training so far.
    pub elapsed_secs: f64,
    /// Last held-out loss.
    pub last_val_loss: Option<f64>,
}

/// Summary of a finished run.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Steps completed.
    pub steps: usize,
    /// Tokens consumed.
    pub tokens: u64,
    /// Final held-out loss (mean NLL per token), with the training-time routing.
    pub val_loss: Option<f64>,
    /// Final held-out loss with the causal routing rule (expert-choice MoR only).
    pub val_loss_causal: Option<f64>,
    /// Last checkpoint written.
    pub checkpoint: PathBuf,
    /// Mean training throughput in tokens/s.
    pub tokens_per_sec: f64,
}

/// One record of `metrics.jsonl`: an optimizer step (or, at step 0, the untrained model's held-out loss). Fields a
/// run does not have (routing metrics of other variants, held-out losses between evaluations) are left out.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer steps taken.
    pub step: usize,
    /// Training tokens consumed.
    pub tokens: u64,
    /// Learning rate of the step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Mean LM cross-entropy per target token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// The objective, auxiliary terms included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_loss: Option<f64>,
    /// Global gradient norm before clipping.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// Expert-choice auxiliary BCE (Σ over recursions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling_loss: Option<f64>,
    /// Auxiliary-router BCE.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aux_router_loss: Option<f64>,
    /// Token-choice balancing loss.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balancing_loss: Option<f64>,
    /// Router z-loss.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub z_loss: Option<f64>,
    /// Expert-choice: fraction of tokens selected at each recursion.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selected_fraction: Option<Vec<f64>>,
    /// Expert-choice: agreement of the causal rule with the top-k choice (App. G.2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling_acc: Option<f64>,
    /// Token-choice: fraction of tokens per expert.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert_load: Option<Vec<f64>>,
    /// Token-choice: MaxVio of the expert load (App. G.2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_vio: Option<f64>,
    /// Training throughput of the step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_sec: Option<f64>,
    /// Held-out loss with the training-time routing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// Held-out loss with the causal routing rule (expert-choice).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss_causal: Option<f64>,
}

/// A training run bound to a model, data and a run directory.
pub struct Trainer {
    model: MorModel,
    opt: AdamW,
    train: TrainConfig,
    data: PackedDataset,
    val: Option<TokenFile>,
    state: TrainerState,
    run: CheckpointDir,
    metrics: MetricsWriter,
    /// The corpus tokenizer (`tokenizer.json` of the data directory), copied into every checkpoint so a checkpoint
    /// alone is enough to generate.
    tokenizer: Option<Vec<u8>>,
}

fn trainable(model: &MorModel) -> Vec<NamedParam> {
    model
        .params()
        .iter()
        .filter(|(name, _)| name.as_str() != BIAS_NAME)
        .map(|(name, var)| NamedParam::new(name.clone(), var.clone()))
        .collect()
}

/// The tokenizer stored beside a prepared corpus, if any.
fn read_tokenizer(data_dir: &Path) -> Result<Option<Vec<u8>>> {
    let p = data_dir.join(TOKENIZER_FILE);
    if !p.exists() {
        return Ok(None);
    }
    std::fs::read(&p).map(Some).map_err(|e| MorError::io(&p, e))
}

fn open_data(
    data_dir: &Path,
    model: &MorModel,
    seq_len: usize,
) -> Result<(PackedDataset, Option<TokenFile>)> {
    let info = CorpusInfo::load(data_dir)?;
    let vocab = model.config().vocab_size;
    if info.vocab_size > vocab {
        return Err(MorError::Data(format!(
            "{}: the corpus tokenizer has {} tokens but the model's vocab_size is {vocab}",
            data_dir.display(),
            info.vocab_size
        )));
    }
    if seq_len > model.config().max_position_embeddings {
        return Err(MorError::Config(format!(
            "train: seq_len {seq_len} exceeds the model's context ({})",
            model.config().max_position_embeddings
        )));
    }
    let train = PackedDataset::new(TokenFile::open(CorpusInfo::train_path(data_dir))?, seq_len)?;
    let val_path = CorpusInfo::val_path(data_dir);
    let val = if info.val_tokens as usize > seq_len {
        Some(TokenFile::open(val_path)?)
    } else {
        None
    };
    Ok((train, val))
}

impl Trainer {
    /// Start a new run of `model` on the prepared corpus `data_dir`, writing to `run_dir`.
    pub fn new(
        model: MorModel,
        train: TrainConfig,
        data_dir: &Path,
        run_dir: &Path,
    ) -> Result<Self> {
        train.validate()?;
        let opt = AdamW::new(trainable(&model), train.optimizer)?;
        let state = TrainerState {
            step: 0,
            tokens: 0,
            sampler: BatchSampler::new(train.seed, train.shuffle),
            train: train.clone(),
            elapsed_secs: 0.0,
            last_val_loss: None,
        };
        write_json_atomic(&run_dir.join("train_config.json"), &train)?;
        Self::assemble(model, opt, state, data_dir, run_dir, false)
    }

    /// Continue the run in `run_dir` from its latest checkpoint. `steps` may extend the run.
    pub fn resume(run_dir: &Path, data_dir: &Path, steps: Option<usize>) -> Result<Self> {
        let ckpt = crate::io::checkpoint::latest(run_dir)
            .ok_or_else(|| MorError::checkpoint(run_dir, "no checkpoint to resume from"))?;
        let model = load_model(&ckpt, &candle_core::Device::Cpu)?;
        let state_path = ckpt.join(TRAINER_STATE_FILE);
        let text =
            std::fs::read_to_string(&state_path).map_err(|e| MorError::io(&state_path, e))?;
        let mut state: TrainerState = serde_json::from_str(&text).map_err(|e| MorError::Json {
            path: state_path.clone(),
            source: e,
        })?;
        if let Some(s) = steps.filter(|&s| s != state.train.steps) {
            // Extending a run stretches a schedule that has a horizon (the lr curve then differs from the
            // original plan from here on).
            state.train.steps = s;
            match &mut state.train.schedule {
                LrSchedule::Wsd { total, .. } | LrSchedule::Cosine { total, .. } => *total = s,
                LrSchedule::Constant { .. } => {}
            }
        }
        state.train.validate()?;
        let mut opt = AdamW::new(trainable(&model), state.train.optimizer)?;
        let opt_state = load_safetensors(&ckpt.join(OPTIMIZER_FILE))?;
        opt.load_state(&opt_state, state.step as u64)?;
        let metrics_path = run_dir.join(METRICS_FILE);
        if metrics_path.exists() {
            // Records written after the checkpoint belong to steps that will be redone.
            truncate_after_step(&metrics_path, state.step as u64)?;
        }
        tracing::info!(step = state.step, checkpoint = %ckpt.display(), "resuming");
        Self::assemble(model, opt, state, data_dir, run_dir, true)
    }

    fn assemble(
        model: MorModel,
        opt: AdamW,
        state: TrainerState,
        data_dir: &Path,
        run_dir: &Path,
        append_metrics: bool,
    ) -> Result<Self> {
        let train = state.train.clone();
        let (data, val) = open_data(data_dir, &model, train.seq_len)?;
        Ok(Trainer {
            run: CheckpointDir::new(run_dir, train.keep_last)?,
            metrics: MetricsWriter::open(run_dir.join(METRICS_FILE), append_metrics)?,
            tokenizer: read_tokenizer(data_dir)?,
            model,
            opt,
            train,
            data,
            val,
            state,
        })
    }

    /// The model being trained.
    pub fn model(&self) -> &MorModel {
        &self.model
    }

    /// The training settings.
    pub fn train_config(&self) -> &TrainConfig {
        &self.train
    }

    /// Turn activation checkpointing on or off for the coming steps ([`MorModel::set_checkpointing`]; same
    /// gradients, less memory, one more forward pass of compute).
    pub fn set_checkpointing(&mut self, on: bool) {
        self.model.set_checkpointing(on);
    }

    /// Completed steps.
    pub fn step(&self) -> usize {
        self.state.step
    }

    /// Mean held-out NLL per token over the first `eval_sequences` non-overlapping sequences of the validation
    /// split, with the given routing mode. `None` without a validation split.
    pub fn evaluate(&self, mode: RouteMode) -> Result<Option<f64>> {
        let Some(val) = &self.val else {
            return Ok(None);
        };
        heldout_loss(
            &self.model.frozen()?,
            val,
            self.train.seq_len,
            self.train.eval_sequences,
            self.train.batch_size,
            mode,
        )
        .map(Some)
    }

    fn save(&self) -> Result<PathBuf> {
        let opt_state = self.opt.state_tensors()?;
        let dir = self.run.save(self.state.step as u64, |dir| {
            save_model(dir, &self.model)?;
            save_safetensors_atomic(&dir.join(OPTIMIZER_FILE), opt_state.iter(), None)?;
            if let Some(t) = &self.tokenizer {
                crate::io::checkpoint::io::write_atomic(&dir.join(TOKENIZER_FILE), t)?;
            }
            write_json_atomic(&dir.join(TRAINER_STATE_FILE), &self.state)
        })?;
        self.plot()?;
        Ok(dir)
    }

    /// Redraw the loss curves (train, held-out) from the metrics log.
    fn plot(&self) -> Result<()> {
        let records = read_metrics(self.metrics.path())?;
        let series_of = |key: &str| Series {
            name: key.replace('_', " "),
            points: metric_points(&records, "step", key),
        };
        let mut series = vec![series_of("loss"), series_of("val_loss")];
        let causal = series_of("val_loss_causal");
        if !causal.points.is_empty() {
            series.push(causal);
        }
        plot_loss_curves(
            &self.run.run_dir().join(PLOT_FILE),
            &format!("{} — loss", self.model.config().variant_name()),
            &series,
        )
    }

    /// Add the held-out loss (training-time routing, and the causal decode rule for expert-choice) to `rec`.
    fn record_held_out(&mut self, rec: &mut StepMetrics) -> Result<()> {
        rec.val_loss = self.evaluate(RouteMode::TopK { step: None })?;
        if rec.val_loss.is_some() {
            self.state.last_val_loss = rec.val_loss;
        }
        if self.model.config().expert_choice().is_some() {
            rec.val_loss_causal = self.evaluate(RouteMode::Causal)?;
        }
        Ok(())
    }

    /// One optimizer step over `grad_accum` micro-batches; returns its metrics record.
    fn train_step(&mut self) -> Result<StepMetrics> {
        let (b, t, accum) = (
            self.train.batch_size,
            self.train.seq_len,
            self.train.grad_accum,
        );
        let num_items = b * t * accum;
        let step = self.state.step;
        let mut acc: Option<GradStore> = None;
        let vars: Vec<Var> = self.opt.vars().into_iter().cloned().collect();
        let mut ce_sum = 0.0;
        let mut n_targets = 0usize;
        let mut total = 0.0;
        let mut aux = [None::<f64>; 4];
        let mut counts: Vec<usize> = Vec::new();
        let mut selected: Vec<f64> = Vec::new();
        let mut sampling_acc = 0.0;
        for _ in 0..accum {
            let ids = self.state.sampler.next_batch(&self.data, b)?;
            let ids = Tensor::from_vec(ids, (b, t), self.model.device())?;
            let out = self
                .model
                .forward_loss(&ids, &ForwardOptions::train(step), num_items)?;
            let loss = &out.loss;
            ce_sum += loss.ce_sum.to_scalar::<f32>()? as f64;
            n_targets += loss.n_targets;
            total += loss.total.to_scalar::<f32>()? as f64;
            let l = &out.router_losses;
            for (sum, v) in aux
                .iter_mut()
                .zip([&l.sampling, &l.aux_router, &l.balancing, &l.z])
            {
                if let Some(v) = v {
                    *sum.get_or_insert(0.0) += v.to_scalar::<f32>()? as f64 / accum as f64;
                }
            }
            match &out.routing {
                RoutingTrace::Expert(steps) => {
                    selected.resize(steps.len(), 0.0);
                    for (r, s) in steps.iter().enumerate() {
                        selected[r] += s.selected.count() as f64 / (b * t * accum) as f64;
                    }
                    sampling_acc += sampling_accuracy(steps)? / accum as f64;
                }
                RoutingTrace::Token(tr) => {
                    counts.resize(tr.counts.len(), 0);
                    for (c, n) in counts.iter_mut().zip(&tr.counts) {
                        *c += n;
                    }
                }
                RoutingTrace::None => {}
            }
            let grads = out.backward()?;
            acc = Some(match acc.take() {
                None => keep_only(grads, &vars),
                Some(mut a) => {
                    for v in &vars {
                        if let Some(g) = grads.get(v.as_tensor()) {
                            let sum = match a.get(v.as_tensor()) {
                                Some(prev) => (prev + g)?,
                                None => g.clone(),
                            };
                            a.insert(v.as_tensor(), sum);
                        }
                    }
                    a
                }
            });
        }
        let mut grads = acc.ok_or_else(|| MorError::Config("no micro-batch".into()))?;
        let var_refs: Vec<&Var> = vars.iter().collect();
        let grad_norm = clip_grad_norm(&mut grads, &var_refs, self.train.max_grad_norm)?;
        let lr = self.train.schedule.lr(step, self.train.lr);
        if grad_norm.is_finite() {
            self.opt.step(&grads, lr)?;
        } else {
            tracing::warn!(step, grad_norm, "non-finite gradient norm: step skipped");
        }
        if !counts.is_empty() {
            self.model.update_balancing_bias(&counts, step)?;
        }
        self.state.step += 1;
        self.state.tokens += num_items as u64;

        let [sampling_loss, aux_router_loss, balancing_loss, z_loss] = aux;
        let mut rec = StepMetrics {
            step: self.state.step,
            tokens: self.state.tokens,
            lr: Some(lr),
            loss: Some(ce_sum / n_targets.max(1) as f64),
            total_loss: Some(total),
            grad_norm: Some(grad_norm),
            sampling_loss,
            aux_router_loss,
            balancing_loss,
            z_loss,
            ..Default::default()
        };
        if !selected.is_empty() {
            rec.selected_fraction = Some(selected);
            rec.sampling_acc = Some(sampling_acc);
        }
        if !counts.is_empty() {
            let n: usize = counts.iter().sum();
            let load: Vec<f64> = counts.iter().map(|&c| c as f64 / n.max(1) as f64).collect();
            let mean = 1.0 / load.len() as f64;
            let max = load.iter().cloned().fold(0.0, f64::max);
            // MaxVio (App. G.2): (max load − mean load) / mean load.
            rec.max_vio = Some((max - mean) / mean);
            rec.expert_load = Some(load);
        }
        Ok(rec)
    }

    /// Train until the configured `steps`, with a progress bar if `progress`. Evaluates, logs and checkpoints as
    /// configured, and always checkpoints at the end.
    pub fn run(&mut self, progress: bool) -> Result<TrainSummary> {
        self.run_until(self.train.steps, progress)
    }

    /// Train until step `until` (at most the configured `steps`), then checkpoint. The schedule and evaluation
    /// follow the whole run's configuration, so stopping early and resuming is the same as never stopping.
    pub fn run_until(&mut self, until: usize, progress: bool) -> Result<TrainSummary> {
        let total_steps = self.train.steps;
        let until = until.min(total_steps);
        let bar = if progress {
            indicatif::ProgressBar::new(total_steps as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps · ETA {eta} · {msg}",
            )
            .map_err(|e| MorError::Config(e.to_string()))?,
        );
        bar.set_position(self.state.step as u64);
        let start = Instant::now();
        let elapsed_before = self.state.elapsed_secs;
        let tokens_before = self.state.tokens;
        let mut last = None;
        if self.state.step == 0 && until > 0 && self.train.eval_every > 0 {
            // The untrained (or freshly up-trained) starting point, so curves of several runs can be compared.
            let mut rec = StepMetrics::default();
            self.record_held_out(&mut rec)?;
            self.metrics.write(&rec)?;
        }
        while self.state.step < until {
            let t0 = Instant::now();
            let mut rec = self.train_step()?;
            let dt = t0.elapsed().as_secs_f64();
            let tps = self.train.tokens_per_step() as f64 / dt.max(1e-9);
            rec.tokens_per_sec = Some(tps);
            let step = self.state.step;
            let eval_now = step == total_steps
                || (self.train.eval_every > 0 && step.is_multiple_of(self.train.eval_every));
            if eval_now {
                self.record_held_out(&mut rec)?;
            }
            if eval_now || step.is_multiple_of(self.train.log_every) {
                self.metrics.write(&rec)?;
            }
            self.state.elapsed_secs = elapsed_before + start.elapsed().as_secs_f64();
            bar.set_position(step as u64);
            bar.set_message(format!(
                "loss {:.3} · {:.0} tok/s",
                rec.loss.unwrap_or(f64::NAN),
                tps
            ));
            if self.train.save_every > 0
                && step.is_multiple_of(self.train.save_every)
                && step < total_steps
            {
                self.save()?;
            }
            last = Some(rec);
        }
        bar.finish_and_clear();
        let checkpoint = self.save()?;
        let secs = start.elapsed().as_secs_f64();
        let last = last.unwrap_or_default();
        Ok(TrainSummary {
            steps: self.state.step,
            tokens: self.state.tokens,
            val_loss: last.val_loss.or(self.state.last_val_loss),
            val_loss_causal: last.val_loss_causal,
            checkpoint,
            tokens_per_sec: (self.state.tokens - tokens_before) as f64 / secs.max(1e-9),
        })
    }
}

/// Keep only the gradients of `vars` (backward also returns every intermediate's gradient; dropping them early
/// bounds memory across accumulation).
fn keep_only(grads: GradStore, vars: &[Var]) -> GradStore {
    let mut out = GradStore::default();
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            out.insert(v.as_tensor(), g.clone());
        }
    }
    out
}

/// Mean NLL per token of `model` over the first `max_sequences` non-overlapping `seq_len` windows of `file`
/// (fewer if the file is shorter), in batches of `batch`.
pub fn heldout_loss(
    model: &MorModel,
    file: &TokenFile,
    seq_len: usize,
    max_sequences: usize,
    batch: usize,
    mode: RouteMode,
) -> Result<f64> {
    let n = (file.len() / seq_len).min(max_sequences.max(1));
    if n == 0 {
        return Err(MorError::Data(format!(
            "{}: {} tokens, fewer than one sequence of {seq_len}",
            file.path().display(),
            file.len()
        )));
    }
    let starts: Vec<usize> = (0..n).map(|i| i * seq_len).collect();
    heldout_loss_traced(model, file, &starts, seq_len, batch, mode, &mut |_, _| {
        Ok(())
    })
}

/// Mean NLL per token of `model` over the `seq_len` windows of `file` starting at `starts`, in batches of `batch`,
/// handing every forward's routing trace and batch size to `on_trace` (routing statistics on the same windows,
/// e.g. the realised depth distribution).
pub fn heldout_loss_traced(
    model: &MorModel,
    file: &TokenFile,
    starts: &[usize],
    seq_len: usize,
    batch: usize,
    mode: RouteMode,
    on_trace: &mut dyn FnMut(&RoutingTrace, usize) -> Result<()>,
) -> Result<f64> {
    let opts = ForwardOptions {
        mode,
        hidden_states: false,
    };
    let (mut sum, mut count) = (0.0, 0usize);
    for chunk in starts.chunks(batch.max(1)) {
        let mut ids = Vec::with_capacity(chunk.len() * seq_len);
        for &s in chunk {
            file.read_into(s..s + seq_len, &mut ids)?;
        }
        let ids = Tensor::from_vec(ids, (chunk.len(), seq_len), model.device())?;
        let out = model.forward(&ids, &opts)?;
        let loss = model.loss(&out, &ids, chunk.len() * seq_len)?;
        on_trace(&out.routing, chunk.len())?;
        sum += loss.ce_sum.to_scalar::<f32>()? as f64;
        count += loss.n_targets;
    }
    Ok(sum / count.max(1) as f64)
}
