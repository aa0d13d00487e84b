//! Model checkpoints: every variant round-trips bit-identically through config.json + model.safetensors, shared
//! weights are stored once, and mismatched or damaged checkpoints are refused with the offending tensor named.

use candle_core::{Device, Tensor};
use mor::config::ModelConfig;
use mor::io::checkpoint::{load_model, load_tensors, save_model};
use mor::model::{ForwardOptions, MorModel};

fn cfg(extra: &str) -> ModelConfig {
    ModelConfig::from_json(&format!(
        r#"{{"vocab_size":64,"hidden_size":16,"intermediate_size":32,"num_hidden_layers":8,
            "num_attention_heads":2,"num_key_value_heads":1,"max_position_embeddings":16{extra}}}"#
    ))
    .unwrap()
}

fn variants() -> Vec<(&'static str, ModelConfig)> {
    let rec = r#","recursion":{"sharing":"middle_cycle","num_recursion":3}"#;
    vec![
        ("vanilla", cfg("")),
        (
            "recursive-cycle",
            cfg(r#","recursion":{"sharing":"cycle","num_recursion":2}"#),
        ),
        (
            "recursive-sequence",
            cfg(r#","recursion":{"sharing":"sequence","num_recursion":2}"#),
        ),
        (
            "mor-expert",
            cfg(&format!(r#"{rec},"mor":{{"routing":{{"expert":{{}}}}}}"#)),
        ),
        (
            "mor-expert-mlp-aux",
            cfg(&format!(
                r#"{rec},"mor":{{"router_type":"mlp","routing":{{"expert":{{"sampling":"aux_router"}}}}}}"#
            )),
        ),
        (
            "mor-token-lossfree",
            cfg(&format!(
                r#"{rec},"mor":{{"routing":{{"token":{{"balancing":"loss_free"}}}}}}"#
            )),
        ),
        (
            "mor-expert-kv-share",
            cfg(&format!(
                r#"{rec},"mor":{{"routing":{{"expert":{{}}}}}},"kv_sharing":{{}}"#
            )),
        ),
    ]
}

#[test]
fn every_variant_round_trips_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = Tensor::from_vec(
        (0..24u32).map(|i| (i * 7) % 64).collect::<Vec<_>>(),
        (2, 12),
        &Device::Cpu,
    )
    .unwrap();
    for (name, c) in variants() {
        let model = MorModel::new(&c, &Device::Cpu, 5).unwrap();
        let dir = tmp.path().join(name);
        save_model(&dir, &model).unwrap();
        let back = load_model(&dir, &Device::Cpu).unwrap();
        let mut loaded = back.config().clone();
        // Saving adds the HF bookkeeping fields; everything else must come back unchanged.
        assert_eq!(loaded.model_type.take().as_deref(), Some("llama"));
        assert!(loaded.architectures.take().is_some());
        assert_eq!(&loaded, model.config(), "{name}");
        let a = model.forward(&ids, &ForwardOptions::eval()).unwrap().logits;
        let b = back.forward(&ids, &ForwardOptions::eval()).unwrap().logits;
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{name}: logits differ after a round trip");
        // Shared weights are stored once: one set of layer tensors per unique layer.
        let stored = load_tensors(&dir).unwrap();
        let layers: std::collections::BTreeSet<String> = stored
            .keys()
            .filter_map(|k| {
                k.strip_prefix("model.layers.")
                    .and_then(|r| r.split('.').next())
                    .map(String::from)
            })
            .collect();
        assert_eq!(
            layers.len(),
            c.layout().unique_layers().len(),
            "{name}: {layers:?}"
        );
    }
}

#[test]
fn mismatched_checkpoints_are_refused_with_the_tensor_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let model = MorModel::new(&variants()[3].1, &Device::Cpu, 0).unwrap();
    save_model(&dir, &model).unwrap();

    // Config says token-choice but the weights are expert-choice: missing/unexpected router tensors.
    let wrong = variants()[5].1.clone();
    let e = mor::io::checkpoint::load_model_with_config(&dir, &wrong, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model.router"), "{e}");

    // A different width: the shape error names the tensor.
    let mut narrow = variants()[3].1.clone();
    narrow.intermediate_size = 48;
    let e = mor::io::checkpoint::load_model_with_config(&dir, &narrow, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("mlp") && e.contains("shape"), "{e}");

    // A malformed config.json.
    std::fs::write(dir.join("config.json"), r#"{"vocab_size": 64}"#).unwrap();
    let e = load_model(&dir, &Device::Cpu).err().unwrap().to_string();
    assert!(
        e.contains("config.json") && e.contains("missing field"),
        "{e}"
    );

    // No weights at all.
    let e = load_model(tmp.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("config.json"), "{e}");
}
