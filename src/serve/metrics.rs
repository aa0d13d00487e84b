//! Server metrics in the Prometheus text format (`GET /metrics`): requests by outcome, queue depth, running
//! sequences, prompt and generated tokens, time to first token and inter-token latency, and what only MoR has:
//! tokens exiting at each recursion depth and the mean rows per call of the shared recursion block (paper §3.3).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use crate::engine::EngineStats;

/// Histogram bucket bounds in seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Debug, Clone, Default)]
struct Histogram {
    counts: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (c, &b) in self.counts.iter_mut().zip(&LATENCY_BUCKETS) {
            if secs <= b {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in self.counts.iter().zip(&LATENCY_BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Debug, Default)]
struct Inner {
    requests: BTreeMap<&'static str, u64>,
    queued: usize,
    running: usize,
    prompt_tokens: u64,
    generated_tokens: u64,
    ttft: Histogram,
    itl: Histogram,
    engine: EngineStats,
    kv_bytes: usize,
}

/// The server's counters, shared by the HTTP handlers and the engine thread.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A panic elsewhere while holding the lock leaves plain counters: still usable.
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    /// Count a request by outcome (`stop`, `length`, `cancelled`, `error`, `rejected_overload`, `bad_request`, …).
    pub fn request(&self, outcome: &'static str) {
        self.with(|m| *m.requests.entry(outcome).or_default() += 1);
    }

    /// Count a request's tokens once it ends.
    pub fn tokens(&self, prompt: usize, generated: usize) {
        self.with(|m| {
            m.prompt_tokens += prompt as u64;
            m.generated_tokens += generated as u64;
        });
    }

    /// Time from receipt to the first token of a request.
    pub fn time_to_first_token(&self, secs: f64) {
        self.with(|m| m.ttft.observe(secs));
    }

    /// Time between two consecutive tokens of a request.
    pub fn inter_token(&self, secs: f64) {
        self.with(|m| m.itl.observe(secs));
    }

    /// The engine's state after a step.
    pub fn engine(&self, queued: usize, running: usize, kv_bytes: usize, stats: &EngineStats) {
        self.with(|m| {
            m.queued = queued;
            m.running = running;
            m.kv_bytes = kv_bytes;
            m.engine = stats.clone();
        });
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.with(|m| {
            let mut o = String::new();
            let gauge = |o: &mut String, name: &str, help: &str, kind: &str, v: String| {
                let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
            };
            let _ = writeln!(
                o,
                "# HELP mor_requests_total Requests by outcome.\n# TYPE mor_requests_total counter"
            );
            for (k, v) in &m.requests {
                let _ = writeln!(o, "mor_requests_total{{outcome=\"{k}\"}} {v}");
            }
            gauge(&mut o, "mor_queue_depth", "Requests waiting for a slot.", "gauge", m.queued.to_string());
            gauge(&mut o, "mor_running_sequences", "Sequences being decoded.", "gauge", m.running.to_string());
            gauge(&mut o, "mor_kv_cache_bytes", "K/V cache bytes held by running sequences.", "gauge", m.kv_bytes.to_string());
            gauge(&mut o, "mor_prompt_tokens_total", "Prompt tokens of finished requests.", "counter", m.prompt_tokens.to_string());
            gauge(&mut o, "mor_generated_tokens_total", "Tokens generated for finished requests.", "counter", m.generated_tokens.to_string());
            gauge(&mut o, "mor_engine_steps_total", "Engine steps run.", "counter", m.engine.steps.to_string());
            m.ttft.render(&mut o, "mor_time_to_first_token_seconds", "Time from receipt of a request to its first token.");
            m.itl.render(&mut o, "mor_inter_token_latency_seconds", "Time between consecutive tokens of a request.");
            let _ = writeln!(
                o,
                "# HELP mor_recursion_exit_tokens_total Tokens processed by the model by the recursion depth at which \
                 they exited the shared block (0: vanilla or no recursion).\n# TYPE mor_recursion_exit_tokens_total counter"
            );
            for (d, c) in m.engine.depths.iter().enumerate() {
                let _ = writeln!(o, "mor_recursion_exit_tokens_total{{depth=\"{d}\"}} {c}");
            }
            gauge(&mut o, "mor_shared_block_rows_total", "Token-recursions run by the shared recursion block.", "counter", m.engine.block_rows.to_string());
            gauge(&mut o, "mor_shared_block_calls_total", "Calls of the shared recursion block.", "counter", m.engine.block_calls.to_string());
            let mean = m.engine.block_rows as f64 / m.engine.block_calls.max(1) as f64;
            gauge(&mut o, "mor_shared_block_mean_rows", "Mean rows per call of the shared recursion block.", "gauge", format!("{mean}"));
            o
        })
    }
}
