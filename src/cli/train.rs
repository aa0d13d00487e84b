//! `mor train` and `mor uptrain`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use mor::config::ModelConfig;
use mor::model::MorModel;
use mor::train::trainer::{TrainConfig, Trainer};
use mor::train::{AdamWConfig, LrSchedule};

use super::{load_trainable, model_config, parse_enum};

/// Flags of `mor train` (also the training part of `mor uptrain`).
#[derive(Args, Clone)]
pub struct TrainArgs {
    /// Model config.json (mor / HF / official layout).
    #[arg(long, conflicts_with_all = ["preset", "init_from"])]
    pub config: Option<PathBuf>,
    /// Model preset name (see `mor flops --list`).
    #[arg(long, conflicts_with = "init_from")]
    pub preset: Option<String>,
    /// Start from a pretrained model (a .gguf file, a checkpoint or a run directory): its config and weights
    /// (continued training, e.g. the vanilla baseline of an up-training comparison).
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Prepared corpus directory (from `mor prepare`).
    #[arg(long)]
    pub data: PathBuf,
    /// Run directory (checkpoints, metrics.jsonl, loss.png).
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    /// Derive the step count from a FLOPs budget, counted as --flops-count says.
    #[arg(long, conflicts_with = "steps")]
    pub flops_budget: Option<f64>,
    /// How --flops-budget counts a token: `training` (3 × forward FLOPs with the LM head) or `paper` (the paper's
    /// isoFLOP convention: forward FLOPs without the head, App. D).
    #[arg(long, default_value = "training")]
    pub flops_count: String,
    /// Tokens per sequence (default: the model's context, at most 2048).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches per step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// Schedule: wsd (trapezoid), cosine or constant.
    #[arg(long, default_value = "wsd")]
    pub schedule: String,
    /// Warm-up steps (default 5% of steps).
    #[arg(long)]
    pub warmup: Option<usize>,
    /// WSD cool-down fraction.
    #[arg(long, default_value_t = 0.2)]
    pub decay_fraction: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    /// Gradient clipping norm.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Seed of the model initialisation and data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Shuffle sequences every epoch.
    #[arg(long)]
    pub shuffle: bool,
    /// Held-out evaluation interval in steps (0: end only).
    #[arg(long, default_value_t = 100)]
    pub eval_every: usize,
    /// Held-out sequences per evaluation.
    #[arg(long, default_value_t = 32)]
    pub eval_sequences: usize,
    /// Checkpoint interval in steps (0: end only).
    #[arg(long, default_value_t = 500)]
    pub save_every: usize,
    /// Checkpoints kept.
    #[arg(long, default_value_t = 2)]
    pub keep_last: usize,
    /// Metrics interval in steps.
    #[arg(long, default_value_t = 10)]
    pub log_every: usize,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Activation checkpointing per layer: the backward pass recomputes each layer instead of keeping its
    /// activations (less memory, about one more forward pass of compute).
    #[arg(long, overrides_with = "no_checkpointing")]
    pub checkpointing: bool,
    /// Keep every activation for the backward pass (the default).
    #[arg(long, overrides_with = "checkpointing")]
    pub no_checkpointing: bool,
    /// Start even if the estimated peak memory of a step exceeds the memory available.
    #[arg(long)]
    pub skip_memory_check: bool,
}

#[derive(Args)]
pub struct UptrainArgs {
    /// Pretrained vanilla model: a .gguf file or a checkpoint directory.
    #[arg(long)]
    pub from: PathBuf,
    /// Sharing strategy: cycle, sequence, middle_cycle, middle_sequence.
    #[arg(long, default_value = "middle_cycle")]
    pub sharing: String,
    /// Number of recursions N_r.
    #[arg(long, default_value_t = 3)]
    pub num_recursion: usize,
    /// Initialisation of the shared layers: stepwise, average, lower, upper, random.
    #[arg(long, default_value = "stepwise")]
    pub init: String,
    /// Routing: none (recursive model), expert or token (MoR, the paper's final recipes).
    #[arg(long, default_value = "expert")]
    pub routing: String,
    /// Only write the initialised model to --out/init and stop.
    #[arg(long)]
    pub init_only: bool,
    #[command(flatten)]
    pub train: TrainArgs,
}

/// Longest default training sequence when `--seq-len` is not given.
pub const DEFAULT_MAX_SEQ_LEN: usize = 2048;

/// The trainer settings of the flags, for `cfg` (steps from `--flops-budget` when given).
pub fn train_config(a: &TrainArgs, cfg: &ModelConfig) -> Result<TrainConfig> {
    // Pretrained contexts can be long (8192 for SmolLM2); train on at most 2048 unless asked.
    let seq_len = a
        .seq_len
        .unwrap_or(cfg.max_position_embeddings.min(DEFAULT_MAX_SEQ_LEN));
    let steps = match a.flops_budget {
        Some(budget) => {
            let tokens_per_step = seq_len * a.batch_size * a.grad_accum;
            let count = parse_enum("flops-count", &a.flops_count)?;
            let n =
                mor::config::flops::steps_for_budget(cfg, seq_len, tokens_per_step, budget, count)?;
            tracing::info!(steps = n, budget, "steps derived from the FLOPs budget");
            n
        }
        None => a.steps,
    };
    let schedule = match a.schedule.as_str() {
        "wsd" => LrSchedule::Wsd {
            warmup: a.warmup,
            total: steps,
            decay_fraction: a.decay_fraction,
        },
        "cosine" => LrSchedule::Cosine {
            warmup: a.warmup,
            total: steps,
            min_lr_ratio: 0.1,
        },
        "constant" => LrSchedule::Constant { warmup: a.warmup },
        other => bail!("--schedule {other:?}: use wsd, cosine or constant"),
    };
    Ok(TrainConfig {
        seq_len,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        steps,
        lr: a.lr,
        schedule,
        optimizer: AdamWConfig {
            weight_decay: a.weight_decay,
            ..AdamWConfig::default()
        },
        max_grad_norm: a.max_grad_norm,
        seed: a.seed,
        shuffle: a.shuffle,
        eval_every: a.eval_every,
        eval_sequences: a.eval_sequences,
        save_every: a.save_every,
        keep_last: a.keep_last,
        log_every: a.log_every,
    })
}

/// Build a recursive / MoR model from a pretrained vanilla one and train it (or only write it, `--init-only`).
pub fn run_uptrain(a: &UptrainArgs) -> Result<()> {
    if a.train.config.is_some() || a.train.preset.is_some() || a.train.init_from.is_some() {
        bail!(
            "uptrain derives the model from --from; do not give --config, --preset or --init-from"
        );
    }
    if a.train.resume {
        run_train(&a.train)?;
        return Ok(());
    }
    let source = load_trainable(&a.from)?;
    let mor_cfg = match a.routing.as_str() {
        "none" => None,
        "expert" => Some(mor::config::MorConfig::expert()),
        "token" => Some(mor::config::MorConfig::token()),
        other => bail!("--routing {other:?}: use none, expert or token"),
    };
    let target = mor::train::uptrain::uptrain_config(
        source.config(),
        parse_enum("sharing", &a.sharing)?,
        a.num_recursion,
        parse_enum("init", &a.init)?,
        mor_cfg,
    )?;
    if let Some(w) = target.layout_warning() {
        tracing::warn!("{w}");
    }
    let model = mor::train::uptrain::uptrain_model(&source, &target, a.train.seed)?;
    println!(
        "up-trained {} -> {} ({:.2}M parameters, init {})",
        source.config().variant_name(),
        target.variant_name(),
        model.params().num_scalars() as f64 / 1e6,
        a.init
    );
    if a.init_only {
        let dir = a.train.out.join("init");
        mor::io::checkpoint::save_model(&dir, &model)?;
        println!("wrote {}", dir.display());
        return Ok(());
    }
    let train = train_config(&a.train, &target)?;
    let trainer = Trainer::new(model, train, &a.train.data, &a.train.out)?;
    finish_training(trainer, &a.train)?;
    Ok(())
}

/// Train a new model, continue a pretrained one (`--init-from`) or resume a run (`--resume`).
pub fn run_train(a: &TrainArgs) -> Result<mor::train::trainer::TrainSummary> {
    let trainer = if a.resume {
        Trainer::resume(
            &a.out,
            &a.data,
            Some(a.steps).filter(|_| a.flops_budget.is_none()),
        )?
    } else {
        let model = match &a.init_from {
            Some(path) => load_trainable(path)?,
            None => {
                let cfg = model_config(&a.config, &a.preset)?;
                if let Some(w) = cfg.layout_warning() {
                    tracing::warn!("{w}");
                }
                MorModel::new(&cfg, &candle_core::Device::Cpu, a.seed)?
            }
        };
        let cfg = model.config().clone();
        let train = train_config(a, &cfg)?;
        println!(
            "training {} ({:.2}M parameters) for {} steps of {} tokens",
            cfg.variant_name(),
            model.params().num_scalars() as f64 / 1e6,
            train.steps,
            train.tokens_per_step()
        );
        Trainer::new(model, train, &a.data, &a.out)?
    };
    finish_training(trainer, a)
}

/// Refuse a run whose estimated step peak exceeds the memory available (`mor::train::memory`), naming the flags
/// that would make it fit.
fn check_memory(trainer: &Trainer) -> Result<()> {
    let model = trainer.model();
    let train = trainer.train_config();
    let shape = mor::train::memory::StepShape {
        batch: train.batch_size,
        seq_len: train.seq_len,
        fused: model.fused_ops(),
        checkpointing: model.checkpointing(),
    };
    let n_params = model.params().num_scalars();
    let Some(available) = mor::train::memory::available_bytes() else {
        tracing::warn!("no /proc/meminfo: memory check skipped");
        return Ok(());
    };
    let est = mor::train::memory::check_fits(
        model.config(),
        n_params,
        &shape,
        train.grad_accum,
        available,
    )?;
    tracing::info!(
        estimated_gib = est.total() as f64 / (1u64 << 30) as f64,
        available_gib = available as f64 / (1u64 << 30) as f64,
        "estimated peak memory of a step"
    );
    Ok(())
}

/// Run the trainer to its last step and print the summary.
pub fn finish_training(
    mut trainer: Trainer,
    a: &TrainArgs,
) -> Result<mor::train::trainer::TrainSummary> {
    trainer.set_checkpointing(a.checkpointing);
    if !a.skip_memory_check {
        check_memory(&trainer)?;
    }
    let summary = trainer.run(!a.quiet)?;
    println!(
        "done: {} steps, {} tokens, {:.0} tokens/s; checkpoint {}",
        summary.steps,
        summary.tokens,
        summary.tokens_per_sec,
        summary.checkpoint.display()
    );
    if let Some(v) = summary.val_loss {
        println!("held-out loss {v:.4} (perplexity {:.2})", v.exp());
    }
    if let Some(v) = summary.val_loss_causal {
        println!(
            "held-out loss with causal routing {v:.4} (perplexity {:.2})",
            v.exp()
        );
    }
    Ok(summary)
}
