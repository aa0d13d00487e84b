//! `mor serve`: an OpenAI-compatible HTTP server on the continuous depth-wise batching engine (paper §3.3, App. E).
//!
//! One engine thread ([`worker`]) owns the model and runs [`crate::engine::Engine`]'s batching loop; the HTTP
//! handlers ([`http`], axum on tokio) validate requests with the engine's own [`crate::engine::RequestCheck`], hand
//! them over a channel, and stream the tokens back as server-sent events or collect them into one response. A new
//! request joins the running batch at the next engine step; a request whose client disconnects is cancelled before
//! the next step. Requests beyond `max_batch + max_queue` in flight get `429` with `Retry-After`. See
//! `docs/serving.md`.

pub mod api;
mod http;
pub mod metrics;
pub mod template;
mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::data::Tokenizer;
use crate::engine::EngineOptions;
use crate::error::{MorError, Result};
use crate::io::gguf::QuantizedWeights;
use crate::model::MorModel;

pub use template::ChatTemplate;

/// The model a server answers with.
pub struct ServedModel {
    /// The model.
    pub model: MorModel,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// GGUF quantized weights to run the matmuls on ([`crate::engine::CachedModel::quantized`]).
    pub quantized: Option<QuantizedWeights>,
    /// Its chat template; without one `/v1/chat/completions` answers with an error.
    pub chat_template: Option<ChatTemplate>,
}

/// Settings of a server.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Sequences decoded together at most (engine slots).
    pub max_batch: usize,
    /// Requests waiting for a slot at most; beyond, `429`.
    pub max_queue: usize,
    /// Per-sequence context limit; `None`: the model's.
    pub context: Option<usize>,
    /// Asynchronous depth-wise batching ([`EngineOptions::asynchronous`]).
    pub asynchronous: bool,
    /// Bearer token every `/v1` request must carry.
    pub api_key: Option<String>,
    /// The model name `/v1/models` lists and responses carry.
    pub served_model_name: String,
    /// Largest accepted request body; beyond, `413`.
    pub max_body_bytes: usize,
    /// After a shutdown signal, how long running responses may take to finish.
    pub shutdown_grace: Duration,
    /// Expert-choice: calibrated per-recursion thresholds ([`EngineOptions::expert_thresholds`]).
    pub expert_thresholds: Option<Vec<f64>>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_batch: 8,
            max_queue: 64,
            context: None,
            asynchronous: false,
            api_key: None,
            served_model_name: "mor".into(),
            max_body_bytes: 1 << 20,
            shutdown_grace: Duration::from_secs(10),
            expert_thresholds: None,
        }
    }
}

/// Serve `model` on `listener` until `shutdown` resolves; then stop accepting connections, let running responses
/// finish within [`ServeOptions::shutdown_grace`], and return. Errors if the engine cannot be built for the model
/// or the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    model: ServedModel,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    if opts.max_batch == 0 {
        return Err(MorError::Config("max_batch must be >= 1".into()));
    }
    let ServedModel {
        model,
        tokenizer,
        quantized,
        chat_template,
    } = model;
    let tokenizer = Arc::new(tokenizer);
    let metrics = Arc::new(metrics::Metrics::default());
    let (jobs, job_rx) = std::sync::mpsc::channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let engine_opts = EngineOptions {
        max_batch: opts.max_batch,
        asynchronous: opts.asynchronous,
        max_context: opts.context,
        expert_thresholds: opts.expert_thresholds.clone(),
        ..Default::default()
    };
    {
        let (tokenizer, metrics) = (tokenizer.clone(), metrics.clone());
        std::thread::Builder::new()
            .name("mor-engine".into())
            .spawn(move || {
                worker::run(
                    model,
                    quantized,
                    tokenizer,
                    engine_opts,
                    metrics,
                    job_rx,
                    ready_tx,
                )
            })
            .map_err(|e| MorError::Config(format!("cannot start the engine thread: {e}")))?;
    }
    let check = ready_rx
        .await
        .map_err(|_| MorError::Config("the engine thread ended while starting".into()))??;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(
            model = opts.served_model_name,
            max_batch = opts.max_batch,
            max_queue = opts.max_queue,
            asynchronous = opts.asynchronous,
            chat_template = chat_template.is_some(),
            "serving on http://{addr}"
        );
    }
    let grace = opts.shutdown_grace;
    let app = http::router(http::AppState::new(
        jobs,
        check,
        tokenizer,
        chat_template,
        metrics,
        opts,
    ));
    let (grace_tx, grace_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections; running responses may finish");
        let _ = grace_tx.send(());
    });
    let grace_over = async move {
        match grace_rx.await {
            Ok(()) => tokio::time::sleep(grace).await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        r = server => r.map_err(|e| MorError::Config(format!("server: {e}")))?,
        () = grace_over => tracing::warn!("grace period of {grace:?} over; closing the remaining responses"),
    }
    Ok(())
}

/// Bind `addr` (e.g. `127.0.0.1:0` for an ephemeral port).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| MorError::Config(format!("cannot listen on {addr}: {e}")))
}
