//! Interoperability with the official PyTorch MoR code (raymin0223/mixture_of_recursions): its config knobs and its
//! checkpoint layouts (spec §7, shared/fixtures/README.md "Parameter names and sharing").
//!
//! mor's own layout is the HF Llama one (`model.layers.{ℓ}` for each distinct layer, named by the first unrolled
//! layer that uses it) plus `model.routers.{r}` / `model.router` for routers. The official code instead nests MoR
//! layers: `model.layers.{p+r}.block.{j}` (expert-choice) or `model.layers.{p}.block_list.{r}.{j}` (token-choice).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use crate::config::{Layout, ModelConfig};
use crate::error::{MorError, Result};
use crate::model::params::ParamStore;

/// Build a mor config from an official `config.json` (Llama fields, possibly a `kv_sharing` dict) and the official
/// training cfg (`recursive`, `kv_sharing`, `mor` sections, as in the fixtures' `meta.json`).
pub fn config_from_official(config_json: &Value, cfg: Option<&Value>) -> Result<ModelConfig> {
    let mut c = config_json.clone();
    let obj = c
        .as_object_mut()
        .ok_or_else(|| MorError::Config("config.json is not a JSON object".into()))?;
    let kv_in_config = obj.remove("kv_sharing");
    let get = |v: Option<&Value>, k: &str| v.and_then(|v| v.get(k)).cloned();
    let rec = get(cfg, "recursive");
    if let Some(rec) = rec.filter(|r| r.get("enable") == Some(&json!(true))) {
        let mut r = json!({ "num_recursion": rec["num_recursion"], "sharing": rec["sharing"] });
        if let Some(init) = rec.get("initialization") {
            r["initialization"] = init.clone();
        }
        obj.insert("recursion".into(), r);
    }
    let kv = get(cfg, "kv_sharing").or(kv_in_config);
    if let Some(kv) = kv.filter(|k| k.get("enable") == Some(&json!(true))) {
        obj.insert(
            "kv_sharing".into(),
            json!({ "update_cache": kv.get("update_cache").cloned().unwrap_or(json!(false)) }),
        );
    }
    if let Some(mor) = get(cfg, "mor").filter(|m| m.get("enable") == Some(&json!(true))) {
        obj.insert("mor".into(), mor_section(&mor)?);
    }
    let text = serde_json::to_string(&c).map_err(|e| MorError::Config(e.to_string()))?;
    ModelConfig::from_json(&text)
}

/// Translate the official `mor` section to mor's.
fn mor_section(m: &Value) -> Result<Value> {
    let ty = m.get("type").and_then(Value::as_str).unwrap_or("expert");
    let mut out = json!({
        "router_type": m.get("router_type").cloned().unwrap_or(json!("linear")),
        "temp": m.get("temp").cloned().unwrap_or(json!(1.0)),
        "z_loss": m.get("z_loss").cloned().unwrap_or(json!(false)),
        "z_coeff": m.get("z_coeff").cloned().unwrap_or(json!(1e-5)),
    });
    let copy = |src: &Value, keys: &[&str]| -> Value {
        let mut o = serde_json::Map::new();
        for k in keys {
            if let Some(v) = src.get(*k).filter(|v| !v.is_null()) {
                o.insert((*k).to_string(), v.clone());
            }
        }
        Value::Object(o)
    };
    match ty {
        "expert" => {
            let e = m.get("expert").cloned().unwrap_or(json!({}));
            let mut ec = copy(
                &e,
                &[
                    "router_func",
                    "alpha",
                    "sampling",
                    "coeff",
                    "gating",
                    "cap_warmup_step",
                ],
            );
            if e.get("router_func").is_some_and(Value::is_null) {
                ec["router_func"] = json!("none");
            }
            if e.get("sampling").is_some_and(Value::is_null) {
                ec["sampling"] = json!("none");
            }
            if let Some(cap) = m.get("capacity").and_then(Value::as_str) {
                let caps: std::result::Result<Vec<f64>, _> =
                    cap.split(',').map(|s| s.trim().parse::<f64>()).collect();
                ec["capacity"] = json!(
                    caps.map_err(|e| MorError::Config(format!("mor.capacity {cap:?}: {e}")))?
                );
            }
            out["routing"] = json!({ "expert": ec });
        }
        "token" => {
            let t = m.get("token").cloned().unwrap_or(json!({}));
            let tc = copy(
                &t,
                &[
                    "router_func",
                    "alpha",
                    "balancing",
                    "coeff",
                    "u",
                    "bal_warmup_step",
                    "gating",
                ],
            );
            out["routing"] = json!({ "token": tc });
        }
        other => {
            return Err(MorError::Config(format!(
                "mor.type {other:?}: expected expert or token"
            )))
        }
    }
    Ok(out)
}

/// Map an official parameter name to mor's canonical name (`None` for names mor does not hold).
fn native_name(name: &str, layout: &Layout, token_choice: bool) -> Option<String> {
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return Some(name.to_string());
    };
    let (idx, tail) = rest.split_once('.')?;
    let idx: usize = idx.parse().ok()?;
    let p = layout.prefix;
    let n_r = layout.num_recursion;
    let last_unrolled = layout.num_layers() - 1;
    let canonical = |unrolled: usize| layout.source[unrolled];
    if let Some(b) = tail.strip_prefix("block.") {
        // Expert-choice: model.layers.{p+r}.block.{j}.X is unrolled layer p + j + r·base_depth.
        let (j, x) = b.split_once('.')?;
        let r = idx.checked_sub(p)?;
        let u = p + j.parse::<usize>().ok()? + r * layout.base_depth;
        return Some(format!("model.layers.{}.{x}", canonical(u)));
    }
    if let Some(b) = tail.strip_prefix("block_list.") {
        let (r, rest) = b.split_once('.')?;
        let (j, x) = rest.split_once('.')?;
        let u = p + j.parse::<usize>().ok()? + r.parse::<usize>().ok()? * layout.base_depth;
        return Some(format!("model.layers.{}.{x}", canonical(u)));
    }
    if let Some(x) = tail.strip_prefix("mor_router.") {
        if token_choice {
            return Some(match x {
                "router_bias" => crate::model::token_choice::BIAS_NAME.to_string(),
                _ => format!("model.{x}"),
            });
        }
        return Some(format!(
            "model.routers.{}.{}",
            idx - p,
            x.strip_prefix("router.")?
        ));
    }
    if tail == "router_bias" {
        return Some(crate::model::token_choice::BIAS_NAME.to_string());
    }
    // Unique layers. In nested (MoR) layouts the module after the recursions is the last unrolled layer.
    let nested_last = if token_choice { p + 1 } else { p + n_r };
    let u = if layout.base_depth > 0 && idx == nested_last && idx != last_unrolled {
        last_unrolled
    } else {
        idx
    };
    Some(format!(
        "model.layers.{}.{tail}",
        canonical(u.min(last_unrolled))
    ))
}

/// mor's canonical name for each official parameter name of one checkpoint (the set decides whether the layout
/// is the nested MoR one). Errors on a name that fits neither layout.
pub fn native_names(names: &[&String], cfg: &ModelConfig) -> Result<Vec<String>> {
    let layout = cfg.layout();
    let nested = is_nested(names);
    let token = cfg.token_choice().is_some();
    names
        .iter()
        .map(|n| {
            if nested {
                native_name(n, &layout, token)
            } else {
                Some((*n).clone())
            }
            .ok_or_else(|| MorError::Config(format!("unrecognised tensor name {n}")))
        })
        .collect()
}

/// Whether a checkpoint uses the official nested MoR layout.
fn is_nested(names: &[&String]) -> bool {
    names
        .iter()
        .any(|n| n.contains(".block.") || n.contains(".block_list.") || n.contains("mor_router"))
}

/// Load the weights of an official checkpoint `model.safetensors` for `cfg` into a parameter store. Aliased copies
/// of shared weights are accepted; a head stored under `lm_head.weight` makes the model untied (the official
/// recursive class never ties it, whatever the config says). Returns the config adjusted for that.
pub fn load_official_weights(
    path: &Path,
    cfg: &ModelConfig,
    device: &Device,
) -> Result<(ModelConfig, ParamStore)> {
    let tensors = candle_core::safetensors::load(path, device)
        .map_err(|e| MorError::checkpoint(path, format!("cannot read safetensors: {e}")))?;
    let mut cfg = cfg.clone();
    let names: Vec<&String> = tensors.keys().collect();
    let natives =
        native_names(&names, &cfg).map_err(|e| MorError::checkpoint(path, e.to_string()))?;
    let mut mapped: HashMap<String, (String, Tensor)> = HashMap::new();
    for (name, native) in names.iter().zip(natives) {
        let t = &tensors[*name];
        let name = (*name).clone();
        if let Some((first, prev)) = mapped.get(&native) {
            // An alias stored as its own copy must equal the canonical tensor.
            let diff = (prev - t)?.abs()?.max_all()?.to_scalar::<f32>()?;
            if diff != 0.0 {
                return Err(MorError::checkpoint(
                    path,
                    format!("{name} and {first} should share weights but differ by {diff}"),
                ));
            }
            continue;
        }
        mapped.insert(native, (name, t.clone()));
    }
    if mapped.contains_key("lm_head.weight") {
        let tied_copy = match (
            mapped.get("lm_head.weight"),
            mapped.get("model.embed_tokens.weight"),
        ) {
            (Some((_, h)), Some((_, e))) => {
                h.dims() == e.dims() && (h - e)?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0
            }
            _ => false,
        };
        if tied_copy {
            mapped.remove("lm_head.weight");
            cfg.tie_word_embeddings = true;
        } else {
            cfg.tie_word_embeddings = false;
        }
    }
    let mut store = ParamStore::new(device, 0);
    for (native, (_, t)) in &mapped {
        store.insert(native, t)?;
    }
    Ok((cfg, store))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: Value) -> ModelConfig {
        let mut j = json!({"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
            "recursion": {"sharing": "middle_cycle", "num_recursion": 3}});
        for (k, v) in extra.as_object().unwrap() {
            j[k] = v.clone();
        }
        ModelConfig::from_json(&j.to_string()).unwrap()
    }

    #[test]
    fn nested_names_map_to_canonical_layers() {
        let c = cfg(json!({"mor": {"routing": {"expert": {}}}}));
        let l = c.layout();
        let m = |n: &str| native_name(n, &l, false).unwrap();
        assert_eq!(
            m("model.layers.0.mlp.up_proj.weight"),
            "model.layers.0.mlp.up_proj.weight"
        );
        assert_eq!(
            m("model.layers.1.block.1.mlp.up_proj.weight"),
            "model.layers.2.mlp.up_proj.weight"
        );
        assert_eq!(
            m("model.layers.3.block.0.mlp.up_proj.weight"),
            "model.layers.1.mlp.up_proj.weight"
        );
        assert_eq!(
            m("model.layers.2.mor_router.router.weight"),
            "model.routers.1.weight"
        );
        assert_eq!(
            m("model.layers.3.mor_router.router.0.weight"),
            "model.routers.2.0.weight"
        );
        assert_eq!(
            m("model.layers.4.input_layernorm.weight"),
            "model.layers.7.input_layernorm.weight"
        );
        let t = cfg(json!({"mor": {"routing": {"token": {}}}}));
        let l = t.layout();
        let m = |n: &str| native_name(n, &l, true).unwrap();
        assert_eq!(
            m("model.layers.1.block_list.2.1.mlp.up_proj.weight"),
            "model.layers.2.mlp.up_proj.weight"
        );
        assert_eq!(
            m("model.layers.1.mor_router.router.weight"),
            "model.router.weight"
        );
        assert_eq!(
            m("model.layers.1.mor_router.router_bias"),
            "model.router_bias"
        );
        assert_eq!(
            m("model.layers.2.mlp.up_proj.weight"),
            "model.layers.7.mlp.up_proj.weight"
        );
    }
}
