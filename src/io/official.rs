//! Interoperability with the official PyTorch MoR code (raymin0223/mixture_of_recursions): its config knobs and its
//! checkpoint layouts (docs/architecture.md S9, tests/fixtures/README.md "Parameter names and sharing").
//!
//! mor's own layout is the HF Llama one (`model.layers.{ℓ}` for each distinct layer, named by the first unrolled
//! layer that uses it) plus `model.routers.{r}` / `model.router` for routers. The official code instead nests MoR
//! layers: `model.layers.{p+r}.block.{j}` (expert-choice) or `model.layers.{p}.block_list.{r}.{j}` (token-choice).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use crate::config::{Layout, ModelConfig, RouterType, RoutingKind, Sampling};
use crate::error::{MorError, Result};
use crate::io::checkpoint::io::{
    save_safetensors_atomic, write_json_atomic, CONFIG_FILE, MODEL_FILE,
};
use crate::model::params::ParamStore;
use crate::model::MorModel;

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
                    "decode_rule",
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

/// The file beside an exported `config.json` holding the official training cfg sections (`recursive`, `kv_sharing`,
/// `mor`) that the official code keeps in its Hydra config rather than in `config.json`. JSON, which YAML readers
/// (Hydra's included) accept as is.
pub const OFFICIAL_CFG_FILE: &str = "official_cfg.json";

/// The official training cfg sections of `cfg` (the inverse of [`config_from_official`]).
pub fn official_cfg(cfg: &ModelConfig) -> Result<Value> {
    let recursive = match &cfg.recursion {
        Some(r) => json!({
            "enable": true, "base_depth": null, "num_recursion": r.num_recursion,
            "sharing": snake(&r.sharing), "ln_share": true, "initialization": snake(&r.initialization),
        }),
        None => json!({ "enable": false }),
    };
    let kv_sharing = match (&cfg.kv_sharing, &cfg.recursion) {
        (Some(kv), Some(r)) => json!({
            "enable": true, "num_recursion": r.num_recursion, "sharing": snake(&r.sharing),
            "update_cache": kv.update_cache,
        }),
        _ => json!({ "enable": false }),
    };
    let mor = match &cfg.mor {
        None => json!({ "enable": false }),
        Some(m) => {
            let hidden = cfg.hidden_size * 2;
            if m.router_type != RouterType::Linear && m.router_hidden.unwrap_or(hidden) != hidden {
                return Err(MorError::Config(format!(
                    "the official code builds MLP routers {hidden} wide (2·d); this model's are {} wide",
                    m.router_hidden.unwrap_or(4 * cfg.hidden_size)
                )));
            }
            let caps: Vec<String> = cfg.capacities().iter().map(f64::to_string).collect();
            let mut out = json!({
                "enable": true, "capacity": caps.join(","), "rand_router": false,
                "router_type": snake(&m.router_type), "z_loss": m.z_loss, "z_coeff": m.z_coeff, "temp": m.temp,
            });
            match &m.routing {
                RoutingKind::Expert(e) => {
                    if e.sampling == Sampling::AuxRouter {
                        return Err(MorError::Config(
                            "exporting auxiliary routers to the official layout is not supported (no reference \
                             checkpoint fixes their names)"
                                .into(),
                        ));
                    }
                    let none_as_null = |s: String| if s == "none" { json!(null) } else { json!(s) };
                    out["type"] = json!("expert");
                    out["expert"] = json!({
                        "cap_warmup_step": e.cap_warmup_step, "router_func": none_as_null(snake(&e.router_func)),
                        "alpha": e.alpha, "sampling": none_as_null(snake(&e.sampling)), "include_first": true,
                        "coeff": e.coeff, "gating": snake(&e.gating),
                        // mor's causal rule (docs/architecture.md S5); the official code has none and ignores it.
                        "decode_rule": serde_json::to_value(e.decode_rule).map_err(|e| MorError::Config(e.to_string()))?,
                    });
                }
                RoutingKind::Token(t) => {
                    out["type"] = json!("token");
                    out["token"] = json!({
                        "bal_warmup_step": t.bal_warmup_step, "router_func": snake(&t.router_func),
                        "alpha": t.alpha, "balancing": snake(&t.balancing), "coeff": t.coeff, "u": t.u,
                        "gating": snake(&t.gating),
                    });
                }
            }
            out
        }
    };
    Ok(json!({ "recursive": recursive, "kv_sharing": kv_sharing, "mor": mor }))
}

/// Serde's snake_case name of a unit enum value, for the official cfg's strings.
fn snake<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The official name of one of mor's canonical parameter names (the inverse of `native_name`): the nested MoR
/// layout for routed models (`model.layers.{p}.block.{j}` / `block_list.0.{j}`, routers under `mor_router`), the
/// flat one otherwise.
fn official_name(name: &str, cfg: &ModelConfig) -> Result<String> {
    let layout = cfg.layout();
    let token = cfg.token_choice().is_some();
    if cfg.mor.is_none() {
        return Ok(name.to_string());
    }
    let (p, bd, n_r) = (layout.prefix, layout.base_depth, layout.num_recursion);
    let last = layout.num_layers() - 1;
    if let Some(rest) = name.strip_prefix("model.routers.") {
        let (r, x) = rest.split_once('.').unwrap_or((rest, ""));
        let r: usize = r
            .parse()
            .map_err(|_| MorError::Config(format!("tensor name {name}")))?;
        return Ok(format!("model.layers.{}.mor_router.router.{x}", p + r));
    }
    if let Some(x) = name.strip_prefix("model.router.") {
        return Ok(format!("model.layers.{p}.mor_router.router.{x}"));
    }
    if name == crate::model::token_choice::BIAS_NAME {
        return Ok(format!("model.layers.{p}.router_bias"));
    }
    if name.starts_with("model.aux_routers.") {
        return Err(MorError::Config(format!(
            "{name}: auxiliary routers have no official name"
        )));
    }
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return Ok(name.to_string());
    };
    let (idx, tail) = rest
        .split_once('.')
        .ok_or_else(|| MorError::Config(format!("tensor name {name}")))?;
    let idx: usize = idx
        .parse()
        .map_err(|_| MorError::Config(format!("tensor name {name}")))?;
    Ok(if idx < p {
        name.to_string()
    } else if idx < p + bd {
        let j = idx - p;
        if token {
            format!("model.layers.{p}.block_list.0.{j}.{tail}")
        } else {
            format!("model.layers.{p}.block.{j}.{tail}")
        }
    } else if idx == last {
        format!(
            "model.layers.{}.{tail}",
            if token { p + 1 } else { p + n_r }
        )
    } else {
        return Err(MorError::Config(format!(
            "{name}: not a layer of the official layout"
        )));
    })
}

/// Write `model` in the official code's layout to `dir`: `config.json` with the Llama fields (and the `kv_sharing`
/// dict the official code adds there), `model.safetensors` with one tensor per distinct parameter under its first
/// official name (recursive models without routing also store the LM head, as the official recursive class never
/// ties it), and [`OFFICIAL_CFG_FILE`] with the `recursive` / `kv_sharing` / `mor` cfg sections. Each file is
/// written atomically.
pub fn export_official(model: &MorModel, dir: &Path) -> Result<()> {
    let cfg = model.config();
    let sections = official_cfg(cfg)?;
    let mut config = serde_json::to_value(cfg).map_err(|e| MorError::Config(e.to_string()))?;
    let obj = config
        .as_object_mut()
        .ok_or_else(|| MorError::Config("config is not an object".into()))?;
    for k in ["recursion", "mor", "kv_sharing"] {
        obj.remove(k);
    }
    if cfg.kv_sharing.is_some() {
        let mut kv = sections["kv_sharing"].clone();
        kv["base_depth"] = json!(cfg.layout().base_depth);
        obj.insert("kv_sharing".into(), kv);
    }
    obj.insert(
        "architectures".into(),
        json!([if cfg.mor.is_some() {
            "MoRLlamaForCausalLM"
        } else {
            "LlamaForCausalLM"
        }]),
    );
    obj.insert("model_type".into(), json!("llama"));
    let mut tensors = std::collections::BTreeMap::new();
    for (name, t) in model.params().tensors() {
        tensors.insert(official_name(&name, cfg)?, t);
    }
    if cfg.recursion.is_some() && cfg.mor.is_none() && cfg.tie_word_embeddings {
        let embed = tensors
            .get("model.embed_tokens.weight")
            .cloned()
            .ok_or_else(|| MorError::Config("model has no embedding".into()))?;
        tensors.insert("lm_head.weight".into(), embed);
    }
    std::fs::create_dir_all(dir).map_err(|e| MorError::io(dir, e))?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    save_safetensors_atomic(&dir.join(MODEL_FILE), tensors.iter(), Some(&meta))?;
    write_json_atomic(&dir.join(OFFICIAL_CFG_FILE), &sections)?;
    write_json_atomic(&dir.join(CONFIG_FILE), &config)
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
