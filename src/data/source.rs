//! Reading documents out of corpus input files: plain text or JSONL, optionally gzipped.

use crate::{MorError, Result};
use indicatif::ProgressBar;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// How an input file is parsed, decided from its name by [`InputFormat::detect`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputFormat {
    /// Plain UTF-8 text.
    Text,
    /// One JSON object per line, the document in a string field.
    Jsonl,
}

impl InputFormat {
    /// Format and gzip flag from the file name: `.jsonl` / `.ndjson` are JSONL, anything
    /// else is text; a trailing `.gz` means gzip-compressed (e.g. `shard.jsonl.gz`).
    pub fn detect(path: &Path) -> (InputFormat, bool) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let (stem, gz) = match name.strip_suffix(".gz") {
            Some(stem) => (stem, true),
            None => (name.as_str(), false),
        };
        let jsonl = stem.ends_with(".jsonl") || stem.ends_with(".ndjson");
        let format = if jsonl {
            InputFormat::Jsonl
        } else {
            InputFormat::Text
        };
        (format, gz)
    }
}

/// How a plain-text file is divided into documents (JSONL is always one per line).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocumentSplit {
    /// The whole file is one document.
    #[default]
    WholeFile,
    /// Chunks separated by one or more blank (whitespace-only) lines are documents.
    BlankLines,
}

enum Mode {
    WholeFile,
    BlankLines,
    Jsonl { field: String },
}

/// Iterator over the documents of one input file; see [`read_documents`].
///
/// After the first error it yields nothing more, so a caller may stop at `Err`.
pub struct Documents {
    path: PathBuf,
    reader: Box<dyn BufRead + Send>,
    mode: Mode,
    /// 1-based number of the last line read, for error messages.
    line_no: usize,
    buf: Vec<u8>,
    done: bool,
}

/// Open `path` and iterate over its documents.
///
/// `split` applies to plain-text files; `field` names the JSONL string field holding
/// the text. Errors name the file, and the line for JSONL and UTF-8 problems.
pub fn read_documents(path: &Path, split: DocumentSplit, field: &str) -> Result<Documents> {
    open_documents(path, split, field, None)
}

/// [`read_documents`] that advances `progress` by the (compressed) bytes read.
pub(crate) fn open_documents(
    path: &Path,
    split: DocumentSplit,
    field: &str,
    progress: Option<ProgressBar>,
) -> Result<Documents> {
    let file = File::open(path).map_err(|e| MorError::io(path, e))?;
    let raw: Box<dyn Read + Send> = match progress {
        Some(pb) => Box::new(pb.wrap_read(file)),
        None => Box::new(file),
    };
    let (format, gz) = InputFormat::detect(path);
    let reader: Box<dyn BufRead + Send> = if gz {
        // Multi-member so concatenated .gz files (`cat a.gz b.gz`) read completely.
        Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(raw)))
    } else {
        Box::new(BufReader::new(raw))
    };
    let mode = match (format, split) {
        (InputFormat::Jsonl, _) => Mode::Jsonl {
            field: field.to_string(),
        },
        (InputFormat::Text, DocumentSplit::WholeFile) => Mode::WholeFile,
        (InputFormat::Text, DocumentSplit::BlankLines) => Mode::BlankLines,
    };
    Ok(Documents {
        path: path.to_path_buf(),
        reader,
        mode,
        line_no: 0,
        buf: Vec::new(),
        done: false,
    })
}

impl Documents {
    fn at_line(&self, msg: impl std::fmt::Display) -> MorError {
        MorError::Data(format!("{}:{}: {msg}", self.path.display(), self.line_no))
    }

    /// Read the next line (with its terminator) into `self.buf`; false at end of input.
    fn next_line(&mut self) -> Result<bool> {
        self.buf.clear();
        let n = self
            .reader
            .read_until(b'\n', &mut self.buf)
            .map_err(|e| MorError::io(&self.path, e))?;
        if n == 0 {
            return Ok(false);
        }
        self.line_no += 1;
        if self.line_no == 1 && self.buf.starts_with(b"\xEF\xBB\xBF") {
            // A UTF-8 byte-order mark is an encoding artefact, not text.
            self.buf.drain(..3);
        }
        Ok(true)
    }

    fn line_str(&self) -> Result<&str> {
        std::str::from_utf8(&self.buf).map_err(|e| self.at_line(format!("invalid UTF-8: {e}")))
    }

    fn whole_file(&mut self) -> Result<Option<String>> {
        let mut bytes = Vec::new();
        self.reader
            .read_to_end(&mut bytes)
            .map_err(|e| MorError::io(&self.path, e))?;
        if bytes.starts_with(b"\xEF\xBB\xBF") {
            bytes.drain(..3);
        }
        String::from_utf8(bytes).map(Some).map_err(|e| {
            let bad = e.utf8_error().valid_up_to();
            self.line_no = 1 + e.as_bytes()[..bad].iter().filter(|&&b| b == b'\n').count();
            self.at_line(format!("invalid UTF-8 at byte {bad}"))
        })
    }

    fn paragraph(&mut self) -> Result<Option<String>> {
        let mut doc = String::new();
        while self.next_line()? {
            let line = self.line_str()?;
            if line.trim().is_empty() {
                if doc.is_empty() {
                    continue; // blank lines before a chunk
                }
                break;
            }
            doc.push_str(line);
        }
        if doc.is_empty() {
            return Ok(None);
        }
        // The separator's line break belongs to the separator, not to the document.
        let end = doc.trim_end_matches(['\n', '\r']).len();
        doc.truncate(end);
        Ok(Some(doc))
    }

    fn jsonl(&mut self) -> Result<Option<String>> {
        let Mode::Jsonl { field } = &self.mode else {
            return Ok(None);
        };
        let field = field.clone();
        while self.next_line()? {
            let line = self.line_str()?;
            if line.trim().is_empty() {
                continue; // tolerate blank lines, e.g. a trailing one
            }
            let value: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| self.at_line(format!("not valid JSON: {e}")))?;
            return match value.get(&field) {
                Some(serde_json::Value::String(text)) => Ok(Some(text.clone())),
                Some(other) => Err(self.at_line(format!(
                    "field \"{field}\" is not a string (found {})",
                    json_kind(other)
                ))),
                None if value.is_object() => {
                    Err(self.at_line(format!("object has no \"{field}\" field")))
                }
                None => Err(self.at_line(format!(
                    "expected a JSON object with a \"{field}\" field, found {}",
                    json_kind(&value)
                ))),
            };
        }
        Ok(None)
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

impl Iterator for Documents {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let next = match self.mode {
            Mode::WholeFile => {
                self.done = true;
                self.whole_file()
            }
            Mode::BlankLines => self.paragraph(),
            Mode::Jsonl { .. } => self.jsonl(),
        };
        match next {
            Ok(Some(doc)) => Some(Ok(doc)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn docs(name: &str, content: &[u8], split: DocumentSplit) -> Vec<Result<String>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        read_documents(&path, split, "text").unwrap().collect()
    }

    #[test]
    fn detects_formats() {
        let d = |s: &str| InputFormat::detect(Path::new(s));
        assert_eq!(d("a.txt"), (InputFormat::Text, false));
        assert_eq!(d("a.TXT.gz"), (InputFormat::Text, true));
        assert_eq!(d("dir/a.jsonl"), (InputFormat::Jsonl, false));
        assert_eq!(d("a.jsonl.gz"), (InputFormat::Jsonl, true));
        assert_eq!(d("a.ndjson"), (InputFormat::Jsonl, false));
    }

    #[test]
    fn splits_on_blank_lines() {
        let got = docs(
            "a.txt",
            b"\n\none\ntwo\n  \n\nthree\r\n\n",
            DocumentSplit::BlankLines,
        );
        let got: Vec<String> = got.into_iter().map(|d| d.unwrap()).collect();
        assert_eq!(got, ["one\ntwo", "three"]);
    }

    #[test]
    fn whole_file_keeps_text_verbatim() {
        let got = docs("a.txt", b"\xEF\xBB\xBFa\n\nb\n", DocumentSplit::WholeFile);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].as_ref().unwrap(), "a\n\nb\n");
    }

    #[test]
    fn invalid_utf8_reports_line() {
        let got = docs("a.txt", b"ok\nok\nbad \xFF\n", DocumentSplit::WholeFile);
        let err = got[0].as_ref().unwrap_err().to_string();
        assert!(err.contains("a.txt:3:"), "{err}");
    }

    #[test]
    fn jsonl_errors_name_the_line_and_stop() {
        let got = docs(
            "a.jsonl",
            b"{\"text\":\"a\"}\n\n{\"text\":3}\n{\"text\":\"b\"}\n",
            DocumentSplit::WholeFile,
        );
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].as_ref().unwrap(), "a");
        let err = got[1].as_ref().unwrap_err().to_string();
        assert!(
            err.contains("a.jsonl:3:") && err.contains("not a string"),
            "{err}"
        );
    }

    #[test]
    fn reads_gzip() {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(b"{\"body\":\"x y\"}\n").unwrap();
        let gz = enc.finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl.gz");
        std::fs::write(&path, gz).unwrap();
        let got: Vec<String> = read_documents(&path, DocumentSplit::WholeFile, "body")
            .unwrap()
            .map(|d| d.unwrap())
            .collect();
        assert_eq!(got, ["x y"]);
    }
}
