//! The `mor eval` command group: `loss`, `tasks` and `depth`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use mor::data::Tokenizer;
use mor::eval::harness::{
    markdown_table, run_task, ExampleResult, ModelScorer, TaskOptions, TaskResult,
};
use mor::eval::loss::{eval_loss, prepare_input, LossOptions, LossReport};
use mor::eval::routing::{depth_picture, RoutingReport, RoutingStats};
use mor::eval::tasks::{load_task, parse_tasks, TaskData};
use mor::eval::{check_vocab, DEFAULT_DATA_DIR};
use mor::io::load::{LoadOptions, ModelSource};
use mor::model::{ForwardOptions, MorModel, Routing};
use mor::{MorError, Result};

/// `mor eval …`
#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// NLL, perplexity and bits per byte over fixed-length windows, plus routing diagnostics for MoR models.
    Loss(LossArgs),
    /// Downstream tasks scored by log-likelihood as lm-evaluation-harness does.
    Tasks(TasksArgs),
    /// Per-token recursion depths of a passage as an HTML page.
    Depth(DepthArgs),
    /// Raw logits of prompts at every position, as .npy files (for checks against other implementations).
    Logits(LogitsArgs),
}

/// Which expert-choice routing rule(s) to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoutingChoice {
    /// The paper's non-causal per-sequence top-k.
    Topk,
    /// The causal rule used by generation (docs/architecture.md S5).
    Causal,
    /// Both.
    Both,
}

/// Model selection shared by the eval commands.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Checkpoint directory (config.json, weights, tokenizer.json), a run directory (its latest checkpoint), or a
    /// .gguf file.
    #[arg(long, visible_alias = "model")]
    pub checkpoint: PathBuf,
    /// tokenizer.json (default: the checkpoint's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Expert-choice routing rule(s) to evaluate (ignored for other models).
    #[arg(long, value_enum, default_value = "both")]
    pub routing: RoutingChoice,
    /// Output directory (default: `<checkpoint>/eval`).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `mor eval loss`
#[derive(Debug, Clone, Args)]
pub struct LossArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Inputs: `.tokens` files, or text / JSONL files (optionally .gz).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Tokens per window (paper: 2048; capped at the model's context).
    #[arg(long, default_value_t = 2048)]
    pub window: usize,
    /// New tokens scored per window (default: window − 1, non-overlapping).
    #[arg(long)]
    pub stride: Option<usize>,
    /// Windows per forward.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// At most this many windows per input (paper: 500).
    #[arg(long)]
    pub max_windows: Option<usize>,
    /// JSONL field holding the text.
    #[arg(long, default_value = "text")]
    pub field: String,
    /// Hide progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// `mor eval tasks`
#[derive(Debug, Clone, Args)]
pub struct TasksArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated tasks (lambada, hellaswag, piqa, winogrande, arc_easy, arc_challenge, mmlu, openbookqa) or
    /// `all`.
    #[arg(long, default_value = "all")]
    pub tasks: String,
    /// Shots per example.
    #[arg(long, default_value_t = 0)]
    pub shots: usize,
    /// Seed of the shot sample.
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// At most N examples per task.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Directory made by scripts/fetch_eval_data.sh.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Hide progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// Also write every example's candidate log-likelihoods, predictions and tokens to this JSONL file.
    #[arg(long)]
    pub dump_examples: Option<PathBuf>,
    /// Score every candidate as its own full sequence instead of running the candidates' shared prefix once through
    /// the KV-cached engine (for timing comparisons and debugging; the scores agree within float rounding).
    #[arg(long)]
    pub no_prefix_reuse: bool,
}

/// `mor eval logits`
#[derive(Debug, Clone, Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A prompt (repeatable).
    #[arg(long = "prompt", required = true)]
    pub prompts: Vec<String>,
}

/// `mor eval depth`
#[derive(Debug, Clone, Args)]
pub struct DepthArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The passage.
    #[arg(long, conflicts_with = "passage_file")]
    pub passage: Option<String>,
    /// A file holding the passage.
    #[arg(long)]
    pub passage_file: Option<PathBuf>,
}

/// A loaded model with its tokenizer and output directory.
pub struct Loaded {
    /// The model.
    pub model: MorModel,
    /// Its tokenizer.
    pub tok: Tokenizer,
    /// Where results go.
    pub out: PathBuf,
    /// The checkpoint directory or GGUF file.
    pub dir: PathBuf,
}

/// Load the checkpoint (or a run directory's latest), its tokenizer, and check they fit together.
pub fn load(a: &ModelArgs) -> Result<Loaded> {
    // Evaluation never trains: the loader freezes the weights, so no autograd graph is kept alive (gigabytes at
    // 2048-token windows).
    let opts = LoadOptions {
        tokenizer: a.tokenizer.clone(),
        ..Default::default()
    };
    let loaded = mor::io::load::load(&a.checkpoint, &opts)?;
    let tok = loaded.tokenizer()?.clone();
    let model = loaded.model;
    check_vocab(&tok, model.config().vocab_size)?;
    let dir = loaded.source.path().to_path_buf();
    // Results go into a checkpoint (`eval/`), or beside a GGUF file (`model.gguf` -> `model.eval/`).
    let out = a.out.clone().unwrap_or_else(|| match &loaded.source {
        ModelSource::Checkpoint(d) => d.join("eval"),
        ModelSource::Gguf(f) => f.with_extension("eval"),
    });
    std::fs::create_dir_all(&out).map_err(|e| MorError::io(&out, e))?;
    Ok(Loaded {
        model,
        tok,
        out,
        dir,
    })
}

/// The (label, options) pairs to run for `choice` on `model`.
pub fn modes(model: &MorModel, choice: RoutingChoice) -> Vec<(&'static str, ForwardOptions)> {
    if !matches!(model.routing(), Routing::Expert(_)) {
        let label = if matches!(model.routing(), Routing::None) {
            "none"
        } else {
            "token-choice"
        };
        return vec![(label, ForwardOptions::eval())];
    }
    match choice {
        RoutingChoice::Topk => vec![("top-k", ForwardOptions::eval())],
        RoutingChoice::Causal => vec![("causal", ForwardOptions::causal())],
        RoutingChoice::Both => vec![
            ("top-k", ForwardOptions::eval()),
            ("causal", ForwardOptions::causal()),
        ],
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    write_bytes(path, text.as_bytes())
}

fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| MorError::io(path, e))
}

fn json_text(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

/// Markdown lines of a routing report.
pub fn routing_markdown(label: &str, r: &RoutingReport) -> String {
    let fr: Vec<String> = r
        .fraction_per_recursion
        .iter()
        .map(|f| format!("{f:.3}"))
        .collect();
    format!(
        "routing {label}: tokens per recursion [{}], dead-token ratio {}, sampling accuracy {}, MaxVio {}, \
         router entropy {}, load entropy {}\n",
        fr.join(", "),
        opt(r.dead_token_ratio, 4),
        opt(r.sampling_accuracy, 4),
        opt(r.max_vio, 4),
        opt(r.router_entropy, 4),
        opt(r.load_entropy, 4)
    )
}

/// `mor eval loss`: returns the reports (input, routing label, loss, routing diagnostics).
pub fn run_loss(a: &LossArgs) -> Result<Vec<(String, LossReport, RoutingReport)>> {
    let l = load(&a.model)?;
    let scratch = l.out.join(format!(".eval-{}.tokens", std::process::id()));
    let opts = LossOptions {
        window: a.window,
        stride: a.stride,
        batch: a.batch,
        max_windows: a.max_windows,
        progress: !a.quiet,
    };
    let mut all = Vec::new();
    let mut md = String::from("| input | routing | windows | tokens | bytes | NLL | ppl | bits/byte |\n|---|---|---|---|---|---|---|---|\n");
    let mut diag = String::new();
    for input in &a.inputs {
        let data = prepare_input(input, &l.tok, &a.field, &scratch);
        let data = match data {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_file(&scratch);
                return Err(e);
            }
        };
        for (label, fwd) in modes(&l.model, a.model.routing) {
            let mut stats = RoutingStats::default();
            let r = eval_loss(&l.model, &data, &opts, fwd, label, Some(&mut stats));
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    let _ = std::fs::remove_file(&scratch);
                    return Err(e);
                }
            };
            let rr = stats.report(label == "top-k");
            let name = input.display().to_string();
            println!(
                "{name} [{label}]: NLL {:.4}, perplexity {:.3}, bits/byte {:.4} ({} tokens, {} bytes, {} windows)",
                r.nll, r.perplexity, r.bits_per_byte, r.tokens, r.bytes, r.windows
            );
            md.push_str(&format!(
                "| {name} | {label} | {} | {} | {} | {:.4} | {:.3} | {:.4} |\n",
                r.windows, r.tokens, r.bytes, r.nll, r.perplexity, r.bits_per_byte
            ));
            if !matches!(l.model.routing(), Routing::None) {
                let line = routing_markdown(label, &rr);
                print!("  {line}");
                diag.push_str(&format!("- {name}: {line}"));
            }
            all.push((name, r, rr));
        }
    }
    let _ = std::fs::remove_file(&scratch);
    let js = json!({
        "checkpoint": l.dir,
        "window": a.window,
        "stride": a.stride,
        "results": all.iter().map(|(n, r, rr)| json!({"input": n, "loss": r, "routing_stats": rr})).collect::<Vec<_>>(),
    });
    write(&l.out.join("loss.json"), &json_text(&js))?;
    write(&l.out.join("loss.md"), &format!("{md}\n{diag}"))?;
    println!("wrote {}", l.out.join("loss.json").display());
    Ok(all)
}

/// `mor eval tasks`: returns the results per routing label.
pub fn run_tasks(a: &TasksArgs) -> Result<Vec<(String, Vec<TaskResult>)>> {
    let tasks = parse_tasks(&a.tasks)?;
    // Load every task before the model so a missing data file fails fast.
    let data = tasks
        .iter()
        .map(|&t| load_task(t, &a.data_dir))
        .collect::<Result<Vec<_>>>()?;
    let l = load(&a.model)?;
    let opts = TaskOptions {
        num_fewshot: a.shots,
        seed: a.seed,
        limit: a.limit,
        progress: !a.quiet,
    };
    let mut dump = match &a.dump_examples {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(|e| MorError::io(p, e))?,
        )),
        None => None,
    };
    let mut all = Vec::new();
    // Per routing label: whether the shared prefix ran once (recorded so a result says how it was computed).
    let mut reuse = Vec::new();
    let mut md = format!(
        "# Downstream evaluation of {}\n\n{}-shot, seed {}, limit {}\n\n",
        l.dir.display(),
        a.shots,
        a.seed,
        a.limit
            .map(|n| n.to_string())
            .unwrap_or_else(|| "none".into())
    );
    for (label, fwd) in modes(&l.model, a.model.routing) {
        let mut scorer = ModelScorer::new(&l.model, fwd, l.tok.eos_id());
        if !a.no_prefix_reuse {
            scorer = scorer.with_prefix_reuse()?;
        }
        reuse.push(scorer.reuses_prefix());
        let mut results = Vec::new();
        for d in &data {
            let (r, examples) = run_task(&mut scorer, &l.tok, d, &opts)?;
            if let (Some(w), Some(p)) = (dump.as_mut(), &a.dump_examples) {
                write_examples(w, p, label, d, &examples)?;
            }
            println!(
                "[{label}] {}: acc {:.4} ± {:.4}{} (n = {})",
                r.task,
                r.acc,
                r.acc_stderr,
                r.acc_norm
                    .map(|x| format!(
                        ", acc_norm {x:.4} ± {:.4}",
                        r.acc_norm_stderr.unwrap_or(f64::NAN)
                    ))
                    .unwrap_or_default(),
                r.n
            );
            results.push(r);
        }
        md.push_str(&markdown_table(&format!("routing: {label}"), &results));
        md.push('\n');
        all.push((label.to_string(), results));
    }
    let stem = format!("tasks-{}shot", a.shots);
    let js = json!({
        "checkpoint": l.dir,
        "num_fewshot": a.shots,
        "seed": a.seed,
        "limit": a.limit,
        "results": all
            .iter()
            .zip(&reuse)
            .map(|((label, r), reused)| json!({"routing": label, "prefix_reuse": reused, "tasks": r}))
            .collect::<Vec<_>>(),
    });
    write(&l.out.join(format!("{stem}.json")), &json_text(&js))?;
    write(&l.out.join(format!("{stem}.md")), &md)?;
    println!("{md}wrote {}", l.out.join(format!("{stem}.json")).display());
    Ok(all)
}

/// One JSON line per example: routing, task, index, gold, the candidates' log-likelihoods, both predictions'
/// correctness, and the tokens (context length, continuation ids) each candidate was scored with.
fn write_examples(
    w: &mut impl std::io::Write,
    path: &Path,
    routing: &str,
    data: &TaskData,
    examples: &[ExampleResult],
) -> Result<()> {
    for (i, r) in examples.iter().enumerate() {
        let line = json!({
            "routing": routing,
            "task": data.task.name(),
            "index": i,
            "gold": data.docs[i].gold,
            "logprobs": r.logprobs,
            "correct": r.correct,
            "correct_norm": r.correct_norm,
            "context_tokens": r.context_tokens,
            "continuation_tokens": r.continuation_tokens,
        });
        writeln!(w, "{line}").map_err(|e| MorError::io(path, e))?;
    }
    w.flush().map_err(|e| MorError::io(path, e))
}

/// A little-endian f32 `.npy` file (format version 1.0) of a row-major `[rows, cols]` matrix.
pub fn npy_f32(rows: usize, cols: usize, data: &[f32]) -> Vec<u8> {
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // The format pads the header with spaces so that the data starts 64-byte aligned, ending in a newline.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for x in data {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// `mor eval logits`: for each routing rule and prompt, writes `logits/<routing>-<i>.npy` (`[tokens, vocab]`
/// f32) and an index `logits/logits.json` with the prompt texts and token ids. Returns the index path.
pub fn run_logits(a: &LogitsArgs) -> Result<PathBuf> {
    let l = load(&a.model)?;
    let dir = l.out.join("logits");
    std::fs::create_dir_all(&dir).map_err(|e| MorError::io(&dir, e))?;
    let mut entries = Vec::new();
    for (label, fwd) in modes(&l.model, a.model.routing) {
        for (i, text) in a.prompts.iter().enumerate() {
            let ids = l.tok.encode(text)?;
            if ids.is_empty() {
                return Err(MorError::Request(format!(
                    "prompt {i} ({text:?}) encodes to no tokens"
                )));
            }
            let t = Tensor::new(ids.as_slice(), l.model.device())?.unsqueeze(0)?;
            let logits = l.model.forward(&t, &fwd)?.logits.get(0)?;
            let (rows, cols) = logits.dims2()?;
            let flat: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let file = format!("{label}-{i}.npy");
            write_bytes(&dir.join(&file), &npy_f32(rows, cols, &flat))?;
            entries.push(json!({"routing": label, "text": text, "ids": ids, "file": file}));
        }
    }
    let index = dir.join("logits.json");
    write(
        &index,
        &json_text(&json!({"checkpoint": l.dir, "prompts": entries})),
    )?;
    println!("wrote {}", index.display());
    Ok(index)
}

/// `mor eval depth`: writes `depth-<routing>.html` per routing rule and returns the paths.
pub fn run_depth(a: &DepthArgs) -> Result<Vec<PathBuf>> {
    let text = match (&a.passage, &a.passage_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).map_err(|e| MorError::io(f, e))?,
        (None, None) => {
            return Err(MorError::Request(
                "give --passage TEXT or --passage-file FILE".into(),
            ))
        }
    };
    let l = load(&a.model)?;
    let mut paths = Vec::new();
    for (label, fwd) in modes(&l.model, a.model.routing) {
        let html = depth_picture(
            &l.model,
            &l.tok,
            &text,
            fwd,
            &format!("{} — routing {label}", l.model.config().variant_name()),
        )?;
        let p = l.out.join(format!("depth-{label}.html"));
        write(&p, &html)?;
        println!("wrote {}", p.display());
        paths.push(p);
    }
    Ok(paths)
}

/// Run an eval subcommand.
pub fn run(cmd: &EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Loss(a) => run_loss(a).map(|_| ()),
        EvalCommand::Tasks(a) => run_tasks(a).map(|_| ()),
        EvalCommand::Depth(a) => run_depth(a).map(|_| ()),
        EvalCommand::Logits(a) => run_logits(a).map(|_| ()),
    }
}
