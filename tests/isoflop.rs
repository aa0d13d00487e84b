//! The isoFLOP study (`mor experiment isoflop`, docs/isoflop.md): budgets become step counts that spend equal FLOPs,
//! a tiny study runs end to end, a started study continues (done runs skipped, a killed run resumed exactly), and bad
//! input is refused before anything is trained.

use std::path::{Path, PathBuf};

use mor::config::flops::forward_flops;
use mor::data::{prepare_corpus, DocumentSplit, PrepareOptions, Tokenizer};
use mor::train::isoflop::{
    DecodeOptions, RunStatus, Study, StudyOptions, DEFAULT_BUDGETS, DEFAULT_VARIANTS, PLOT_FILE,
    RESULT_FILE, TABLE_FILE,
};

fn test_data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// A corpus of the 24 bundled sonnets (one document each), a quarter of them held out.
fn corpus(dir: &Path) -> PathBuf {
    let inputs = [test_data("sonnets.txt"), test_data("sonnets.jsonl")];
    let tok = Tokenizer::train_bpe(&inputs, 300).unwrap();
    let data = dir.join("data");
    let opts = PrepareOptions {
        val_fraction: 0.25,
        split: DocumentSplit::BlankLines,
        ..PrepareOptions::default()
    };
    let info = prepare_corpus(&inputs, &tok, &data, &opts).unwrap();
    assert!(!info.split_within_document && info.val_documents == 6);
    tok.save(data.join("tokenizer.json")).unwrap();
    data
}

/// A study small enough to train in seconds: d 32, 5 layers (1 + 3 + 1 for N_r = 3), 32-token windows.
fn tiny(variants: &[&str], budget: f64) -> StudyOptions {
    StudyOptions {
        budgets: vec![budget],
        variants: variants.iter().map(|s| s.to_string()).collect(),
        hidden_size: 32,
        heads: 2,
        layers: 5,
        seq_len: 32,
        batch_size: 2,
        eval_sequences: 4,
        save_every: 2,
        decode: DecodeOptions {
            batch: 2,
            requests: 2,
            new_tokens: 4,
            rounds: 1,
        },
        ..StudyOptions::default()
    }
}

/// FLOPs of one vanilla optimizer step of [`tiny`] on the test corpus.
fn vanilla_step_flops(data: &Path) -> f64 {
    let s = Study::plan(&tiny(&["vanilla"], 1e12), data, Path::new("unused")).unwrap();
    s.runs[0].flops() / s.runs[0].train.steps as f64
}

#[test]
fn derived_steps_spend_equal_flops_across_variants() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    // The study's own shape and budgets (only the held-out set shrunk to fit the test corpus), plus MoR-2.
    let mut o = StudyOptions {
        eval_sequences: 1,
        ..StudyOptions::default()
    };
    o.variants.push("mor-expert-2".into());
    let study = Study::plan(&o, &data, &tmp.path().join("study")).unwrap();
    assert_eq!(
        study.runs.len(),
        DEFAULT_BUDGETS.len() * (DEFAULT_VARIANTS.len() + 1)
    );
    for &budget in &DEFAULT_BUDGETS {
        let runs: Vec<_> = study.runs.iter().filter(|r| r.budget == budget).collect();
        for r in &runs {
            // Counted independently by the FLOPs calculator, as `mor flops` does.
            let per_token = forward_flops(&r.model, o.seq_len)
                .unwrap()
                .per_token_excl_head;
            let spent = per_token * (r.train.steps * r.train.tokens_per_step()) as f64;
            assert!(
                spent <= budget && spent > 0.99 * budget,
                "{} at {budget:e}: {spent:e}",
                r.variant
            );
            assert_eq!(r.model.num_hidden_layers, 8, "{}", r.variant);
            assert_eq!(r.model.hidden_size, 128, "{}", r.variant);
        }
        let steps = |v: &str| runs.iter().find(|r| r.variant == v).unwrap().train.steps;
        // Same unrolled depth: recursive costs what vanilla costs; MoR processes fewer tokens per recursion.
        assert_eq!(steps("recursive-3"), steps("vanilla"));
        assert!(steps("mor-expert-3") as f64 > 1.3 * steps("vanilla") as f64);
        // Recursive KV sharing skips the deeper recursions' K/V projections: a little cheaper per token.
        let per_token = |v: &str| {
            runs.iter()
                .find(|r| r.variant == v)
                .unwrap()
                .flops_per_token
        };
        assert!(per_token("mor-expert-3+kv") < per_token("mor-expert-3"));
        assert!(steps("mor-expert-3+kv") >= steps("mor-expert-3"));
        assert!(steps("mor-expert-2") < steps("mor-expert-3"));
    }
    // Warm-up: 5% of each variant's steps at the smallest budget, at every budget (paper App. B).
    for v in DEFAULT_VARIANTS {
        let runs: Vec<_> = study.runs.iter().filter(|r| r.variant == v).collect();
        let w = (0.05 * runs[0].train.steps as f64).round() as usize;
        assert!(w > 0);
        assert!(
            runs.iter().all(|r| r.train.schedule.warmup_steps() == w),
            "{v}"
        );
    }
}

#[test]
fn tiny_study_runs_end_to_end_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let budget = 4.5 * vanilla_step_flops(&data);
    let o = tiny(&["vanilla", "mor-expert-3"], budget);
    let out = tmp.path().join("study");
    let report = Study::plan(&o, &data, &out).unwrap().run(false).unwrap();

    assert_eq!(report.runs.len(), 2);
    let (van, moe) = (&report.runs[0].0, &report.runs[1].0);
    assert!(report.runs.iter().all(|r| r.1 == RunStatus::Trained));
    assert_eq!((van.variant.as_str(), van.steps), ("vanilla", 4));
    assert!(
        moe.steps > van.steps,
        "MoR trains more steps at the same budget"
    );
    assert!(moe.unique_params < van.unique_params);
    for r in [van, moe] {
        // Trained a little from a uniform start (ln 300 ≈ 5.7 nats).
        assert!(
            r.nll.is_finite() && r.nll > 1.0 && r.nll < 6.5,
            "{}: {}",
            r.variant,
            r.nll
        );
        assert!(
            r.flops <= budget && r.flops > 0.75 * budget,
            "{}: {:e}",
            r.variant,
            r.flops
        );
    }
    assert!(van.nll_causal.is_none() && van.depth.is_none());
    let depth = moe.depth.as_ref().unwrap();
    assert_eq!(depth.len(), 4);
    assert!((depth.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{depth:?}");
    assert!(moe.nll_causal.unwrap().is_finite());
    // Decode throughput of both trained models.
    let decode = &report.decode[0].1.results;
    assert_eq!(decode.len(), 2);
    assert!(decode
        .iter()
        .all(|d| d.tokens == 8 && d.tokens_per_sec() > 0.0));

    // The table and the plot.
    let table = std::fs::read_to_string(out.join(TABLE_FILE)).unwrap();
    assert_eq!(table, report.table);
    for needle in [
        "| vanilla |",
        "| mor-expert-3 |",
        &format!("{:.4}", moe.nll),
        "depth (0..N_r)",
    ] {
        assert!(table.contains(needle), "{needle} missing:\n{table}");
    }
    let png = std::fs::read(out.join(PLOT_FILE)).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // Started again: every run is read back, nothing is trained.
    let result_file = report.runs[1].0.clone();
    let again = Study::plan(&o, &data, &out).unwrap().run(false).unwrap();
    assert!(again.runs.iter().all(|r| r.1 == RunStatus::Skipped));
    assert_eq!(again.runs[1].0, result_file);
    assert_eq!(again.table, report.table);

    // Another variant added later: only it is trained.
    let more = tiny(&["vanilla", "mor-expert-3", "recursive-3"], budget);
    let grown = Study::plan(&more, &data, &out).unwrap().run(false).unwrap();
    let status: Vec<RunStatus> = grown.runs.iter().map(|r| r.1).collect();
    assert_eq!(
        status,
        [RunStatus::Skipped, RunStatus::Skipped, RunStatus::Trained]
    );

    // Other settings in the same directory are refused rather than mixed in.
    let other = StudyOptions {
        lr: 1e-3,
        ..o.clone()
    };
    let e = Study::plan(&other, &data, &out)
        .unwrap()
        .run(false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("different training configuration"), "{e}");

    // A study killed in the middle of a run: the run continues from its checkpoint and ends exactly where an
    // uninterrupted one does.
    let killed = tmp.path().join("killed");
    let study = Study::plan(&o, &data, &killed).unwrap();
    let plan = &study.runs[1];
    plan.start(&data).unwrap().run_until(2, false).unwrap();
    assert!(!plan.dir.join(RESULT_FILE).exists());
    let resumed = study.run(false).unwrap();
    assert_eq!(resumed.runs[0].1, RunStatus::Trained);
    assert_eq!(resumed.runs[1].1, RunStatus::Resumed(2));
    let r = &resumed.runs[1].0;
    assert_eq!(r.steps, moe.steps);
    assert!((r.nll - moe.nll).abs() < 1e-5, "{} vs {}", r.nll, moe.nll);
}

#[test]
fn bad_input_is_refused_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let out = tmp.path().join("study");
    let err = |o: &StudyOptions, data: &Path| Study::plan(o, data, &out).unwrap_err().to_string();
    let ok = tiny(&["vanilla", "mor-expert-3"], 1e9);
    assert!(Study::plan(&ok, &data, &out).is_ok());

    // A budget below one optimizer step of some variant.
    let step = vanilla_step_flops(&data);
    let e = err(&tiny(&["mor-expert-3", "vanilla"], 0.9 * step), &data);
    assert!(
        e.contains("smaller than one training step") && e.contains("vanilla"),
        "{e}"
    );
    assert!(err(&tiny(&["vanilla"], -1.0), &data).contains("positive"));
    assert!(err(&tiny(&["vanilla"], f64::NAN), &data).contains("positive"));

    // Variants that cannot be built at 5 layers (3 middle layers for N_r = 4), or at another depth, or at all.
    let e = err(&tiny(&["vanilla", "mor-expert-4"], 1e9), &data);
    assert!(e.contains("mor-expert-4") && e.contains("5 layers"), "{e}");
    assert!(err(&tiny(&["vanilla@8"], 1e9), &data).contains("unrolled depth"));
    assert!(err(&tiny(&["mixture-3"], 1e9), &data).contains("unknown variant"));
    assert!(err(&tiny(&["vanilla", "vanilla"], 1e9), &data).contains("twice"));

    // A held-out split smaller than the held-out set.
    let big_eval = StudyOptions {
        eval_sequences: 1000,
        ..ok.clone()
    };
    let e = err(&big_eval, &data);
    assert!(
        e.contains("held-out tokens, fewer than the held-out set"),
        "{e}"
    );

    // A held-out split cut out of a single document.
    let single = tmp.path().join("single");
    let tok = Tokenizer::train_bpe(&[test_data("sonnets.txt")], 300).unwrap();
    let opts = PrepareOptions {
        val_fraction: 0.5,
        ..PrepareOptions::default()
    };
    prepare_corpus(&[test_data("sonnets.txt")], &tok, &single, &opts).unwrap();
    let e = err(&ok, &single);
    assert!(e.contains("only document"), "{e}");

    // Nothing was written by any refused plan.
    assert!(!out.exists());
}
