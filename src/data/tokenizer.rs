//! Thin wrapper around a Hugging Face `tokenizers::Tokenizer`: loading, byte-level BPE
//! training with the SmolLM special-token convention, and error mapping to [`MorError`].

use super::source::{read_documents, DocumentSplit};
use super::write_atomic;
use crate::{MorError, Result};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

/// End-of-text token of SmolLM / GPT-2 style vocabularies; id 0 in tokenizers we train.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// EOS spellings of other vocabulary families, tried in order when [`EOS_TOKEN`] is absent.
const EOS_FALLBACKS: [&str; 3] = ["</s>", "<eos>", "<|end_of_text|>"];

/// A text tokenizer with a known end-of-sequence id.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_id: u32,
    /// Cached: `tokenizers` answers `get_vocab_size(true)` by building the whole vocabulary map (a 49K-entry
    /// clone for SmolLM2), which made decoding quadratic in the text length.
    vocab_size: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

fn tk_err(context: impl std::fmt::Display, e: tokenizers::Error) -> MorError {
    MorError::Data(format!("{context}: {e}"))
}

impl Tokenizer {
    /// Load a Hugging Face `tokenizer.json`.
    ///
    /// Fails if the file is missing, is not a valid tokenizer definition, or has no
    /// recognisable EOS token.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        // Read ourselves so a missing file is an I/O error naming the path, not a
        // generic tokenizers error.
        let bytes = std::fs::read(path).map_err(|e| MorError::io(path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
            tk_err(
                format_args!("{}: not a valid tokenizer.json", path.display()),
                e,
            )
        })?;
        Self::from_inner(inner)
            .map_err(|e| MorError::Data(format!("{}: {}", path.display(), strip_data(e))))
    }

    /// Wrap an already built `tokenizers::Tokenizer`, locating its EOS token.
    pub fn from_inner(inner: tokenizers::Tokenizer) -> Result<Self> {
        let eos_id = std::iter::once(EOS_TOKEN)
            .chain(EOS_FALLBACKS)
            .find_map(|t| inner.token_to_id(t))
            .ok_or_else(|| {
                MorError::Data(format!(
                    "tokenizer has no EOS token (looked for {EOS_TOKEN}, {})",
                    EOS_FALLBACKS.join(", ")
                ))
            })?;
        let vocab_size = inner.get_vocab_size(true);
        Ok(Self {
            inner,
            eos_id,
            vocab_size,
        })
    }

    /// Train a GPT-2 style byte-level BPE tokenizer on `files`.
    ///
    /// Files are read like corpus inputs (plain text or JSONL with a `"text"` field,
    /// optionally gzipped; each text file is one document). `<|endoftext|>` is the only
    /// special token and gets id 0. The byte-level alphabet (256 symbols) is always
    /// included, so any input encodes without unknown tokens and decodes losslessly.
    pub fn train_bpe(files: &[PathBuf], vocab_size: usize) -> Result<Self> {
        // 256 byte symbols + EOS; anything smaller cannot represent arbitrary input.
        let min_vocab = ByteLevel::alphabet().len() + 1;
        if vocab_size < min_vocab {
            return Err(MorError::Config(format!(
                "BPE vocab_size {vocab_size} is too small: at least {min_vocab} are needed \
                 (256 byte symbols + {EOS_TOKEN})"
            )));
        }
        if files.is_empty() {
            return Err(MorError::Data(
                "no input files to train the tokenizer on".into(),
            ));
        }
        let mut inner = tokenizers::Tokenizer::new(BPE::default());
        inner
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_post_processor(Some(ByteLevel::new(false, true, true)))
            .with_decoder(Some(ByteLevel::new(false, true, true)));
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(vec![AddedToken::from(EOS_TOKEN, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();

        // The trainer wants a plain iterator of strings; read errors are parked in
        // `failure` and end the iteration, then reported after training returns.
        let failure: Arc<Mutex<Option<MorError>>> = Arc::default();
        let mut n_docs = 0usize;
        let docs = files.iter().flat_map({
            let failure = Arc::clone(&failure);
            move |path| {
                let failure = Arc::clone(&failure);
                let iter: Box<dyn Iterator<Item = Result<String>> + Send> =
                    match read_documents(path, DocumentSplit::WholeFile, "text") {
                        Ok(it) => Box::new(it),
                        Err(e) => Box::new(std::iter::once(Err(e))),
                    };
                iter.map_while(move |doc| match doc {
                    Ok(text) => Some(text),
                    Err(e) => {
                        if let Ok(mut slot) = failure.lock() {
                            slot.get_or_insert(e);
                        }
                        None
                    }
                })
            }
        });
        let docs = docs.inspect(|_| n_docs += 1);
        let trained = inner.train(&mut trainer, docs).map(|_| ());
        if let Some(e) = failure.lock().ok().and_then(|mut f| f.take()) {
            return Err(e);
        }
        trained.map_err(|e| tk_err("BPE training failed", e))?;
        if n_docs == 0 {
            return Err(MorError::Data(format!(
                "no documents found in {} input file(s) to train the tokenizer on",
                files.len()
            )));
        }
        let tok = Self::from_inner(inner)?;
        if tok.eos_id != 0 {
            return Err(MorError::Data(format!(
                "trained tokenizer put {EOS_TOKEN} at id {} instead of 0",
                tok.eos_id
            )));
        }
        Ok(tok)
    }

    /// Write the tokenizer as `tokenizer.json` to `path`, atomically (temp file + rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let json = self.to_json()?;
        write_atomic(path, json.as_bytes())
    }

    /// The tokenizer's canonical JSON serialisation.
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| tk_err("serialising tokenizer", e))
    }

    /// A fingerprint of the tokenizer definition (FNV-1a 64 of its canonical JSON), stored
    /// with prepared corpora so that token files are never read with another vocabulary.
    pub fn fingerprint(&self) -> Result<String> {
        Ok(format!(
            "fnv1a64:{:016x}",
            fnv1a64(self.to_json()?.as_bytes())
        ))
    }

    /// Token ids of `text`, without any special tokens added (no BOS/EOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| tk_err("encoding text", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encode several texts in parallel (same output as [`Tokenizer::encode`] on each).
    pub fn encode_batch(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let encs = self
            .inner
            .encode_batch_fast(inputs, false)
            .map_err(|e| tk_err("encoding text batch", e))?;
        Ok(encs.iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Text of `ids`; special tokens (EOS) are kept so document boundaries stay visible.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(MorError::Data(format!(
                "cannot decode token id {bad}: vocabulary has {} tokens",
                self.vocab_size()
            )));
        }
        self.inner
            .decode(ids, false)
            .map_err(|e| tk_err("decoding token ids", e))
    }

    /// Number of token ids, including added/special tokens.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Id of the end-of-sequence token (also used as padding).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The token string of `id`, if it is in the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of `token`, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The wrapped Hugging Face tokenizer, for features this wrapper does not expose.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// The message of a `MorError::Data`, to re-wrap it with more context.
fn strip_data(e: MorError) -> String {
    match e {
        MorError::Data(m) => m,
        other => other.to_string(),
    }
}

/// 64-bit FNV-1a: tiny, dependency-free and identical on every platform, which is all a
/// mismatch check needs (it is not meant to resist deliberate collisions).
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_reference_vectors() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn rejects_tiny_vocab() {
        let err = Tokenizer::train_bpe(&[PathBuf::from("x.txt")], 100).unwrap_err();
        assert!(err.to_string().contains("too small"), "{err}");
    }
}
