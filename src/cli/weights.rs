//! `mor import`, `mor export`, `mor quantize` and `mor verify`: moving weights in and out, and checking them against the official
//! code.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

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
pub struct QuantizeArgs {
    /// Checkpoint directory, run directory (latest checkpoint) or .gguf file.
    pub checkpoint: PathBuf,
    /// Matmul weight type: q8_0, q4_0, q4_1, q4_k (Q5_0 for tensors whose width is not a multiple of 256) or f32.
    #[arg(long = "type")]
    pub r#type: String,
    /// Output .gguf file (written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// tokenizer.json to embed (default: the checkpoint's, if any).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

#[derive(Args)]
pub struct ExportArgs {
    /// Checkpoint directory, run directory (latest checkpoint) or .gguf file.
    #[arg(long, visible_alias = "model")]
    pub checkpoint: PathBuf,
    /// Output: a directory for `hf` and `official`, a file for `gguf`.
    #[arg(long)]
    pub out: PathBuf,
    /// Format: hf (mor's Hugging Face layout), official (the official MoR code's nested layout with its cfg
    /// sections, for training at scale on its PyTorch stack) or gguf (vanilla models).
    #[arg(long, default_value = "hf")]
    pub format: String,
    /// tokenizer.json to include (default: the checkpoint's, if any).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

/// Import a GGUF file (llama.cpp's `llama` or mor's own architecture, weights dequantized to f32) as a checkpoint
/// directory with its tokenizer, if the file has one.
pub fn run_import(a: &ImportArgs) -> Result<()> {
    let mut f = mor::io::gguf::GgufFile::open(&a.gguf)?;
    let tok = f.has_tokenizer().then(|| f.tokenizer()).transpose()?;
    let model = f.model(&candle_core::Device::Cpu)?;
    mor::io::checkpoint::save_model(&a.out, &model)?;
    if let Some(t) = &tok {
        t.save(a.out.join("tokenizer.json"))?;
    }
    println!(
        "imported {} ({:.2}M parameters, {}) to {}",
        model.config().variant_name(),
        model.params().num_scalars() as f64 / 1e6,
        tok.map_or("no tokenizer".into(), |t| format!(
            "vocabulary {}",
            t.vocab_size()
        )),
        a.out.display()
    );
    Ok(())
}

/// Quantize a checkpoint into a GGUF file (vanilla: llama.cpp's `llama` architecture; recursive and MoR: mor's).
pub fn run_quantize(a: &QuantizeArgs) -> Result<()> {
    let ty: mor::io::gguf::QuantType = a.r#type.parse()?;
    let opts = mor::io::load::LoadOptions {
        tokenizer: a.tokenizer.clone(),
        ..Default::default()
    };
    let loaded = mor::io::load::load(&a.checkpoint, &opts)?;
    let notes = mor::io::gguf::quantize_gguf(&loaded.model, loaded.tokenizer.as_ref(), ty, &a.out)?;
    for n in &notes {
        println!("fallback: {n}");
    }
    let bytes = std::fs::metadata(&a.out)?.len();
    println!(
        "wrote {} ({}, {ty}, {:.1} MiB{})",
        a.out.display(),
        loaded.model.config().variant_name(),
        bytes as f64 / (1 << 20) as f64,
        if loaded.tokenizer.is_some() {
            ", with tokenizer"
        } else {
            ", no tokenizer"
        }
    );
    Ok(())
}

/// Export a checkpoint in the Hugging Face layout or as GGUF.
pub fn run_export(a: &ExportArgs) -> Result<()> {
    let opts = mor::io::load::LoadOptions {
        tokenizer: a.tokenizer.clone(),
        ..Default::default()
    };
    let mor::io::load::LoadedModel {
        model,
        tokenizer: tok,
        ..
    } = mor::io::load::load(&a.checkpoint, &opts)?;
    match a.format.as_str() {
        "hf" => {
            mor::io::checkpoint::save_model(&a.out, &model)?;
            if let Some(t) = &tok {
                t.save(a.out.join("tokenizer.json"))?;
            }
        }
        "official" => {
            mor::io::official::export_official(&model, &a.out)?;
            if let Some(t) = &tok {
                t.save(a.out.join("tokenizer.json"))?;
            }
        }
        "gguf" => mor::io::gguf::export_gguf(&model, tok.as_ref(), &a.out)?,
        other => bail!("--format {other:?}: use hf, official or gguf"),
    }
    println!("wrote {}", a.out.display());
    Ok(())
}

/// Compare the model against a reference directory made with the official code; an error beyond tolerance.
pub fn run_verify(reference: &std::path::Path) -> Result<()> {
    let report = mor::io::verify::verify_reference(reference)?;
    print!("{}", report.table());
    if !report.passed() {
        bail!("deviations beyond tolerance");
    }
    println!("all {} quantities within tolerance", report.rows.len());
    Ok(())
}
