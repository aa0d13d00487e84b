//! `mor import`, `mor export` and `mor verify`: moving weights in and out, and checking them against the official
//! code.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use mor::data::Tokenizer;

use super::open_checkpoint;

#[derive(Args)]
pub struct ImportArgs {
    /// GGUF file.
    #[arg(long)]
    pub gguf: PathBuf,
    /// Output checkpoint directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct ExportArgs {
    /// Checkpoint directory or run directory (latest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output: a directory for `hf`, a file for `gguf`.
    #[arg(long)]
    pub out: PathBuf,
    /// Format: hf or gguf.
    #[arg(long, default_value = "hf")]
    pub format: String,
    /// tokenizer.json to include (default: the checkpoint's, if any).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

/// Import a GGUF file as a checkpoint directory with its tokenizer.
pub fn run_import(a: &ImportArgs) -> Result<()> {
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
    Ok(())
}

/// Export a checkpoint in the Hugging Face layout or as GGUF.
pub fn run_export(a: &ExportArgs) -> Result<()> {
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
    Ok(())
}

/// Compare the model against a reference directory made with the official code; an error beyond tolerance.
pub fn run_verify(reference: &std::path::Path) -> Result<()> {
    let report = mor::verify::verify_reference(reference)?;
    print!("{}", report.table());
    if !report.passed() {
        bail!("deviations beyond tolerance");
    }
    println!("all {} quantities within tolerance", report.rows.len());
    Ok(())
}
