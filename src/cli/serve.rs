//! `mor serve`: the OpenAI-compatible HTTP server (see `docs/serving.md`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use mor::io::load::{LoadOptions, ModelSource};
use mor::serve::{ChatTemplate, ServeOptions, ServedModel};

/// Which model to load, shared by `mor serve`, `mor chat` and `mor bench serve`.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Checkpoint directory, run directory (its latest checkpoint), or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// With a .gguf file: run the matmuls on its stored quantized weights instead of dequantized f32.
    #[arg(long)]
    pub quantized: bool,
    /// Convert the weights to this dtype after loading (bf16: half the memory traffic per token).
    #[arg(long, value_enum)]
    pub dtype: Option<super::WeightDtype>,
    /// tokenizer.json (default: the checkpoint's own, or the GGUF's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on (0: any free port; the address is logged).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Bearer token every /v1 request must carry.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Model name listed by /v1/models and carried by responses (default: the model file or directory name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Largest accepted request body in bytes (beyond: 413).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Seconds running responses may take to finish after SIGINT / SIGTERM.
    #[arg(long, default_value_t = 10.0)]
    pub shutdown_grace: f64,
}

/// Engine settings shared by `mor serve` and `mor bench serve`.
#[derive(Args, Clone)]
pub struct EngineArgs {
    /// Sequences decoded together at most (slots).
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Requests waiting for a slot at most (beyond: 429).
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Per-sequence context limit in tokens (default: the model's).
    #[arg(long)]
    pub context: Option<usize>,
    /// Synchronous depth-wise batching (one shared-block call per recursion per step).
    #[arg(long, conflicts_with = "asynchronous")]
    pub sync: bool,
    /// Asynchronous depth-wise batching (one shared-block call per step over all depths; paper App. E).
    #[arg(long = "async")]
    pub asynchronous: bool,
}

impl EngineArgs {
    /// Asynchronous or not: as asked, else the mode `mor bench generate` measured faster for such a model
    /// (docs/benchmarks.md: asynchronous is 5-10% ahead for MoR with hidden size >= 256, synchronous ahead below).
    pub fn asynchronous(&self, model: &mor::MorModel) -> bool {
        if self.sync || self.asynchronous {
            return self.asynchronous;
        }
        model.layout().base_depth > 0 && model.config().hidden_size >= 256
    }
}

/// Load a model for serving with the one model loader ([`mor::io::load::load`]), plus its chat template: the GGUF's
/// `tokenizer.chat_template`, or the `chat_template` of a `tokenizer_config.json` beside the checkpoint.
pub fn load_served(a: &ModelArgs) -> Result<ServedModel> {
    let loaded = mor::io::load::load(
        &a.model,
        &LoadOptions {
            tokenizer: a.tokenizer.clone(),
            quantized: a.quantized,
            dtype: a.dtype.map(super::WeightDtype::dtype),
            ..Default::default()
        },
    )?;
    let tokenizer = loaded.tokenizer()?.clone();
    let template = match &loaded.source {
        ModelSource::Gguf(p) => mor::io::gguf::GgufFile::open(p)?
            .chat_template()
            .map(str::to_string),
        ModelSource::Checkpoint(dir) => mor::serve::template::template_beside_checkpoint(dir)?,
    };
    let model = loaded.model;
    let chat_template = match template {
        Some(src) => {
            let name = |id: Option<u32>| {
                id.and_then(|i| tokenizer.id_to_token(i))
                    .unwrap_or_default()
            };
            let bos = name(model.config().bos_token_id);
            let eos = name(model.config().eos_token_id.or(Some(tokenizer.eos_id())));
            Some(ChatTemplate::new(&src, &bos, &eos).context("the model's chat template")?)
        }
        None => None,
    };
    Ok(ServedModel {
        model,
        tokenizer,
        quantized: loaded.quantized,
        chat_template,
    })
}

/// The served model name by default: the model file's stem or the directory's name.
pub fn default_model_name(a: &ModelArgs) -> String {
    let p = if a.model.is_file() {
        a.model.file_stem()
    } else {
        a.model.file_name()
    };
    p.map_or_else(|| "mor".to_string(), |s| s.to_string_lossy().into_owned())
}

/// A multi-threaded tokio runtime for the HTTP side (the engine runs on its own thread).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

pub fn run_serve(a: &ServeArgs) -> Result<()> {
    if !(a.shutdown_grace.is_finite() && a.shutdown_grace >= 0.0) {
        bail!("--shutdown-grace must be a number of seconds >= 0");
    }
    let served = load_served(&a.model)?;
    let opts = ServeOptions {
        max_batch: a.engine.max_batch,
        max_queue: a.engine.max_queue,
        context: a.engine.context,
        asynchronous: a.engine.asynchronous(&served.model),
        api_key: a.api_key.clone(),
        served_model_name: a
            .served_model_name
            .clone()
            .unwrap_or_else(|| default_model_name(&a.model)),
        max_body_bytes: a.max_body_bytes,
        shutdown_grace: Duration::from_secs_f64(a.shutdown_grace),
        expert_thresholds: None,
    };
    let rt = runtime()?;
    rt.block_on(async {
        let listener = mor::serve::bind(SocketAddr::new(a.host, a.port)).await?;
        mor::serve::serve(listener, served, opts, shutdown_signal()).await?;
        tracing::info!("server stopped");
        Ok(())
    })
}

/// `mor bench serve`.
#[derive(Args)]
pub struct ServeBenchArgs {
    /// A model to serve (checkpoint, run directory or .gguf).
    #[arg(long, conflicts_with_all = ["variants", "url"])]
    pub model: Option<std::path::PathBuf>,
    /// With --model FILE.gguf: quantized matmuls.
    #[arg(long)]
    pub quantized: bool,
    /// Random-weight variants in the `mor bench generate` shapes (e.g. vanilla,mor-expert-4), each served in turn.
    #[arg(long, conflicts_with = "url")]
    pub variants: Option<String>,
    /// An already running OpenAI-compatible server to load instead (e.g. llama-server), e.g. http://127.0.0.1:8080.
    #[arg(long)]
    pub url: Option<String>,
    /// The `model` field sent with --url.
    #[arg(long, default_value = "default")]
    pub url_model: String,
    /// With --url: the server's process id, to report its peak resident memory (Linux /proc).
    #[arg(long, requires = "url")]
    pub server_pid: Option<u32>,
    /// With --url: the random prompts' token ids are drawn below this (SmolLM2: 49152).
    #[arg(long, default_value_t = 49152)]
    pub url_vocab: usize,
    /// Variants: model width.
    #[arg(long, default_value_t = 256)]
    pub hidden_size: usize,
    /// Variants: unrolled layers.
    #[arg(long, default_value_t = 34)]
    pub layers: usize,
    /// Concurrent clients (comma-separated list: one run each).
    #[arg(long, default_value = "1,8")]
    pub clients: String,
    /// Requests per run.
    #[arg(long, default_value_t = 32)]
    pub requests: usize,
    /// Mean prompt length (random token ids).
    #[arg(long, default_value_t = 16)]
    pub prompt_tokens: usize,
    /// Mean generated tokens (max_tokens, with ignore_eos).
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Lengths uniform in mean × [1 − spread, 1 + spread].
    #[arg(long, default_value_t = 0.5)]
    pub spread: f64,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Deadline of each request in seconds.
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
    /// Rounds (servers interleaved within each).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Print one JSON object per line per server and client count instead of the table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub fn run_bench_serve(a: &ServeBenchArgs) -> Result<()> {
    use mor::bench::serve::{bench_in_process, run_load, table, LoadOptions, ServeBenchRow};
    let clients: Vec<usize> = a
        .clients
        .split(',')
        .map(|c| c.trim().parse::<usize>().ok().filter(|&n| n >= 1))
        .collect::<Option<_>>()
        .context("--clients: a comma-separated list of positive integers")?;
    if a.requests == 0
        || a.rounds == 0
        || a.timeout.is_nan()
        || a.timeout <= 0.0
        || !(0.0..1.0).contains(&a.spread)
    {
        bail!("--requests and --rounds must be >= 1, --timeout > 0, --spread in [0, 1)");
    }
    let load = |c: usize, model: &str, vocab: usize, server_pid: Option<u32>| LoadOptions {
        clients: c,
        requests: a.requests,
        prompt_tokens: a.prompt_tokens,
        new_tokens: a.new_tokens,
        spread: a.spread,
        // Skip the lowest ids, where special tokens live.
        token_range: (vocab.min(100) as u32 / 2, vocab as u32),
        model: model.to_string(),
        temperature: a.temperature,
        seed: 7,
        timeout: Duration::from_secs_f64(a.timeout),
        server_pid,
    };
    let load_before = mor::bench::load_average();
    let rt = runtime()?;
    let mut rows: Vec<ServeBenchRow> = Vec::new();
    // (label, loader) per server; servers are rebuilt each round so each run starts from a fresh engine.
    type Make<'a> = Box<dyn Fn() -> Result<(ServedModel, ServeOptions)> + 'a>;
    let mut servers: Vec<(String, Option<Make>)> = Vec::new();
    let opts_for = |model: &mor::MorModel| ServeOptions {
        max_batch: a.engine.max_batch,
        max_queue: a.engine.max_queue,
        context: a.engine.context,
        asynchronous: a.engine.asynchronous(model),
        served_model_name: "bench".into(),
        ..Default::default()
    };
    if let Some(url) = &a.url {
        // Refuse what no request could reach before the run, rather than reporting it as failed requests.
        match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => bail!("--url {url}: not an http:// or https:// URL with a host"),
        }
        if let Some(pid) = a.server_pid {
            if !std::path::Path::new(&format!("/proc/{pid}/status")).exists() {
                bail!("--server-pid {pid}: no such process");
            }
        }
        servers.push((url.clone(), None));
    } else if let Some(v) = &a.variants {
        for label in v.split(',').map(str::trim) {
            let name = label.to_string();
            let make: Make = Box::new(move || {
                let o = mor::bench::generate::GenerateBenchOptions {
                    hidden_size: a.hidden_size,
                    layers: a.layers,
                    ..Default::default()
                };
                let cfg = mor::bench::generate::generate_variant_config(&name, &o)?;
                let model = mor::MorModel::new(&cfg, &candle_core::Device::Cpu, 0)?.frozen()?;
                let thresholds = if cfg.expert_choice().is_some() {
                    Some(mor::bench::generate::calibrate_on_own_text(&model, &o)?)
                } else {
                    None
                };
                let mut opts = opts_for(&model);
                if name.ends_with("+async") {
                    opts.asynchronous = true;
                }
                opts.expert_thresholds = thresholds;
                let tokenizer = mor::bench::serve::synthetic_tokenizer(cfg.vocab_size)?;
                let served = ServedModel {
                    model,
                    tokenizer,
                    quantized: None,
                    chat_template: None,
                };
                Ok((served, opts))
            });
            servers.push((label.to_string(), Some(make)));
        }
    } else if let Some(path) = &a.model {
        let args = ModelArgs {
            model: path.clone(),
            quantized: a.quantized,
            dtype: None,
            tokenizer: None,
        };
        let label = default_model_name(&args);
        let make: Make = Box::new(move || {
            let served = load_served(&args)?;
            let opts = opts_for(&served.model);
            Ok((served, opts))
        });
        servers.push((label, Some(make)));
    } else {
        bail!("give --model PATH, --variants LIST or --url URL");
    }
    for round in 0..a.rounds {
        for (si, (label, make)) in servers.iter().enumerate() {
            let reports = match make {
                None => {
                    let vocab = a.url_vocab;
                    rt.block_on(async {
                        let mut out = Vec::new();
                        for &c in &clients {
                            let o = load(c, &a.url_model, vocab, a.server_pid);
                            out.push(run_load(label, &o).await?);
                        }
                        anyhow::Ok(out)
                    })?
                }
                Some(make) => {
                    let (served, opts) = make()?;
                    let vocab = served.tokenizer.vocab_size();
                    // The server runs in this process.
                    let pid = Some(std::process::id());
                    let loads: Vec<LoadOptions> = clients
                        .iter()
                        .map(|&c| load(c, "bench", vocab, pid))
                        .collect();
                    rt.block_on(bench_in_process(served, opts, &loads))?
                }
            };
            for (ci, r) in reports.into_iter().enumerate() {
                tracing::info!(
                    round,
                    server = label,
                    clients = r.clients,
                    tokens_per_sec = format!("{:.1}", r.tokens_per_sec),
                    "run done"
                );
                let idx = ci * servers.len() + si;
                if rows.len() <= idx {
                    rows.resize(
                        idx + 1,
                        ServeBenchRow {
                            server: String::new(),
                            runs: Vec::new(),
                        },
                    );
                }
                rows[idx].server = label.clone();
                rows[idx].runs.push(r);
            }
        }
    }
    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    println!("{}", table(&rows));
    println!(
        "{}",
        mor::bench::load_line((load_before, mor::bench::load_average()))
    );
    Ok(())
}
