//! JSONL metrics log: one JSON object per line, flushed per line so a killed run loses nothing
//! but the line being written, and readers tolerate that partial last line.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::io::checkpoint::io::write_atomic;
use crate::{MorError, Result};

/// Appends metric records to a JSONL file.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Open `path` (parent directories created). With `append`, existing lines are kept and an
    /// unterminated last line left by a killed run is cut off so the next record starts cleanly;
    /// otherwise the file is truncated.
    pub fn open(path: impl Into<PathBuf>, append: bool) -> Result<Self> {
        let path = path.into();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| MorError::io(dir, e))?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(!append)
            .open(&path)
            .map_err(|e| MorError::io(&path, e))?;
        if append {
            let bytes = std::fs::read(&path).map_err(|e| MorError::io(&path, e))?;
            let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            if keep != bytes.len() {
                file.set_len(keep as u64)
                    .map_err(|e| MorError::io(&path, e))?;
            }
            file.seek(SeekFrom::End(0))
                .map_err(|e| MorError::io(&path, e))?;
        }
        Ok(Self { path, file })
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append `record` (normally a JSON object with a `"step"` field) as one line.
    pub fn write<T: Serialize + ?Sized>(&mut self, record: &T) -> Result<()> {
        let mut line = serde_json::to_vec(record).map_err(|e| MorError::Json {
            path: self.path.clone(),
            source: e,
        })?;
        line.push(b'\n');
        // One write call per line (the file is unbuffered), so a kill cannot interleave records.
        self.file
            .write_all(&line)
            .and_then(|()| self.file.flush())
            .map_err(|e| MorError::io(&self.path, e))
    }
}

/// Parse `text` as JSONL. A final line that is not newline-terminated and does not parse is a
/// write cut short by a kill and is dropped; any other bad line is an error naming its number.
fn parse_lines(path: &Path, text: &str) -> Result<Vec<serde_json::Value>> {
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(v) => out.push(v),
            Err(_) if !complete && i + 1 == lines.len() => {}
            Err(e) => {
                return Err(MorError::Data(format!(
                    "{}: line {}: invalid JSON: {e}",
                    path.display(),
                    i + 1
                )))
            }
        }
    }
    Ok(out)
}

/// Read every record of a metrics file, tolerating a partial last line.
pub fn read_metrics(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| MorError::io(path, e))?;
    parse_lines(path, &text)
}

/// The `(x, y)` points of metric `y_key` against `x_key` (e.g. "step") over `records`, skipping records that lack
/// either as a number.
pub fn metric_points(records: &[serde_json::Value], x_key: &str, y_key: &str) -> Vec<(f64, f64)> {
    records
        .iter()
        .filter_map(|r| Some((r.get(x_key)?.as_f64()?, r.get(y_key)?.as_f64()?)))
        .collect()
}

/// Drop records whose `"step"` is greater than `step` (used when resuming from a checkpoint, so
/// the log does not contain steps that will be redone), plus any partial last line. Records
/// without a numeric `step` are kept. The file is rewritten atomically; a missing file is a
/// no-op. Returns the number of records removed.
pub fn truncate_after_step(path: &Path, step: u64) -> Result<usize> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(MorError::io(path, e)),
    };
    let records = parse_lines(path, &text)?;
    let total = records.len();
    let mut out = Vec::with_capacity(text.len());
    let mut kept = 0;
    for r in records {
        let after = r
            .get("step")
            .and_then(|s| s.as_f64())
            .is_some_and(|s| s > step as f64);
        if !after {
            serde_json::to_writer(&mut out, &r).map_err(|e| MorError::Json {
                path: path.to_path_buf(),
                source: e,
            })?;
            out.push(b'\n');
            kept += 1;
        }
    }
    write_atomic(path, &out)?;
    Ok(total - kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn write_read_append_truncate() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("logs/metrics.jsonl");
        {
            let mut w = MetricsWriter::open(&p, false).unwrap();
            for s in 1..=5u64 {
                w.write(&json!({"step": s, "loss": 10.0 / s as f64}))
                    .unwrap();
            }
        }
        // Simulate a kill mid-line.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(br#"{"step": 6, "lo"#).unwrap();
        drop(f);
        let r = read_metrics(&p).unwrap();
        assert_eq!(r.len(), 5);
        assert_eq!(r[4]["step"], 5);

        // Appending cuts the partial line off first.
        let mut w = MetricsWriter::open(&p, true).unwrap();
        w.write(&json!({"step": 6, "loss": 1.0})).unwrap();
        w.write(&json!({"event": "eval"})).unwrap();
        drop(w);
        let r = read_metrics(&p).unwrap();
        assert_eq!(r.len(), 7);
        assert_eq!(r[5], json!({"step": 6, "loss": 1.0}));

        assert_eq!(truncate_after_step(&p, 3).unwrap(), 3);
        let steps: Vec<_> = read_metrics(&p)
            .unwrap()
            .iter()
            .map(|v| v.get("step").cloned())
            .collect();
        assert_eq!(
            steps,
            vec![Some(json!(1)), Some(json!(2)), Some(json!(3)), None]
        );

        // Not appending starts over.
        MetricsWriter::open(&p, false).unwrap();
        assert!(read_metrics(&p).unwrap().is_empty());
        assert_eq!(
            truncate_after_step(&d.path().join("none.jsonl"), 1).unwrap(),
            0
        );
    }

    #[test]
    fn corrupt_middle_line_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.jsonl");
        std::fs::write(&p, "{\"step\":1}\nnot json\n{\"step\":2}\n").unwrap();
        let err = read_metrics(&p).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("m.jsonl"), "{err}");
        // A complete (newline-terminated) bad last line is corruption too, not a partial write.
        std::fs::write(&p, "{\"step\":1}\n{\"st\n").unwrap();
        assert!(read_metrics(&p).is_err());
        assert!(matches!(
            read_metrics(&d.path().join("missing.jsonl")).unwrap_err(),
            MorError::Io { .. }
        ));
    }
}
