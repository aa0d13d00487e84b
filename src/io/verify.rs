//! `mor verify`: run a model on a reference directory made with the official PyTorch code (the format of
//! tests/fixtures, see its README) and report the largest deviation of every quantity it holds.
//!
//! Tolerances are the fixtures README's suggestions for float32: logits, hidden states, losses and gates within
//! 1e-5 absolute; gradients within 1e-4 of each tensor's largest magnitude; routing decisions exact.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use serde_json::Value;

use crate::error::{MorError, Result};
use crate::io::official::{config_from_official, load_official_weights, native_names};
use crate::model::expert_choice::{bce_with_logits_sum, sampling_accuracy};
use crate::model::{ForwardOptions, MorModel, RoutingTrace};

/// Absolute tolerance for logits, hidden states, losses, probabilities and gates.
pub const ATOL: f64 = 1e-5;
/// Gradient tolerance relative to each tensor's largest |grad|.
pub const GRAD_RTOL: f64 = 1e-4;

/// How a quantity is compared.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Check {
    /// max |Δ| ≤ tolerance.
    Abs(f64),
    /// max |Δ| ≤ tolerance · max |reference|.
    RelToMax(f64),
    /// Integers: must be equal.
    Exact,
}

/// One compared quantity.
#[derive(Debug, Clone)]
pub struct Deviation {
    /// Name as in the reference files.
    pub name: String,
    /// Largest absolute difference (for `Exact`: number of differing entries).
    pub max_abs: f64,
    /// Largest |reference| (scale for relative checks).
    pub ref_scale: f64,
    /// The rule applied.
    pub check: Check,
}

impl Deviation {
    /// Whether the deviation is within tolerance.
    pub fn ok(&self) -> bool {
        match self.check {
            Check::Abs(t) => self.max_abs <= t,
            Check::RelToMax(t) => self.max_abs <= t * self.ref_scale.max(f64::MIN_POSITIVE),
            Check::Exact => self.max_abs == 0.0,
        }
    }
}

/// The result of verifying one reference directory.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// Variant description.
    pub variant: String,
    /// Every compared quantity.
    pub rows: Vec<Deviation>,
}

impl VerifyReport {
    /// True if every quantity is within tolerance.
    pub fn passed(&self) -> bool {
        self.rows.iter().all(Deviation::ok)
    }

    /// The row called `name`, if compared.
    pub fn row(&self, name: &str) -> Option<&Deviation> {
        self.rows.iter().find(|r| r.name == name)
    }

    /// A fixed-width table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{}\n{:<48} {:>12} {:>12}  {}\n",
            self.variant, "quantity", "max |Δ|", "scale", "ok"
        );
        for r in &self.rows {
            let rule = match r.check {
                Check::Abs(t) => format!("abs ≤ {t:e}"),
                Check::RelToMax(t) => format!("≤ {t:e}·scale"),
                Check::Exact => "exact".into(),
            };
            s.push_str(&format!(
                "{:<48} {:>12.3e} {:>12.3e}  {} ({rule})\n",
                r.name,
                r.max_abs,
                r.ref_scale,
                if r.ok() { "yes" } else { "NO" }
            ));
        }
        s
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| MorError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| MorError::Json {
        path: path.into(),
        source: e,
    })
}

fn compare(
    rows: &mut Vec<Deviation>,
    name: &str,
    ours: &Tensor,
    reference: &Tensor,
    check: Check,
) -> Result<()> {
    let a = ours.to_dtype(DType::F64)?.flatten_all()?;
    let b = reference.to_dtype(DType::F64)?.flatten_all()?;
    if a.dims() != b.dims() {
        return Err(MorError::Config(format!(
            "{name}: {} values here, {} in the reference",
            a.elem_count(),
            b.elem_count()
        )));
    }
    let max_abs = if check == Check::Exact {
        a.ne(&b)?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?
    } else {
        (&a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?
    };
    let ref_scale = b.abs()?.max_all()?.to_scalar::<f64>()?;
    rows.push(Deviation {
        name: name.to_string(),
        max_abs,
        ref_scale,
        check,
    });
    Ok(())
}

fn ints(v: &[u32], shape: &[usize], dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(v.to_vec(), shape, dev)?.to_dtype(DType::I64)?)
}

/// The model of a reference directory: `checkpoint/` in the official layout, with the training cfg from
/// `meta.json`.
pub fn load_reference_model(dir: &Path) -> Result<MorModel> {
    let meta = read_json(&dir.join("meta.json"))?;
    let ckpt = dir.join("checkpoint");
    let config_json = read_json(&ckpt.join("config.json"))?;
    let cfg = config_from_official(&config_json, meta.get("cfg"))?;
    let (cfg, store) = load_official_weights(&ckpt.join("model.safetensors"), &cfg, &Device::Cpu)?;
    MorModel::from_params(&cfg, store)
}

/// Verify the reference directory `dir` (meta.json, checkpoint/, tensors.safetensors, grads.safetensors).
pub fn verify_reference(dir: &Path) -> Result<VerifyReport> {
    let dev = Device::Cpu;
    let meta = read_json(&dir.join("meta.json"))?;
    let model = load_reference_model(dir)?;
    let cfg = model.config().clone();
    let tpath = dir.join("tensors.safetensors");
    let reference = candle_core::safetensors::load(&tpath, &dev)
        .map_err(|e| MorError::checkpoint(&tpath, e.to_string()))?;
    let get = |k: &str| -> Result<&Tensor> {
        reference
            .get(k)
            .ok_or_else(|| MorError::checkpoint(&tpath, format!("missing tensor {k}")))
    };
    let ids = get("input_ids")?.to_dtype(DType::U32)?;
    let (b, t) = ids.dims2()?;
    let mut rows = Vec::new();

    // Eval-mode forward: logits and hidden states.
    let eval = model.forward(
        &ids,
        &ForwardOptions {
            hidden_states: true,
            ..ForwardOptions::eval()
        },
    )?;
    compare(
        &mut rows,
        "logits",
        &eval.logits,
        get("logits")?,
        Check::Abs(ATOL),
    )?;
    for (i, h) in eval.hidden_states.iter().enumerate() {
        if let Some(r) = reference.get(&format!("hidden_states.{i}")) {
            compare(
                &mut rows,
                &format!("hidden_states.{i}"),
                h,
                r,
                Check::Abs(ATOL),
            )?;
        }
    }

    // Train-mode forward: losses, routing, gradients.
    let out = model.forward(&ids, &ForwardOptions::train(0))?;
    let num_items = meta
        .get("num_items_in_batch")
        .and_then(Value::as_u64)
        .map_or(b * t, |n| n as usize);
    let loss = model.loss(&out, &ids, num_items)?;
    let scalar = |x: &Tensor| -> Result<Tensor> { Ok(x.to_dtype(DType::F32)?) };
    compare(
        &mut rows,
        "loss.lm_loss",
        &scalar(&loss.lm)?,
        get("loss.lm_loss")?,
        Check::Abs(ATOL),
    )?;
    let mean = (&loss.ce_sum / loss.n_targets as f64)?;
    compare(
        &mut rows,
        "loss.lm_loss_eval_mean",
        &mean,
        get("loss.lm_loss_eval_mean")?,
        Check::Abs(ATOL),
    )?;
    compare(
        &mut rows,
        "loss.total_loss",
        &loss.total,
        get("loss.total_loss")?,
        Check::Abs(ATOL),
    )?;
    let l = &out.router_losses;
    for (name, ours) in [
        ("loss.sampling_loss", &l.sampling),
        ("loss.balancing_loss", &l.balancing),
        ("loss.router_z_loss", &l.z),
    ] {
        if let (Some(o), Some(r)) = (ours, reference.get(name)) {
            compare(&mut rows, name, o, r, Check::Abs(ATOL))?;
        }
    }
    match &out.routing {
        RoutingTrace::Expert(steps) => {
            for (r, s) in steps.iter().enumerate() {
                let nc = s.candidates.n_max();
                let ns = s.selected.n_max();
                let cand: Vec<u32> = s.candidates.rows.iter().flatten().copied().collect();
                let sel: Vec<u32> = s.selected.rows.iter().flatten().copied().collect();
                let local: Vec<u32> = s
                    .chosen
                    .chunks(nc.max(1))
                    .flat_map(|row| (0..row.len() as u32).filter(|&i| row[i as usize]))
                    .collect();
                let p = format!("routing.r{r}");
                compare(
                    &mut rows,
                    &format!("{p}.candidates"),
                    &ints(&cand, &[b, nc], &dev)?,
                    get(&format!("{p}.candidates"))?,
                    Check::Exact,
                )?;
                compare(
                    &mut rows,
                    &format!("{p}.selected"),
                    &ints(&sel, &[b, ns], &dev)?,
                    get(&format!("{p}.selected"))?,
                    Check::Exact,
                )?;
                compare(
                    &mut rows,
                    &format!("{p}.selected_local"),
                    &ints(&local, &[b, ns], &dev)?,
                    get(&format!("{p}.selected_local"))?,
                    Check::Exact,
                )?;
                compare(
                    &mut rows,
                    &format!("{p}.router_logits"),
                    &s.logits,
                    get(&format!("{p}.router_logits"))?,
                    Check::Abs(ATOL),
                )?;
                compare(
                    &mut rows,
                    &format!("{p}.router_probs"),
                    &s.probs,
                    get(&format!("{p}.router_probs"))?,
                    Check::Abs(ATOL),
                )?;
                compare(
                    &mut rows,
                    &format!("{p}.gates"),
                    &s.gates,
                    get(&format!("{p}.gates"))?,
                    Check::Abs(ATOL),
                )?;
                let name = format!("loss.sampling_loss.r{r}");
                if let Some(refl) = reference.get(&name) {
                    let targets: Vec<f32> =
                        s.chosen.iter().map(|&c| f32::from(u8::from(c))).collect();
                    let targets = Tensor::from_vec(targets, s.chosen.len(), &dev)?;
                    let bce = (bce_with_logits_sum(&s.logits, &targets)? / s.chosen.len() as f64)?;
                    compare(&mut rows, &name, &bce, refl, Check::Abs(ATOL))?;
                }
            }
            if let Some(r) = reference.get("metric.sampling_acc") {
                let acc = Tensor::new(sampling_accuracy(steps)? as f32, &dev)?;
                compare(&mut rows, "metric.sampling_acc", &acc, r, Check::Abs(ATOL))?;
            }
        }
        RoutingTrace::Token(tr) => {
            let n_r = cfg.num_recursion();
            compare(
                &mut rows,
                "routing.expert_index",
                &ints(&tr.expert, &[b, t], &dev)?,
                get("routing.expert_index")?,
                Check::Exact,
            )?;
            compare(
                &mut rows,
                "routing.router_logits",
                &tr.logits.reshape((b, t, n_r))?,
                get("routing.router_logits")?,
                Check::Abs(ATOL),
            )?;
            compare(
                &mut rows,
                "routing.router_probs",
                &tr.probs.reshape((b, t, n_r))?,
                get("routing.router_probs")?,
                Check::Abs(ATOL),
            )?;
            compare(
                &mut rows,
                "routing.gate",
                &tr.gate.reshape((b, t))?,
                get("routing.gate")?,
                Check::Abs(ATOL),
            )?;
            let ratio: Vec<f32> = tr
                .counts
                .iter()
                .map(|&c| c as f32 / (b * t) as f32)
                .collect();
            compare(
                &mut rows,
                "balancing_ratio",
                &Tensor::from_vec(ratio, n_r, &dev)?,
                get("balancing_ratio")?,
                Check::Abs(ATOL),
            )?;
        }
        RoutingTrace::None => {}
    }

    // Gradients of the total loss, by official canonical name.
    let gpath = dir.join("grads.safetensors");
    if gpath.exists() {
        let grads_ref = candle_core::safetensors::load(&gpath, &dev)
            .map_err(|e| MorError::checkpoint(&gpath, e.to_string()))?;
        let grads = loss.total.backward()?;
        let names: Vec<&String> = grads_ref.keys().collect();
        let natives = native_names(&names, &cfg)?;
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        for (name, native) in names.iter().zip(natives) {
            if seen.insert(native.clone(), (*name).clone()).is_some() {
                continue;
            }
            let var = model.params().get(&native).ok_or_else(|| {
                MorError::Config(format!(
                    "reference gradient {name}: no parameter {native} here"
                ))
            })?;
            let ours = match grads.get(var.as_tensor()) {
                Some(g) => g.clone(),
                None => var.as_tensor().zeros_like()?,
            };
            compare(
                &mut rows,
                &format!("grad.{name}"),
                &ours,
                &grads_ref[*name],
                Check::RelToMax(GRAD_RTOL),
            )?;
        }
    }

    // Loss-free balancing: the bias update after one step and the routing it then gives.
    if let (Some(before), Some(after)) = (
        reference.get("loss_free.router_bias_before"),
        reference.get("loss_free.router_bias_after"),
    ) {
        if let RoutingTrace::Token(tr) = &out.routing {
            let bias_name = crate::model::token_choice::BIAS_NAME;
            let bias = model
                .params()
                .get(bias_name)
                .ok_or_else(|| MorError::Config("model has no router bias".into()))?;
            compare(
                &mut rows,
                "loss_free.router_bias_before",
                bias.as_tensor(),
                before,
                Check::Abs(ATOL),
            )?;
            model.update_balancing_bias(&tr.counts, 0)?;
            compare(
                &mut rows,
                "loss_free.router_bias_after",
                bias.as_tensor(),
                after,
                Check::Abs(ATOL),
            )?;
            if let Some(idx_after) = reference.get("loss_free.expert_index_after_update") {
                let scores = tr.probs.broadcast_add(bias.as_tensor())?;
                let e: Vec<u32> = scores.argmax(D::Minus1)?.to_vec1()?;
                compare(
                    &mut rows,
                    "loss_free.expert_index_after_update",
                    &ints(&e, &[b, t], &dev)?,
                    idx_after,
                    Check::Exact,
                )?;
            }
        }
    }
    Ok(VerifyReport {
        variant: format!(
            "{} ({})",
            meta.get("name")
                .and_then(Value::as_str)
                .unwrap_or("reference"),
            cfg.variant_name()
        ),
        rows,
    })
}
