//! Data pipeline: tokenizer, corpus preparation, token files and packed batches.
//!
//! Flow, following the paper's pretraining setup:
//! 1. [`Tokenizer`]: load a Hugging Face `tokenizer.json` or train a byte-level BPE,
//!    with `<|endoftext|>` as id 0 (EOS = pad = 0, the SmolLM convention).
//! 2. [`prepare_corpus`]: tokenize documents (text / JSONL, optionally gzipped), append
//!    EOS after each (no BOS), concatenate, hold out a validation split, and write
//!    `train.tokens` / `val.tokens` (raw little-endian u32) plus `corpus.json`.
//! 3. [`TokenFile`] + [`PackedDataset`]: memory-map a token stream and cut it into
//!    consecutive `seq_len`-token sequences (attention crosses document boundaries,
//!    as in the paper); [`BatchSampler`] draws resumable batches, and
//!    [`PackedDataset::eval_windows`] walks a stream for evaluation.

mod corpus;
mod dataset;
mod sampler;
mod source;
mod tokenizer;

pub use corpus::{
    prepare_corpus, CorpusInfo, PrepareOptions, SourceInfo, CORPUS_INFO_FILE, TRAIN_FILE, VAL_FILE,
};
pub use dataset::{EvalWindow, EvalWindows, PackedDataset, TokenFile};
pub use sampler::BatchSampler;
pub use source::{read_documents, DocumentSplit, Documents, InputFormat};
pub use tokenizer::{Tokenizer, EOS_TOKEN};

use crate::{MorError, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// A file being written under a temporary sibling name, renamed into place by
/// [`AtomicFile::commit`], so readers never see a partial file and a crash leaves the
/// previous version intact. Dropped uncommitted, the temporary file is removed.
pub(crate) struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    writer: Option<BufWriter<File>>,
}

impl AtomicFile {
    /// Start writing `path` (through a temporary file next to it).
    pub(crate) fn create(path: &Path) -> Result<Self> {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".tmp-{}", std::process::id()));
        let tmp = path.with_file_name(name);
        let file = File::create(&tmp).map_err(|e| MorError::io(&tmp, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            writer: Some(BufWriter::new(file)),
        })
    }

    /// Append `bytes`.
    pub(crate) fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        match self.writer.as_mut() {
            Some(w) => w.write_all(bytes).map_err(|e| MorError::io(&self.tmp, e)),
            None => Err(MorError::Data(format!(
                "{}: write after commit",
                self.path.display()
            ))),
        }
    }

    /// Flush, sync and rename the temporary file over the destination.
    pub(crate) fn commit(mut self) -> Result<()> {
        let Some(mut w) = self.writer.take() else {
            return Ok(());
        };
        w.flush().map_err(|e| MorError::io(&self.tmp, e))?;
        let file = w
            .into_inner()
            .map_err(|e| MorError::io(&self.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| MorError::io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| MorError::io(&self.path, e))?;
        // Renamed: nothing left for Drop to clean up.
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            self.writer.take();
            // Best effort: a leftover temp file is harmless but untidy.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Write `path` atomically with the bytes `contents`.
pub(crate) fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(contents)?;
    f.commit()
}
