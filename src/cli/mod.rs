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

/// The dtype of a model's dense weights for inference (`--dtype`).
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum WeightDtype {
    /// 32-bit floats.
    F32,
    /// bfloat16: half the bytes per weight, read as f32 in registers.
    Bf16,
}

impl WeightDtype {
    /// The candle dtype.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            WeightDtype::F32 => candle_core::DType::F32,
            WeightDtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// A model to train from (`--init-from`, `uptrain --from`): trainable weights, any path [`mor::io::load`] takes.
pub fn load_trainable(path: &Path) -> Result<MorModel> {
    let opts = LoadOptions {
        trainable: true,
        ..Default::default()
    };
    Ok(load(path, &opts)?.model)
}
