//! End-to-end training: a tiny MoR model learns on real text, checkpoints are complete, and a resumed run continues
//! exactly like an uninterrupted one.

use std::path::{Path, PathBuf};

use mor::config::ModelConfig;
use mor::data::{prepare_corpus, PrepareOptions, Tokenizer};
use mor::io::checkpoint::load_model;
use mor::model::MorModel;
use mor::train::metrics::read_metrics;
use mor::train::trainer::{TrainConfig, Trainer, METRICS_FILE, PLOT_FILE};
use mor::train::{AdamWConfig, LrSchedule};

fn sample_text() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sonnets.txt")
}

/// Tokenizer + prepared corpus in `dir`.
fn prepare(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    let tok = Tokenizer::train_bpe(&[sample_text()], 300).unwrap();
    let opts = PrepareOptions {
        val_fraction: 0.1,
        split: mor::data::DocumentSplit::BlankLines,
        ..PrepareOptions::default()
    };
    prepare_corpus(&[sample_text()], &tok, &data, &opts).unwrap();
    tok.save(data.join("tokenizer.json")).unwrap();
    data
}

fn tiny(routing: &str) -> ModelConfig {
    ModelConfig::from_json(&format!(
        r#"{{"vocab_size":320,"hidden_size":32,"intermediate_size":64,"num_hidden_layers":5,
            "num_attention_heads":2,"num_key_value_heads":1,"max_position_embeddings":32,
            "recursion":{{"sharing":"middle_cycle","num_recursion":3}}{routing}}}"#
    ))
    .unwrap()
}

fn train_cfg(steps: usize, save_every: usize) -> TrainConfig {
    TrainConfig {
        seq_len: 32,
        batch_size: 4,
        grad_accum: 2,
        steps,
        lr: 3e-3,
        schedule: LrSchedule::Wsd {
            warmup: Some(2),
            total: steps,
            decay_fraction: 0.2,
        },
        optimizer: AdamWConfig::default(),
        max_grad_norm: 1.0,
        seed: 3,
        shuffle: true,
        eval_every: 5,
        eval_sequences: 4,
        save_every,
        keep_last: 3,
        log_every: 1,
    }
}

fn losses(run: &Path) -> Vec<(u64, f64)> {
    read_metrics(&run.join(METRICS_FILE))
        .unwrap()
        .iter()
        .filter_map(|r| Some((r["step"].as_u64()?, r.get("loss")?.as_f64()?)))
        .collect()
}

#[test]
fn mor_learns_and_resume_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let cfg = tiny(r#","mor":{"routing":{"expert":{}}}"#);

    // Uninterrupted: 12 steps.
    let full = tmp.path().join("full");
    let model = MorModel::new(&cfg, &candle_core::Device::Cpu, 1).unwrap();
    let mut t = Trainer::new(model, train_cfg(12, 0), &data, &full).unwrap();
    let summary = t.run(false).unwrap();
    assert_eq!(summary.steps, 12);
    let curve = losses(&full);
    assert_eq!(curve.len(), 12);
    // The starting point is recorded as step 0, held-out only.
    let first = &read_metrics(&full.join(METRICS_FILE)).unwrap()[0];
    assert_eq!(first["step"].as_u64(), Some(0));
    assert!(first["val_loss"].as_f64().unwrap() > summary.val_loss.unwrap());
    assert!(first.get("loss").is_none());
    assert!(
        curve.last().unwrap().1 < curve[0].1 - 0.5,
        "loss should fall: {curve:?}"
    );
    assert!(summary.val_loss.unwrap().is_finite());
    assert!(summary.val_loss_causal.unwrap().is_finite());
    assert!(full.join(PLOT_FILE).exists());

    // The same run stopped at step 7 (as if killed after its checkpoint), then resumed to the end.
    let split = tmp.path().join("split");
    let model = MorModel::new(&cfg, &candle_core::Device::Cpu, 1).unwrap();
    let mut t = Trainer::new(model, train_cfg(12, 3), &data, &split).unwrap();
    t.run_until(7, false).unwrap();
    drop(t);
    let mut t = Trainer::resume(&split, &data, None).unwrap();
    assert_eq!(t.step(), 7);
    t.run(false).unwrap();
    let resumed = losses(&split);
    assert_eq!(resumed.len(), 12, "{resumed:?}");
    for ((s1, a), (s2, b)) in curve.iter().zip(&resumed) {
        assert_eq!(s1, s2);
        assert_eq!(
            a, b,
            "step {s1}: resumed loss {b} differs from uninterrupted {a}"
        );
    }
    // The final weights are identical too.
    let a = load_model(
        &mor::io::checkpoint::latest(&full).unwrap(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let b = load_model(
        &mor::io::checkpoint::latest(&split).unwrap(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    for ((na, va), (nb, vb)) in a.params().iter().zip(b.params().iter()) {
        assert_eq!(na, nb);
        let d = (va.as_tensor() - vb.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{na} differs after resume");
    }
}

#[test]
fn token_choice_loss_free_trains_and_updates_its_bias() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    let cfg = tiny(
        r#","mor":{"routing":{"token":{"router_func":"sigmoid","alpha":0.1,"balancing":"loss_free"}}}"#,
    );
    let model = MorModel::new(&cfg, &candle_core::Device::Cpu, 2).unwrap();
    let run = tmp.path().join("run");
    // An odd number of steps: the bias is a sum of ±u steps, so it cannot return exactly to zero.
    let mut t = Trainer::new(model, train_cfg(3, 0), &data, &run).unwrap();
    t.run(false).unwrap();
    let bias = t
        .model()
        .params()
        .get(mor::model::token_choice::BIAS_NAME)
        .unwrap()
        .as_tensor()
        .to_vec1::<f32>()
        .unwrap();
    assert!(bias.iter().any(|&b| b != 0.0), "bias never moved: {bias:?}");
    let recs = read_metrics(&run.join(METRICS_FILE)).unwrap();
    let first_step = recs.iter().find(|r| r.get("loss").is_some()).unwrap();
    assert!(first_step.get("max_vio").is_some());
}

#[test]
fn bad_inputs_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path());
    // A model whose vocabulary is smaller than the corpus tokenizer's.
    let mut cfg = tiny("");
    cfg.vocab_size = 100;
    let model = MorModel::new(&cfg, &candle_core::Device::Cpu, 0).unwrap();
    let e = Trainer::new(model, train_cfg(2, 0), &data, &tmp.path().join("r1"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("vocab_size"), "{e}");
    // A sequence longer than the context.
    let model = MorModel::new(&tiny(""), &candle_core::Device::Cpu, 0).unwrap();
    let mut tc = train_cfg(2, 0);
    tc.seq_len = 64;
    let e = Trainer::new(model, tc, &data, &tmp.path().join("r2"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("exceeds the model's context"), "{e}");
    // Resuming a run that has no checkpoint.
    let e = Trainer::resume(&tmp.path().join("nothing"), &data, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no checkpoint"), "{e}");
    // A truncated checkpoint.
    let model = MorModel::new(&tiny(""), &candle_core::Device::Cpu, 0).unwrap();
    let dir = tmp.path().join("ckpt");
    mor::io::checkpoint::save_model(&dir, &model).unwrap();
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_model(&dir, &candle_core::Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn frozen_model_matches_and_builds_no_graph() {
    use candle_core::{Device, Tensor};
    use mor::model::ForwardOptions;
    let cfg = tiny(r#","mor":{"routing":{"expert":{}}}"#);
    let model = MorModel::new(&cfg, &Device::Cpu, 5).unwrap();
    let frozen = model.frozen().unwrap();
    let ids: Vec<u32> = (0..24).map(|i| (i * 7 % 320) as u32).collect();
    let x = Tensor::from_vec(ids, (1, 24), &Device::Cpu).unwrap();
    let a = model.forward(&x, &ForwardOptions::eval()).unwrap().logits;
    let b = frozen.forward(&x, &ForwardOptions::eval()).unwrap().logits;
    // The trainable model records the graph (every intermediate stays alive); the frozen one does not.
    assert!(a.track_op());
    assert!(!b.track_op());
    let max_diff = |x: &Tensor, y: &Tensor| -> f32 {
        (x - y)
            .and_then(|t| t.abs()?.max_all()?.to_scalar::<f32>())
            .unwrap()
    };
    assert_eq!(max_diff(&a, &b), 0.0);
    // Same storage: an optimizer update of the trainable model shows through.
    let name = "model.embed_tokens.weight";
    let w = model.params().get(name).unwrap();
    model
        .params()
        .set(name, &w.as_tensor().ones_like().unwrap())
        .unwrap();
    let after = frozen.forward(&x, &ForwardOptions::eval()).unwrap().logits;
    assert!(max_diff(&after, &b) > 0.0);
}
