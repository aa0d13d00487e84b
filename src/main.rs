//! The `mor` command line: train, verify, generate and benchmark Mixture-of-Recursions models.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use mor::checkpoint::load_model;
use mor::config::ModelConfig;
use mor::data::{prepare_corpus, PrepareOptions, Tokenizer};
use mor::model::MorModel;
use mor::train::trainer::{TrainConfig, Trainer};
use mor::train::{AdamWConfig, LrSchedule};

#[global_allocator]
static GLOBAL: mor::alloc::CountingAlloc = mor::alloc::CountingAlloc;

#[derive(Parser)]
#[command(
    name = "mor",
    version,
    about = "Mixture-of-Recursions language models: train, verify, generate, benchmark"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a tiny MoR model on the bundled Shakespeare corpus, then report held-out loss and a sample.
    Quickstart(QuickstartArgs),
    /// Train a byte-level BPE tokenizer on text / JSONL files.
    Tokenizer(TokenizerArgs),
    /// Tokenize text / JSONL files into a packed token corpus with a held-out split.
    Prepare(PrepareArgs),
    /// Train (or resume) a model on a prepared corpus.
    Train(TrainArgs),
    /// Sample text from a checkpoint.
    Generate(GenerateArgs),
    /// Compare the model against a reference directory made with the official PyTorch code.
    Verify {
        /// Directory with meta.json, checkpoint/, tensors.safetensors, grads.safetensors.
        reference: PathBuf,
    },
    /// Forward FLOPs per token of a config or preset (paper App. D).
    Flops(FlopsArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Evaluation: loss / bits per byte, downstream tasks, routing depth pictures.
    #[command(subcommand)]
    Eval(mor::eval::cli::EvalCommand),
    /// Import a GGUF file (llama.cpp) as a mor checkpoint directory with its tokenizer.json.
    Import(ImportArgs),
    /// Export a checkpoint: Hugging Face layout (any model) or GGUF (vanilla models).
    Export(ExportArgs),
    /// Up-train a pretrained vanilla model (GGUF or checkpoint) into a recursive / MoR model, then train it.
    Uptrain(UptrainArgs),
    /// Overlay one metric of several runs in a PNG and print it as a markdown table (e.g. held-out loss).
    Plot(PlotArgs),
}

#[derive(Args)]
struct PlotArgs {
    /// Run directories (with metrics.jsonl), each optionally labelled as `DIR=LABEL`.
    #[arg(required = true)]
    runs: Vec<String>,
    /// Metric to plot: a key of metrics.jsonl (val_loss, val_loss_causal, loss, ...).
    #[arg(long, default_value = "val_loss")]
    metric: String,
    /// x axis: step or tokens.
    #[arg(long, default_value = "step")]
    x: String,
    /// Chart title (default: the metric).
    #[arg(long)]
    title: Option<String>,
    /// Output PNG.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct ImportArgs {
    /// GGUF file.
    #[arg(long)]
    gguf: PathBuf,
    /// Output checkpoint directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct ExportArgs {
    /// Checkpoint directory or run directory (latest checkpoint).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output: a directory for `hf`, a file for `gguf`.
    #[arg(long)]
    out: PathBuf,
    /// Format: hf or gguf.
    #[arg(long, default_value = "hf")]
    format: String,
    /// tokenizer.json to include (default: the checkpoint's, if any).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

#[derive(Args)]
struct UptrainArgs {
    /// Pretrained vanilla model: a .gguf file or a checkpoint directory.
    #[arg(long)]
    from: PathBuf,
    /// Sharing strategy: cycle, sequence, middle_cycle, middle_sequence.
    #[arg(long, default_value = "middle_cycle")]
    sharing: String,
    /// Number of recursions N_r.
    #[arg(long, default_value_t = 3)]
    num_recursion: usize,
    /// Initialisation of the shared layers: stepwise, average, lower, upper, random.
    #[arg(long, default_value = "stepwise")]
    init: String,
    /// Routing: none (recursive model), expert or token (MoR, the paper's final recipes).
    #[arg(long, default_value = "expert")]
    routing: String,
    /// Only write the initialised model to --out/init and stop.
    #[arg(long)]
    init_only: bool,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Args)]
struct QuickstartArgs {
    /// Output directory (corpus, tokenizer, run).
    #[arg(long, default_value = "runs/quickstart")]
    out: PathBuf,
    /// Model preset.
    #[arg(long, default_value = "tiny-mor-expert")]
    preset: String,
    /// Training steps.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Prompt for the sample.
    #[arg(long, default_value = "ROMEO:")]
    prompt: String,
}

#[derive(Args)]
struct TokenizerArgs {
    /// Input files.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Vocabulary size.
    #[arg(long, default_value_t = 4096)]
    vocab_size: usize,
    /// Output tokenizer.json.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct PrepareArgs {
    /// Input files (.txt, .jsonl, optionally .gz).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// tokenizer.json to use (copied into the output directory).
    #[arg(long)]
    tokenizer: PathBuf,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Fraction of documents held out.
    #[arg(long, default_value_t = 0.01)]
    val_fraction: f64,
    /// JSONL field with the text.
    #[arg(long, default_value = "text")]
    field: String,
}

#[derive(Args, Clone)]
struct TrainArgs {
    /// Model config.json (mor / HF / official layout).
    #[arg(long, conflicts_with_all = ["preset", "init_from"])]
    config: Option<PathBuf>,
    /// Model preset name (see `mor flops --list`).
    #[arg(long, conflicts_with = "init_from")]
    preset: Option<String>,
    /// Start from a pretrained model (a .gguf file, a checkpoint or a run directory): its config and weights
    /// (continued training, e.g. the vanilla baseline of an up-training comparison).
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// Prepared corpus directory (from `mor prepare`).
    #[arg(long)]
    data: PathBuf,
    /// Run directory (checkpoints, metrics.jsonl, loss.png).
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its latest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// Derive the step count from a training-FLOPs budget (3 × forward FLOPs per token × tokens).
    #[arg(long, conflicts_with = "steps")]
    flops_budget: Option<f64>,
    /// Tokens per sequence (default: the model's context, at most 2048).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Micro-batches per step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Schedule: wsd (trapezoid), cosine or constant.
    #[arg(long, default_value = "wsd")]
    schedule: String,
    /// Warm-up steps (default 5% of steps).
    #[arg(long)]
    warmup: Option<usize>,
    /// WSD cool-down fraction.
    #[arg(long, default_value_t = 0.2)]
    decay_fraction: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// Gradient clipping norm.
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Seed of the model initialisation and data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Shuffle sequences every epoch.
    #[arg(long)]
    shuffle: bool,
    /// Held-out evaluation interval in steps (0: end only).
    #[arg(long, default_value_t = 100)]
    eval_every: usize,
    /// Held-out sequences per evaluation.
    #[arg(long, default_value_t = 32)]
    eval_sequences: usize,
    /// Checkpoint interval in steps (0: end only).
    #[arg(long, default_value_t = 500)]
    save_every: usize,
    /// Checkpoints kept.
    #[arg(long, default_value_t = 2)]
    keep_last: usize,
    /// Metrics interval in steps.
    #[arg(long, default_value_t = 10)]
    log_every: usize,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct GenerateArgs {
    /// Checkpoint directory (config.json, model.safetensors, tokenizer.json), a run directory, or a .gguf file.
    #[arg(long)]
    checkpoint: PathBuf,
    /// With a .gguf checkpoint: run the matmuls on the stored quantized weights (candle's quantized matmul)
    /// instead of dequantized f32.
    #[arg(long)]
    quantized: bool,
    /// tokenizer.json (default: the one in the checkpoint).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Prompt text.
    #[arg(long)]
    prompt: String,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Tokens to generate.
    #[arg(long, default_value_t = 100)]
    max_tokens: usize,
    /// Temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Keep the k most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling mass.
    #[arg(long)]
    top_p: Option<f64>,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop sequences.
    #[arg(long)]
    stop: Vec<String>,
}

#[derive(Args)]
struct FlopsArgs {
    /// Model config.json.
    #[arg(long, conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// Preset name.
    #[arg(long)]
    preset: Option<String>,
    /// Sequence length (default: the model's context).
    #[arg(long)]
    seq_len: Option<usize>,
    /// List presets.
    #[arg(long)]
    list: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Measured f32 GEMM GFLOP/s at the engine's shapes and memory read GB/s of this machine.
    Machine {
        /// Model width (GEMM shapes of one layer of this width and of the LM head).
        #[arg(long, default_value_t = 256)]
        hidden_size: usize,
        /// Query heads.
        #[arg(long, default_value_t = 4)]
        heads: usize,
        /// Vocabulary size (LM head shape).
        #[arg(long, default_value_t = 4096)]
        vocab: usize,
        /// GEMM row counts (comma-separated; the batch sizes of the decode steps).
        #[arg(long, default_value = "1,8,20,32,50,128")]
        rows: String,
    },
    /// Training throughput and peak memory of vanilla, recursive and MoR at the same shape.
    Train {
        /// Model width.
        #[arg(long, default_value_t = 256)]
        hidden_size: usize,
        /// Unrolled layers ((layers − 2) divisible by every N_r).
        #[arg(long, default_value_t = 8)]
        layers: usize,
        /// Sequences per step.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        /// Rounds of interleaved runs.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Variants (comma-separated); the first is the baseline.
        #[arg(
            long,
            default_value = "vanilla,recursive-2,mor-expert-2,mor-expert-3,mor-token-3"
        )]
        variants: String,
    },
    /// Generation throughput (KV cache, continuous / depth-wise batching) of vanilla, recursive and MoR.
    Generate {
        /// Model width.
        #[arg(long, default_value_t = 256)]
        hidden_size: usize,
        /// Unrolled layers ((layers − 2) divisible by every N_r; 34 = the paper's MoR-4 comparison).
        #[arg(long, default_value_t = 34)]
        layers: usize,
        /// Batch sizes (comma-separated; `max` = the paper's B=Max).
        #[arg(long, default_value = "1,8,32,max")]
        batches: String,
        /// Memory budget in GiB for B=Max (parameters + K/V at full context).
        #[arg(long, default_value_t = 16.0)]
        memory_gib: f64,
        /// Context length (K/V at full context for B=Max; generation lengths are clipped to it).
        #[arg(long, default_value_t = 512)]
        context: usize,
        /// Mean generation length.
        #[arg(long, default_value_t = 128.0)]
        mean_len: f64,
        /// Standard deviation of the generation length.
        #[arg(long, default_value_t = 32.0)]
        std_len: f64,
        /// Requests per batch slot.
        #[arg(long, default_value_t = 3)]
        requests_per_slot: usize,
        /// Rounds of interleaved runs.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Variants (comma-separated): vanilla, recursive-N, mor-expert-N, mor-token-N, optionally `@L` (unrolled
        /// layers), `+kv` (recursive KV sharing), `+async` (asynchronous depth-wise batching).
        #[arg(
            long,
            default_value = "vanilla,recursive-4,mor-expert-2,mor-expert-2+async,mor-expert-4,mor-expert-4+async"
        )]
        variants: String,
    },
}

fn model_config(config: &Option<PathBuf>, preset: &Option<String>) -> Result<ModelConfig> {
    match (config, preset) {
        (Some(p), _) => Ok(mor::checkpoint::load_config(p)?),
        (None, Some(name)) => Ok(mor::presets::preset(name)?),
        (None, None) => bail!("give --config FILE or --preset NAME"),
    }
}

/// Longest default training sequence when `--seq-len` is not given.
const DEFAULT_MAX_SEQ_LEN: usize = 2048;

fn train_config(a: &TrainArgs, cfg: &ModelConfig) -> Result<TrainConfig> {
    // Pretrained contexts can be long (8192 for SmolLM2); train on at most 2048 unless asked.
    let seq_len = a
        .seq_len
        .unwrap_or(cfg.max_position_embeddings.min(DEFAULT_MAX_SEQ_LEN));
    let steps = match a.flops_budget {
        Some(budget) => {
            let tokens_per_step = seq_len * a.batch_size * a.grad_accum;
            let n = mor::flops::steps_for_budget(cfg, seq_len, tokens_per_step, budget)?;
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

/// A serde enum from its snake_case name, for CLI flags.
fn parse_enum<T: serde::de::DeserializeOwned>(flag: &str, s: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| anyhow::anyhow!("--{flag} {s:?} is not a valid value"))
}

/// A pretrained model and (if available) its tokenizer: a GGUF file or a checkpoint directory.
fn load_pretrained(path: &Path) -> Result<(MorModel, Option<Tokenizer>)> {
    if path.is_file() {
        let (m, t) = mor::gguf::import_gguf(path, &candle_core::Device::Cpu)?;
        return Ok((m, Some(t)));
    }
    let dir = resolve_checkpoint(path);
    let model = load_model(&dir, &candle_core::Device::Cpu)
        .with_context(|| format!("loading {}", dir.display()))?;
    let tok = dir.join("tokenizer.json");
    let tok = tok
        .exists()
        .then(|| Tokenizer::from_file(&tok))
        .transpose()?;
    Ok((model, tok))
}

fn run_uptrain(a: &UptrainArgs) -> Result<()> {
    if a.train.config.is_some() || a.train.preset.is_some() || a.train.init_from.is_some() {
        bail!(
            "uptrain derives the model from --from; do not give --config, --preset or --init-from"
        );
    }
    if a.train.resume {
        run_train(&a.train)?;
        return Ok(());
    }
    let (source, _) = load_pretrained(&a.from)?;
    let mor_cfg = match a.routing.as_str() {
        "none" => None,
        "expert" => Some(mor::config::MorConfig::expert()),
        "token" => Some(mor::config::MorConfig::token()),
        other => bail!("--routing {other:?}: use none, expert or token"),
    };
    let target = mor::uptrain::uptrain_config(
        source.config(),
        parse_enum("sharing", &a.sharing)?,
        a.num_recursion,
        parse_enum("init", &a.init)?,
        mor_cfg,
    )?;
    if let Some(w) = target.layout_warning() {
        tracing::warn!("{w}");
    }
    let model = mor::uptrain::uptrain_model(&source, &target, a.train.seed)?;
    println!(
        "up-trained {} -> {} ({:.2}M parameters, init {})",
        source.config().variant_name(),
        target.variant_name(),
        model.params().num_scalars() as f64 / 1e6,
        a.init
    );
    if a.init_only {
        let dir = a.train.out.join("init");
        mor::checkpoint::save_model(&dir, &model)?;
        println!("wrote {}", dir.display());
        return Ok(());
    }
    let train = train_config(&a.train, &target)?;
    let trainer = Trainer::new(model, train, &a.train.data, &a.train.out)?;
    finish_training(trainer, &a.train)?;
    Ok(())
}

/// Draw `mor plot` and return its markdown table: one row per x value, one column per run.
fn run_plot(a: &PlotArgs) -> Result<String> {
    let mut series = Vec::new();
    for spec in &a.runs {
        let (dir, label) = match spec.split_once('=') {
            Some((d, l)) => (PathBuf::from(d), l.to_string()),
            None => (PathBuf::from(spec), spec.clone()),
        };
        let path = dir.join(mor::train::trainer::METRICS_FILE);
        let records = mor::metrics::read_metrics(&path)
            .with_context(|| format!("reading the metrics of run {}", dir.display()))?;
        let points = mor::metrics::metric_points(&records, &a.x, &a.metric);
        if points.is_empty() {
            bail!(
                "{} has no record with both {:?} and {:?}",
                path.display(),
                a.x,
                a.metric
            );
        }
        series.push(mor::plot::Series {
            name: label,
            points,
        });
    }
    let title = a
        .title
        .clone()
        .unwrap_or_else(|| a.metric.replace('_', " "));
    mor::plot::plot_curves(&a.out, &title, &a.x, &a.metric, &series)?;
    let mut xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let mut table = format!(
        "| {} | {} |\n|---|{}\n",
        a.x,
        series
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(series.len())
    );
    for x in xs {
        let cells: Vec<String> = series
            .iter()
            .map(|s| match s.points.iter().rev().find(|p| p.0 == x) {
                Some(p) => format!("{:.4}", p.1),
                None => String::new(),
            })
            .collect();
        table += &format!("| {x} | {} |\n", cells.join(" | "));
    }
    table += &format!("\nplot: {}\n", a.out.display());
    Ok(table)
}

fn run_train(a: &TrainArgs) -> Result<mor::train::trainer::TrainSummary> {
    let trainer = if a.resume {
        Trainer::resume(
            &a.out,
            &a.data,
            Some(a.steps).filter(|_| a.flops_budget.is_none()),
        )?
    } else {
        let model = match &a.init_from {
            Some(path) => load_pretrained(path)?.0,
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

fn finish_training(
    mut trainer: Trainer,
    a: &TrainArgs,
) -> Result<mor::train::trainer::TrainSummary> {
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

/// A checkpoint directory, or the latest checkpoint of a run directory.
fn resolve_checkpoint(path: &Path) -> PathBuf {
    if path.join("config.json").exists() {
        path.to_path_buf()
    } else {
        mor::checkpoint::latest(path).unwrap_or_else(|| path.to_path_buf())
    }
}

/// Load the model of a checkpoint (or a run's latest checkpoint) and the path of its tokenizer (the given one, or
/// the checkpoint's own tokenizer.json).
fn open_checkpoint(path: &Path, tokenizer: &Option<PathBuf>) -> Result<(MorModel, PathBuf)> {
    let dir = resolve_checkpoint(path);
    let model = load_model(&dir, &candle_core::Device::Cpu)
        .with_context(|| format!("loading {}", dir.display()))?
        .frozen()?;
    let tok = tokenizer
        .clone()
        .unwrap_or_else(|| dir.join("tokenizer.json"));
    Ok((model, tok))
}

fn run_generate(a: &GenerateArgs) -> Result<String> {
    let is_gguf = a.checkpoint.is_file();
    if a.quantized && !is_gguf {
        bail!("--quantized needs a .gguf file as --checkpoint");
    }
    let (model, tokenizer) = if is_gguf {
        let (model, gguf_tok) = load_pretrained(&a.checkpoint)?;
        let tok = match &a.tokenizer {
            Some(p) => Tokenizer::from_file(p)?,
            None => gguf_tok.context("the GGUF file has no tokenizer; give --tokenizer")?,
        };
        (model.frozen()?, tok)
    } else {
        let (model, tok_path) = open_checkpoint(&a.checkpoint, &a.tokenizer)?;
        (model, Tokenizer::from_file(&tok_path)?)
    };
    let s = &a.sampling;
    let params = mor::sampling::SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        repetition_penalty: s.repetition_penalty,
        seed: s.seed,
        max_new_tokens: s.max_tokens,
        stop: s.stop.clone(),
    };
    let emit = &mut |piece: &str| {
        use std::io::Write;
        print!("{piece}");
        let _ = std::io::stdout().flush();
    };
    let out = if a.quantized {
        let weights =
            mor::gguf::GgufFile::open(&a.checkpoint)?.quantized_weights(model.config())?;
        let cached = mor::engine::CachedModel::new(&model)?.with_quantized(weights)?;
        mor::generate::generate_cached(&cached, &tokenizer, &a.prompt, &params, emit)?
    } else {
        mor::generate::generate(&model, &tokenizer, &a.prompt, &params, emit)?
    };
    println!();
    Ok(out.text)
}

fn run_quickstart(a: &QuickstartArgs) -> Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/shakespeare.jsonl.gz");
    let corpus = if corpus.exists() {
        corpus
    } else {
        PathBuf::from("corpus/shakespeare.jsonl.gz")
    };
    if !corpus.exists() {
        bail!("bundled corpus not found at {}", corpus.display());
    }
    let cfg = mor::presets::preset(&a.preset)?;
    let data_dir = a.out.join("data");
    let tok_path = data_dir.join("tokenizer.json");
    std::fs::create_dir_all(&data_dir)?;
    let tokenizer = if tok_path.exists() {
        Tokenizer::from_file(&tok_path)?
    } else {
        println!(
            "training a {}-token byte-level BPE on {}",
            cfg.vocab_size,
            corpus.display()
        );
        let t = Tokenizer::train_bpe(std::slice::from_ref(&corpus), cfg.vocab_size)?;
        t.save(&tok_path)?;
        t
    };
    if !data_dir.join(mor::data::CORPUS_INFO_FILE).exists() {
        println!("tokenizing the corpus");
        let opts = PrepareOptions {
            val_fraction: 0.02,
            show_progress: true,
            ..PrepareOptions::default()
        };
        let info = prepare_corpus(std::slice::from_ref(&corpus), &tokenizer, &data_dir, &opts)?;
        println!(
            "{} training and {} held-out tokens",
            info.train_tokens, info.val_tokens
        );
    }
    let run_dir = a.out.join("run");
    let args = TrainArgs {
        config: None,
        preset: Some(a.preset.clone()),
        init_from: None,
        data: data_dir.clone(),
        out: run_dir.clone(),
        resume: mor::checkpoint::latest(&run_dir).is_some(),
        steps: a.steps,
        flops_budget: None,
        seq_len: None,
        batch_size: 8,
        grad_accum: 1,
        lr: 3e-3,
        schedule: "wsd".into(),
        warmup: None,
        decay_fraction: 0.2,
        weight_decay: 0.1,
        max_grad_norm: 1.0,
        seed: 0,
        shuffle: true,
        eval_every: 100,
        eval_sequences: 32,
        save_every: 100,
        keep_last: 2,
        log_every: 10,
        quiet: false,
    };
    let summary = run_train(&args)?;
    println!(
        "loss curve: {}",
        run_dir.join(mor::train::trainer::PLOT_FILE).display()
    );
    println!("\nsample (prompt {:?}):", a.prompt);
    run_generate(&GenerateArgs {
        checkpoint: summary.checkpoint.clone(),
        quantized: false,
        tokenizer: Some(tok_path),
        prompt: a.prompt.clone(),
        sampling: SamplingArgs {
            max_tokens: 80,
            temperature: 0.8,
            top_k: Some(40),
            top_p: None,
            repetition_penalty: 1.1,
            seed: 0,
            stop: vec![],
        },
    })?;
    println!(
        "\ncheckpoint: {}\nnext: mor generate --checkpoint {} --prompt \"...\"",
        summary.checkpoint.display(),
        run_dir.display()
    );
    Ok(())
}

fn main() -> Result<()> {
    mor::alloc::keep_freed_memory();
    mor::engine::pin_thread_count();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Quickstart(a) => run_quickstart(&a)?,
        Command::Tokenizer(a) => {
            let t = Tokenizer::train_bpe(&a.inputs, a.vocab_size)?;
            t.save(&a.out)?;
            println!("wrote {} ({} tokens)", a.out.display(), t.vocab_size());
        }
        Command::Prepare(a) => {
            let tokenizer = Tokenizer::from_file(&a.tokenizer)?;
            let opts = PrepareOptions {
                val_fraction: a.val_fraction,
                jsonl_field: a.field.clone(),
                show_progress: true,
                ..PrepareOptions::default()
            };
            let info = prepare_corpus(&a.inputs, &tokenizer, &a.out, &opts)?;
            tokenizer.save(a.out.join("tokenizer.json"))?;
            println!(
                "{}: {} training and {} held-out tokens",
                a.out.display(),
                info.train_tokens,
                info.val_tokens
            );
        }
        Command::Train(a) => {
            run_train(&a)?;
        }
        Command::Generate(a) => {
            run_generate(&a)?;
        }
        Command::Verify { reference } => {
            let report = mor::verify::verify_reference(&reference)?;
            print!("{}", report.table());
            if !report.passed() {
                bail!("deviations beyond tolerance");
            }
            println!("all {} quantities within tolerance", report.rows.len());
        }
        Command::Import(a) => {
            let (model, tok) = mor::gguf::import_gguf(&a.gguf, &candle_core::Device::Cpu)?;
            mor::checkpoint::save_model(&a.out, &model)?;
            tok.save(a.out.join("tokenizer.json"))?;
            println!(
                "imported {} ({:.2}M parameters, vocabulary {}) to {}",
                model.config().variant_name(),
                model.params().num_scalars() as f64 / 1e6,
                tok.vocab_size(),
                a.out.display()
            );
        }
        Command::Export(a) => {
            let (model, tok_path) = open_checkpoint(&a.checkpoint, &a.tokenizer)?;
            let tok = tok_path
                .exists()
                .then(|| Tokenizer::from_file(&tok_path))
                .transpose()?;
            match a.format.as_str() {
                "hf" => {
                    mor::checkpoint::save_model(&a.out, &model)?;
                    if let Some(t) = &tok {
                        t.save(a.out.join("tokenizer.json"))?;
                    }
                }
                "gguf" => mor::gguf::export_gguf(&model, tok.as_ref(), &a.out)?,
                other => bail!("--format {other:?}: use hf or gguf"),
            }
            println!("wrote {}", a.out.display());
        }
        Command::Uptrain(a) => run_uptrain(&a)?,
        Command::Plot(a) => print!("{}", run_plot(&a)?),
        Command::Flops(a) => {
            if a.list {
                for p in mor::presets::preset_names() {
                    println!("{p}");
                }
                return Ok(());
            }
            let cfg = model_config(&a.config, &a.preset)?;
            let seq = a.seq_len.unwrap_or(cfg.max_position_embeddings);
            println!("{}", mor::flops::forward_flops(&cfg, seq)?);
        }
        Command::Bench(BenchCommand::Train {
            hidden_size,
            layers,
            batch,
            seq_len,
            rounds,
            variants,
        }) => {
            let o = mor::bench::TrainBenchOptions {
                hidden_size,
                layers,
                batch,
                seq_len,
                rounds,
                variants: variants.split(',').map(|s| s.trim().to_string()).collect(),
                ..Default::default()
            };
            println!("{}", mor::bench::bench_train(&o)?);
        }
        Command::Eval(c) => mor::eval::cli::run(&c)?,
        Command::Bench(BenchCommand::Machine {
            hidden_size,
            heads,
            vocab,
            rows,
        }) => {
            let rows = rows
                .split(',')
                .map(|x| {
                    x.trim()
                        .parse::<usize>()
                        .ok()
                        .filter(|&n| n >= 1)
                        .with_context(|| format!("--rows: {x:?} is not a positive integer"))
                })
                .collect::<Result<Vec<_>>>()?;
            if hidden_size == 0 || heads == 0 || hidden_size % heads != 0 || vocab == 0 {
                anyhow::bail!(
                    "--hidden-size must be a positive multiple of --heads, --vocab positive"
                );
            }
            println!(
                "{}",
                mor::engine::bench::bench_machine(hidden_size, heads, vocab, &rows)?
            );
        }
        Command::Bench(BenchCommand::Generate {
            hidden_size,
            layers,
            batches,
            memory_gib,
            context,
            mean_len,
            std_len,
            requests_per_slot,
            rounds,
            variants,
        }) => {
            let list = |s: &str| {
                s.split(',')
                    .map(|x| x.trim().to_string())
                    .collect::<Vec<_>>()
            };
            let batches = list(&batches)
                .iter()
                .map(|b| {
                    b.parse::<mor::engine::bench::BatchSize>()
                        .with_context(|| format!("--batches: {b:?}"))
                })
                .collect::<Result<Vec<_>>>()?;
            if !(memory_gib > 0.0 && memory_gib.is_finite()) {
                anyhow::bail!("--memory-gib must be positive");
            }
            let o = mor::engine::bench::GenerateBenchOptions {
                hidden_size,
                layers,
                batches,
                context,
                memory_budget: (memory_gib * (1u64 << 30) as f64) as usize,
                mean_len,
                std_len,
                requests_per_slot,
                rounds,
                variants: list(&variants),
                ..Default::default()
            };
            println!("{}", mor::engine::bench::bench_generate(&o)?);
        }
    }
    Ok(())
}
