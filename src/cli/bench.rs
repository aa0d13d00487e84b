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
        BenchCommand::Train {
            hidden_size,
            layers,
            batch,
            seq_len,
            rounds,
            variants,
        } => {
            let o = mor::bench::train::TrainBenchOptions {
                hidden_size,
                layers,
                batch,
                seq_len,
                rounds,
                variants: variants.split(',').map(|s| s.trim().to_string()).collect(),
                ..Default::default()
            };
            println!("{}", mor::bench::train::bench_train(&o)?);
        }
        BenchCommand::Machine {
            hidden_size,
            heads,
            vocab,
            rows,
        } => {
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
            let o = mor::bench::generate::GenerateBenchOptions {
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
            println!("{}", mor::bench::generate::bench_generate(&o)?);
        }
    }
    Ok(())
}
