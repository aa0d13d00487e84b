//! The subcommands of the `mor` binary, one module per family, and what they share: opening models and
//! checkpoints and parsing enum-valued flags.

pub mod bench;
pub mod data;
pub mod generate;
pub mod plot;
pub mod quickstart;
pub mod train;
pub mod weights;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use mor::checkpoint::load_model;
use mor::config::ModelConfig;
use mor::data::Tokenizer;
use mor::model::MorModel;

/// The model config of `--config FILE` or `--preset NAME`.
pub fn model_config(config: &Option<PathBuf>, preset: &Option<String>) -> Result<ModelConfig> {
    match (config, preset) {
        (Some(p), _) => Ok(mor::checkpoint::load_config(p)?),
        (None, Some(name)) => Ok(mor::presets::preset(name)?),
        (None, None) => bail!("give --config FILE or --preset NAME"),
    }
}

/// A serde enum from its snake_case name, for CLI flags.
pub fn parse_enum<T: serde::de::DeserializeOwned>(flag: &str, s: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| anyhow::anyhow!("--{flag} {s:?} is not a valid value"))
}

/// A pretrained model and (if available) its tokenizer: a GGUF file or a checkpoint directory.
pub fn load_pretrained(path: &Path) -> Result<(MorModel, Option<Tokenizer>)> {
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

/// A checkpoint directory, or the latest checkpoint of a run directory.
pub fn resolve_checkpoint(path: &Path) -> PathBuf {
    if path.join("config.json").exists() {
        path.to_path_buf()
    } else {
        mor::checkpoint::latest(path).unwrap_or_else(|| path.to_path_buf())
    }
}

/// Load the model of a checkpoint (or a run's latest checkpoint) and the path of its tokenizer (the given one, or
/// the checkpoint's own tokenizer.json).
pub fn open_checkpoint(path: &Path, tokenizer: &Option<PathBuf>) -> Result<(MorModel, PathBuf)> {
    let dir = resolve_checkpoint(path);
    let model = load_model(&dir, &candle_core::Device::Cpu)
        .with_context(|| format!("loading {}", dir.display()))?
        .frozen()?;
    let tok = tokenizer
        .clone()
        .unwrap_or_else(|| dir.join("tokenizer.json"));
    Ok((model, tok))
}
