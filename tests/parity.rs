//! Parity with the official PyTorch implementation: every fixture in ../shared/fixtures (see its README) must match
//! in logits, hidden states, losses, routing decisions and gradients within the float32 tolerances of `mor::verify`.

use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    let root = std::env::var("MOR_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    root.join(name)
}

fn check(name: &str, must_have: &[&str]) {
    let report =
        mor::verify::verify_reference(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
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
