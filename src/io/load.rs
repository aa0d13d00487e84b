//! The one model loader every command uses: a checkpoint directory, a run directory (its latest checkpoint) or a
//! llama.cpp `.gguf` file, with the tokenizer that belongs to it.

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::data::Tokenizer;
use crate::error::{MorError, Result};
use crate::io::checkpoint::{latest, load_model};
use crate::io::gguf::{import_gguf, GgufFile, QuantizedWeights};
use crate::model::MorModel;

/// Where a model came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A checkpoint directory (config.json + model.safetensors).
    Checkpoint(PathBuf),
    /// A llama.cpp GGUF file.
    Gguf(PathBuf),
}

/// How to load.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// A tokenizer.json to use instead of the model's own.
    pub tokenizer: Option<PathBuf>,
    /// Keep the weights trainable (`Var`s, for `train --init-from` and up-training). Inference and evaluation load
    /// frozen weights, so no autograd graph is kept alive.
    pub trainable: bool,
    /// Also read the GGUF file's quantized matmul weights (for the engine's quantized path).
    pub quantized: bool,
}

/// A loaded model with its tokenizer.
#[derive(Debug)]
pub struct LoadedModel {
    /// The model.
    pub model: MorModel,
    /// Its tokenizer: the one given, the checkpoint's tokenizer.json, or the GGUF file's vocabulary; `None` when the
    /// checkpoint has none.
    pub tokenizer: Option<Tokenizer>,
    /// The quantized weights, when asked for.
    pub quantized: Option<QuantizedWeights>,
    /// Where it came from.
    pub source: ModelSource,
}

impl LoadedModel {
    /// The tokenizer, or an error telling the user how to give one.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            MorError::Config(format!(
                "{} has no tokenizer.json; give one with --tokenizer",
                self.source.path().display()
            ))
        })
    }
}

impl ModelSource {
    /// The path of the checkpoint directory or GGUF file.
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Checkpoint(p) | ModelSource::Gguf(p) => p,
        }
    }

    /// Resolve a user's path: a `.gguf` (any regular file), a checkpoint directory, or a run directory (its latest
    /// checkpoint).
    pub fn resolve(path: &Path) -> Result<ModelSource> {
        if path.is_file() {
            return Ok(ModelSource::Gguf(path.to_path_buf()));
        }
        if !path.exists() {
            return Err(MorError::Config(format!(
                "{}: no such file or directory",
                path.display()
            )));
        }
        if path.join("config.json").exists() {
            return Ok(ModelSource::Checkpoint(path.to_path_buf()));
        }
        latest(path).map(ModelSource::Checkpoint).ok_or_else(|| {
            MorError::Config(format!(
                "{}: neither a .gguf file, a checkpoint directory (config.json) nor a run directory with checkpoints",
                path.display()
            ))
        })
    }
}

/// Load the model at `path` (see [`ModelSource::resolve`]) on the CPU.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let source = ModelSource::resolve(path)?;
    let dev = Device::Cpu;
    let (model, own_tokenizer) = match &source {
        ModelSource::Gguf(p) => {
            let (m, t) = import_gguf(p, &dev)?;
            (m, Some(t))
        }
        ModelSource::Checkpoint(dir) => {
            let m = load_model(dir, &dev)
                .map_err(|e| MorError::Config(format!("loading {}: {e}", dir.display())))?;
            let tok = dir.join("tokenizer.json");
            (
                m,
                tok.exists()
                    .then(|| Tokenizer::from_file(&tok))
                    .transpose()?,
            )
        }
    };
    let quantized = match (&source, opts.quantized) {
        (ModelSource::Gguf(p), true) => Some(GgufFile::open(p)?.quantized_weights(model.config())?),
        (ModelSource::Checkpoint(dir), true) => {
            return Err(MorError::Config(format!(
                "--quantized needs a .gguf file; {} is a checkpoint directory with f32 weights",
                dir.display()
            )))
        }
        (_, false) => None,
    };
    let tokenizer = match &opts.tokenizer {
        Some(p) => Some(Tokenizer::from_file(p)?),
        None => own_tokenizer,
    };
    let model = if opts.trainable {
        model
    } else {
        model.frozen()?
    };
    Ok(LoadedModel {
        model,
        tokenizer,
        quantized,
        source,
    })
}
