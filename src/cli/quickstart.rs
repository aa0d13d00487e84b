//! `mor quickstart`: the main job on the bundled defaults.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;

use mor::data::{prepare_corpus, PrepareOptions, Tokenizer};

use super::generate::{run_generate, GenerateArgs, SamplingArgs};
use super::train::{run_train, TrainArgs};

#[derive(Args)]
pub struct QuickstartArgs {
    /// Output directory (corpus, tokenizer, run).
    #[arg(long, default_value = "runs/quickstart")]
    pub out: PathBuf,
    /// Model preset.
    #[arg(long, default_value = "tiny-mor-expert")]
    pub preset: String,
    /// Training steps.
    #[arg(long, default_value_t = 300)]
    pub steps: usize,
    /// Prompt for the sample.
    #[arg(long, default_value = "ROMEO:")]
    pub prompt: String,
}

/// Tokenizer, corpus, training and a sample on the bundled Shakespeare corpus; resumes an interrupted run.
pub fn run_quickstart(a: &QuickstartArgs) -> Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/shakespeare.jsonl.gz");
    let corpus = if corpus.exists() {
        corpus
    } else {
        PathBuf::from("corpus/shakespeare.jsonl.gz")
    };
    if !corpus.exists() {
        bail!("bundled corpus not found at {}", corpus.display());
    }
    let cfg = mor::config::presets::preset(&a.preset)?;
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
        resume: mor::io::checkpoint::latest(&run_dir).is_some(),
        steps: a.steps,
        flops_budget: None,
        flops_count: "training".into(),
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
        checkpointing: false,
        no_checkpointing: false,
        skip_memory_check: false,
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
        dtype: None,
        threads: None,
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
