//! Model checkpoints in the Hugging Face layout: `config.json` + `model.safetensors` (or a sharded
//! `model.safetensors.index.json`). Shared weights are stored once under their canonical name; the safetensors
//! metadata lists every alias (unrolled layer → canonical layer) so other tools can rebuild the unrolled view.
//!
//! Loading accepts mor's own checkpoints, plain HF Llama directories and the official MoR code's layouts
//! (nested `block.{j}` / `block_list.{r}.{j}` names, aliases stored as copies, an untied `lm_head`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::config::ModelConfig;
use crate::error::{MorError, Result};
use crate::io::checkpoint::io::{save_safetensors_atomic, write_json_atomic};
use crate::io::checkpoint::io::{CONFIG_FILE, MODEL_FILE};
use crate::io::official::{config_from_official, load_official_weights, OFFICIAL_CFG_FILE};
use crate::model::params::ParamStore;
use crate::model::MorModel;

/// Unrolled-layer aliases of shared weights: `model.layers.{ℓ}` → `model.layers.{canonical}` for every unrolled
/// layer ℓ whose weights live under another layer's name.
pub fn layer_aliases(cfg: &ModelConfig) -> BTreeMap<String, String> {
    cfg.layout()
        .source
        .iter()
        .enumerate()
        .filter(|(l, s)| *l != **s)
        .map(|(l, s)| (format!("model.layers.{l}"), format!("model.layers.{s}")))
        .collect()
}

/// Write `model` to `dir` (created if needed): config.json and model.safetensors, each atomically.
pub fn save_model(dir: &Path, model: &MorModel) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| MorError::io(dir, e))?;
    let mut cfg = serde_json::to_value(model.config()).map_err(|e| MorError::Json {
        path: dir.join(CONFIG_FILE),
        source: e,
    })?;
    cfg["architectures"] = serde_json::json!(["MorForCausalLM"]);
    cfg["model_type"] = serde_json::json!("llama");
    write_json_atomic(&dir.join(CONFIG_FILE), &cfg)?;
    let tensors = model.params().tensors();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(
        "mor_aliases".to_string(),
        serde_json::to_string(&layer_aliases(model.config())).unwrap_or_default(),
    );
    save_safetensors_atomic(&dir.join(MODEL_FILE), tensors.iter(), Some(&meta))
}

/// Read a config.json written by mor, by HF transformers (Llama) or by the official MoR code.
pub fn load_config(path: &Path) -> Result<ModelConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| MorError::io(path, e))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| MorError::Json {
        path: path.into(),
        source: e,
    })?;
    let official_kv = value
        .get("kv_sharing")
        .is_some_and(|k| k.get("enable").is_some());
    let res = if official_kv {
        config_from_official(&value, None)
    } else {
        ModelConfig::from_json(&text)
    };
    res.map_err(|e| match e {
        MorError::Config(m) => MorError::Config(format!("{}: {m}", path.display())),
        other => other,
    })
}

/// The weight files of a checkpoint directory: model.safetensors, or the shards named by its index.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(MODEL_FILE);
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Err(MorError::checkpoint(
            dir,
            "no model.safetensors or model.safetensors.index.json",
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| MorError::io(&index, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| MorError::Json {
        path: index.clone(),
        source: e,
    })?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| MorError::checkpoint(&index, "no weight_map object"))?;
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(Value::as_str)
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Load a model from a checkpoint directory (config.json + weights) onto `device`. Every tensor the config needs
/// must be present with the right shape, and no unexpected tensor may be present; errors name the tensor.
pub fn load_model(dir: &Path, device: &Device) -> Result<MorModel> {
    load_model_with_config(dir, &load_dir_config(dir)?, device)
}

/// The config of a checkpoint directory: its config.json, completed by the official training cfg sections when the
/// directory is an official-layout export ([`OFFICIAL_CFG_FILE`]).
pub fn load_dir_config(dir: &Path) -> Result<ModelConfig> {
    let official = dir.join(OFFICIAL_CFG_FILE);
    if !official.exists() {
        return load_config(&dir.join(CONFIG_FILE));
    }
    let read = |p: &Path| -> Result<Value> {
        let text = std::fs::read_to_string(p).map_err(|e| MorError::io(p, e))?;
        serde_json::from_str(&text).map_err(|e| MorError::Json {
            path: p.into(),
            source: e,
        })
    };
    config_from_official(&read(&dir.join(CONFIG_FILE))?, Some(&read(&official)?))
        .map_err(|e| MorError::checkpoint(dir, e.to_string()))
}

/// Load weights from `dir` for an explicitly given config (e.g. the official code's MoR settings from its
/// training config).
pub fn load_model_with_config(dir: &Path, cfg: &ModelConfig, device: &Device) -> Result<MorModel> {
    let files = weight_files(dir)?;
    let mut cfg = cfg.clone();
    let mut store = ParamStore::new(device, 0);
    for f in &files {
        let (c, part) = load_official_weights(f, &cfg, device)?;
        if files.len() == 1 || part.get("lm_head.weight").is_some() {
            cfg = c;
        }
        for (name, var) in part.iter() {
            store.insert(name, var.as_tensor())?;
        }
    }
    MorModel::from_params(&cfg, store).map_err(|e| match e {
        MorError::Config(m) => MorError::checkpoint(dir, m),
        other => other,
    })
}

/// All tensors of a checkpoint's weight files by name (for inspection and comparisons).
pub fn load_tensors(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for f in weight_files(dir)? {
        out.extend(crate::io::checkpoint::io::load_safetensors(&f)?);
    }
    Ok(out)
}
