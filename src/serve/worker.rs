//! The engine thread: it owns the model and runs the continuous-batching loop ([`Engine::step`]). HTTP handlers
//! hand it [`Job`]s over a channel and receive [`Event`]s back as tokens are produced. A job joins the running batch
//! at the next step; a job whose handler has gone (client disconnected) is cancelled before the next step, which
//! frees its slot and K/V cache.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::data::Tokenizer;
use crate::engine::sampling::{SamplingParams, TokenLogprobs};
use crate::engine::{CachedModel, Engine, EngineOptions, Finish, RequestCheck, RequestId};
use crate::error::Result;
use crate::model::MorModel;
use crate::serve::api::finish_reason;
use crate::serve::metrics::Metrics;

/// A request for the engine.
pub(crate) struct Job {
    /// Validated prompt tokens.
    pub prompt: Vec<u32>,
    /// Validated sampling parameters.
    pub params: SamplingParams,
    /// Where its events go; dropping the receiver cancels the job.
    pub events: UnboundedSender<Event>,
    /// When the server received it (for the time to first token).
    pub received: Instant,
}

/// What the engine reports for a job.
#[derive(Debug)]
pub(crate) enum Event {
    /// Text that became final, and the log-probabilities of the token that completed it if the request asked for
    /// them (one event per token that completed some text or has log-probabilities, plus one for text held back
    /// until the end).
    Token {
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    /// The job ended.
    Done {
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
}

struct Live {
    events: UnboundedSender<Event>,
    received: Instant,
    last_token: Option<Instant>,
}

/// Build the engine on this thread and run it until `jobs` is closed and the engine is idle. `ready` receives the
/// engine's request validator, or the error that prevented building it.
pub(crate) fn run(
    model: MorModel,
    quantized: Option<crate::io::gguf::QuantizedWeights>,
    tokenizer: Arc<Tokenizer>,
    opts: EngineOptions,
    metrics: Arc<Metrics>,
    jobs: Receiver<Job>,
    ready: tokio::sync::oneshot::Sender<Result<RequestCheck>>,
) {
    let built = match quantized {
        Some(w) => CachedModel::quantized(&model, w),
        None => CachedModel::new(&model),
    };
    let engine = built.and_then(|c| Engine::with_cached(c, Some(&tokenizer), opts));
    let mut engine = match engine {
        Ok(e) => {
            let _ = ready.send(Ok(e.request_check().clone()));
            e
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut live: HashMap<RequestId, Live> = HashMap::new();
    let mut closed = false;
    loop {
        if engine.is_idle() {
            if closed {
                return;
            }
            match jobs.recv() {
                Ok(job) => admit(&mut engine, &mut live, &metrics, job),
                Err(_) => return,
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(job) => admit(&mut engine, &mut live, &metrics, job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        let gone: Vec<RequestId> = live
            .iter()
            .filter(|(_, l)| l.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            engine.cancel(id);
        }
        let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.step()));
        match step {
            Ok(Ok(_)) => {}
            // The engine has failed its running sequences; they are reported below.
            Ok(Err(e)) => tracing::error!("engine step failed: {e}"),
            Err(_) => {
                tracing::error!("engine step panicked; failing its running sequences");
                let ids: Vec<RequestId> = live.keys().copied().collect();
                for id in ids {
                    engine.cancel(id);
                    if let Some(l) = live.remove(&id) {
                        metrics.request("error");
                        let _ = l.events.send(Event::Done {
                            finish: Finish::Failed("the engine failed".into()),
                            prompt_tokens: 0,
                            completion_tokens: 0,
                        });
                    }
                }
            }
        }
        report(&mut engine, &mut live, &metrics);
    }
}

fn admit(engine: &mut Engine, live: &mut HashMap<RequestId, Live>, metrics: &Metrics, job: Job) {
    match engine.submit(job.prompt, job.params) {
        Ok(id) => {
            live.insert(
                id,
                Live {
                    events: job.events,
                    received: job.received,
                    last_token: None,
                },
            );
        }
        // The handler validated with the same check, so this is not expected; still, answer rather than drop.
        Err(e) => {
            metrics.request("error");
            let _ = job.events.send(Event::Done {
                finish: Finish::Failed(e.to_string()),
                prompt_tokens: 0,
                completion_tokens: 0,
            });
        }
    }
}

/// Forward the step's tokens and finished requests to their handlers, and the engine's state to the metrics.
fn report(engine: &mut Engine, live: &mut HashMap<RequestId, Live>, metrics: &Metrics) {
    // Finished requests are counted before the engine's gauges are published, so whoever sees a sequence gone
    // from `mor_running_sequences` also sees it counted; and both before any event, so a client that sees a token
    // or its end also sees the step in the metrics.
    let finished = engine.take_finished();
    for f in &finished {
        if live.contains_key(&f.id) {
            metrics.request(finish_reason(&f.finish));
            metrics.tokens(f.prompt_tokens.len(), f.tokens.len());
        }
    }
    metrics.engine(
        engine.queued(),
        engine.running(),
        engine.kv_bytes(),
        engine.stats(),
    );
    let now = Instant::now();
    for p in engine.take_progress() {
        let Some(l) = live.get_mut(&p.id) else {
            continue;
        };
        if p.token.is_some() {
            match l.last_token {
                None => metrics.time_to_first_token((now - l.received).as_secs_f64()),
                Some(t) => metrics.inter_token((now - t).as_secs_f64()),
            }
            l.last_token = Some(now);
        }
        if !p.text.is_empty() || p.logprobs.is_some() {
            let _ = l.events.send(Event::Token {
                text: p.text,
                logprobs: p.logprobs,
            });
        }
    }
    for f in finished {
        let Some(l) = live.remove(&f.id) else {
            continue;
        };
        let _ = l.events.send(Event::Done {
            finish: f.finish,
            prompt_tokens: f.prompt_tokens.len(),
            completion_tokens: f.tokens.len(),
        });
    }
}
