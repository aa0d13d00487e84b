//! Parity with the official PyTorch implementation: every fixture in tests/fixtures (see its README) must match
//! in logits, hidden states, losses, routing decisions and gradients within the float32 tolerances of `mor::io::verify`.

use std::path::PathBuf;

mod common;
use common::max_abs_diff;

fn fixture(name: &str) -> PathBuf {
    let root = std::env::var("MOR_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"));
    root.join(name)
}

fn check(name: &str, must_have: &[&str]) {
    let report =
        mor::io::verify::verify_reference(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    println!("{}", report.table());
    for m in must_have {
        assert!(report.row(m).is_some(), "{name}: {m} was not compared");
    }
    assert!(
        report.rows.iter().any(|r| r.name.starts_with("grad.")),
        "{name}: no gradient compared"
    );
    assert!(report.passed(), "{name} deviates:\n{}", report.table());
}

#[test]
fn a_vanilla() {
    check("A_vanilla", &["logits", "loss.total_loss"]);
}
#[test]
fn b_recursive_middle_cycle() {
    check(
        "B_recursive_middle_cycle_r3",
        &["logits", "loss.total_loss", "grad.lm_head.weight"],
    );
}
#[test]
fn c_recursive_cycle() {
    check("C_recursive_cycle_r2", &["logits"]);
}
#[test]
fn d_recursive_sequence() {
    check("D_recursive_sequence_r2", &["logits"]);
}
#[test]
fn e_recursive_middle_sequence() {
    check("E_recursive_middle_sequence_r3", &["logits"]);
}
#[test]
fn f_mor_expert_linear_sigmoid() {
    check(
        "F_mor_expert_linear_sigmoid",
        &[
            "hidden_states.3",
            "routing.r2.selected",
            "routing.r2.gates",
            "loss.sampling_loss.r1",
            "metric.sampling_acc",
        ],
    );
}
#[test]
fn g_mor_expert_mlp_tanh() {
    check(
        "G_mor_expert_mlp_tanh",
        &["routing.r1.selected", "loss.sampling_loss"],
    );
}
#[test]
fn h_mor_token_balancing_zloss() {
    check(
        "H_mor_token_softmax_balloss_zloss",
        &[
            "routing.expert_index",
            "loss.balancing_loss",
            "loss.router_z_loss",
            "hidden_states.2",
        ],
    );
}
#[test]
fn i_mor_token_loss_free() {
    check(
        "I_mor_token_lossfree_sigmoid",
        &[
            "routing.expert_index",
            "loss_free.router_bias_after",
            "loss_free.expert_index_after_update",
        ],
    );
}
#[test]
fn j_mor_expert_kv_sharing() {
    check("J_mor_expert_kv_share", &["routing.r2.selected", "logits"]);
}
#[test]
fn k_recursive_kv_sharing() {
    check("K_recursive_middle_cycle_r3_kv_share", &["logits"]);
}

/// `mor export --format official` on every fixture: the exported checkpoint holds exactly the fixture's tensors,
/// name by name and bit for bit, and loads back (through the one model loader) to the same logits.
#[test]
fn official_export_round_trips_every_fixture() {
    use candle_core::Tensor;
    let root = fixture("");
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("meta.json").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 11, "fixtures: {names:?}");
    for name in names {
        let dir = fixture(&name);
        let model = mor::io::verify::load_reference_model(&dir).unwrap();
        let out = tempfile::tempdir().unwrap();
        mor::io::official::export_official(&model, out.path()).unwrap();
        let theirs = candle_core::safetensors::load(
            dir.join("checkpoint/model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let ours = candle_core::safetensors::load(
            out.path().join("model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let mut a: Vec<&String> = theirs.keys().collect();
        let mut b: Vec<&String> = ours.keys().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{name}: tensor names");
        for (k, t) in &theirs {
            assert_eq!(max_abs_diff(t, &ours[k]), 0.0, "{name}: {k}");
        }
        let back = mor::io::load::load(out.path(), &Default::default())
            .unwrap()
            .model;
        assert_eq!(back.config(), model.config(), "{name}: config");
        let ids = Tensor::from_vec(
            (0..24u32).map(|i| (i * 37) % 256).collect::<Vec<_>>(),
            (1, 24),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let opts = mor::model::ForwardOptions::eval();
        let (x, y) = (
            model.forward(&ids, &opts).unwrap().logits,
            back.forward(&ids, &opts).unwrap().logits,
        );
        assert_eq!(
            max_abs_diff(&x, &y),
            0.0,
            "{name}: logits after the round trip"
        );
    }
}
