//! Library error type. The CLI wraps these in `anyhow`; the library never panics on bad input.

use std::path::PathBuf;

/// Every failure the `mor` library reports.
#[derive(Debug, thiserror::Error)]
pub enum MorError {
    /// A configuration value is missing, malformed or inconsistent with another.
    #[error("invalid config: {0}")]
    Config(String),
    /// A checkpoint or weight file does not match what the model expects.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    /// Input data (corpus, token file, tokenizer) is unusable.
    #[error("data: {0}")]
    Data(String),
    /// A request (prompt, sampling parameters, generation length) is invalid.
    #[error("invalid request: {0}")]
    Request(String),
    /// A training step would not fit in the memory available (`crate::train::memory`).
    #[error("out of memory: {0}")]
    Memory(String),
    /// An I/O failure, with the path it concerned.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A tensor operation failed (shape mismatch, dtype, ...).
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    /// JSON (de)serialisation failed.
    #[error("json {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Result alias used across the library.
pub type Result<T> = std::result::Result<T, MorError>;

impl MorError {
    /// Wrap an I/O error with the path it concerned.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        MorError::Io {
            path: path.into(),
            source,
        }
    }
    /// A checkpoint error for `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        MorError::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
