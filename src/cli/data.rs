//! `mor tokenizer` and `mor prepare`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use mor::data::{prepare_corpus, PrepareOptions, Tokenizer};

#[derive(Args)]
pub struct TokenizerArgs {
    /// Input files.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Vocabulary size.
    #[arg(long, default_value_t = 4096)]
    pub vocab_size: usize,
    /// Output tokenizer.json.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct PrepareArgs {
    /// Input files (.txt, .jsonl, optionally .gz).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// tokenizer.json to use (copied into the output directory).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Fraction of documents held out.
    #[arg(long, default_value_t = 0.01)]
    pub val_fraction: f64,
    /// JSONL field with the text.
    #[arg(long, default_value = "text")]
    pub field: String,
}

/// Train a byte-level BPE and save it.
pub fn run_tokenizer(a: &TokenizerArgs) -> Result<()> {
    let t = Tokenizer::train_bpe(&a.inputs, a.vocab_size)?;
    t.save(&a.out)?;
    println!("wrote {} ({} tokens)", a.out.display(), t.vocab_size());
    Ok(())
}

/// Tokenize files into a packed corpus with a held-out split, next to a copy of the tokenizer.
pub fn run_prepare(a: &PrepareArgs) -> Result<()> {
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
    Ok(())
}
