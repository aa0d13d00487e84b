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
    /// Bearer token every /v1 request must carry (default: the MOR_API_KEY environment variable, if set).
    #[arg(long, env = "MOR_API_KEY", hide_env_values = true)]
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
    #[arg(long, conflicts_with = "async")]
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
    };
    let rt = runtime()?;
    rt.block_on(async {
        let listener = mor::serve::bind(SocketAddr::new(a.host, a.port)).await?;
        mor::serve::serve(listener, served, opts, shutdown_signal()).await?;
        tracing::info!("server stopped");
        Ok(())
    })
}
