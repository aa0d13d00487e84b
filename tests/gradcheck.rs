//! Finite-difference gradient checks in f64, independent of the PyTorch fixtures.
//!
//! candle's CPU autograd silently drops gradients of its fused ops and returns wrong ones for `scatter`
//! (docs/architecture.md S10), so every op and composed function the model uses, and the whole model in each
//! of its variants, is checked here against central differences:
//!
//! * op level: a random projection `Σ f(x) ⊙ w` (fixed random w) is differentiated w.r.t. every input and
//!   parameter; relative error ≤ 1e-6;
//! * model level: `loss.total` of tiny f64 models (vanilla, recursive with each sharing, MoR expert- and
//!   token-choice in their variants, recursive KV sharing) w.r.t. a few entries of every parameter tensor
//!   (always including the entry with the largest gradient); relative error ≤ 1e-5. Routing is discrete, so every
//!   perturbed forward must reproduce the unperturbed routing (otherwise the entry is retried with a smaller step or
//!   skipped, and at most a few entries may be skipped);
//! * shared weights: a recursive model holds one parameter per unique layer, and the gradient of a shared weight
//!   equals the sum of the gradients of its uses (checked against an untied vanilla copy of the unrolled model).
//!
//! The relative error of an entry is |g_ad − g_fd| / max(|g_fd|, floor), where the floor is 1e-3 × the largest
//! |gradient| of that tensor (so entries whose gradient is ~0 are compared on the tensor's scale). Ops use central
//! differences at eps = 1e-6. The model uses the fourth-order stencil at eps = 1e-4 (truncation ~eps⁴, measured
//! round-off ≤ 2e-11 absolute on an O(3) loss) and an absolute floor of 1e-5, i.e. an absolute slack of 1e-10 for
//! tensors whose gradients are tiny. Two documented exceptions: paths through candle's `gelu_erf` (MLP routers) are
//! checked at 1e-4 because its backward truncates 1/√(2π) (see `GELU_TOL`), and the aux-router BCE, computed on
//! detached inputs by design, is excluded from the finite-difference objective of every non-aux-router parameter.

use std::collections::{BTreeMap, BTreeSet};

mod common;
use common::{randn, routed_model, DEV};

use anyhow::{anyhow, Result};
use candle_core::{DType, Tensor, Var, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use mor::config::ModelConfig;
use mor::model::expert_choice::bce_with_logits_sum;
use mor::model::layers::{
    linear, log_softmax_last, position_mask, softmax_last, DecoderLayer, KeyValue, KvSource,
    RmsNorm, Rope,
};
use mor::model::ops;
use mor::model::params::ParamStore;
use mor::model::recursion::Subset;
use mor::model::router::Router;
use mor::model::token_choice::BIAS_NAME;
use mor::model::{ForwardOptions, MorModel, RoutingTrace};

/// The tensors here are tiny, so candle's per-op thread fan-out only costs: with the test harness running the tests
/// in parallel, one thread per op is ~6× faster (48 s → 7 s on 2 cores). candle reads RAYON_NUM_THREADS at every
/// op; every test sets it first thing, before any tensor op, so no other thread reads it concurrently.
fn single_threaded_ops() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            std::env::set_var("RAYON_NUM_THREADS", "1");
        }
    });
}

// ------------------------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------------------------

fn var(rng: &mut StdRng, shape: &[usize], std: f64) -> Result<Var> {
    Ok(Var::from_tensor(&randn(rng, shape, 0.0, std, DType::F64)?)?)
}

fn values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?)
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0f64, |m, x| m.max(x.abs()))
}

/// The entry with the largest |g| followed by up to `k` further random distinct entries (all entries if the tensor
/// has at most `k + 1`).
fn pick_entries(rng: &mut StdRng, g: &[f64], k: usize) -> Vec<usize> {
    let n = g.len();
    if n <= k + 1 {
        return (0..n).collect();
    }
    let top = (0..n)
        .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
        .expect("non-empty");
    let mut out = vec![top];
    while out.len() < k + 1 {
        let i = rng.random_range(0..n);
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// Set entry `i` of `var` to `base[i] + delta` (all other entries from `base`).
fn set_entry(var: &Var, base: &[f64], i: usize, delta: f64) -> Result<()> {
    let mut v = base.to_vec();
    v[i] += delta;
    var.set(&Tensor::from_vec(v, var.shape(), &DEV)?)?;
    Ok(())
}

fn rel_err(ad: f64, fd: f64, floor: f64) -> f64 {
    (ad - fd).abs() / fd.abs().max(floor)
}

// ------------------------------------------------------------------------------------------------------------------
// Op-level checks
// ------------------------------------------------------------------------------------------------------------------

const OP_EPS: f64 = 1e-6;
const OP_TOL: f64 = 1e-6;
/// candle 0.11.1's `gelu_erf` backward writes 1/√(2π) as 0.398942 (relative error 7e-7), so its derivative is off
/// by up to 2.8e-7·max|x·e^{−x²/2}| = 1.7e-7 absolute (pinned by `candle_gelu_erf_backward_deviation`). Paths
/// through it are checked at 1e-4.
const GELU_TOL: f64 = 1e-4;
/// Largest absolute deviation of candle's gelu_erf derivative from the exact one: 2.804e-7 · e^{−1/2}.
const GELU_DERIV_ABS: f64 = 1.71e-7;

/// Check the gradients of `Σ f() ⊙ w` w.r.t. `vars` (f reads the vars' tensors) against central differences.
/// Returns the worst relative error.
fn check_op(
    name: &str,
    tol: f64,
    rng: &mut StdRng,
    vars: &[(&str, &Var)],
    f: &dyn Fn() -> Result<Tensor>,
) -> Result<f64> {
    let out = f()?;
    let w = randn(rng, out.dims(), 0.0, 1.0, DType::F64)?;
    let project = |o: &Tensor| -> Result<Tensor> { Ok((o * &w)?.sum_all()?) };
    let grads = project(&out)?.backward()?;
    let mut worst = 0.0f64;
    let mut worst_at = String::new();
    for (vn, v) in vars {
        let g = grads
            .get(v.as_tensor())
            .ok_or_else(|| anyhow!("{name}: no gradient for {vn}"))?;
        assert_eq!(g.dims(), v.dims(), "{name}: gradient shape of {vn}");
        let g = values(g)?;
        let gmax = max_abs(&g);
        assert!(gmax > 0.0, "{name}: gradient of {vn} is identically zero");
        let base = values(v.as_tensor())?;
        let floor = 1e-3 * gmax;
        for i in pick_entries(rng, &g, 24) {
            set_entry(v, &base, i, OP_EPS)?;
            let fp = project(&f()?)?.to_scalar::<f64>()?;
            set_entry(v, &base, i, -OP_EPS)?;
            let fm = project(&f()?)?.to_scalar::<f64>()?;
            set_entry(v, &base, i, 0.0)?;
            let fd = (fp - fm) / (2.0 * OP_EPS);
            let e = rel_err(g[i], fd, floor);
            if e > worst {
                worst = e;
                worst_at = format!("d/d{vn}[{i}]: autograd {} vs finite difference {fd}", g[i]);
            }
        }
    }
    println!("op {name:<40} worst rel err {worst:.2e} (tol {tol:.0e}; {worst_at})");
    Ok(worst)
}

fn tiny_cfg(extra: &str) -> Result<ModelConfig> {
    let json = format!(
        r#"{{"vocab_size":32,"hidden_size":16,"intermediate_size":32,"num_hidden_layers":8,
            "num_attention_heads":2,"num_key_value_heads":1,"max_position_embeddings":16,
            "initializer_range":0.2{extra}}}"#
    );
    Ok(ModelConfig::from_json(&json)?)
}

/// Re-draw every parameter of a store: norms 1 + N(0, 0.2²), everything else N(0, std²).
fn redraw_store(store: &ParamStore, rng: &mut StdRng, std: f64) -> Result<()> {
    for (name, v) in store.iter() {
        let t = if name.contains("norm") {
            randn(rng, v.dims(), 1.0, 0.2, DType::F64)?
        } else {
            randn(rng, v.dims(), 0.0, std, DType::F64)?
        };
        v.set(&t)?;
    }
    Ok(())
}

fn store_vars(store: &ParamStore) -> Vec<(String, Var)> {
    store.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn named(vars: &[(String, Var)]) -> Vec<(&str, &Var)> {
    vars.iter().map(|(k, v)| (k.as_str(), v)).collect()
}

#[test]
fn op_level_gradients_match_finite_differences() -> Result<()> {
    single_threaded_ops();
    let mut rng = StdRng::seed_from_u64(11);
    let rng = &mut rng;
    // (check, worst relative error, tolerance)
    let mut worst: Vec<(String, f64, f64)> = Vec::new();
    let mut rec = |name: &str, e: f64| {
        let tol = if name.contains("gelu") || name.contains("mlp") {
            GELU_TOL
        } else {
            OP_TOL
        };
        worst.push((name.to_string(), e, tol))
    };

    // linear (rank-3 input).
    let x = var(rng, &[2, 3, 4], 1.0)?;
    let w = var(rng, &[5, 4], 1.0)?;
    let (xt, wt) = (x.as_tensor().clone(), w.as_tensor().clone());
    let e = check_op("linear", OP_TOL, rng, &[("x", &x), ("w", &w)], &|| {
        Ok(linear(&xt, &wt)?)
    })?;
    rec("linear", e);

    // softmax / log-softmax, plain and with an additive -inf mask (as in attention).
    let x = var(rng, &[3, 6], 2.0)?;
    let xt = x.as_tensor().clone();
    let mask_data: Vec<f64> = (0..18)
        .map(|i| {
            if i % 6 > i / 6 + 2 {
                f64::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask_data, (3, 6), &DEV)?;
    rec(
        "softmax_last",
        check_op("softmax_last", OP_TOL, rng, &[("x", &x)], &|| {
            Ok(softmax_last(&xt)?)
        })?,
    );
    rec(
        "softmax_last (masked)",
        check_op("softmax_last (masked)", OP_TOL, rng, &[("x", &x)], &|| {
            Ok(softmax_last(&xt.broadcast_add(&mask)?)?)
        })?,
    );
    rec(
        "log_softmax_last",
        check_op("log_softmax_last", OP_TOL, rng, &[("x", &x)], &|| {
            Ok(log_softmax_last(&xt)?)
        })?,
    );
    rec(
        "softmax_last rank-4",
        check_op("softmax_last rank-4", OP_TOL, rng, &[("x", &x)], &|| {
            Ok(softmax_last(&xt.reshape((1, 3, 2, 3))?)?)
        })?,
    );

    // RmsNorm built through a ParamStore (its weight is checked too).
    let mut store = ParamStore::with_dtype(&DEV, 1, DType::F64);
    let norm = RmsNorm::new(&mut store, "norm.weight", 8, 1e-6)?;
    redraw_store(&store, rng, 1.0)?;
    let x = var(rng, &[2, 3, 8], 1.0)?;
    let xt = x.as_tensor().clone();
    let sv = store_vars(&store);
    let mut vars = named(&sv);
    vars.push(("x", &x));
    rec(
        "RmsNorm",
        check_op("RmsNorm", OP_TOL, rng, &vars, &|| Ok(norm.forward(&xt)?))?,
    );

    // RoPE at scattered positions (as for a routed subset).
    let cfg = tiny_cfg("")?;
    let hd = cfg.head_dim();
    let rope = Rope::new(&cfg, 16, &DEV, DType::F64)?;
    let pos = Tensor::from_vec(vec![0u32, 2, 3, 7, 9, 1, 4, 5, 0, 0], (2, 5), &DEV)?;
    let (cos, sin) = rope.at(&pos)?;
    let x = var(rng, &[2, 2, 5, hd], 1.0)?;
    let xt = x.as_tensor().clone();
    rec(
        "Rope::apply",
        check_op("Rope::apply", OP_TOL, rng, &[("x", &x)], &|| {
            Ok(Rope::apply(&xt, &cos, &sin)?)
        })?,
    );

    // The fused training ops (model::ops) have their own backward passes: each is checked here as the composed ops
    // are (tests/fused.rs checks that both compute the same values and gradients).
    rec(
        "ops::rope",
        check_op("ops::rope", OP_TOL, rng, &[("x", &x)], &|| {
            Ok(ops::rope(&xt, &cos, &sin)?)
        })?,
    );
    let x = var(rng, &[2, 3, 8], 1.0)?;
    let w = Var::from_tensor(&randn(rng, &[8], 1.0, 0.2, DType::F64)?)?;
    let (xt, wt) = (x.as_tensor().clone(), w.as_tensor().clone());
    rec(
        "ops::rms_norm",
        check_op(
            "ops::rms_norm",
            OP_TOL,
            rng,
            &[("x", &x), ("w", &w)],
            &|| Ok(ops::rms_norm(&xt, &wt, 1e-6)?),
        )?,
    );
    let g = var(rng, &[3, 7], 1.5)?;
    let u = var(rng, &[3, 7], 1.0)?;
    let (gt, ut) = (g.as_tensor().clone(), u.as_tensor().clone());
    rec(
        "ops::swiglu",
        check_op("ops::swiglu", OP_TOL, rng, &[("g", &g), ("u", &u)], &|| {
            Ok(ops::swiglu(&gt, &ut)?)
        })?,
    );
    // LM head + cross-entropy in chunks of 3 rows over 7 rows (chunks 3, 3, 1).
    let h = var(rng, &[7, 6], 1.0)?;
    let w = var(rng, &[11, 6], 1.0)?;
    let (ht, wt) = (h.as_tensor().clone(), w.as_tensor().clone());
    let targets = [3u32, 0, 10, 10, 5, 1, 7];
    rec(
        "ops::lm_head_cross_entropy",
        check_op(
            "ops::lm_head_cross_entropy",
            OP_TOL,
            rng,
            &[("h", &h), ("w", &w)],
            &|| {
                Ok(ops::cross_entropy::lm_head_cross_entropy_in_chunks(
                    &ht, &wt, &targets, 3,
                )?)
            },
        )?,
    );
    // Attention, GQA (2 key heads × 2 query heads each) over: a causal mask shared by the batch, the position mask
    // of a padded routed subset, and full-sequence K/V read at the subset's original positions (KV sharing).
    let rows = vec![vec![0u32, 2, 3, 7, 9], vec![1, 4, 5, 0, 0]];
    let valid = vec![5usize, 3];
    let all: Vec<Vec<u32>> = vec![(0..10).collect(); 2];
    let causal: Vec<Vec<u32>> = vec![(0..5).collect(); 1];
    for (label, mask, m) in [
        (
            "ops::attention (causal)",
            position_mask(&causal, &[5], &causal, &[5], &DEV, DType::F64)?,
            5,
        ),
        (
            "ops::attention (subset)",
            position_mask(&rows, &valid, &rows, &valid, &DEV, DType::F64)?,
            5,
        ),
        (
            "ops::attention (shared K/V)",
            position_mask(&rows, &valid, &all, &[10, 10], &DEV, DType::F64)?,
            10,
        ),
    ] {
        let q = var(rng, &[2, 2, 2 * 5, 4], 1.0)?;
        let k = var(rng, &[2, 2, m, 4], 1.0)?;
        let v = var(rng, &[2, 2, m, 4], 1.0)?;
        let (qt, kt, vt) = (
            q.as_tensor().clone(),
            k.as_tensor().clone(),
            v.as_tensor().clone(),
        );
        rec(
            label,
            check_op(
                label,
                OP_TOL,
                rng,
                &[("q", &q), ("k", &k), ("v", &v)],
                &|| Ok(ops::attention(&qt, &kt, &vt, &mask, 0.5)?),
            )?,
        );
    }

    // Decoder layer with its own K/V over a routed subset (position mask with a padded row), all weights checked.
    let mut store = ParamStore::with_dtype(&DEV, 2, DType::F64);
    let layer = DecoderLayer::new(&mut store, "layer", &cfg)?;
    redraw_store(&store, rng, 0.3)?;
    let own_mask = position_mask(&rows, &valid, &rows, &valid, &DEV, DType::F64)?;
    let x = var(rng, &[2, 5, 16], 1.0)?;
    let xt = x.as_tensor().clone();
    let sv = store_vars(&store);
    let mut vars = named(&sv);
    vars.push(("x", &x));
    let (c, s) = (cos.clone(), sin.clone());
    rec(
        "DecoderLayer (KvSource::Own)",
        check_op("DecoderLayer (KvSource::Own)", OP_TOL, rng, &vars, &|| {
            let (out, kv) = layer.forward(&xt, &c, &s, &own_mask, KvSource::Own)?;
            Ok(Tensor::cat(
                &[out.flatten_all()?, kv.k.flatten_all()?, kv.v.flatten_all()?],
                0,
            )?)
        })?,
    );

    // Decoder layer reading shared full-sequence K/V (recursive KV sharing): gradients reach the shared K/V.
    let shared_mask = position_mask(&rows, &valid, &all, &[10, 10], &DEV, DType::F64)?;
    let k = var(rng, &[2, 1, 10, hd], 1.0)?;
    let v = var(rng, &[2, 1, 10, hd], 1.0)?;
    let kv = KeyValue {
        k: k.as_tensor().clone(),
        v: v.as_tensor().clone(),
    };
    // K/V weights are unused when K/V are shared: check everything else.
    let mut vars: Vec<(&str, &Var)> = named(&sv)
        .into_iter()
        .filter(|(n, _)| !n.contains("k_proj") && !n.contains("v_proj"))
        .collect();
    vars.extend([("x", &x), ("k", &k), ("v", &v)]);
    rec(
        "DecoderLayer (KvSource::Shared)",
        check_op(
            "DecoderLayer (KvSource::Shared)",
            OP_TOL,
            rng,
            &vars,
            &|| {
                Ok(layer
                    .forward(&xt, &cos, &sin, &shared_mask, KvSource::Shared(&kv))?
                    .0)
            },
        )?,
    );

    // Routers (linear and MLP with erf-GELU).
    for (label, extra) in [
        (
            "Router linear",
            r#","recursion":{"sharing":"middle_cycle","num_recursion":3},"mor":{"router_type":"linear","routing":{"expert":{}}}"#,
        ),
        (
            "Router mlp (gelu_erf)",
            r#","recursion":{"sharing":"middle_cycle","num_recursion":3},"mor":{"router_type":"mlp","routing":{"expert":{}}}"#,
        ),
    ] {
        let rcfg = tiny_cfg(extra)?;
        let mut store = ParamStore::with_dtype(&DEV, 3, DType::F64);
        let router = Router::new(&mut store, "router", &rcfg, 3)?;
        redraw_store(&store, rng, 0.5)?;
        let x = var(rng, &[7, 16], 1.0)?;
        let xt = x.as_tensor().clone();
        let sv = store_vars(&store);
        let mut vars = named(&sv);
        vars.push(("x", &x));
        rec(
            label,
            check_op(label, GELU_TOL, rng, &vars, &|| Ok(router.forward(&xt)?))?,
        );
    }

    // BCE with logits (sampling loss) against 0/1 targets.
    let x = var(rng, &[9], 2.0)?;
    let xt = x.as_tensor().clone();
    let y = Tensor::from_vec(vec![1.0f64, 0., 0., 1., 1., 0., 1., 0., 0.], 9, &DEV)?;
    rec(
        "bce_with_logits_sum",
        check_op("bce_with_logits_sum", OP_TOL, rng, &[("x", &x)], &|| {
            Ok(bce_with_logits_sum(&xt, &y)?)
        })?,
    );

    // index_select with repeated indices (row gather of a subset).
    let x = var(rng, &[6, 4], 1.0)?;
    let xt = x.as_tensor().clone();
    let idx = Tensor::from_vec(vec![0u32, 3, 3, 5, 1], 5, &DEV)?;
    rec(
        "index_select",
        check_op("index_select", OP_TOL, rng, &[("x", &x)], &|| {
            Ok(xt.index_select(&idx, 0)?)
        })?,
    );

    // index_add over flattened rows (the scatter-back of selected tokens), with repeated indices.
    let base = var(rng, &[8, 3], 1.0)?;
    let src = var(rng, &[5, 3], 1.0)?;
    let (bt, st) = (base.as_tensor().clone(), src.as_tensor().clone());
    let idx = Tensor::from_vec(vec![1u32, 4, 4, 7, 0], 5, &DEV)?;
    rec(
        "index_add",
        check_op(
            "index_add",
            OP_TOL,
            rng,
            &[("base", &base), ("src", &src)],
            &|| Ok(bt.index_add(&idx, &st, 0)?),
        )?,
    );

    // gather along the last dim (targets / chosen experts).
    let x = var(rng, &[4, 5], 1.0)?;
    let xt = x.as_tensor().clone();
    let gidx = Tensor::from_vec(vec![0u32, 4, 2, 2, 1, 1, 3, 0], (4, 2), &DEV)?;
    rec(
        "gather",
        check_op("gather", OP_TOL, rng, &[("x", &x)], &|| {
            Ok(xt.gather(&gidx, D::Minus1)?)
        })?,
    );

    // Element-wise activations. Random inputs stay far from the kinks of abs / relu at 0 (≫ eps).
    let x = var(rng, &[3, 7], 1.5)?;
    let xt = x.as_tensor().clone();
    type Unary = fn(&Tensor) -> candle_core::Result<Tensor>;
    let unary: [(&str, Unary); 8] = [
        ("gelu_erf", |t| t.gelu_erf()),
        ("silu = x·sigmoid(x)", |t| t * candle_nn::ops::sigmoid(t)?),
        ("sigmoid", candle_nn::ops::sigmoid),
        ("tanh", |t| t.tanh()),
        ("abs", |t| t.abs()),
        ("relu", |t| t.relu()),
        ("exp", |t| t.exp()),
        ("sqr", |t| t.sqr()),
    ];
    for (label, op) in unary {
        let tol = if label == "gelu_erf" {
            GELU_TOL
        } else {
            OP_TOL
        };
        rec(
            label,
            check_op(label, tol, rng, &[("x", &x)], &|| Ok(op(&xt)?))?,
        );
    }
    // Ops on positive inputs.
    let p = Var::from_tensor(&(randn(rng, &[3, 7], 0.0, 1.0, DType::F64)?.abs()? + 0.5)?)?;
    let pt = p.as_tensor().clone();
    let positive: [(&str, Unary); 3] = [
        ("log", |t| t.log()),
        ("sqrt", |t| t.sqrt()),
        ("recip", |t| t.recip()),
    ];
    for (label, op) in positive {
        rec(
            label,
            check_op(label, OP_TOL, rng, &[("x", &p)], &|| Ok(op(&pt)?))?,
        );
    }

    // Shape ops: cat / narrow / transpose / batched matmul / reductions with broadcasts.
    let a = var(rng, &[2, 3, 4], 1.0)?;
    let b = var(rng, &[2, 4, 5], 1.0)?;
    let (at, btt) = (a.as_tensor().clone(), b.as_tensor().clone());
    rec(
        "cat/narrow/transpose/matmul/broadcast",
        check_op(
            "cat/narrow/transpose/matmul/broadcast",
            OP_TOL,
            rng,
            &[("a", &a), ("b", &b)],
            &|| {
                let m = at.matmul(&btt)?; // [2,3,5]
                let n = Tensor::cat(&[&m.narrow(2, 3, 2)?.neg()?, &m.narrow(2, 0, 3)?], 2)?;
                let t = n.transpose(1, 2)?.contiguous()?; // [2,5,3]
                let s = t.mean_keepdim(D::Minus1)?;
                Ok(t.broadcast_mul(&s)?
                    .broadcast_add(&at.sum_keepdim(2)?.transpose(1, 2)?)?)
            },
        )?,
    );

    let overall = worst
        .iter()
        .filter(|(_, _, t)| *t == OP_TOL)
        .fold(0.0f64, |m, (_, e, _)| m.max(*e));
    println!(
        "op level: {} checks, worst rel err {overall:.2e} (excluding gelu_erf paths)",
        worst.len()
    );
    let failed: Vec<&(String, f64, f64)> = worst.iter().filter(|(_, e, t)| e > t).collect();
    assert!(
        failed.is_empty(),
        "op gradients off by more than their tolerance: {failed:?}"
    );
    Ok(())
}

/// candle's `gelu_erf` backward vs the exact derivative Φ(x) + x·φ(x): equal up to the truncated 1/√(2π) constant.
#[test]
fn candle_gelu_erf_backward_deviation() -> Result<()> {
    single_threaded_ops();
    let xs: Vec<f64> = (0..=200).map(|i| -5.0 + 0.05 * i as f64).collect();
    let x = Var::from_tensor(&Tensor::from_vec(xs.clone(), xs.len(), &DEV)?)?;
    let grads = x.as_tensor().gelu_erf()?.sum_all()?.backward()?;
    let g = values(grads.get(x.as_tensor()).expect("gradient"))?;
    // Exact: 0.5·(1 + erf(x/√2)) + x·e^{−x²/2}/√(2π), erf from the forward of candle (checked by FD above).
    let half_cdf = values(&((x.as_tensor() / 2f64.sqrt())?.erf()? * 0.5)?)?;
    let mut dev = 0.0f64;
    for ((&xi, &gi), &c) in xs.iter().zip(&g).zip(&half_cdf) {
        let exact = 0.5 + c + xi * (-0.5 * xi * xi).exp() / (2.0 * std::f64::consts::PI).sqrt();
        dev = dev.max((gi - exact).abs());
    }
    println!("candle gelu_erf derivative: max |autograd − exact| = {dev:.2e}");
    assert!(
        dev <= GELU_DERIV_ABS,
        "gelu_erf derivative off by {dev:.2e}"
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------------------------------
// Model-level checks
// ------------------------------------------------------------------------------------------------------------------

const MODEL_EPS: f64 = 1e-4;
const MODEL_TOL: f64 = 1e-5;
const MODEL_ABS_FLOOR: f64 = 1e-5;
const B: usize = 2;
const T: usize = 8;

/// The discrete routing decisions of a forward.
#[derive(Debug, Clone, PartialEq)]
enum Decisions {
    None,
    Expert(Vec<Subset>),
    Token(Vec<u32>),
}

fn decisions(r: &RoutingTrace) -> Decisions {
    match r {
        RoutingTrace::None => Decisions::None,
        RoutingTrace::Expert(steps) => {
            Decisions::Expert(steps.iter().map(|s| s.selected.clone()).collect())
        }
        RoutingTrace::Token(t) => Decisions::Token(t.expert.clone()),
    }
}

fn model_json(extra: &str) -> String {
    format!(
        r#"{{"vocab_size":32,"hidden_size":16,"intermediate_size":32,"num_hidden_layers":8,
            "num_attention_heads":2,"num_key_value_heads":1,"max_position_embeddings":16,
            "initializer_range":0.2{extra}}}"#
    )
}

fn ids(seed: u64, vocab: usize) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let data: Vec<u32> = (0..B * T)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    Ok(Tensor::from_vec(data, (B, T), &DEV)?)
}

/// The objective whose autograd gradient w.r.t. `param` is `∂ loss.total / ∂ param`: the total loss, except that the
/// auxiliary-router BCE (computed on detached hidden states, so it trains only the aux routers) is left out for every
/// other parameter. With num_items = B·T the aux term enters `total` with weight 1.
fn loss_and_decisions(
    model: &MorModel,
    ids: &Tensor,
    step: usize,
    param: &str,
) -> Result<(f64, Decisions)> {
    let out = model.forward(ids, &ForwardOptions::train(step))?;
    let loss = model.loss(&out, ids, B * T)?;
    let mut l = loss.total.to_scalar::<f64>()?;
    if let Some(aux) = &out.router_losses.aux_router {
        if !param.starts_with("model.aux_routers.") {
            l -= aux.to_scalar::<f64>()?;
        }
    }
    Ok((l, decisions(&out.routing)))
}

struct ModelReport {
    worst: f64,
    worst_abs: f64,
    checked: usize,
    skipped: usize,
    tensors: usize,
}

/// Gradient check of `loss.total` w.r.t. every parameter tensor of the model built from `json`.
fn check_model(label: &str, json: &str, step: usize, seed: u64) -> Result<ModelReport> {
    let model = routed_model(json, seed, DType::F64, 0.03)?;
    let ids = ids(seed + 1, model.config().vocab_size)?;
    let out = model.forward(&ids, &ForwardOptions::train(step))?;
    let base_dec = decisions(&out.routing);
    let loss = model.loss(&out, &ids, B * T)?;
    let grads = loss.total.backward()?;

    // Routing must not be degenerate (except during the capacity warm-up at step 0, where it is full by design).
    match &out.routing {
        RoutingTrace::Expert(steps) => {
            let partial = steps.iter().any(|s| s.selected != s.candidates);
            let warm = model
                .config()
                .expert_choice()
                .is_some_and(|e| step < e.cap_warmup_step);
            if step == 0 && warm {
                assert!(
                    steps.iter().all(|s| s.selected.count() == B * T),
                    "{label}: capacity warm-up at step 0 must keep every token"
                );
            } else {
                assert!(partial, "{label}: routing selected every token");
            }
        }
        RoutingTrace::Token(t) => {
            let used = t.counts.iter().filter(|&&c| c > 0).count();
            assert!(
                used >= 2,
                "{label}: all tokens chose one expert: {:?}",
                t.counts
            );
        }
        RoutingTrace::None => {}
    }

    let mut rng = StdRng::seed_from_u64(seed + 2);
    let mut report = ModelReport {
        worst: 0.0,
        worst_abs: 0.0,
        checked: 0,
        skipped: 0,
        tensors: 0,
    };
    let mut worst_at = String::new();
    let mlp_router = model
        .config()
        .mor
        .as_ref()
        .is_some_and(|m| m.router_type != mor::config::RouterType::Linear);
    for (name, v) in model.params().iter() {
        report.tensors += 1;
        let base = values(v.as_tensor())?;
        let g = match grads.get(v.as_tensor()) {
            Some(g) => values(g)?,
            None => vec![0.0; base.len()],
        };
        let gmax = max_abs(&g);
        if name == BIAS_NAME {
            // A buffer updated by the trainer: it only shifts the (discrete) argmax, so no gradient flows.
            assert_eq!(gmax, 0.0, "{label}: {name} must not receive a gradient");
        } else {
            assert!(
                grads.get(v.as_tensor()).is_some() && gmax > 0.0,
                "{label}: parameter {name} gets no gradient"
            );
        }
        let floor = (1e-3 * gmax).max(MODEL_ABS_FLOOR);
        // MLP routers go through gelu_erf, whose candle backward is only accurate to ~1.7e-7 (see GELU_TOL).
        let tol = if mlp_router && name.contains("router") {
            GELU_TOL
        } else {
            MODEL_TOL
        };
        for i in pick_entries(&mut rng, &g, 3) {
            let mut fd = None;
            for eps in [MODEL_EPS, MODEL_EPS / 10.0] {
                // Fourth-order central difference: (L(−2h) − 8L(−h) + 8L(h) − L(2h)) / 12h.
                let mut l = [0.0f64; 4];
                let mut same = true;
                for (k, m) in [-2.0, -1.0, 1.0, 2.0].into_iter().enumerate() {
                    set_entry(v, &base, i, m * eps)?;
                    let (lk, dk) = loss_and_decisions(&model, &ids, step, name)?;
                    l[k] = lk;
                    same &= dk == base_dec;
                }
                set_entry(v, &base, i, 0.0)?;
                if same {
                    fd = Some((l[0] - 8.0 * l[1] + 8.0 * l[2] - l[3]) / (12.0 * eps));
                    break;
                }
            }
            let Some(fd) = fd else {
                report.skipped += 1;
                continue;
            };
            let e = rel_err(g[i], fd, floor);
            report.worst_abs = report.worst_abs.max((g[i] - fd).abs());
            assert!(
                e <= tol,
                "{label}: d loss / d {name}[{i}]: autograd {} vs finite difference {fd} (rel err {e:.2e}, \
                 floor {floor:.1e})",
                g[i]
            );
            if tol == MODEL_TOL && e > report.worst {
                report.worst = e;
                worst_at = format!("{name}[{i}]");
            }
            report.checked += 1;
        }
    }
    assert!(
        report.skipped * 10 <= report.checked,
        "{label}: {} entries skipped because a perturbation flipped routing, {} checked",
        report.skipped,
        report.checked
    );
    println!(
        "model {label:<44} {:>3} tensors {:>4} entries ({} skipped) worst rel err {:.2e} at {worst_at} (max abs {:.1e})",
        report.tensors, report.checked, report.skipped, report.worst, report.worst_abs
    );
    Ok(report)
}

fn run_cases(group: &str, cases: &[(&str, String, usize)]) -> Result<()> {
    let mut worst = 0.0f64;
    for (k, (label, json, step)) in cases.iter().enumerate() {
        let r = check_model(label, json, *step, 100 + k as u64)?;
        worst = worst.max(r.worst);
    }
    println!("group {group}: worst rel err {worst:.2e}");
    Ok(())
}

#[test]
fn vanilla_and_recursive_models() -> Result<()> {
    single_threaded_ops();
    let mut cases = vec![(
        "vanilla 6L",
        model_json("").replace(r#""num_hidden_layers":8"#, r#""num_hidden_layers":6"#),
        0,
    )];
    for (label, sharing, n) in [
        ("recursive cycle N_r=2", "cycle", 2),
        ("recursive sequence N_r=2", "sequence", 2),
        ("recursive middle_cycle N_r=3", "middle_cycle", 3),
        ("recursive middle_sequence N_r=3", "middle_sequence", 3),
    ] {
        cases.push((
            label,
            model_json(&format!(
                r#","recursion":{{"sharing":"{sharing}","num_recursion":{n}}}"#
            )),
            0,
        ));
    }
    run_cases("vanilla/recursive", &cases)
}

const MIDDLE3: &str = r#","recursion":{"sharing":"middle_cycle","num_recursion":3}"#;

#[test]
fn mor_expert_choice_models() -> Result<()> {
    single_threaded_ops();
    let mor = |m: &str| model_json(&format!(r#"{MIDDLE3},"mor":{m}"#));
    let cases = vec![
        (
            "expert linear+sigmoid (aux_loss)",
            mor(r#"{"router_type":"linear","routing":{"expert":{"router_func":"sigmoid"}}}"#),
            0,
        ),
        (
            "expert mlp+tanh",
            mor(r#"{"router_type":"mlp","routing":{"expert":{"router_func":"tanh"}}}"#),
            0,
        ),
        (
            "expert wide_mlp",
            mor(r#"{"router_type":"wide_mlp","routing":{"expert":{}}}"#),
            0,
        ),
        (
            "expert gating additive",
            mor(r#"{"routing":{"expert":{"gating":"additive"}}}"#),
            0,
        ),
        (
            "expert sampling aux_router",
            mor(r#"{"routing":{"expert":{"sampling":"aux_router"}}}"#),
            0,
        ),
        (
            "expert z_loss",
            mor(r#"{"z_loss":true,"routing":{"expert":{}}}"#),
            0,
        ),
    ];
    run_cases("MoR expert-choice (router variants)", &cases)
}

#[test]
fn mor_expert_choice_training_variants() -> Result<()> {
    single_threaded_ops();
    let mor = |m: &str| model_json(&format!(r#"{MIDDLE3},"mor":{m}"#));
    let warm = r#"{"routing":{"expert":{"cap_warmup_step":10}}}"#;
    let cases = vec![
        ("expert cap warm-up, step 0", mor(warm), 0),
        ("expert cap warm-up, step 5", mor(warm), 5),
        (
            "expert cycle N_r=2 (no prefix layer)",
            model_json(
                r#","recursion":{"sharing":"cycle","num_recursion":2},"mor":{"routing":{"expert":{}}}"#,
            ),
            0,
        ),
    ];
    run_cases("MoR expert-choice (training variants)", &cases)
}

#[test]
fn mor_token_choice_models() -> Result<()> {
    single_threaded_ops();
    let mor = |m: &str| model_json(&format!(r#"{MIDDLE3},"mor":{m}"#));
    let cases = vec![
        (
            "token softmax + balancing loss + z_loss",
            mor(
                r#"{"z_loss":true,"routing":{"token":{"router_func":"softmax","balancing":"loss"}}}"#,
            ),
            0,
        ),
        (
            "token sigmoid + loss_free",
            mor(
                r#"{"z_loss":true,"routing":{"token":{"router_func":"sigmoid","alpha":0.1,"balancing":"loss_free"}}}"#,
            ),
            0,
        ),
    ];
    run_cases("MoR token-choice", &cases)
}

#[test]
fn recursive_kv_sharing_models() -> Result<()> {
    single_threaded_ops();
    let cases = vec![
        (
            "kv sharing, recursive",
            model_json(&format!(r#"{MIDDLE3},"kv_sharing":{{}}"#)),
            0,
        ),
        (
            "kv sharing, MoR expert",
            model_json(&format!(
                r#"{MIDDLE3},"mor":{{"routing":{{"expert":{{}}}}}},"kv_sharing":{{}}"#
            )),
            0,
        ),
        (
            "kv sharing update_cache, MoR expert",
            model_json(&format!(
                r#"{MIDDLE3},"mor":{{"routing":{{"expert":{{}}}}}},"kv_sharing":{{"update_cache":true}}"#
            )),
            0,
        ),
        (
            "kv sharing update_cache, recursive",
            model_json(&format!(
                r#"{MIDDLE3},"kv_sharing":{{"update_cache":true}}"#
            )),
            0,
        ),
    ];
    run_cases("recursive KV sharing", &cases)
}

// ------------------------------------------------------------------------------------------------------------------
// Shared weights
// ------------------------------------------------------------------------------------------------------------------

/// Parameter names of a layer's tensors, without the `model.layers.{i}.` prefix.
fn layer_params(model: &MorModel) -> BTreeMap<usize, BTreeSet<String>> {
    let mut out: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    for (name, _) in model.params().iter() {
        if let Some(rest) = name.strip_prefix("model.layers.") {
            let (i, suffix) = rest.split_once('.').expect("layer parameter name");
            out.entry(i.parse().expect("layer index"))
                .or_default()
                .insert(suffix.to_string());
        }
    }
    out
}

#[test]
fn shared_layers_are_one_parameter_and_their_gradients_sum_over_uses() -> Result<()> {
    single_threaded_ops();
    for (sharing, n) in [
        ("cycle", 2),
        ("sequence", 2),
        ("middle_cycle", 3),
        ("middle_sequence", 3),
    ] {
        let json = model_json(&format!(
            r#","recursion":{{"sharing":"{sharing}","num_recursion":{n}}}"#
        ));
        let rec = routed_model(&json, 7, DType::F64, 0.03)?;
        let layout = rec.layout().clone();

        // Exactly one set of parameters per unique layer, and nothing else besides embeddings and the final norm.
        let per_layer = layer_params(&rec);
        let unique: Vec<usize> = layout.unique_layers();
        assert_eq!(
            per_layer.keys().copied().collect::<Vec<_>>(),
            unique,
            "{sharing}: parameter layers vs layout"
        );
        for (i, names) in &per_layer {
            assert_eq!(names.len(), 9, "{sharing}: layer {i} has {names:?}");
        }
        assert_eq!(rec.params().len(), 2 + 9 * unique.len(), "{sharing}");
        assert!(
            unique.len() < layout.num_layers(),
            "{sharing}: nothing shared"
        );

        // The untied equivalent: a vanilla model whose layer i is a copy of layer source[i].
        let vjson = model_json("").replace(
            r#""num_hidden_layers":8"#,
            &format!(r#""num_hidden_layers":{}"#, layout.num_layers()),
        );
        let vcfg = ModelConfig::from_json(&vjson)?;
        let mut store = ParamStore::with_dtype(&DEV, 0, DType::F64);
        for (name, v) in rec.params().iter() {
            match name.strip_prefix("model.layers.") {
                Some(rest) => {
                    let (i, suffix) = rest.split_once('.').expect("layer parameter name");
                    let i: usize = i.parse()?;
                    for (j, &s) in layout.source.iter().enumerate() {
                        if s == i {
                            let copy = v.as_tensor().copy()?;
                            store.insert(&format!("model.layers.{j}.{suffix}"), &copy)?;
                        }
                    }
                }
                None => store.insert(name, &v.as_tensor().copy()?)?,
            }
        }
        let untied = MorModel::from_params(&vcfg, store)?;

        let ids = ids(8, 32)?;
        let lr = rec.loss(&rec.forward(&ids, &ForwardOptions::train(0))?, &ids, B * T)?;
        let lu = untied.loss(
            &untied.forward(&ids, &ForwardOptions::train(0))?,
            &ids,
            B * T,
        )?;
        let (a, b) = (lr.total.to_scalar::<f64>()?, lu.total.to_scalar::<f64>()?);
        assert!(
            (a - b).abs() <= 1e-12 * a.abs(),
            "{sharing}: loss {a} vs untied {b}"
        );
        let gr = lr.total.backward()?;
        let gu = lu.total.backward()?;
        let mut worst = 0.0f64;
        for (name, v) in rec.params().iter() {
            let g = values(gr.get(v.as_tensor()).expect("gradient"))?;
            let uses: Vec<String> = match name.strip_prefix("model.layers.") {
                Some(rest) => {
                    let (i, suffix) = rest.split_once('.').expect("layer parameter name");
                    let i: usize = i.parse()?;
                    (0..layout.num_layers())
                        .filter(|&j| layout.source[j] == i)
                        .map(|j| format!("model.layers.{j}.{suffix}"))
                        .collect()
                }
                None => vec![name.clone()],
            };
            let mut sum = vec![0.0f64; g.len()];
            for u in &uses {
                let uv = untied.params().get(u).expect("untied parameter");
                let ug = values(gu.get(uv.as_tensor()).expect("untied gradient"))?;
                for (s, x) in sum.iter_mut().zip(ug) {
                    *s += x;
                }
            }
            let scale = max_abs(&g).max(1e-300);
            let diff = g
                .iter()
                .zip(&sum)
                .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
            let e = diff / scale;
            assert!(
                e <= 1e-10,
                "{sharing}: gradient of {name} ≠ Σ over its {} uses (rel {e:.2e})",
                uses.len()
            );
            worst = worst.max(e);
        }
        println!(
            "shared {sharing:<16} {} unique / {} unrolled layers; shared grad = Σ per-use grads, worst rel {worst:.2e}",
            unique.len(),
            layout.num_layers()
        );
    }
    Ok(())
}
