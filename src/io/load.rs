//! The one model loader every command uses: a checkpoint directory, a run directory (its latest checkpoint) or a
//! `.gguf` file (llama.cpp's `llama` or mor's own architecture), with the tokenizer that belongs to it.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::data::Tokenizer;
use crate::error::{MorError, Result};
use crate::io::checkpoint::{latest, load_model};
use crate::io::gguf::{GgufFile, QuantizedWeights};
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
    /// Read the GGUF file's weights as stored, for the engine's quantized path ([`LoadedModel::quantized`]); the
    /// model is then only a frame for [`CachedModel::quantized`](crate::engine::CachedModel::quantized), its dense
    /// matmul weights placeholders ([`GgufFile::quantized_model`]).
    pub quantized: bool,
    /// Convert the weights to this dtype after loading (bf16 halves the bytes each decode step reads; the engine
    /// runs bf16 weights with f32 activations). Not with `quantized`.
    pub dtype: Option<candle_core::DType>,
}

/// A loaded model with its tokenizer.
#[derive(Debug)]
pub struct LoadedModel {
    /// The model.
    pub model: MorModel,
    /// Its tokenizer: the one given, the checkpoint's tokenizer.json, or the GGUF file's vocabulary; `None` when the
    /// checkpoint has none.
    pub tokenizer: Option<Tokenizer>,
    /// The weights as stored in the GGUF file, when asked for.
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
    // What loading frees (raw tensors, metadata, tokenizer conversion) must not stay resident beside an inference
    // model; training keeps the allocator's reuse of freed memory throughout.
    let _release = (!opts.trainable).then(crate::alloc::ReturnFreedMemory::new);
    let dev = Device::Cpu;
    let (model, own_tokenizer, quantized) = match &source {
        ModelSource::Gguf(p) => {
            let mut f = GgufFile::open(p)?;
            let tok = f.has_tokenizer().then(|| f.tokenizer()).transpose()?;
            if opts.quantized {
                // The stored weights only: the model is a frame whose dense matmul weights are placeholders.
                let (m, w) = f.quantized_model()?;
                (m, tok, Some(w))
            } else {
                // Converted to the requested dtype tensor by tensor: no f32 copy of the whole model at any time.
                (
                    f.model_as(&dev, opts.dtype.unwrap_or(DType::F32))?,
                    tok,
                    None,
                )
            }
        }
        ModelSource::Checkpoint(dir) => {
            if opts.quantized {
                return Err(MorError::Config(format!(
                    "--quantized needs a .gguf file; {} is a checkpoint directory with f32 weights",
                    dir.display()
                )));
            }
            let m = load_model(dir, &dev)
                .map_err(|e| MorError::Config(format!("loading {}: {e}", dir.display())))?;
            let tok = dir.join("tokenizer.json");
            (
                m,
                tok.exists()
                    .then(|| Tokenizer::from_file(&tok))
                    .transpose()?,
                None,
            )
        }
    };
    let tokenizer = match &opts.tokenizer {
        Some(p) => Some(Tokenizer::from_file(p)?),
        None => own_tokenizer,
    };
    let mut model = if opts.trainable {
        model
    } else {
        model.frozen()?
    };
    if let Some(dtype) = opts.dtype {
        if quantized.is_some() {
            return Err(MorError::Config(
                "--dtype converts dense weights; --quantized runs the stored blocks instead".into(),
            ));
        }
        if model.params().dtype() != dtype {
            model = model.to_dtype(dtype)?;
        }
    }
    if !opts.trainable && quantized.is_none() {
        // Every token reads the dense weights whole: huge pages spare the TLB misses of streaming them
        // (docs/benchmarks.md), and a weight fills its pages, unlike the activations that 4 KiB pages are for.
        let huge: usize = model.params().tensors().values().map(huge_pages_for).sum();
        tracing::debug!("{} MiB of weights on huge pages", huge >> 20);
    }
    tracing::debug!(
        "loaded {}: {} MiB allocated",
        source.path().display(),
        crate::alloc::current_bytes() >> 20
    );
    Ok(LoadedModel {
        model,
        tokenizer,
        quantized,
        source,
    })
}

/// [`crate::alloc::collapse_to_huge_pages`] on the CPU storage of `t` (f32 or bf16); the bytes collapsed.
fn huge_pages_for(t: &candle_core::Tensor) -> usize {
    use candle_core::{CpuStorage, Storage};
    let (storage, _) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => crate::alloc::collapse_to_huge_pages(v),
        Storage::Cpu(CpuStorage::BF16(v)) => crate::alloc::collapse_to_huge_pages(v),
        _ => 0,
    }
}
