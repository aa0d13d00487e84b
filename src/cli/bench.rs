//! `mor flops` and `mor bench`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use super::model_config;

#[derive(Args)]
pub struct FlopsArgs {
    /// Model config.json.
    #[arg(long, conflicts_with = "preset")]
    pub config: Option<PathBuf>,
    /// Preset name.
    #[arg(long)]
    pub preset: Option<String>,
    /// Sequence length (default: the model's context).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// List presets.
    #[arg(long)]
    pub list: bool,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Load an OpenAI-compatible server on loopback (mor serve in process, or --url): aggregate tokens/s, time to
    /// first token and inter-token latency p50 / p99 at each client count.
    Serve(super::serve::ServeBenchArgs),
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
    /// Prefill and decode tokens/s and peak memory of one model (GGUF file or checkpoint), as llama.cpp's
    /// llama-bench / llama-batched-bench measure them.
    Model {
        /// A .gguf file or a checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// Run on the stored quantized weights (GGUF only; an error names any tensor the kernels cannot run).
        #[arg(long)]
        quantized: bool,
        /// Convert the weights to this dtype after loading (bf16: half the memory traffic per token).
        #[arg(long, value_enum)]
        dtype: Option<super::WeightDtype>,
        /// Engine threads (default: the cores available).
        #[arg(long)]
        threads: Option<usize>,
        /// Prompt tokens per sequence (prefill; 0 skips it).
        #[arg(long, default_value_t = 512)]
        prompt_len: usize,
        /// Decoded tokens per sequence (0 skips it).
        #[arg(long, default_value_t = 128)]
        gen_len: usize,
        /// Batch sizes (comma-separated).
        #[arg(long, default_value = "1")]
        batch: String,
        /// Decode after the prefilled prompts (as llama-batched-bench) instead of from an empty context (as
        /// llama-bench).
        #[arg(long)]
        decode_from_prompt: bool,
        /// Repetitions.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// One JSON object per batch size instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Training throughput and peak memory of vanilla, recursive and MoR at the same shape.
    Train(TrainBenchArgs),
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
        /// Width preset: `smollm2` (d = 576, 9 heads, 3 KV heads, FFN 1536, vocabulary 49152, 30 layers; overrides
        /// --hidden-size and --layers).
        #[arg(long)]
        shape: Option<String>,
        /// Weight precisions, comma-separated: f32 and/or q8_0, q4_0, q4_1, q4_k (every variant quantized in memory
        /// as `mor quantize` stores it, on the integer kernels).
        #[arg(long, default_value = "f32")]
        quantized: String,
    },
}

/// `mor bench train`.
#[derive(Args)]
pub struct TrainBenchArgs {
    /// Take the shape (width, heads, KV heads, FFN, vocabulary, layers) from this preset; alone, it is also the
    /// one variant measured. The shape flags below override single fields.
    #[arg(long)]
    pub preset: Option<String>,
    /// Model width [default: 256].
    #[arg(long)]
    pub hidden_size: Option<usize>,
    /// Query heads [default: 4].
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value heads [default: heads / 2].
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// FFN width [default: 3 × width].
    #[arg(long)]
    pub intermediate_size: Option<usize>,
    /// Vocabulary size [default: 4096].
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Unrolled layers ((layers − 2) divisible by every N_r) [default: 8].
    #[arg(long)]
    pub layers: Option<usize>,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Measured steps per variant per round (after one untimed warm-up step).
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
    /// Rounds of interleaved runs.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Variants (comma-separated; preset names or vanilla, recursive-N, mor-expert-N, mor-token-N at the shape);
    /// the first is the baseline [default: the preset, or vanilla,recursive-2,mor-expert-2,mor-expert-3,mor-token-3].
    #[arg(long)]
    pub variants: Option<String>,
    /// Use the composed reference ops instead of the fused training ops (for before/after comparisons).
    #[arg(long)]
    pub composed_ops: bool,
    /// Activation checkpointing per layer.
    #[arg(long, overrides_with = "no_checkpointing")]
    pub checkpointing: bool,
    /// No activation checkpointing (the default).
    #[arg(long, overrides_with = "checkpointing")]
    pub no_checkpointing: bool,
}

/// Print the forward FLOPs per token of a config or preset, or the preset names.
pub fn run_flops(a: &FlopsArgs) -> Result<()> {
    if a.list {
        for p in mor::config::presets::preset_names() {
            println!("{p}");
        }
        return Ok(());
    }
    let cfg = model_config(&a.config, &a.preset)?;
    let seq = a.seq_len.unwrap_or(cfg.max_position_embeddings);
    println!("{}", mor::config::flops::forward_flops(&cfg, seq)?);
    Ok(())
}

/// Run one benchmark and print its report.
pub fn run_bench(c: BenchCommand) -> Result<()> {
    match c {
        BenchCommand::Model {
            model,
            quantized,
            dtype,
            threads,
            prompt_len,
            gen_len,
            batch,
            decode_from_prompt,
            reps,
            json,
        } => {
            if let Some(n) = threads {
                super::generate::apply_threads(n)?;
            }
            let batches = positive_list("batch", &batch)?;
            let opts = mor::io::load::LoadOptions {
                quantized,
                dtype: dtype.map(super::WeightDtype::dtype),
                ..Default::default()
            };
            let mut loaded = mor::io::load::load(&model, &opts)?;
            let weights = loaded.quantized.take();
            let m = &loaded.model;
            let precision = match &weights {
                Some(w) => format!("{} (quantized kernels)", w.formats()),
                None => format!("{:?}", m.params().dtype()).to_lowercase(),
            };
            let cm = match weights {
                Some(w) => mor::engine::CachedModel::quantized(m, w)?,
                None => mor::engine::CachedModel::new(m)?,
            };
            let o = mor::bench::model::ModelBenchOptions {
                model: model.file_name().map_or_else(
                    || model.display().to_string(),
                    |f| f.to_string_lossy().into(),
                ),
                precision,
                prompt_len,
                gen_len,
                batches,
                reps,
                decode_from_prompt,
                threads: mor::engine::num_threads(),
            };
            let report = mor::bench::model::bench_model(&cm, &o)?;
            if json {
                for l in report.json_lines() {
                    println!("{l}");
                }
            } else {
                println!("{report}");
            }
        }
        BenchCommand::Serve(a) => super::serve::run_bench_serve(&a)?,
        BenchCommand::Train(a) => {
            println!(
                "{}",
                mor::bench::train::bench_train(&train_bench_options(&a)?)?
            );
        }
        BenchCommand::Machine {
            hidden_size,
            heads,
            vocab,
            rows,
        } => {
            let rows = positive_list("rows", &rows)?;
            if hidden_size == 0 || heads == 0 || hidden_size % heads != 0 || vocab == 0 {
                anyhow::bail!(
                    "--hidden-size must be a positive multiple of --heads, --vocab positive"
                );
            }
            println!(
                "{}",
                mor::bench::machine::bench_machine(hidden_size, heads, vocab, &rows)?
            );
        }
        BenchCommand::Generate {
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
            shape,
            quantized,
        } => {
            let list = |s: &str| {
                s.split(',')
                    .map(|x| x.trim().to_string())
                    .collect::<Vec<_>>()
            };
            let batches = list(&batches)
                .iter()
                .map(|b| {
                    b.parse::<mor::bench::generate::BatchSize>()
                        .with_context(|| format!("--batches: {b:?}"))
                })
                .collect::<Result<Vec<_>>>()?;
            if !(memory_gib > 0.0 && memory_gib.is_finite()) {
                anyhow::bail!("--memory-gib must be positive");
            }
            let precisions = list(&quantized)
                .iter()
                .map(|t| t.parse::<mor::io::gguf::QuantType>())
                .collect::<mor::Result<Vec<_>>>()
                .context("--quantized")?;
            let mut o = mor::bench::generate::GenerateBenchOptions {
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
                precisions,
                ..Default::default()
            };
            if let Some(name) = &shape {
                o = o.with_shape(name)?;
            }
            println!("{}", mor::bench::generate::bench_generate(&o)?);
        }
    }
    Ok(())
}

/// The benchmark options of `mor bench train`'s arguments.
fn train_bench_options(a: &TrainBenchArgs) -> Result<mor::bench::train::TrainBenchOptions> {
    let mut o = mor::bench::train::TrainBenchOptions {
        batch: a.batch,
        seq_len: a.seq_len,
        steps: a.steps,
        rounds: a.rounds,
        fused: !a.composed_ops,
        checkpointing: a.checkpointing,
        ..Default::default()
    };
    if let Some(p) = &a.preset {
        let cfg = mor::config::presets::preset(p)?;
        o.hidden_size = cfg.hidden_size;
        o.heads = cfg.num_attention_heads;
        o.kv_heads = Some(cfg.num_key_value_heads);
        o.intermediate_size = Some(cfg.intermediate_size);
        o.vocab = cfg.vocab_size;
        o.layers = cfg.num_hidden_layers;
        o.variants = vec![p.clone()];
    }
    o.hidden_size = a.hidden_size.unwrap_or(o.hidden_size);
    o.heads = a.heads.unwrap_or(o.heads);
    o.kv_heads = a.kv_heads.or(o.kv_heads);
    o.intermediate_size = a.intermediate_size.or(o.intermediate_size);
    o.vocab = a.vocab.unwrap_or(o.vocab);
    o.layers = a.layers.unwrap_or(o.layers);
    if let Some(v) = &a.variants {
        o.variants = v.split(',').map(|s| s.trim().to_string()).collect();
    }
    if o.batch == 0 || o.seq_len < 2 || o.steps == 0 || o.rounds == 0 || o.variants.is_empty() {
        anyhow::bail!("--batch, --steps, --rounds must be positive, --seq-len at least 2, --variants non-empty");
    }
    Ok(o)
}

/// A comma-separated list of positive integers given to `--flag`.
fn positive_list(flag: &str, s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|x| {
            x.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n >= 1)
                .with_context(|| format!("--{flag}: {x:?} is not a positive integer"))
        })
        .collect()
}
