//! Memory-mapped token streams, packing into fixed-length sequences, and evaluation windows.

use super::AtomicFile;
use crate::{MorError, Result};
use memmap2::Mmap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A read-only stream of u32 token ids stored little-endian in a file, memory-mapped.
///
/// Cheap to clone (the mapping is shared).
#[derive(Clone, Debug)]
pub struct TokenFile {
    path: PathBuf,
    /// `None` for an empty file, which cannot be mapped.
    map: Option<Arc<Mmap>>,
    len: usize,
}

impl TokenFile {
    /// Map `path`. Fails if it cannot be read or its size is not a multiple of 4 bytes
    /// (a truncated or foreign file).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| MorError::io(path, e))?;
        let bytes = file.metadata().map_err(|e| MorError::io(path, e))?.len();
        if bytes % 4 != 0 {
            return Err(MorError::Data(format!(
                "{}: size {bytes} bytes is not a multiple of 4; the token file is truncated \
                 or not a u32 token stream",
                path.display()
            )));
        }
        let map = if bytes == 0 {
            None
        } else {
            // SAFETY: the map is read-only; like every reader of mapped files we rely on
            // token files not being modified while in use (they are only ever replaced
            // by rename, which leaves this mapping on the old inode).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| MorError::io(path, e))?;
            Some(Arc::new(map))
        };
        let len = usize::try_from(bytes / 4).map_err(|_| {
            MorError::Data(format!("{}: too large for this platform", path.display()))
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            len,
        })
    }

    /// Write `tokens` to `path` as little-endian u32, atomically.
    pub fn write(path: impl AsRef<Path>, tokens: &[u32]) -> Result<()> {
        let mut f = AtomicFile::create(path.as_ref())?;
        for chunk in tokens.chunks(1 << 16) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|t| t.to_le_bytes()).collect();
            f.write_all(&bytes)?;
        }
        f.commit()
    }

    /// The file this stream was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the stream has no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens in `range` (decoded from little-endian; the copy also sidesteps any
    /// alignment question about the mapped bytes).
    pub fn get(&self, range: Range<usize>) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(range.len());
        self.read_into(range, &mut out)?;
        Ok(out)
    }

    /// Append the tokens in `range` to `out` (reuses `out`'s allocation across batches).
    pub fn read_into(&self, range: Range<usize>, out: &mut Vec<u32>) -> Result<()> {
        if range.start > range.end || range.end > self.len {
            return Err(MorError::Data(format!(
                "{}: token range {}..{} is out of bounds (file has {} tokens)",
                self.path.display(),
                range.start,
                range.end,
                self.len
            )));
        }
        if let Some(map) = &self.map {
            let bytes = &map[range.start * 4..range.end * 4];
            out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        Ok(())
    }

    /// Largest token id in the stream (None if empty); a full scan, used to check that
    /// a corpus fits a model's vocabulary.
    pub fn max_token(&self) -> Option<u32> {
        let map = self.map.as_ref()?;
        map.chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .max()
    }
}

/// A token stream cut into consecutive, non-overlapping sequences of `seq_len` tokens.
///
/// Input ids and labels are the same sequence (the model shifts labels internally), so
/// no `seq_len + 1` overlap is needed. The incomplete tail is dropped.
#[derive(Clone, Debug)]
pub struct PackedDataset {
    file: TokenFile,
    seq_len: usize,
    num_seqs: usize,
}

impl PackedDataset {
    /// Pack `file` into sequences of `seq_len` tokens. Fails if `seq_len` is 0 or the
    /// file holds less than one sequence.
    pub fn new(file: TokenFile, seq_len: usize) -> Result<Self> {
        if seq_len == 0 {
            return Err(MorError::Config("seq_len must be at least 1".into()));
        }
        let num_seqs = file.len() / seq_len;
        if num_seqs == 0 {
            return Err(MorError::Data(format!(
                "{}: holds {} tokens, fewer than one sequence of seq_len = {seq_len}",
                file.path().display(),
                file.len()
            )));
        }
        Ok(Self {
            file,
            seq_len,
            num_seqs,
        })
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.num_seqs
    }

    /// Always false: construction requires at least one sequence.
    pub fn is_empty(&self) -> bool {
        self.num_seqs == 0
    }

    /// Tokens per sequence.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The underlying token stream.
    pub fn file(&self) -> &TokenFile {
        &self.file
    }

    /// Tokens of sequence `index`.
    pub fn sequence(&self, index: usize) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(self.seq_len);
        self.read_sequence_into(index, &mut out)?;
        Ok(out)
    }

    /// Append the tokens of sequence `index` to `out`.
    pub fn read_sequence_into(&self, index: usize, out: &mut Vec<u32>) -> Result<()> {
        if index >= self.num_seqs {
            return Err(MorError::Data(format!(
                "{}: sequence {index} out of range ({} sequences of {} tokens)",
                self.file.path().display(),
                self.num_seqs,
                self.seq_len
            )));
        }
        let start = index * self.seq_len;
        self.file.read_into(start..start + self.seq_len, out)
    }

    /// Evaluation windows of `seq_len` tokens over the whole stream (tail included);
    /// see [`EvalWindows`]. `stride` is how many new tokens each window scores:
    /// `seq_len - 1` scores every token once with no overlap, smaller strides give
    /// each scored token at least `seq_len - stride` tokens of context.
    pub fn eval_windows(&self, stride: usize) -> Result<EvalWindows<'_>> {
        EvalWindows::new(&self.file, self.seq_len, stride)
    }
}

/// One evaluation window: feed `tokens` to the model and score the predictions of
/// `tokens[first_scored..]` (the prediction of `tokens[j]` comes from position `j - 1`,
/// so in logit terms: positions `first_scored - 1 .. tokens.len() - 1`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvalWindow {
    /// Stream offset of `tokens[0]`.
    pub start: usize,
    /// The window's tokens (`window_len` of them, fewer only if the stream is shorter).
    pub tokens: Vec<u32>,
    /// Index in `tokens` of the first token whose prediction is scored (always >= 1).
    pub first_scored: usize,
}

/// Iterator over [`EvalWindow`]s covering a token stream.
///
/// Every token except the stream's first (which has no context) is scored exactly once.
/// A window of `L` tokens yields `L - 1` predictions, so `stride = L - 1` is the
/// non-overlapping case (consecutive windows share only the one boundary token that
/// serves as context). With a smaller stride, each window re-reads `L - stride` tokens
/// of context and scores only the last `stride`. The final window is moved back to stay
/// `L` tokens long and scores only what is left.
#[derive(Clone, Debug)]
pub struct EvalWindows<'a> {
    file: &'a TokenFile,
    window_len: usize,
    stride: usize,
    /// Next stream position to score.
    next_target: usize,
}

impl<'a> EvalWindows<'a> {
    /// Windows of `window_len` tokens over `file`, each scoring `stride` new tokens
    /// (the first window scores all of its `window_len - 1` predictions).
    pub fn new(file: &'a TokenFile, window_len: usize, stride: usize) -> Result<Self> {
        if window_len < 2 {
            return Err(MorError::Config(format!(
                "eval window must hold at least 2 tokens, got {window_len}"
            )));
        }
        if stride == 0 || stride >= window_len {
            return Err(MorError::Config(format!(
                "eval stride must be in 1..={} for windows of {window_len} tokens, got \
                 {stride} (a window of L tokens makes L - 1 predictions, so L - 1 is the \
                 non-overlapping stride)",
                window_len - 1
            )));
        }
        Ok(Self {
            file,
            window_len,
            stride,
            next_target: 1,
        })
    }

    /// Number of tokens that will be scored in total (`stream length - 1`).
    pub fn scored_tokens(&self) -> usize {
        self.file.len().saturating_sub(1)
    }
}

impl Iterator for EvalWindows<'_> {
    type Item = EvalWindow;

    fn next(&mut self) -> Option<EvalWindow> {
        let n = self.file.len();
        if self.next_target >= n {
            return None;
        }
        // The first window scores everything it can; later ones `stride` new tokens.
        let budget = if self.next_target == 1 {
            self.window_len - 1
        } else {
            self.stride
        };
        let end = (self.next_target + budget).min(n);
        let start = end.saturating_sub(self.window_len);
        let first_scored = self.next_target - start;
        self.next_target = end;
        // In bounds by construction (start <= end <= n), so the read cannot fail.
        let tokens = self.file.get(start..end).ok()?;
        Some(EvalWindow {
            start,
            tokens,
            first_scored,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(n: u32) -> (tempfile::TempDir, TokenFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.tokens");
        TokenFile::write(&path, &(0..n).collect::<Vec<_>>()).unwrap();
        let f = TokenFile::open(&path).unwrap();
        (dir, f)
    }

    #[test]
    fn first_window_scores_everything_it_can() {
        let (_d, f) = stream(10);
        let w: Vec<_> = EvalWindows::new(&f, 4, 3).unwrap().collect();
        assert_eq!(w[0].start, 0);
        assert_eq!(w[0].first_scored, 1);
        assert_eq!(w[1].start, 3);
        assert_eq!(w[1].tokens, [3, 4, 5, 6]);
        // Last window is pulled back to full length: targets 7..10 are left.
        assert_eq!(w.last().unwrap().start, 6);
        assert_eq!(w.last().unwrap().first_scored, 1);
        assert_eq!(w.len(), 3);
    }

    #[test]
    fn short_stream_gives_one_short_window() {
        let (_d, f) = stream(3);
        let w: Vec<_> = EvalWindows::new(&f, 8, 7).unwrap().collect();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].tokens, [0, 1, 2]);
        let (_d, f) = stream(1);
        assert_eq!(EvalWindows::new(&f, 8, 7).unwrap().count(), 0);
    }

    #[test]
    fn rejects_bad_stride() {
        let (_d, f) = stream(10);
        assert!(EvalWindows::new(&f, 4, 4).is_err());
        assert!(EvalWindows::new(&f, 4, 0).is_err());
        assert!(EvalWindows::new(&f, 1, 1).is_err());
    }

    #[test]
    fn empty_file_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.tokens");
        std::fs::write(&path, b"").unwrap();
        let f = TokenFile::open(&path).unwrap();
        assert!(f.is_empty());
        assert_eq!(f.get(0..0).unwrap(), Vec::<u32>::new());
        assert!(f.get(0..1).is_err());
        let err = PackedDataset::new(f, 4).unwrap_err().to_string();
        assert!(err.contains("holds 0 tokens"), "{err}");
    }
}
