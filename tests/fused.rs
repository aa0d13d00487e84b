//! The fused training ops (`mor::model::ops`) against the composed reference ops they replace: the same values and
//! the same gradients, op by op, layer by layer and for whole models in every variant; and the same loss curve over
//! a short training run. (Their finite-difference checks are in tests/gradcheck.rs.)

mod common;
use common::{routed_model, DEV};

use anyhow::{anyhow, Result};
use candle_core::{DType, Tensor, Var, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use mor::config::ModelConfig;
use mor::model::layers::{
    log_softmax_last, position_mask, DecoderLayer, KeyValue, KvSource, RmsNorm, Rope,
};
use mor::model::ops;
use mor::model::params::ParamStore;
use mor::model::{ForwardOptions, MorModel, RoutingTrace};
use mor::train::{AdamW, AdamWConfig, NamedParam};

fn randn(rng: &mut StdRng, shape: &[usize], mean: f64, std: f64) -> Result<Tensor> {
    Ok(common::randn(rng, shape, mean, std, DType::F64)?)
}

fn var(rng: &mut StdRng, shape: &[usize], std: f64) -> Result<Var> {
    Ok(Var::from_tensor(&randn(rng, shape, 0.0, std)?)?)
}

fn values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?)
}

/// max |a − b| / max(max |b|, 1e-30).
fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (values(a)?, values(b)?);
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-30);
    Ok(a.iter()
        .zip(&b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale)
}

/// Compare fused and composed functions of `vars`: outputs, and gradients of a random projection of the output.
fn compare(
    name: &str,
    rng: &mut StdRng,
    vars: &[(&str, &Var)],
    fused: &dyn Fn() -> Result<Tensor>,
    composed: &dyn Fn() -> Result<Tensor>,
) -> Result<()> {
    const TOL: f64 = 1e-12;
    let (a, b) = (fused()?, composed()?);
    let e = rel_diff(&a, &b)?;
    assert!(e <= TOL, "{name}: fused output differs by {e:.2e}");
    let w = randn(rng, a.dims(), 0.0, 1.0)?;
    let ga = (&a * &w)?.sum_all()?.backward()?;
    let gb = (&b * &w)?.sum_all()?.backward()?;
    let mut worst = e;
    for (vn, v) in vars {
        let (x, y) = (ga.get(v.as_tensor()), gb.get(v.as_tensor()));
        let (x, y) = (
            x.ok_or_else(|| anyhow!("{name}: fused op gives no gradient for {vn}"))?,
            y.ok_or_else(|| anyhow!("{name}: composed op gives no gradient for {vn}"))?,
        );
        let e = rel_diff(x, y)?;
        assert!(e <= TOL, "{name}: gradient of {vn} differs by {e:.2e}");
        worst = worst.max(e);
    }
    println!("{name:<40} fused vs composed: worst rel diff {worst:.1e}");
    Ok(())
}

fn tiny_cfg(extra: &str) -> Result<ModelConfig> {
    Ok(ModelConfig::from_json(&model_json(extra))?)
}

fn model_json(extra: &str) -> String {
    format!(
        r#"{{"vocab_size":32,"hidden_size":16,"intermediate_size":32,"num_hidden_layers":8,
            "num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":16,
            "initializer_range":0.2{extra}}}"#
    )
}

fn redraw(store: &ParamStore, rng: &mut StdRng) -> Result<()> {
    for (name, v) in store.iter() {
        let t = if name.contains("norm") {
            randn(rng, v.dims(), 1.0, 0.2)?
        } else {
            randn(rng, v.dims(), 0.0, 0.3)?
        };
        v.set(&t)?;
    }
    Ok(())
}

#[test]
fn each_fused_op_matches_its_composition() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(5);
    let rng = &mut rng;

    // RMSNorm.
    let mut store = ParamStore::with_dtype(&DEV, 1, DType::F64);
    let mut norm = RmsNorm::new(&mut store, "norm.weight", 8, 1e-6)?;
    redraw(&store, rng)?;
    let mut reference = norm.clone();
    reference.set_fused(false);
    norm.set_fused(true);
    let wv = store.iter().next().map(|(_, v)| v.clone()).expect("weight");
    let x = var(rng, &[3, 4, 8], 1.0)?;
    let xt = x.as_tensor().clone();
    compare(
        "rms_norm",
        rng,
        &[("x", &x), ("w", &wv)],
        &|| Ok(norm.forward(&xt)?),
        &|| Ok(reference.forward(&xt)?),
    )?;

    // RoPE at scattered positions.
    let cfg = tiny_cfg("")?;
    let rope = Rope::new(&cfg, 16, &DEV, DType::F64)?;
    let pos = Tensor::from_vec(vec![0u32, 2, 3, 7, 9, 1, 4, 5, 0, 0], (2, 5), &DEV)?;
    let (cos, sin) = rope.at(&pos)?;
    let x = var(rng, &[2, 3, 5, cfg.head_dim()], 1.0)?;
    let xt = x.as_tensor().clone();
    compare(
        "rope",
        rng,
        &[("x", &x)],
        &|| Ok(ops::rope(&xt, &cos, &sin)?),
        &|| Ok(Rope::apply(&xt, &cos, &sin)?),
    )?;

    // SwiGLU gate.
    let g = var(rng, &[5, 9], 2.0)?;
    let u = var(rng, &[5, 9], 1.0)?;
    let (gt, ut) = (g.as_tensor().clone(), u.as_tensor().clone());
    compare(
        "swiglu",
        rng,
        &[("g", &g), ("u", &u)],
        &|| Ok(ops::swiglu(&gt, &ut)?),
        &|| Ok(((&gt * candle_nn::ops::sigmoid(&gt)?)? * &ut)?),
    )?;

    // LM head + cross-entropy, one chunk and several.
    let h = var(rng, &[9, 6], 1.0)?;
    let w = var(rng, &[13, 6], 1.0)?;
    let (ht, wt) = (h.as_tensor().clone(), w.as_tensor().clone());
    let targets: Vec<u32> = (0..9).map(|i| (i * 5 % 13) as u32).collect();
    let tt = Tensor::from_vec(targets.clone(), (9, 1), &DEV)?;
    let reference = || -> Result<Tensor> {
        let logp = log_softmax_last(&ht.matmul(&wt.t()?)?)?;
        Ok(logp.gather(&tt, D::Minus1)?.sum_all()?.neg()?)
    };
    for rows in [9, 4, 1] {
        compare(
            &format!("lm_head_cross_entropy ({rows} rows/chunk)"),
            rng,
            &[("h", &h), ("w", &w)],
            &|| {
                Ok(ops::cross_entropy::lm_head_cross_entropy_in_chunks(
                    &ht, &wt, &targets, rows,
                )?)
            },
            &reference,
        )?;
    }
    Ok(())
}

/// A decoder layer (attention with GQA, both norms, RoPE, SwiGLU) fused vs composed, on the masks the model uses.
#[test]
fn fused_decoder_layer_matches_composed_layer() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(6);
    let rng = &mut rng;
    let cfg = tiny_cfg("")?;
    let hd = cfg.head_dim();
    let mut store = ParamStore::with_dtype(&DEV, 2, DType::F64);
    let mut layer = DecoderLayer::new(&mut store, "layer", &cfg)?;
    redraw(&store, rng)?;
    let mut reference = layer.clone();
    reference.set_fused(false);
    layer.set_fused(true);
    let rope = Rope::new(&cfg, 16, &DEV, DType::F64)?;
    // A padded routed subset: row 1 has 3 real tokens then 2 padding slots.
    let rows = vec![vec![0u32, 2, 3, 7, 9], vec![1, 4, 5, 0, 0]];
    let valid = vec![5usize, 3];
    let pos = Tensor::from_vec(rows.iter().flatten().copied().collect(), (2, 5), &DEV)?;
    let (cos, sin) = rope.at(&pos)?;
    let causal = mor::model::recursion::causal_mask(5, &DEV, DType::F64)?;
    let subset = position_mask(&rows, &valid, &rows, &valid, &DEV, DType::F64)?;
    let all: Vec<Vec<u32>> = vec![(0..10).collect(); 2];
    let shared = position_mask(&rows, &valid, &all, &[10, 10], &DEV, DType::F64)?;
    let sv: Vec<(String, Var)> = store.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let x = var(rng, &[2, 5, 16], 1.0)?;
    let xt = x.as_tensor().clone();
    let mut vars: Vec<(&str, &Var)> = sv.iter().map(|(k, v)| (k.as_str(), v)).collect();
    vars.push(("x", &x));
    for (label, mask) in [("causal", &causal), ("subset", &subset)] {
        compare(
            &format!("DecoderLayer own K/V ({label})"),
            rng,
            &vars,
            &|| {
                let (out, kv) = layer.forward(&xt, &cos, &sin, mask, KvSource::Own)?;
                Ok(Tensor::cat(&[out.flatten_all()?, kv.k.flatten_all()?], 0)?)
            },
            &|| {
                let (out, kv) = reference.forward(&xt, &cos, &sin, mask, KvSource::Own)?;
                Ok(Tensor::cat(&[out.flatten_all()?, kv.k.flatten_all()?], 0)?)
            },
        )?;
    }
    let k = var(rng, &[2, 2, 10, hd], 1.0)?;
    let v = var(rng, &[2, 2, 10, hd], 1.0)?;
    let kv = KeyValue {
        k: k.as_tensor().clone(),
        v: v.as_tensor().clone(),
    };
    let mut vars: Vec<(&str, &Var)> = sv
        .iter()
        .filter(|(n, _)| !n.contains("k_proj") && !n.contains("v_proj"))
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    vars.extend([("x", &x), ("k", &k), ("v", &v)]);
    compare(
        "DecoderLayer shared K/V",
        rng,
        &vars,
        &|| {
            Ok(layer
                .forward(&xt, &cos, &sin, &shared, KvSource::Shared(&kv))?
                .0)
        },
        &|| {
            Ok(reference
                .forward(&xt, &cos, &sin, &shared, KvSource::Shared(&kv))?
                .0)
        },
    )?;
    Ok(())
}

fn tiny_model(json: &str, seed: u64, dtype: DType) -> Result<MorModel> {
    Ok(routed_model(json, seed, dtype, 0.03)?)
}

fn random_ids(seed: u64, b: usize, t: usize, vocab: usize) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let data: Vec<u32> = (0..b * t)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    Ok(Tensor::from_vec(data, (b, t), &DEV)?)
}

fn decisions(r: &RoutingTrace) -> String {
    match r {
        RoutingTrace::None => String::new(),
        RoutingTrace::Expert(steps) => format!(
            "{:?}",
            steps.iter().map(|s| &s.selected).collect::<Vec<_>>()
        ),
        RoutingTrace::Token(t) => format!("{:?}", t.expert),
    }
}

const MIDDLE3: &str = r#","recursion":{"sharing":"middle_cycle","num_recursion":3}"#;

fn variants() -> Vec<(&'static str, String)> {
    let mor = |m: &str| model_json(&format!(r#"{MIDDLE3},"mor":{m}"#));
    vec![
        ("vanilla", model_json("")),
        ("recursive middle-cycle 3", model_json(MIDDLE3)),
        ("mor expert-choice", mor(r#"{"routing":{"expert":{}}}"#)),
        (
            "mor expert-choice, aux router, z-loss",
            mor(r#"{"z_loss":true,"routing":{"expert":{"sampling":"aux_router"}}}"#),
        ),
        (
            "mor token-choice",
            mor(r#"{"z_loss":true,"routing":{"token":{}}}"#),
        ),
        (
            "recursive KV sharing",
            model_json(&format!(r#"{MIDDLE3},"kv_sharing":{{}}"#)),
        ),
        (
            "mor expert-choice + KV sharing (update)",
            model_json(&format!(
                r#"{MIDDLE3},"mor":{{"routing":{{"expert":{{}}}}}},"kv_sharing":{{"update_cache":true}}"#
            )),
        ),
    ]
}

/// Every variant: `forward_loss` with fused ops, and with fused ops and checkpointing, equals the composed path in
/// the loss, the routing and every parameter's gradient.
#[test]
fn fused_and_checkpointed_models_match_composed_models() -> Result<()> {
    for (k, (label, json)) in variants().into_iter().enumerate() {
        let mut model = tiny_model(&json, 40 + k as u64, DType::F64)?;
        let ids = random_ids(7 + k as u64, 2, 12, 32)?;
        let opts = ForwardOptions::train(50);
        model.set_fused_ops(false);
        let reference = model.forward_loss(&ids, &opts, 24)?;
        let want = reference.loss.total.to_scalar::<f64>()?;
        let want_grads = reference.backward()?;
        for (path, fused, ckpt) in [
            ("fused", true, false),
            ("fused + checkpointing", true, true),
            ("composed + checkpointing", false, true),
        ] {
            model.set_fused_ops(fused);
            model.set_checkpointing(ckpt);
            let out = model.forward_loss(&ids, &opts, 24)?;
            assert_eq!(
                decisions(&out.routing),
                decisions(&reference.routing),
                "{label}, {path}: routing"
            );
            let got = out.loss.total.to_scalar::<f64>()?;
            assert!(
                (got - want).abs() <= 1e-12 * want.abs(),
                "{label}, {path}: loss {got} vs {want}"
            );
            let grads = out.backward()?;
            let mut worst = 0.0f64;
            for (name, v) in model.params().iter() {
                match (grads.get(v.as_tensor()), want_grads.get(v.as_tensor())) {
                    (Some(x), Some(y)) => {
                        let e = rel_diff(x, y)?;
                        assert!(
                            e <= 1e-10,
                            "{label}, {path}: gradient of {name} differs by {e:.2e}"
                        );
                        worst = worst.max(e);
                    }
                    (None, None) => {}
                    _ => panic!("{label}, {path}: {name} has a gradient on one path only"),
                }
            }
            println!("{label:<44} {path:<26} loss {got:.6}, worst gradient rel diff {worst:.1e}");
        }
        model.set_checkpointing(false);
    }
    Ok(())
}

/// Loss per step of a short AdamW run (f32, the training dtype) of `model` on fixed batches.
fn loss_curve(model: &MorModel, steps: usize) -> Result<Vec<f64>> {
    let params: Vec<NamedParam> = model
        .params()
        .iter()
        .map(|(n, v)| NamedParam::new(n.clone(), v.clone()))
        .collect();
    let mut opt = AdamW::new(params, AdamWConfig::default())?;
    let mut curve = Vec::with_capacity(steps);
    // Two fixed batches in turn: a run that can learn them.
    let batches = [
        random_ids(100, 4, 16, model.config().vocab_size)?,
        random_ids(101, 4, 16, model.config().vocab_size)?,
    ];
    for s in 0..steps {
        let ids = &batches[s % 2];
        let out = model.forward_loss(ids, &ForwardOptions::train(s), 4 * 16)?;
        curve.push(out.loss.total.to_scalar::<f32>()? as f64);
        let grads = out.backward()?;
        opt.step(&grads, 3e-3)?;
    }
    Ok(curve)
}

#[test]
fn loss_curves_match_with_and_without_fused_ops_and_checkpointing() -> Result<()> {
    for (label, json) in [variants()[0].clone(), variants()[2].clone()] {
        let mut reference = tiny_model(&json, 9, DType::F32)?;
        reference.set_fused_ops(false);
        let want = loss_curve(&reference, 8)?;
        println!("{label}: composed                {want:.5?}");
        assert!(
            want.last() < want.first(),
            "{label}: the run must learn: {want:?}"
        );
        for ckpt in [false, true] {
            let mut model = tiny_model(&json, 9, DType::F32)?;
            assert!(
                model.fused_ops() && !model.checkpointing(),
                "defaults: fused ops, no checkpointing"
            );
            model.set_checkpointing(ckpt);
            let got = loss_curve(&model, 8)?;
            println!("{label}: fused, checkpointing {ckpt:<5} {got:.5?}");
            for (s, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs(),
                    "{label}, checkpointing {ckpt}: step {s}: loss {a} vs {b}"
                );
            }
        }
    }
    Ok(())
}
