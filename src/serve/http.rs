//! The HTTP routes: `/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health`, `/metrics`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::data::Tokenizer;
use crate::engine::sampling::TokenLogprobs;
use crate::engine::{Finish, RequestCheck};
use crate::error::MorError;
use crate::serve::api::{self, ApiError, Generation, LogprobsWriter, Prompt};
use crate::serve::metrics::Metrics;
use crate::serve::template::ChatTemplate;
use crate::serve::worker::{Event, Job};
use crate::serve::ServeOptions;

/// Without `max_tokens`, a completion generates at most this many tokens (OpenAI's default for completions); a chat
/// completion may use the whole context that remains.
const DEFAULT_COMPLETION_TOKENS: usize = 16;

/// What every handler shares.
pub(crate) struct AppState {
    jobs: std::sync::Mutex<Sender<Job>>,
    check: RequestCheck,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    metrics: Arc<Metrics>,
    /// Requests admitted and not yet answered (running or queued).
    in_flight: AtomicUsize,
    next_id: AtomicU64,
    opts: ServeOptions,
    created: u64,
}

impl AppState {
    pub(crate) fn new(
        jobs: Sender<Job>,
        check: RequestCheck,
        tokenizer: Arc<Tokenizer>,
        template: Option<ChatTemplate>,
        metrics: Arc<Metrics>,
        opts: ServeOptions,
    ) -> Arc<Self> {
        Arc::new(AppState {
            jobs: std::sync::Mutex::new(jobs),
            check,
            tokenizer,
            template,
            metrics,
            in_flight: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            opts,
            created: unix_now(),
        })
    }

    fn capacity(&self) -> usize {
        self.opts.max_batch + self.opts.max_queue
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The routes with their state.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    let limit = state.opts.max_body_bytes;
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Count a refused request by its status, and answer it.
fn refuse(s: &AppState, e: ApiError) -> Response {
    s.metrics.request(match e.status.as_u16() {
        400 => "bad_request",
        401 => "unauthorized",
        404 => "not_found",
        413 => "too_large",
        429 => "rejected_overload",
        _ => "error",
    });
    e.into_response()
}

fn authorize(s: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &s.opts.api_key else {
        return Ok(());
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.map(str::trim) == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
        ))
    }
}

fn body_bytes(s: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                ..ApiError::bad_request(format!(
                    "the request body is larger than {} bytes",
                    s.opts.max_body_bytes
                ))
            }
        } else {
            ApiError::bad_request(format!("cannot read the request body: {}", r.body_text()))
        }
    })
}

fn check_model(s: &AppState, model: &Option<String>) -> Result<(), ApiError> {
    match model {
        Some(m) if *m != s.opts.served_model_name => Err(ApiError {
            param: Some("model".into()),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!(
                    "the model '{m}' does not exist; this server serves '{}'",
                    s.opts.served_model_name
                ),
            )
        }),
        _ => Ok(()),
    }
}

async fn completions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = (|| -> Result<Pending, ApiError> {
        authorize(&s, &headers)?;
        let req = api::parse_completion(&body_bytes(&s, body)?)?;
        check_model(&s, &req.model)?;
        let prompt = match req.prompt {
            Prompt::Text(t) => encode(&s, &t, "prompt")?,
            Prompt::Tokens(t) => t,
        };
        submit(&s, prompt, req.generation, Kind::Completion, "prompt")
    })();
    match r {
        Ok(pending) => pending.respond(&s).await,
        Err(e) => refuse(&s, e),
    }
}

async fn chat_completions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = (|| -> Result<Pending, ApiError> {
        authorize(&s, &headers)?;
        let req = api::parse_chat(&body_bytes(&s, body)?)?;
        check_model(&s, &req.model)?;
        let template = s.template.as_ref().ok_or_else(|| {
            ApiError::bad_request(
                "this model has no chat template (none in its GGUF metadata or tokenizer_config.json); \
                 use /v1/completions",
            )
        })?;
        let text = template
            .render(&req.messages)
            .map_err(|e| ApiError::bad_field("messages", strip_kind(e)))?;
        let prompt = encode(&s, &text, "messages")?;
        submit(&s, prompt, req.generation, Kind::Chat, "messages")
    })();
    match r {
        Ok(pending) => pending.respond(&s).await,
        Err(e) => refuse(&s, e),
    }
}

async fn models(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&s, &headers) {
        return refuse(&s, e);
    }
    api::json_body(&json!({"object": "list", "data": [{
        "id": s.opts.served_model_name,
        "object": "model",
        "created": s.created,
        "owned_by": "mor",
        "max_model_len": s.check.context(),
    }]}))
}

async fn health() -> Response {
    api::json_body(&json!({"status": "ok"}))
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn not_found(State(s): State<Arc<AppState>>) -> Response {
    refuse(
        &s,
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            "no such endpoint (this server has /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics)",
        ),
    )
}

async fn method_not_allowed(State(s): State<Arc<AppState>>) -> Response {
    refuse(
        &s,
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            "this endpoint does not take that HTTP method",
        ),
    )
}

/// The message of a library error without its kind prefix.
fn strip_kind(e: MorError) -> String {
    match e {
        MorError::Request(m) | MorError::Config(m) | MorError::Data(m) => m,
        other => other.to_string(),
    }
}

fn encode(s: &AppState, text: &str, field: &str) -> Result<Vec<u32>, ApiError> {
    s.tokenizer
        .encode(text)
        .map_err(|e| ApiError::bad_field(field, format!("{field}: {}", strip_kind(e))))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// An admitted request's receiver of engine events, which keeps it counted in [`AppState::in_flight`] until it is
/// answered or its client goes away.
///
/// The count is released before the receiver closes (`drop` runs before the fields are dropped), and the engine
/// cancels a request only once its receiver is closed; so when a cancellation is observable (the engine's slot
/// freed, the metrics counting it), the request no longer counts against the capacity either.
struct Admission {
    state: Arc<AppState>,
    events: UnboundedReceiver<Event>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request handed to the engine, waiting for its events.
struct Pending {
    id: String,
    kind: Kind,
    stream: bool,
    include_usage: bool,
    /// The request asked for log-probabilities.
    logprobs: bool,
    admission: Admission,
}

/// Validate against the context and the engine's check, admit under the in-flight bound, and hand to the engine.
fn submit(
    s: &Arc<AppState>,
    prompt: Vec<u32>,
    g: Generation,
    kind: Kind,
    prompt_field: &str,
) -> Result<Pending, ApiError> {
    let ctx = s.check.context();
    if prompt.len() >= ctx {
        return Err(ApiError::bad_field(
            prompt_field,
            format!(
                "{prompt_field} has {} tokens, which leaves no room in the context of {ctx} tokens",
                prompt.len()
            ),
        ));
    }
    let room = ctx - prompt.len().max(1);
    let max_new = match g.max_tokens {
        Some(m) if m > room => {
            return Err(ApiError::bad_field(
                "max_tokens",
                format!(
                    "max_tokens {m} does not fit: the prompt has {} tokens and the context {ctx}, so at most {room} \
                     can be generated",
                    prompt.len()
                ),
            ))
        }
        Some(m) => m,
        None if kind == Kind::Completion => DEFAULT_COMPLETION_TOKENS.min(room),
        None => room,
    };
    let mut params = g.params;
    params.max_new_tokens = max_new;
    let params_logprobs = params.logprobs.is_some();
    let checked = s.check.check(prompt, &params).map_err(|e| {
        let msg = strip_kind(e);
        // The engine's messages start with the field they refuse.
        let field = match msg.split_whitespace().next().unwrap_or("") {
            "max_new_tokens" => "max_tokens".to_string(),
            f @ ("temperature" | "top_k" | "top_p" | "repetition_penalty") => f.to_string(),
            f if f.starts_with("stop[") => "stop".to_string(),
            _ => prompt_field.to_string(),
        };
        ApiError::bad_field(&field, msg)
    })?;
    if s.in_flight.fetch_add(1, Ordering::SeqCst) >= s.capacity() {
        s.in_flight.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "server_overloaded",
                format!(
                    "the server is at capacity ({} running, {} queued); retry later",
                    s.opts.max_batch, s.opts.max_queue
                ),
            )
        });
    }
    let (tx, rx) = unbounded_channel();
    let admission = Admission {
        state: s.clone(),
        events: rx,
    };
    let job = Job {
        prompt: checked.prompt,
        params,
        events: tx,
        received: Instant::now(),
    };
    let sent = s
        .jobs
        .lock()
        .map_err(|_| ())
        .and_then(|j| j.send(job).map_err(|_| ()));
    if sent.is_err() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "engine_unavailable",
            "the engine is not running",
        ));
    }
    let n = s.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match kind {
        Kind::Completion => format!("cmpl-{n}"),
        Kind::Chat => format!("chatcmpl-{n}"),
    };
    Ok(Pending {
        id,
        kind,
        stream: g.stream,
        include_usage: g.include_usage,
        logprobs: params_logprobs,
        admission,
    })
}

fn engine_error(msg: &str) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "generation_failed",
        format!("generation failed: {msg}"),
    )
}

impl Pending {
    async fn respond(self, s: &Arc<AppState>) -> Response {
        if self.stream {
            return self.stream_response(s);
        }
        let mut p = self;
        let mut text = String::new();
        let mut logprobs = Vec::new();
        let (finish, prompt_tokens, completion_tokens) = loop {
            match p.admission.events.recv().await {
                Some(Event::Token {
                    text: t,
                    logprobs: l,
                }) => {
                    text.push_str(&t);
                    logprobs.extend(l);
                }
                Some(Event::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                }) => break (finish, prompt_tokens, completion_tokens),
                None => return refuse(s, engine_error("the engine dropped the request")),
            }
        };
        if let Finish::Failed(msg) = &finish {
            return engine_error(msg).into_response();
        }
        let created = unix_now();
        let model = &s.opts.served_model_name;
        let reason = api::finish_reason(&finish);
        let usage = api::usage(prompt_tokens, completion_tokens);
        let logprobs = if p.logprobs {
            LogprobsWriter::new(p.kind == Kind::Chat).render(&s.tokenizer, &logprobs)
        } else {
            Value::Null
        };
        let body = match p.kind {
            Kind::Completion => json!({
                "id": p.id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}],
                "usage": usage,
            }),
            Kind::Chat => json!({
                "id": p.id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": logprobs, "finish_reason": reason}],
                "usage": usage,
            }),
        };
        drop(p.admission);
        api::json_body(&body)
    }

    /// Server-sent events: one chunk per piece of text, a final chunk with the finish reason, optionally one with
    /// the usage, then `data: [DONE]`.
    fn stream_response(self, s: &Arc<AppState>) -> Response {
        let chunk = Chunker {
            id: self.id,
            kind: self.kind,
            created: unix_now(),
            model: s.opts.served_model_name.clone(),
            logprobs: self.logprobs.then(|| {
                (
                    s.tokenizer.clone(),
                    LogprobsWriter::new(self.kind == Kind::Chat),
                )
            }),
        };
        let mut queue = VecDeque::new();
        if chunk.kind == Kind::Chat {
            queue.push_back(chunk.delta(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
                None,
            ));
        }
        let state = StreamState {
            admission: self.admission,
            queue,
            done: false,
            chunk,
            include_usage: self.include_usage,
        };
        let stream = futures_util::stream::unfold(state, |mut st| async move {
            loop {
                if let Some(data) = st.queue.pop_front() {
                    return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), st));
                }
                if st.done {
                    return None;
                }
                st.next().await;
            }
        });
        Sse::new(stream).into_response()
    }
}

/// Builds the JSON of stream chunks.
struct Chunker {
    id: String,
    kind: Kind,
    created: u64,
    model: String,
    /// With log-probabilities: the tokenizer to render them with, and the writer.
    logprobs: Option<(Arc<Tokenizer>, LogprobsWriter)>,
}

impl Chunker {
    fn head(&self) -> Value {
        let object = match self.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model})
    }

    /// A chat chunk with `delta`.
    fn delta(&self, delta: Value, logprobs: Value, finish: Option<&str>) -> String {
        let mut v = self.head();
        v["choices"] =
            json!([{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]);
        v.to_string()
    }

    /// A chunk carrying `text` and the log-probabilities of the token that made it, if any.
    fn text(&mut self, text: &str, token: Option<TokenLogprobs>, finish: Option<&str>) -> String {
        let logprobs = match (&mut self.logprobs, token) {
            (Some((tokenizer, writer)), Some(t)) => writer.render(tokenizer, &[t]),
            _ => Value::Null,
        };
        match self.kind {
            Kind::Chat if finish.is_some() && text.is_empty() => {
                self.delta(json!({}), logprobs, finish)
            }
            Kind::Chat => self.delta(json!({"content": text}), logprobs, finish),
            Kind::Completion => {
                let mut v = self.head();
                v["choices"] = json!([{"index": 0, "text": text, "logprobs": logprobs,
                                       "finish_reason": finish}]);
                v.to_string()
            }
        }
    }

    fn usage(&self, prompt: usize, completion: usize) -> String {
        let mut v = self.head();
        v["choices"] = json!([]);
        v["usage"] = api::usage(prompt, completion);
        v.to_string()
    }
}

struct StreamState {
    admission: Admission,
    queue: VecDeque<String>,
    done: bool,
    chunk: Chunker,
    include_usage: bool,
}

impl StreamState {
    /// Wait for the next engine event and queue the chunks it makes.
    async fn next(&mut self) {
        match self.admission.events.recv().await {
            Some(Event::Token { text, logprobs }) => {
                let c = self.chunk.text(&text, logprobs, None);
                self.queue.push_back(c);
            }
            Some(Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            }) => {
                if let Finish::Failed(msg) = &finish {
                    self.queue.push_back(engine_error(msg).body().to_string());
                } else {
                    let reason = api::finish_reason(&finish);
                    let c = self.chunk.text("", None, Some(reason));
                    self.queue.push_back(c);
                    if self.include_usage {
                        self.queue
                            .push_back(self.chunk.usage(prompt_tokens, completion_tokens));
                    }
                }
                self.queue.push_back("[DONE]".into());
                self.done = true;
            }
            None => {
                self.queue.push_back(
                    engine_error("the engine dropped the request")
                        .body()
                        .to_string(),
                );
                self.queue.push_back("[DONE]".into());
                self.done = true;
            }
        }
    }
}
