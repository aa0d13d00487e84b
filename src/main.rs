//! The `mor` command line: train, verify, generate, evaluate and benchmark Mixture-of-Recursions models. Each
//! subcommand lives in a module of `cli`; this file only parses and dispatches.

mod cli;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use cli::bench::{BenchCommand, FlopsArgs};
use cli::chat::ChatArgs;
use cli::data::{PrepareArgs, TokenizerArgs};
use cli::experiment::ExperimentCommand;
use cli::generate::GenerateArgs;
use cli::plot::PlotArgs;
use cli::quickstart::QuickstartArgs;
use cli::serve::ServeArgs;
use cli::train::{TrainArgs, UptrainArgs};
use cli::weights::{ExportArgs, ImportArgs, QuantizeArgs};

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
    Eval(cli::eval::EvalCommand),
    /// Import a GGUF file (llama.cpp's llama or mor's own architecture) as a mor checkpoint directory with its
    /// tokenizer.json.
    Import(ImportArgs),
    /// Export a checkpoint: Hugging Face layout (any model) or GGUF (vanilla models).
    Export(ExportArgs),
    /// Quantize any checkpoint (vanilla, recursive, MoR) into a GGUF file: q8_0, q4_0, q4_1, q4_k.
    Quantize(QuantizeArgs),
    /// Up-train a pretrained vanilla model (GGUF or checkpoint) into a recursive / MoR model, then train it.
    Uptrain(UptrainArgs),
    /// Overlay one metric of several runs in a PNG and print it as a markdown table (e.g. held-out loss).
    Plot(PlotArgs),
    /// Studies of many runs: `isoflop` compares vanilla, recursive and MoR at equal training FLOPs.
    #[command(subcommand)]
    Experiment(ExperimentCommand),
    /// Serve a model over an OpenAI-compatible HTTP API (completions, chat completions, streaming).
    Serve(ServeArgs),
    /// Chat with a model in the terminal, streaming its replies.
    Chat(ChatArgs),
}

fn main() -> ExitCode {
    mor::alloc::keep_freed_memory();
    mor::engine::pin_thread_count();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let command = Cli::parse().command;
    // Inference keeps its peak resident memory down with 4 KiB pages (measured; `alloc::no_huge_pages`).
    if matches!(
        command,
        Command::Generate(_)
            | Command::Serve(_)
            | Command::Chat(_)
            | Command::Bench(BenchCommand::Model { .. } | BenchCommand::Serve(_))
    ) {
        mor::alloc::no_huge_pages();
    }
    match run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A user error is one line with its causes, never a backtrace, whatever RUST_BACKTRACE says (a panic
            // still reports one through the default hook).
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Quickstart(a) => cli::quickstart::run_quickstart(&a),
        Command::Tokenizer(a) => cli::data::run_tokenizer(&a),
        Command::Prepare(a) => cli::data::run_prepare(&a),
        Command::Train(a) => cli::train::run_train(&a).map(|_| ()),
        Command::Generate(a) => cli::generate::run_generate(&a).map(|_| ()),
        Command::Verify { reference } => cli::weights::run_verify(&reference),
        Command::Import(a) => cli::weights::run_import(&a),
        Command::Export(a) => cli::weights::run_export(&a),
        Command::Quantize(a) => cli::weights::run_quantize(&a),
        Command::Uptrain(a) => cli::train::run_uptrain(&a),
        Command::Serve(a) => cli::serve::run_serve(&a),
        Command::Chat(a) => cli::chat::run_chat(&a),
        Command::Plot(a) => cli::plot::run_plot(&a).map(|table| print!("{table}")),
        Command::Flops(a) => cli::bench::run_flops(&a),
        Command::Bench(c) => cli::bench::run_bench(c),
        Command::Eval(c) => Ok(cli::eval::run(&c)?),
        Command::Experiment(c) => cli::experiment::run_experiment(&c),
    }
}
