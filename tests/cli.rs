//! The `mor` command line end to end: tokenizer → prepare → train → resume → generate, `verify` on a reference
//! fixture, `flops`, and clear errors (never a panic) on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn mor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mor"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run mor")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A failing command exits 1 with a message, not 101 with a panic.
fn fails_with(args: &[&str], needle: &str) {
    let o = mor(args);
    let t = text(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{args:?} should fail cleanly: {t}"
    );
    assert!(!t.contains("panicked"), "{args:?} panicked: {t}");
    assert!(t.contains(needle), "{args:?}: expected {needle:?} in {t}");
}

fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sonnets.txt")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn train_resume_generate_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tmp.path().join("tok.json");
    let data = tmp.path().join("data");
    let run = tmp.path().join("run");
    let cfg = tmp.path().join("config.json");
    std::fs::write(
        &cfg,
        r#"{"vocab_size":300,"hidden_size":32,"intermediate_size":64,"num_hidden_layers":5,
            "num_attention_heads":2,"num_key_value_heads":1,"max_position_embeddings":32,
            "recursion":{"num_recursion":3},"mor":{"routing":{"expert":{}}}}"#,
    )
    .unwrap();
    let o = mor(&[
        "tokenizer",
        s(&sample()),
        "--vocab-size",
        "300",
        "--out",
        s(&tok),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = mor(&[
        "prepare",
        s(&sample()),
        "--tokenizer",
        s(&tok),
        "--out",
        s(&data),
        "--val-fraction",
        "0.2",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let train = |extra: &[&str]| {
        let mut a = vec![
            "train",
            "--config",
            s(&cfg),
            "--data",
            s(&data),
            "--out",
            s(&run),
            "--seq-len",
            "32",
            "--batch-size",
            "4",
            "--eval-every",
            "2",
            "--eval-sequences",
            "2",
            "--quiet",
        ];
        a.extend_from_slice(extra);
        mor(&a)
    };
    let o = train(&["--steps", "3"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("held-out loss"), "{}", text(&o));
    let o = train(&["--steps", "5", "--resume"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("done: 5 steps"), "{}", text(&o));
    assert!(run.join("loss.png").exists());

    let o = mor(&[
        "generate",
        "--checkpoint",
        s(&run),
        "--prompt",
        "Shall I",
        "--max-tokens",
        "5",
        "--seed",
        "1",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    // Same seed, same text.
    let again = mor(&[
        "generate",
        "--checkpoint",
        s(&run),
        "--prompt",
        "Shall I",
        "--max-tokens",
        "5",
        "--seed",
        "1",
    ]);
    assert_eq!(o.stdout, again.stdout);

    // Continued training of the trained model (the vanilla baseline of an up-training comparison), then one plot
    // of both runs' held-out loss.
    let cont = tmp.path().join("cont");
    let o = mor(&[
        "train",
        "--init-from",
        s(&run),
        "--data",
        s(&data),
        "--out",
        s(&cont),
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--steps",
        "2",
        "--eval-every",
        "1",
        "--eval-sequences",
        "2",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let png = tmp.path().join("cmp.png");
    let o = mor(&[
        "plot",
        &format!("{}=scratch", s(&run)),
        &format!("{}=continued", s(&cont)),
        "--out",
        s(&png),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let table = text(&o);
    assert!(table.contains("| step | scratch | continued |"), "{table}");
    // Step 0 of the continued run is the trained model's held-out loss, which the scratch run recorded at step 5.
    let row = |step: &str| -> Vec<String> {
        let line = table
            .lines()
            .find(|l| l.starts_with(&format!("| {step} |")))
            .unwrap_or_else(|| panic!("no row {step} in {table}"));
        line.split('|').map(|c| c.trim().to_string()).collect()
    };
    assert_eq!(row("0")[3], row("5")[2], "{table}");
    assert!(png.exists());
    fails_with(
        &[
            "plot",
            s(&run),
            "--metric",
            "no_such_metric",
            "--out",
            s(&png),
        ],
        "no_such_metric",
    );
    // Bad requests.
    let long = "word ".repeat(200);
    fails_with(
        &["generate", "--checkpoint", s(&run), "--prompt", &long],
        "context",
    );
    fails_with(
        &[
            "generate",
            "--checkpoint",
            s(&run),
            "--prompt",
            "x",
            "--top-p",
            "1.5",
        ],
        "top_p",
    );
    fails_with(
        &[
            "generate",
            "--checkpoint",
            s(&run),
            "--prompt",
            "x",
            "--max-tokens",
            "0",
        ],
        "max_new_tokens",
    );
}

#[test]
fn verify_reports_parity_with_the_official_code() {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/F_mor_expert_linear_sigmoid");
    let o = mor(&["verify", s(&fixture)]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("routing.r2.selected") && t.contains("within tolerance"),
        "{t}"
    );
    fails_with(&["verify", "/nonexistent/reference"], "meta.json");
}

#[test]
fn flops_and_bad_configs() {
    let o = mor(&["flops", "--preset", "smollm-360m-mor-expert-3"]);
    assert!(o.status.success(), "{}", text(&o));
    fails_with(&["flops", "--preset", "no-such-model"], "tiny-mor-expert");
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, r#"{"vocab_size":10,"hidden_size":30,"intermediate_size":8,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2}"#).unwrap();
    fails_with(
        &["flops", "--config", s(&bad)],
        "does not divide hidden_size",
    );
    std::fs::write(&bad, r#"{"vocab_size":10,"hidden_size":32,"intermediate_size":8,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"moe":{}}"#).unwrap();
    fails_with(&["flops", "--config", s(&bad)], "unknown field");
    // An empty corpus.
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let o = mor(&[
        "tokenizer",
        s(&sample()),
        "--vocab-size",
        "300",
        "--out",
        s(&tmp.path().join("t.json")),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    fails_with(
        &[
            "prepare",
            s(&empty),
            "--tokenizer",
            s(&tmp.path().join("t.json")),
            "--out",
            s(&tmp.path().join("d")),
        ],
        "empty",
    );
}

#[test]
fn bench_serve_refuses_an_unreachable_url_or_pid_before_running() {
    fails_with(
        &["bench", "serve", "--url", "notaurl", "--clients", "1"],
        "--url notaurl: not an http:// or https:// URL with a host",
    );
    fails_with(
        &[
            "bench",
            "serve",
            "--url",
            "http://127.0.0.1:1",
            "--server-pid",
            "4000000000",
        ],
        "--server-pid 4000000000: no such process",
    );
}
