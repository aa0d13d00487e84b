//! Crash-safe file writing, safetensors I/O and rotating training-checkpoint directories.
//!
//! Everything is written to a temporary name in the destination directory, fsynced, then renamed
//! over the target, so a reader (or a resumed run) sees either the old or the new file, never a
//! torn one.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::{MorError, Result};

/// Distinguishes temp files created concurrently by one process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A sibling temp path of `path` (same directory, so the final rename stays on one filesystem).
/// The original extension is kept last because some writers pick the format from it.
fn temp_sibling(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| MorError::Config(format!("{} has no file name", path.display())))?
        .to_string_lossy();
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    Ok(path.with_file_name(format!(".{name}.tmp-{}-{n}{ext}", std::process::id())))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// fsync a directory so a rename inside it survives a power loss. Not all platforms allow opening
/// a directory; there the rename is as durable as the OS makes it.
fn sync_dir(dir: &Path) -> Result<()> {
    match File::open(dir) {
        Ok(f) => match f.sync_all() {
            Ok(()) => Ok(()),
            // Some filesystems refuse fsync on directories; not a correctness issue for us.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Ok(()),
            Err(e) if e.raw_os_error() == Some(22) => Ok(()),
            Err(e) => Err(MorError::io(dir, e)),
        },
        Err(_) if cfg!(windows) => Ok(()),
        Err(e) => Err(MorError::io(dir, e)),
    }
}

/// Produce `path` atomically: `fill` writes a complete file at the temp path it is given; it is
/// then fsynced and renamed over `path`, and the directory fsynced. The temp file is removed on
/// failure.
pub fn write_atomic_with<F>(path: &Path, fill: F) -> Result<()>
where
    F: FnOnce(&Path) -> Result<()>,
{
    let dir = parent_dir(path);
    fs::create_dir_all(dir).map_err(|e| MorError::io(dir, e))?;
    let tmp = temp_sibling(path)?;
    let result = (|| {
        fill(&tmp)?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| MorError::io(&tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| MorError::io(path, e))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Write `bytes` to `path` atomically (temp file, fsync, rename, fsync directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = File::create(tmp).map_err(|e| MorError::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| MorError::io(tmp, e))
    })
}

/// Write `value` as pretty JSON (with a trailing newline) to `path` atomically.
pub fn write_json_atomic<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| MorError::Json {
        path: path.to_path_buf(),
        source: e,
    })?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Save named tensors as a safetensors file, atomically. `metadata` goes into the header's
/// `__metadata__` string map (e.g. to record which names alias a shared weight). Names must be
/// unique. Tensors on an accelerator are copied to the host while writing.
pub fn save_safetensors_atomic<'a, I, S>(
    path: &Path,
    tensors: I,
    metadata: Option<&HashMap<String, String>>,
) -> Result<()>
where
    I: IntoIterator<Item = (S, &'a Tensor)>,
    S: AsRef<str>,
{
    let mut items: Vec<(String, Tensor)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (name, t) in tensors {
        let name = name.as_ref().to_string();
        if !seen.insert(name.clone()) {
            return Err(MorError::checkpoint(
                path,
                format!("duplicate tensor name {name:?}"),
            ));
        }
        // candle's safetensors View copies via the host and unwraps internally, panicking on
        // the packed sub-byte dtypes: refuse those here, and make the tensor contiguous on CPU
        // so the copy cannot fail.
        if !matches!(
            t.dtype(),
            DType::U8
                | DType::U32
                | DType::I16
                | DType::I32
                | DType::I64
                | DType::BF16
                | DType::F16
                | DType::F32
                | DType::F64
                | DType::F8E4M3
        ) {
            return Err(MorError::checkpoint(
                path,
                format!(
                    "tensor {name:?} has dtype {:?}, which cannot be saved",
                    t.dtype()
                ),
            ));
        }
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        items.push((name, t));
    }
    write_atomic_with(path, |tmp| {
        safetensors::serialize_to_file(items, metadata.cloned(), tmp)
            .map_err(|e| MorError::checkpoint(tmp, format!("writing safetensors: {e}")))
    })
}

/// A loaded safetensors file: its tensors and its `__metadata__` map (empty when absent).
#[derive(Debug, Clone)]
pub struct SafetensorsFile {
    /// Tensors by name.
    pub tensors: HashMap<String, Tensor>,
    /// The header's `__metadata__` string map.
    pub metadata: HashMap<String, String>,
}

/// Load every tensor of a safetensors file onto the CPU.
pub fn load_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(read_safetensors(path, &Device::Cpu)?.tensors)
}

/// Load every tensor and the metadata of a safetensors file onto `device`. The file is
/// memory-mapped, so only the tensors' own storage is allocated. Errors name the path: missing
/// file, truncated or corrupt file, dtype candle does not support.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<SafetensorsFile> {
    let file = File::open(path).map_err(|e| MorError::io(path, e))?;
    let len = file.metadata().map_err(|e| MorError::io(path, e))?.len();
    if len < 8 {
        return Err(MorError::checkpoint(
            path,
            format!("not a safetensors file: only {len} bytes (truncated?)"),
        ));
    }
    // SAFETY: the map is read-only and dropped before returning; checkpoints are replaced by
    // rename, never rewritten in place, so the mapped file does not change under us.
    let mmap =
        unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|e| MorError::io(path, e))?;
    let corrupt = |e: safetensors::SafeTensorError| {
        MorError::checkpoint(
            path,
            format!("invalid safetensors file (truncated or corrupt?): {e}"),
        )
    };
    let (_, header) = safetensors::SafeTensors::read_metadata(&mmap).map_err(corrupt)?;
    let st = safetensors::SafeTensors::deserialize(&mmap).map_err(corrupt)?;
    let mut tensors = HashMap::with_capacity(st.len());
    for (name, view) in st.iter() {
        DType::try_from(view.dtype()).map_err(|_| {
            MorError::checkpoint(
                path,
                format!("tensor {name:?} has unsupported dtype {:?}", view.dtype()),
            )
        })?;
        let t = view
            .load(device)
            .map_err(|e| MorError::checkpoint(path, format!("loading tensor {name:?}: {e}")))?;
        tensors.insert(name.to_string(), t);
    }
    Ok(SafetensorsFile {
        tensors,
        metadata: header.metadata().clone().unwrap_or_default(),
    })
}

/// File names inside a training checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
/// Model weights.
pub const MODEL_FILE: &str = "model.safetensors";
/// Optimizer moments.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Trainer state (format owned by the trainer).
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
/// Pointer file in the run directory naming the newest complete checkpoint.
pub const LATEST_FILE: &str = "latest";

const STEP_PREFIX: &str = "step-";
const TMP_SUFFIX: &str = ".tmp";

/// Directory name of the checkpoint for `step` (`step-00001234`).
pub fn step_dir_name(step: u64) -> String {
    format!("{STEP_PREFIX}{step:08}")
}

/// Parse `step-NNNNNNNN` (complete checkpoints only, not `.tmp`).
fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(STEP_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The newest complete checkpoint of `run_dir`, or `None` if there is none (or no run dir).
/// Uses the `latest` pointer when it names an existing checkpoint; otherwise falls back to the
/// highest-numbered `step-*` directory, so a crash between rename and pointer update is harmless.
pub fn latest(run_dir: &Path) -> Option<PathBuf> {
    if let Ok(s) = fs::read_to_string(run_dir.join(LATEST_FILE)) {
        let name = s.trim();
        if parse_step_dir(name).is_some() {
            let p = run_dir.join(name);
            if p.is_dir() {
                return Some(p);
            }
        }
    }
    list_checkpoints(run_dir)
        .ok()?
        .into_iter()
        .next_back()
        .map(|(_, p)| p)
}

/// Complete checkpoints of `run_dir` as `(step, path)`, oldest first. A missing run dir is empty.
pub fn list_checkpoints(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let rd = match fs::read_dir(run_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(MorError::io(run_dir, e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| MorError::io(run_dir, e))?;
        let name = entry.file_name();
        if let Some(step) = name.to_str().and_then(parse_step_dir) {
            if entry.path().is_dir() {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Rotating training checkpoints in a run directory: `step-XXXXXXXX/` holding [`CONFIG_FILE`],
/// [`MODEL_FILE`], [`OPTIMIZER_FILE`] and [`TRAINER_STATE_FILE`], plus a [`LATEST_FILE`] pointer.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    run_dir: PathBuf,
    keep_last: usize,
}

impl CheckpointDir {
    /// Manage checkpoints under `run_dir` (created if needed), keeping the newest `keep_last`.
    pub fn new(run_dir: impl Into<PathBuf>, keep_last: usize) -> Result<Self> {
        let run_dir = run_dir.into();
        if keep_last == 0 {
            return Err(MorError::Config(
                "checkpoint keep_last must be at least 1".into(),
            ));
        }
        fs::create_dir_all(&run_dir).map_err(|e| MorError::io(&run_dir, e))?;
        Ok(Self { run_dir, keep_last })
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The newest complete checkpoint, see [`latest`].
    pub fn latest(&self) -> Option<PathBuf> {
        latest(&self.run_dir)
    }

    /// Write the checkpoint for `step`. `write` fills the directory it is given (a
    /// `step-XXXXXXXX.tmp/` staging directory) with the checkpoint files, e.g. via
    /// [`write_json_atomic`] and [`save_safetensors_atomic`]. The staging directory is then
    /// fsynced and renamed into place, `latest` updated, and checkpoints beyond the newest
    /// `keep_last` deleted. Staging directories left by a crashed save are removed first. An
    /// existing checkpoint for the same step is replaced. Returns the final directory.
    pub fn save<F>(&self, step: u64, write: F) -> Result<PathBuf>
    where
        F: FnOnce(&Path) -> Result<()>,
    {
        self.remove_stale_tmp()?;
        let name = step_dir_name(step);
        let final_dir = self.run_dir.join(&name);
        let tmp_dir = self.run_dir.join(format!("{name}{TMP_SUFFIX}"));
        fs::create_dir(&tmp_dir).map_err(|e| MorError::io(&tmp_dir, e))?;
        let staged = write(&tmp_dir).and_then(|()| sync_tree(&tmp_dir));
        if let Err(e) = staged {
            let _ = fs::remove_dir_all(&tmp_dir);
            return Err(e);
        }
        if final_dir.exists() {
            // rename(2) cannot replace a non-empty directory: move the old one aside first. A
            // crash in between leaves `latest` falling back to the previous checkpoint.
            let old = self.run_dir.join(format!("{name}.old{TMP_SUFFIX}"));
            let _ = fs::remove_dir_all(&old);
            fs::rename(&final_dir, &old).map_err(|e| MorError::io(&final_dir, e))?;
            fs::rename(&tmp_dir, &final_dir).map_err(|e| MorError::io(&final_dir, e))?;
            let _ = fs::remove_dir_all(&old);
        } else {
            fs::rename(&tmp_dir, &final_dir).map_err(|e| MorError::io(&final_dir, e))?;
        }
        sync_dir(&self.run_dir)?;
        write_atomic(
            &self.run_dir.join(LATEST_FILE),
            format!("{name}\n").as_bytes(),
        )?;
        self.prune(step)?;
        Ok(final_dir)
    }

    /// Delete all but the newest `keep_last` checkpoints, never the one just written.
    fn prune(&self, just_written: u64) -> Result<()> {
        let all = list_checkpoints(&self.run_dir)?;
        let excess = all.len().saturating_sub(self.keep_last);
        for (step, path) in all.into_iter().take(excess) {
            if step != just_written {
                fs::remove_dir_all(&path).map_err(|e| MorError::io(&path, e))?;
            }
        }
        Ok(())
    }

    /// Remove `*.tmp` staging directories left behind by an interrupted save.
    fn remove_stale_tmp(&self) -> Result<()> {
        let rd = fs::read_dir(&self.run_dir).map_err(|e| MorError::io(&self.run_dir, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| MorError::io(&self.run_dir, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(STEP_PREFIX) && name.ends_with(TMP_SUFFIX) && entry.path().is_dir()
            {
                let p = entry.path();
                fs::remove_dir_all(&p).map_err(|e| MorError::io(&p, e))?;
            }
        }
        Ok(())
    }
}

/// fsync every regular file directly in `dir`, then `dir` itself, so the checkpoint's content is
/// durable before it becomes visible under its final name.
fn sync_tree(dir: &Path) -> Result<()> {
    let rd = fs::read_dir(dir).map_err(|e| MorError::io(dir, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| MorError::io(dir, e))?;
        let p = entry.path();
        if p.is_file() {
            File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| MorError::io(&p, e))?;
        }
    }
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<(String, Tensor)> {
        vec![
            (
                "a".to_string(),
                Tensor::arange(0f32, 6.0, &Device::Cpu)
                    .unwrap()
                    .reshape((2, 3))
                    .unwrap(),
            ),
            (
                "b".to_string(),
                Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap(),
            ),
            ("s".to_string(), Tensor::new(7.5f64, &Device::Cpu).unwrap()),
        ]
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/x.json");
        write_json_atomic(&p, &serde_json::json!({"a": 1})).unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        let names: Vec<_> = fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn safetensors_roundtrip_with_metadata_and_noncontiguous() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.safetensors");
        let mut items = sample();
        let t = items[0].1.t().unwrap();
        items.push(("a_t".into(), t));
        let meta = HashMap::from([("tied.lm_head".to_string(), "embed".to_string())]);
        save_safetensors_atomic(&p, items.iter().map(|(n, t)| (n, t)), Some(&meta)).unwrap();
        let f = read_safetensors(&p, &Device::Cpu).unwrap();
        assert_eq!(f.metadata, meta);
        assert_eq!(f.tensors.len(), 4);
        assert_eq!(
            f.tensors["a_t"].to_vec2::<f32>().unwrap(),
            vec![vec![0.0, 3.0], vec![1.0, 4.0], vec![2.0, 5.0]]
        );
        assert_eq!(f.tensors["b"].to_vec1::<u32>().unwrap(), vec![1, 2, 3]);
        assert_eq!(f.tensors["s"].to_scalar::<f64>().unwrap(), 7.5);
        // A HashMap works directly too, and no metadata means an empty map.
        let map: HashMap<String, Tensor> = sample().into_iter().collect();
        save_safetensors_atomic(&p, &map, None).unwrap();
        let f = read_safetensors(&p, &Device::Cpu).unwrap();
        assert!(f.metadata.is_empty());
        assert_eq!(load_safetensors(&p).unwrap().len(), 3);
    }

    #[test]
    fn optimizer_state_survives_safetensors() {
        use crate::train::{AdamW, AdamWConfig, NamedParam};
        let w = candle_core::Var::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(
            vec![NamedParam::new("w", w.clone())],
            AdamWConfig::default(),
        )
        .unwrap();
        let g = w
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        opt.step(&g, 0.1).unwrap();
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(OPTIMIZER_FILE);
        save_safetensors_atomic(&p, &opt.state_tensors().unwrap(), None).unwrap();
        let loaded = load_safetensors(&p).unwrap();
        let mut fresh = AdamW::new(
            vec![NamedParam::new("w", w.clone())],
            AdamWConfig::default(),
        )
        .unwrap();
        fresh.load_state(&loaded, opt.step_count()).unwrap();
        let a = opt.state_tensors().unwrap();
        let b = fresh.state_tensors().unwrap();
        for k in ["w.exp_avg", "w.exp_avg_sq"] {
            assert_eq!(
                a[k].to_vec2::<f32>().unwrap(),
                b[k].to_vec2::<f32>().unwrap()
            );
        }
        assert_eq!(b["w.step"].to_scalar::<f64>().unwrap(), 1.0);
    }

    #[test]
    fn duplicate_names_rejected() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.safetensors");
        let t = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let err = save_safetensors_atomic(&p, [("x", &t), ("x", &t)], None).unwrap_err();
        assert!(err.to_string().contains("duplicate"), "{err}");
        assert!(!p.exists());
    }

    #[test]
    fn load_errors_name_the_path() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("nope.safetensors");
        let err = load_safetensors(&missing).unwrap_err();
        assert!(matches!(err, MorError::Io { .. }));
        assert!(err.to_string().contains("nope.safetensors"), "{err}");

        let p = d.path().join("m.safetensors");
        let items = sample();
        save_safetensors_atomic(&p, items.iter().map(|(n, t)| (n, t)), None).unwrap();
        let bytes = fs::read(&p).unwrap();
        for cut in [bytes.len() - 1, bytes.len() / 2, 12, 3, 0] {
            let q = d.path().join(format!("cut{cut}.safetensors"));
            fs::write(&q, &bytes[..cut]).unwrap();
            let err = load_safetensors(&q).unwrap_err();
            assert!(matches!(err, MorError::Checkpoint { .. }), "{err}");
            assert!(
                err.to_string().contains(&format!("cut{cut}.safetensors")),
                "{err}"
            );
        }
        let q = d.path().join("garbage.safetensors");
        fs::write(&q, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
        assert!(matches!(
            load_safetensors(&q).unwrap_err(),
            MorError::Checkpoint { .. }
        ));
    }

    #[test]
    fn unsupported_dtype_is_reported() {
        // Hand-build a file with a BOOL tensor, which candle cannot represent.
        let header = br#"{"flag":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[1, 0]);
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bool.safetensors");
        fs::write(&p, bytes).unwrap();
        let err = load_safetensors(&p).unwrap_err().to_string();
        assert!(
            err.contains("unsupported dtype") && err.contains("bool.safetensors"),
            "{err}"
        );
    }

    fn write_ckpt(dir: &Path, step: u64) -> Result<()> {
        write_json_atomic(&dir.join(CONFIG_FILE), &serde_json::json!({"d": 4}))?;
        let t = Tensor::full(step as f32, 3, &Device::Cpu)?;
        save_safetensors_atomic(&dir.join(MODEL_FILE), [("w", &t)], None)?;
        save_safetensors_atomic(&dir.join(OPTIMIZER_FILE), [("w.exp_avg", &t)], None)?;
        write_json_atomic(
            &dir.join(TRAINER_STATE_FILE),
            &serde_json::json!({ "step": step }),
        )
    }

    #[test]
    fn checkpoint_dir_rotation_and_latest() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("run");
        assert_eq!(latest(&run), None);
        let ck = CheckpointDir::new(&run, 2).unwrap();
        assert_eq!(ck.latest(), None);
        for step in [100, 200, 300] {
            let p = ck.save(step, |dir| write_ckpt(dir, step)).unwrap();
            assert_eq!(p, run.join(step_dir_name(step)));
            assert_eq!(ck.latest(), Some(p));
        }
        let steps: Vec<u64> = list_checkpoints(&run)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, vec![200, 300]);
        assert_eq!(
            fs::read_to_string(run.join(LATEST_FILE)).unwrap().trim(),
            "step-00000300"
        );
        let m = load_safetensors(&run.join("step-00000300").join(MODEL_FILE)).unwrap();
        assert_eq!(m["w"].to_vec1::<f32>().unwrap(), vec![300.0; 3]);

        // Re-saving an existing step replaces it.
        ck.save(300, |dir| write_ckpt(dir, 301)).unwrap();
        let m = load_safetensors(&run.join("step-00000300").join(MODEL_FILE)).unwrap();
        assert_eq!(m["w"].to_vec1::<f32>().unwrap(), vec![301.0; 3]);
        assert_eq!(list_checkpoints(&run).unwrap().len(), 2);
    }

    #[test]
    fn crash_leftovers_do_not_break_latest_and_are_cleaned() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().to_path_buf();
        let ck = CheckpointDir::new(&run, 3).unwrap();
        ck.save(10, |dir| write_ckpt(dir, 10)).unwrap();

        // Simulated crash mid-save of step 20: staging dir with a partial file.
        let tmp = run.join("step-00000020.tmp");
        fs::create_dir(&tmp).unwrap();
        fs::write(tmp.join(MODEL_FILE), b"partial").unwrap();
        assert_eq!(latest(&run), Some(run.join("step-00000010")));

        // A failing writer leaves no staging dir and does not move `latest`.
        let err = ck
            .save(20, |_| Err(MorError::Data("disk full".into())))
            .unwrap_err();
        assert!(err.to_string().contains("disk full"));
        assert!(!tmp.exists());
        assert_eq!(latest(&run), Some(run.join("step-00000010")));

        // Crash after the rename but before the pointer update: fall back to scanning.
        fs::create_dir(run.join("step-00000030")).unwrap();
        fs::write(run.join(LATEST_FILE), "step-00000099\n").unwrap();
        assert_eq!(latest(&run), Some(run.join("step-00000030")));

        fs::create_dir(&tmp).unwrap();
        ck.save(40, |dir| write_ckpt(dir, 40)).unwrap();
        assert!(!tmp.exists());
        assert_eq!(latest(&run), Some(run.join("step-00000040")));
    }
}
