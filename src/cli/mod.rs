//! The subcommands of the `mor` binary, one module per family, and what they share: opening models and
//! checkpoints and parsing enum-valued flags.

pub mod bench;
pub mod chat;
pub mod data;
pub mod eval;
pub mod experiment;
pub mod generate;
pub mod plot;
pub mod quickstart;
pub mod serve;
pub mod train;
pub mod weights;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use mor::config::ModelConfig;
use mor::io::load::{load, LoadOptions};
use mor::model::MorModel;

/// The model config of `--config FILE` or `--preset NAME`.
pub fn model_config(config: &Option<PathBuf>, preset: &Option<String>) -> Result<ModelConfig> {
    match (config, preset) {
        (Some(p), _) => Ok(mor::io::checkpoint::load_config(p)?),
        (None, Some(name)) => Ok(mor::config::presets::preset(name)?),
        (None, None) => bail!("give --config FILE or --preset NAME"),
    }
}

/// A serde enum from its snake_case name, for CLI flags.
pub fn parse_enum<T: serde::de::DeserializeOwned>(flag: &str, s: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| anyhow::anyhow!("--{flag} {s:?} is not a valid value"))
}

/// A model to train from (`--init-from`, `uptrain --from`): trainable weights, any path [`mor::io::load`] takes.
pub fn load_trainable(path: &Path) -> Result<MorModel> {
    let opts = LoadOptions {
        trainable: true,
        ..Default::default()
    };
    Ok(load(path, &opts)?.model)
}
