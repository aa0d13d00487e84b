//! Corpus preparation: documents -> token ids + EOS -> `train.tokens` / `val.tokens`.

use super::source::{open_documents, DocumentSplit};
use super::tokenizer::Tokenizer;
use super::{write_atomic, AtomicFile};
use crate::{MorError, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// File name of the corpus description written next to the token files.
pub const CORPUS_INFO_FILE: &str = "corpus.json";
/// File name of the training token stream.
pub const TRAIN_FILE: &str = "train.tokens";
/// File name of the validation token stream.
pub const VAL_FILE: &str = "val.tokens";

/// Bumped when the on-disk layout changes, so old corpora are rejected, not misread.
const FORMAT_VERSION: u32 = 1;

/// Documents are encoded in batches of about this many bytes (parallel encoding, bounded memory).
const BATCH_BYTES: usize = 4 << 20;

/// Options of [`prepare_corpus`].
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// Fraction of documents held out for validation, in `[0, 1)`. With at least two
    /// documents and a positive fraction, at least one document is held out and at
    /// least one kept; with a single document, its final fraction of tokens is held out.
    pub val_fraction: f64,
    /// How plain-text files are divided into documents.
    pub split: DocumentSplit,
    /// JSONL field holding the document text.
    pub jsonl_field: String,
    /// Show a progress bar on stderr (by input bytes).
    pub show_progress: bool,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self {
            val_fraction: 0.01,
            split: DocumentSplit::WholeFile,
            jsonl_field: "text".into(),
            show_progress: false,
        }
    }
}

/// Per-input statistics recorded in `corpus.json`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SourceInfo {
    /// The input path as given.
    pub path: PathBuf,
    /// Size of the file on disk (compressed size for `.gz`).
    pub bytes: u64,
    /// Non-empty documents read from it.
    pub documents: u64,
    /// Tokens produced from it, EOS included.
    pub tokens: u64,
}

/// Description of a prepared corpus directory (`corpus.json`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CorpusInfo {
    /// On-disk layout version.
    pub format_version: u32,
    /// Tokens in `train.tokens`.
    pub train_tokens: u64,
    /// Tokens in `val.tokens`.
    pub val_tokens: u64,
    /// Documents in the training split.
    pub train_documents: u64,
    /// Documents in the validation split (0 when a single document was split by tokens).
    pub val_documents: u64,
    /// Whether validation is the tail of the only document rather than whole documents.
    pub split_within_document: bool,
    /// Documents skipped because they were empty or whitespace-only.
    pub skipped_empty_documents: u64,
    /// EOS id appended after every document.
    pub eos_id: u32,
    /// Vocabulary size of the tokenizer used.
    pub vocab_size: usize,
    /// [`Tokenizer::fingerprint`] of the tokenizer used.
    pub tokenizer_fingerprint: String,
    /// The requested validation fraction.
    pub val_fraction: f64,
    /// How plain-text inputs were split into documents.
    pub split: DocumentSplit,
    /// JSONL text field used.
    pub jsonl_field: String,
    /// The inputs, in order.
    pub sources: Vec<SourceInfo>,
}

impl CorpusInfo {
    /// Read `corpus.json` from a prepared corpus directory.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join(CORPUS_INFO_FILE);
        let bytes = std::fs::read(&path).map_err(|e| MorError::io(&path, e))?;
        let info: CorpusInfo = serde_json::from_slice(&bytes).map_err(|source| MorError::Json {
            path: path.clone(),
            source,
        })?;
        if info.format_version != FORMAT_VERSION {
            return Err(MorError::Data(format!(
                "{}: corpus format version {} is not supported (expected {FORMAT_VERSION}); \
                 prepare the corpus again",
                path.display(),
                info.format_version
            )));
        }
        Ok(info)
    }

    /// Fail unless `tokenizer` is the one the corpus was tokenized with.
    pub fn check_tokenizer(&self, tokenizer: &Tokenizer) -> Result<()> {
        let fp = tokenizer.fingerprint()?;
        if fp != self.tokenizer_fingerprint || tokenizer.vocab_size() != self.vocab_size {
            return Err(MorError::Data(format!(
                "tokenizer mismatch: corpus was prepared with a tokenizer of {} tokens \
                 (fingerprint {}), but this one has {} tokens (fingerprint {fp})",
                self.vocab_size,
                self.tokenizer_fingerprint,
                tokenizer.vocab_size()
            )));
        }
        Ok(())
    }

    /// Path of the training token file in corpus directory `dir`.
    pub fn train_path(dir: impl AsRef<Path>) -> PathBuf {
        dir.as_ref().join(TRAIN_FILE)
    }

    /// Path of the validation token file in corpus directory `dir`.
    pub fn val_path(dir: impl AsRef<Path>) -> PathBuf {
        dir.as_ref().join(VAL_FILE)
    }
}

/// Tokenize `inputs` and write a train/validation corpus to `out_dir`.
///
/// Each non-empty document becomes its tokens followed by EOS (no BOS); documents are
/// concatenated in input order into one stream, as in the paper's pretraining data.
/// Validation takes whole documents spread evenly through the input (every k-th
/// document), so it is deterministic and not just the last source. Writes
/// `train.tokens`, `val.tokens` (raw little-endian u32) and `corpus.json`, each
/// atomically; `corpus.json` is written last and removed first, so its presence means
/// the token files are complete and match it.
pub fn prepare_corpus(
    inputs: &[PathBuf],
    tokenizer: &Tokenizer,
    out_dir: &Path,
    opts: &PrepareOptions,
) -> Result<CorpusInfo> {
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(MorError::Config(format!(
            "val_fraction must be in [0, 1), got {}",
            opts.val_fraction
        )));
    }
    if inputs.is_empty() {
        return Err(MorError::Data("no corpus input files given".into()));
    }
    // Check every input up front so a typo in the last path fails before hours of work.
    let mut sizes = Vec::with_capacity(inputs.len());
    for path in inputs {
        let meta = std::fs::metadata(path).map_err(|e| MorError::io(path, e))?;
        if !meta.is_file() {
            return Err(MorError::Data(format!("{}: not a file", path.display())));
        }
        sizes.push(meta.len());
    }
    std::fs::create_dir_all(out_dir).map_err(|e| MorError::io(out_dir, e))?;

    let progress = make_progress(opts.show_progress, sizes.iter().sum());
    // Pass 1: tokenize everything into one temporary stream, remembering where each
    // document ends; the split needs the document count, known only at the end.
    let all_path = out_dir.join("all.tokens");
    let mut all = AtomicFile::create(&all_path)?;
    let mut doc_ends: Vec<u64> = Vec::new();
    let mut sources = Vec::with_capacity(inputs.len());
    let mut skipped = 0u64;
    let eos = tokenizer.eos_id().to_le_bytes();
    for (path, &bytes) in inputs.iter().zip(&sizes) {
        progress.set_message(path.display().to_string());
        let docs_before = doc_ends.len();
        let tokens_before = doc_ends.last().copied().unwrap_or(0);
        let mut batch: Vec<String> = Vec::new();
        let mut batch_bytes = 0usize;
        let mut flush = |batch: &mut Vec<String>, doc_ends: &mut Vec<u64>| -> Result<()> {
            for ids in tokenizer.encode_batch(batch)? {
                let mut buf = Vec::with_capacity(4 * (ids.len() + 1));
                ids.iter().for_each(|id| buf.extend(id.to_le_bytes()));
                buf.extend(eos);
                all.write_all(&buf)?;
                let end = doc_ends.last().copied().unwrap_or(0) + ids.len() as u64 + 1;
                doc_ends.push(end);
            }
            batch.clear();
            Ok(())
        };
        let docs = open_documents(path, opts.split, &opts.jsonl_field, Some(progress.clone()))?;
        for doc in docs {
            let doc = doc?;
            if doc.trim().is_empty() {
                skipped += 1;
                continue;
            }
            batch_bytes += doc.len();
            batch.push(doc);
            if batch_bytes >= BATCH_BYTES {
                flush(&mut batch, &mut doc_ends)?;
                batch_bytes = 0;
            }
        }
        flush(&mut batch, &mut doc_ends)?;
        sources.push(SourceInfo {
            path: path.clone(),
            bytes,
            documents: (doc_ends.len() - docs_before) as u64,
            tokens: doc_ends.last().copied().unwrap_or(0) - tokens_before,
        });
    }
    progress.finish_and_clear();
    let total = doc_ends.last().copied().unwrap_or(0);
    if total == 0 {
        return Err(MorError::Data(format!(
            "empty corpus: no non-empty documents in {} input file(s) ({} empty skipped)",
            inputs.len(),
            skipped
        )));
    }
    all.commit()?;
    let result = split_and_write(&all_path, &doc_ends, out_dir, opts.val_fraction);
    let _ = std::fs::remove_file(&all_path);
    let split = result?;

    let info = CorpusInfo {
        format_version: FORMAT_VERSION,
        train_tokens: split.train_tokens,
        val_tokens: total - split.train_tokens,
        train_documents: split.train_documents,
        val_documents: doc_ends.len() as u64 - split.train_documents,
        split_within_document: split.within_document,
        skipped_empty_documents: skipped,
        eos_id: tokenizer.eos_id(),
        vocab_size: tokenizer.vocab_size(),
        tokenizer_fingerprint: tokenizer.fingerprint()?,
        val_fraction: opts.val_fraction,
        split: opts.split,
        jsonl_field: opts.jsonl_field.clone(),
        sources,
    };
    let json = serde_json::to_vec_pretty(&info).map_err(|source| MorError::Json {
        path: out_dir.join(CORPUS_INFO_FILE),
        source,
    })?;
    write_atomic(&out_dir.join(CORPUS_INFO_FILE), &json)?;
    Ok(info)
}

fn make_progress(show: bool, total_bytes: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total_bytes);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:30!} {wide_bar} {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, eta {eta})",
    ) {
        pb.set_style(style);
    }
    pb
}

struct SplitCounts {
    train_tokens: u64,
    train_documents: u64,
    within_document: bool,
}

/// Which documents go to validation: `n_val` of `n`, spread evenly (document `i` is
/// held out when `floor((i+1)·n_val/n)` steps past `floor(i·n_val/n)`).
pub(crate) fn val_documents(n: u64, val_fraction: f64) -> impl Fn(u64) -> bool {
    let n_val = if n < 2 || val_fraction <= 0.0 {
        0
    } else {
        ((n as f64 * val_fraction).round() as u64).clamp(1, n - 1)
    };
    let (n, n_val) = (u128::from(n.max(1)), u128::from(n_val));
    move |i| {
        let i = u128::from(i);
        (i + 1) * n_val / n > i * n_val / n
    }
}

/// Pass 2: route each document of the temporary stream to the train or val file.
fn split_and_write(
    all_path: &Path,
    doc_ends: &[u64],
    out_dir: &Path,
    val_fraction: f64,
) -> Result<SplitCounts> {
    let file = std::fs::File::open(all_path).map_err(|e| MorError::io(all_path, e))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut train = AtomicFile::create(&out_dir.join(TRAIN_FILE))?;
    let mut val = AtomicFile::create(&out_dir.join(VAL_FILE))?;
    let mut copy = |dst: &mut AtomicFile, tokens: u64| -> Result<()> {
        let mut left = tokens * 4;
        let mut buf = vec![0u8; 1 << 20];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            reader
                .read_exact(&mut buf[..n])
                .map_err(|e| MorError::io(all_path, e))?;
            dst.write_all(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    };

    let total = doc_ends.last().copied().unwrap_or(0);
    let counts = if doc_ends.len() == 1 {
        // One document: hold out its final tokens, keeping at least one on each side.
        let val_tokens = if val_fraction > 0.0 && total >= 2 {
            ((total as f64 * val_fraction).round() as u64).clamp(1, total - 1)
        } else {
            0
        };
        copy(&mut train, total - val_tokens)?;
        copy(&mut val, val_tokens)?;
        SplitCounts {
            train_tokens: total - val_tokens,
            train_documents: 1,
            within_document: val_tokens > 0,
        }
    } else {
        let is_val = val_documents(doc_ends.len() as u64, val_fraction);
        let (mut train_tokens, mut train_documents, mut start) = (0, 0, 0);
        for (i, &end) in doc_ends.iter().enumerate() {
            if is_val(i as u64) {
                copy(&mut val, end - start)?;
            } else {
                copy(&mut train, end - start)?;
                train_tokens += end - start;
                train_documents += 1;
            }
            start = end;
        }
        SplitCounts {
            train_tokens,
            train_documents,
            within_document: false,
        }
    };
    // Drop the old description first: while it exists it must describe the token files.
    let info_path = out_dir.join(CORPUS_INFO_FILE);
    match std::fs::remove_file(&info_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(MorError::io(&info_path, e))
        }
        _ => {}
    }
    train.commit()?;
    val.commit()?;
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_out(n: u64, f: f64) -> Vec<u64> {
        let is_val = val_documents(n, f);
        (0..n).filter(|&i| is_val(i)).collect()
    }

    #[test]
    fn validation_documents_are_spread_and_counted() {
        assert_eq!(held_out(10, 0.2), [4, 9]);
        assert_eq!(held_out(42, 0.05), [20, 41]);
        // A positive fraction holds out at least one document, never all of them.
        assert_eq!(held_out(5, 0.01).len(), 1);
        assert_eq!(held_out(2, 0.99).len(), 1);
        assert!(held_out(7, 0.0).is_empty());
        assert!(held_out(1, 0.5).is_empty());
        assert_eq!(held_out(1000, 0.1).len(), 100);
    }
}
