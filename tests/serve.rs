//! `mor serve` end to end: the real server on an ephemeral loopback port with a small random-weight MoR model and a
//! BPE tokenizer trained on the bundled sonnets, talked to over HTTP with reqwest. Every endpoint, streaming parsed
//! as server-sent events, determinism under batching, overload, cancellation, the bad-request matrix, the API key,
//! body limits, and a bounded fuzz run after which the server still answers correctly.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod common;

use candle_core::DType;
use futures_util::StreamExt;
use mor::data::Tokenizer;
use mor::engine::sampling::SamplingParams;
use mor::model::MorModel;
use mor::serve::{ChatTemplate, ServeOptions, ServedModel};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const CTX: usize = 128;
const NAME: &str = "tiny-mor";
const TEMPLATE: &str = "{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}\
{{ raise_exception('unknown role ' + m.role) }}{% endif %}<|{{ m.role }}|>{{ m.content | trim }}\n{% endfor %}\
{% if add_generation_prompt %}<|assistant|>{% endif %}";

fn tokenizer() -> Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let text = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sonnets.txt");
        Tokenizer::train_bpe(&[text], 300).unwrap()
    })
    .clone()
}

/// A small MoR model (expert-choice, 3 recursions of a shared middle block) with random weights and routers re-drawn
/// so that tokens exit at different depths.
fn model() -> MorModel {
    model_with_context(CTX)
}

/// [`model`] with another context length.
fn model_with_context(ctx: usize) -> MorModel {
    let vocab = tokenizer().vocab_size();
    let json = format!(
        r#"{{"vocab_size":{vocab},"hidden_size":32,"intermediate_size":64,"num_hidden_layers":8,
            "num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":{ctx},"initializer_range":0.2,
            "recursion":{{"sharing":"middle_cycle","num_recursion":3}},"mor":{{"routing":{{"expert":{{}}}}}}}}"#
    );
    common::routed_model(&json, 4, DType::F32, 0.1)
        .unwrap()
        .frozen()
        .unwrap()
}

struct Server {
    base: String,
    client: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<mor::Result<()>>>,
}

impl Server {
    async fn start(opts: ServeOptions) -> Server {
        Self::start_with(opts, Some(ChatTemplate::new(TEMPLATE, "", "</s>").unwrap())).await
    }

    async fn start_with(opts: ServeOptions, chat_template: Option<ChatTemplate>) -> Server {
        Self::start_model(opts, chat_template, model()).await
    }

    async fn start_model(
        opts: ServeOptions,
        chat_template: Option<ChatTemplate>,
        model: MorModel,
    ) -> Server {
        let listener = mor::serve::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let served = ServedModel {
            model,
            tokenizer: tokenizer(),
            quantized: None,
            chat_template,
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(mor::serve::serve(listener, served, opts, async move {
            let _ = rx.await;
        }));
        let s = Server {
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            stop: Some(tx),
            task: Some(task),
        };
        // The listener is bound before the engine is ready; wait until it answers.
        let t0 = Instant::now();
        while s.client.get(s.url("/health")).send().await.is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "server did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

/// The value of a metric line `name value` (labels included in `name`), if there is one (a labelled counter has
/// no line until it is first counted).
fn try_metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .map(|v| v.parse().unwrap())
}

/// The value of a metric line `name value` (labels included in `name`).
fn metric(text: &str, name: &str) -> f64 {
    try_metric(text, name).unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
}

fn server_opts() -> ServeOptions {
    ServeOptions {
        served_model_name: NAME.into(),
        ..Default::default()
    }
}

/// The `data:` payloads of a server-sent event stream, in order.
async fn sse(resp: reqwest::Response) -> Vec<String> {
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let body = resp.text().await.unwrap();
    parse_sse(&body)
}

fn parse_sse(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

/// Text, finish reason and usage of a parsed stream (completions or chat).
fn stream_result(events: &[String]) -> (String, String, Option<Value>) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let mut text = String::new();
    let mut finish = None;
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
        }
        for c in v["choices"].as_array().unwrap() {
            let piece = c["text"]
                .as_str()
                .or_else(|| c["delta"]["content"].as_str())
                .unwrap_or("");
            text.push_str(piece);
            if let Some(f) = c["finish_reason"].as_str() {
                assert!(finish.is_none(), "two finish reasons: {events:?}");
                finish = Some(f.to_string());
            }
        }
    }
    (text, finish.expect("a finish reason"), usage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_and_completion_equal_mor_generate() {
    let s = Server::start(server_opts()).await;
    let r = s.client.get(s.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "ok");

    let models: Value = s
        .client
        .get(s.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], NAME);
    assert_eq!(models["data"][0]["object"], "model");

    let prompt = "Shall I compare thee to a summer's day?";
    let (status, v) = s
        .post(
            "/v1/completions",
            &json!({"model": NAME, "prompt": prompt, "max_tokens": 24, "temperature": 0, "unknown_field": [1]}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], NAME);
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let choice = &v["choices"][0];
    // The same request through the library's one-slot front end.
    let want = mor::engine::generate::generate(
        &model(),
        &tokenizer(),
        prompt,
        &SamplingParams {
            max_new_tokens: 24,
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(choice["text"], want.text.as_str());
    let expect_finish = if want.finish == mor::engine::Finish::Length {
        "length"
    } else {
        "stop"
    };
    assert_eq!(choice["finish_reason"], expect_finish);
    assert_eq!(v["usage"]["prompt_tokens"], want.prompt_tokens.len());
    assert_eq!(v["usage"]["completion_tokens"], want.tokens.len());
    assert_eq!(
        v["usage"]["total_tokens"],
        want.prompt_tokens.len() + want.tokens.len()
    );

    // A prompt of token ids gives the same as its text.
    let (status, by_ids) = s
        .post(
            "/v1/completions",
            &json!({"prompt": want.prompt_tokens, "max_tokens": 24, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{by_ids}");
    assert_eq!(by_ids["choices"][0]["text"], choice["text"]);

    // Unknown routes answer with an OpenAI-style error.
    let r = s.client.get(s.url("/v1/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_equals_non_streamed_for_completions_and_chat() {
    let s = Server::start(server_opts()).await;
    for (path, body) in [
        (
            "/v1/completions",
            json!({"prompt": "From fairest creatures", "max_tokens": 40, "temperature": 0.9, "seed": 5}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "When I do count", "max_tokens": 30, "temperature": 0, "stop": ["e", "th"]}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Love?"}],
                   "max_tokens": 30, "temperature": 0.7, "seed": 9}),
        ),
    ] {
        let (status, whole) = s.post(path, &body).await;
        assert_eq!(status, 200, "{whole}");
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        streamed["stream_options"] = json!({"include_usage": true});
        let events = sse(s
            .client
            .post(s.url(path))
            .json(&streamed)
            .send()
            .await
            .unwrap())
        .await;
        let (text, finish, usage) = stream_result(&events);
        let c = &whole["choices"][0];
        let want = c["text"]
            .as_str()
            .or_else(|| c["message"]["content"].as_str())
            .unwrap();
        assert_eq!(text, want, "{path} {body}");
        assert_eq!(finish, c["finish_reason"].as_str().unwrap());
        assert_eq!(usage.as_ref(), Some(&whole["usage"]));
        if path.contains("chat") {
            assert_eq!(whole["object"], "chat.completion");
            assert_eq!(c["message"]["role"], "assistant");
            let first: Value = serde_json::from_str(&events[0]).unwrap();
            assert_eq!(first["object"], "chat.completion.chunk");
            assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
            // The template was applied: the prompt is the rendered conversation.
            let rendered = "<|system|>Be brief.\n<|user|>Love?\n<|assistant|>";
            let n = tokenizer().encode(rendered).unwrap().len();
            assert_eq!(whole["usage"]["prompt_tokens"], n);
        }
        // More than one chunk of text: streaming is incremental.
        assert!(events.len() > 3, "{events:?}");
    }
    s.stop().await;
}

/// Requests that, sent 16 at once, must each give what they give alone.
fn mixed_requests() -> Vec<Value> {
    let lines = [
        "Shall I compare thee",
        "Thou art more lovely",
        "Rough winds do shake",
        "And summer's lease",
        "Sometime too hot",
        "And often is his gold",
        "And every fair from fair",
        "By chance, or nature's",
        "But thy eternal summer",
        "Nor lose possession",
        "Nor shall Death brag",
        "When in eternal lines",
        "So long as men can breathe",
        "So long lives this",
        "Devouring Time",
        "And make the earth",
    ];
    lines
        .iter()
        .enumerate()
        .map(|(i, p)| {
            // Half greedy, half sampled with a fixed seed; different lengths so sequences join and leave.
            json!({"prompt": p, "max_tokens": 8 + 3 * i, "temperature": if i % 2 == 0 { 0.0 } else { 0.8 },
                   "seed": i, "top_k": 40})
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_requests_equal_the_same_sent_one_at_a_time() {
    let s = Server::start(ServeOptions {
        max_batch: 6,
        ..server_opts()
    })
    .await;
    let reqs = mixed_requests();
    let mut alone = Vec::new();
    for r in &reqs {
        let (status, v) = s.post("/v1/completions", r).await;
        assert_eq!(status, 200, "{v}");
        alone.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }
    let tasks: Vec<_> = reqs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let (client, url, mut r) = (s.client.clone(), s.url("/v1/completions"), r.clone());
            // Every other one streamed.
            r["stream"] = json!(i % 2 == 1);
            tokio::spawn(async move {
                let resp = client.post(url).json(&r).send().await.unwrap();
                if i % 2 == 1 {
                    stream_result(&sse(resp).await).0
                } else {
                    let v: Value = resp.json().await.unwrap();
                    v["choices"][0]["text"].as_str().unwrap().to_string()
                }
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap(), alone[i], "request {i}");
    }
    let m = s.metrics().await;
    // Sequences were really batched, and tokens left the shared block at different depths.
    assert!(metric(&m, "mor_shared_block_mean_rows") > 1.0, "{m}");
    let depths: Vec<f64> = (1..=3)
        .map(|d| {
            metric(
                &m,
                &format!("mor_recursion_exit_tokens_total{{depth=\"{d}\"}}"),
            )
        })
        .collect();
    assert!(depths.iter().filter(|&&c| c > 0.0).count() >= 2, "{m}");
    assert_eq!(metric(&m, "mor_running_sequences"), 0.0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_400_naming_the_field() {
    let s = Server::start(server_opts()).await;
    let long = "word ".repeat(400);
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "/v1/completions",
            json!({"prompt": "a", "max_tokens": -5}),
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "max_tokens": 0}),
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "max_completion_tokens": 0}),
            "max_completion_tokens",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "max_tokens": CTX}),
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "max_tokens": "ten"}),
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "max_tokens": 2.5}),
            "max_tokens",
        ),
        ("/v1/completions", json!({"prompt": long}), "prompt"),
        (
            "/v1/completions",
            json!({"prompt": vec![1u32; CTX]}),
            "prompt",
        ),
        ("/v1/completions", json!({"prompt": [1, 100000]}), "prompt"),
        ("/v1/completions", json!({"prompt": [1, -1]}), "prompt[1]"),
        ("/v1/completions", json!({"prompt": 7}), "prompt"),
        ("/v1/completions", json!({"prompt": ["a", "b"]}), "prompt"),
        ("/v1/completions", json!({}), "prompt"),
        ("/v1/completions", json!({"prompt": "a", "n": 2}), "n"),
        (
            "/v1/completions",
            json!({"prompt": "a", "temperature": -1}),
            "temperature",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "temperature": "hot"}),
            "temperature",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "top_p": 0}),
            "top_p",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "top_k": -3}),
            "top_k",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "repetition_penalty": 0}),
            "repetition_penalty",
        ),
        ("/v1/completions", json!({"prompt": "a", "stop": 3}), "stop"),
        (
            "/v1/completions",
            json!({"prompt": "a", "stop": ["x", ""]}),
            "stop",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "stream": "yes"}),
            "stream",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "stream_options": {"include_usage": 1}}),
            "stream_options.include_usage",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "logprobs": 6}),
            "logprobs",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "logprobs": -1}),
            "logprobs",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "logprobs": true}),
            "logprobs",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "logprobs": 2.5}),
            "logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "logprobs": 3}),
            "logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": "2"}),
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}),
            "top_logprobs",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "frequency_penalty": 0.5}),
            "frequency_penalty",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "seed": "s"}),
            "seed",
        ),
        ("/v1/chat/completions", json!({"messages": []}), "messages"),
        (
            "/v1/chat/completions",
            json!({"messages": "hi"}),
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"content": "hi"}]}),
            "messages[0].role",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": 5}]}),
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "robot", "content": "hi"}]}),
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": long}]}),
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "n": 3}),
            "n",
        ),
    ];
    for (path, body, field) in cases {
        let (status, v) = s.post(path, &body).await;
        assert_eq!(status, 400, "{path} {body}: {v}");
        let e = &v["error"];
        assert_eq!(e["type"], "invalid_request_error", "{v}");
        assert_eq!(e["param"], field, "{body}: {v}");
        let msg = e["message"].as_str().unwrap();
        assert!(
            msg.contains(field.split('[').next().unwrap()),
            "{body}: {msg}"
        );
    }
    // Malformed JSON and a JSON that is not an object.
    for raw in ["{\"prompt\": ", "[1, 2]", "", "\u{0}\u{ff}"] {
        let r = s
            .client
            .post(s.url("/v1/completions"))
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{raw:?}");
        let v: Value = r.json().await.unwrap();
        assert!(
            v["error"]["message"].as_str().unwrap().contains("JSON"),
            "{v}"
        );
    }
    // A wrong model name: 404 as OpenAI answers.
    let (status, v) = s
        .post("/v1/completions", &json!({"model": "gpt-4", "prompt": "a"}))
        .await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["error"]["code"], "model_not_found");
    // The server still works.
    let (status, _) = s
        .post("/v1/completions", &json!({"prompt": "a", "max_tokens": 3}))
        .await;
    assert_eq!(status, 200);
    let m = s.metrics().await;
    assert!(
        metric(&m, "mor_requests_total{outcome=\"bad_request\"}") >= 37.0,
        "{m}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_without_a_template_is_a_clear_error() {
    let s = Server::start_with(server_opts(), None).await;
    let (status, v) = s
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("chat template"),
        "{v}"
    );
    s.stop().await;
}

/// log_softmax of a logits row, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + row
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

/// The legacy `logprobs` objects of a stream's chunks merged into one (`text_offset` runs on across chunks).
fn merge_legacy(events: &[String]) -> Value {
    let mut merged =
        json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap();
        for c in v["choices"].as_array().unwrap() {
            let lp = &c["logprobs"];
            if lp.is_null() {
                continue;
            }
            for k in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
                let items = lp[k].as_array().unwrap().clone();
                merged[k].as_array_mut().unwrap().extend(items);
            }
        }
    }
    merged
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_logprobs_are_the_models_log_softmax() {
    let s = Server::start(server_opts()).await;
    let prompt = "Shall I compare thee";
    let n = 8;
    let body = json!({"prompt": prompt, "max_tokens": n, "temperature": 0, "logprobs": 5, "ignore_eos": true});
    let (status, v) = s.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), n, "{lp}");
    assert_eq!(v["usage"]["completion_tokens"], n);
    let mut offset = 0;
    for i in 0..n {
        let token = tokens[i].as_str().unwrap();
        let chosen = lp["token_logprobs"][i].as_f64().unwrap();
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert!((5..=6).contains(&top.len()), "{top:?}");
        // Greedy: the sampled token is the most likely one.
        let (best, best_lp) = top
            .iter()
            .map(|(t, x)| (t.as_str(), x.as_f64().unwrap()))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap();
        assert_eq!((best, best_lp), (token, chosen), "{top:?}");
        assert!(top.values().all(|x| x.as_f64().unwrap() <= 0.0), "{top:?}");
        let mass: f64 = top.values().map(|x| x.as_f64().unwrap().exp()).sum();
        assert!(mass <= 1.0 + 1e-6, "{mass}");
        assert_eq!(lp["text_offset"][i], offset);
        offset += token.chars().count();
    }

    // Reference: the model's own logits on every prefix, computed here.
    let (model, tok) = (model(), tokenizer());
    let want = mor::engine::generate::generate(
        &model,
        &tok,
        prompt,
        &SamplingParams {
            max_new_tokens: n,
            ignore_eos: true,
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(want.tokens.len(), n);
    let cached = mor::engine::CachedModel::new(&model).unwrap();
    for i in 0..n {
        let prefix: Vec<u32> = want
            .prompt_tokens
            .iter()
            .chain(&want.tokens[..i])
            .copied()
            .collect();
        let mut cache = cached.new_cache();
        let out = cached
            .step(&mut [&mut cache], &[&prefix], &Default::default())
            .unwrap();
        let row: Vec<Vec<f32>> = out.logits.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
        let ls = log_softmax(&row[0]);
        let got = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(
            (got - ls[want.tokens[i] as usize]).abs() < 1e-4,
            "token {i}: {got} vs {}",
            ls[want.tokens[i] as usize]
        );
        // A token that is part of a character is named by its bytes (`bytes:\\x..`); others by their text.
        let text = tok.decode(&want.tokens[i..=i]).unwrap();
        if !text.contains('\u{fffd}') {
            assert_eq!(tokens[i], text.as_str());
        }
        let mut order: Vec<usize> = (0..ls.len()).collect();
        order.sort_by(|&a, &b| ls[b].total_cmp(&ls[a]));
        for &id in &order[..5] {
            let key = tok.decode(&[id as u32]).unwrap();
            if key.contains('\u{fffd}') {
                continue;
            }
            let x = lp["top_logprobs"][i][key.as_str()].as_f64().unwrap();
            assert!(
                (x - ls[id]).abs() < 1e-4,
                "token {i}, alternative {id}: {x} vs {}",
                ls[id]
            );
        }
    }

    // Streamed: the same log-probabilities, chunk by chunk.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let r = s
        .client
        .post(s.url("/v1/completions"))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    let events = sse(r).await;
    assert_eq!(merge_legacy(&events), *lp);

    // Log-probabilities are the model's, before temperature: sampling hot gives the same first distribution.
    let mut hot = body.clone();
    hot["temperature"] = json!(1.7);
    hot["seed"] = json!(3);
    let (status, h) = s.post("/v1/completions", &hot).await;
    assert_eq!(status, 200, "{h}");
    assert_eq!(
        h["choices"][0]["logprobs"]["top_logprobs"][0],
        lp["top_logprobs"][0]
    );

    // Without logprobs, none.
    let (_, plain) = s
        .post(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 2}),
        )
        .await;
    assert!(plain["choices"][0]["logprobs"].is_null(), "{plain}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_logprobs_streamed_equal_non_streamed() {
    let s = Server::start(server_opts()).await;
    let body = json!({"messages": [{"role": "user", "content": "Tell me of summer"}], "max_tokens": 6,
                      "temperature": 0, "logprobs": true, "top_logprobs": 3, "ignore_eos": true});
    let (status, v) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(content.len(), 6, "{v}");
    for e in &content {
        let token = e["token"].as_str().unwrap();
        let bytes: Vec<u8> = serde_json::from_value(e["bytes"].clone()).unwrap();
        assert_eq!(String::from_utf8_lossy(&bytes), token);
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{e}");
        // Greedy: the sampled token is the top-1 alternative.
        assert_eq!(top[0]["token"], e["token"]);
        assert_eq!(top[0]["logprob"], e["logprob"]);
        let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]), "{lps:?}");
        assert!(lps.iter().all(|&x| x <= 0.0));
        assert!(lps.iter().map(|x| x.exp()).sum::<f64>() <= 1.0 + 1e-6);
    }
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let r = s
        .client
        .post(s.url("/v1/chat/completions"))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    let events = sse(r).await;
    let mut merged = Vec::new();
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let c: Value = serde_json::from_str(e).unwrap();
        if let Some(lp) = c["choices"][0]["logprobs"]["content"].as_array() {
            merged.extend(lp.iter().cloned());
        }
    }
    assert_eq!(merged, content);
    // logprobs without top_logprobs: the sampled token only.
    let mut bare = body.clone();
    bare.as_object_mut().unwrap().remove("top_logprobs");
    let (_, b) = s.post("/v1/chat/completions", &bare).await;
    let first = &b["choices"][0]["logprobs"]["content"][0];
    assert_eq!(first["logprob"], content[0]["logprob"]);
    assert_eq!(first["top_logprobs"], json!([]));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_gets_429_while_admitted_requests_complete() {
    let s = Server::start(ServeOptions {
        max_batch: 2,
        max_queue: 2,
        ..server_opts()
    })
    .await;
    let n = 12;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (client, url) = (s.client.clone(), s.url("/v1/completions"));
            tokio::spawn(async move {
                let body =
                    json!({"prompt": format!("Sonnet {i}:"), "max_tokens": 100, "temperature": 0});
                let r = client.post(url).json(&body).send().await.unwrap();
                let status = r.status().as_u16();
                let retry = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                (status, retry, r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let (status, retry, v) = t.await.unwrap();
        match status {
            200 => {
                ok += 1;
                assert!(v["choices"][0]["text"].is_string());
            }
            429 => {
                refused += 1;
                assert_eq!(retry.as_deref(), Some("1"));
                assert_eq!(v["error"]["code"], "server_overloaded", "{v}");
            }
            s => panic!("status {s}: {v}"),
        }
    }
    assert!(ok >= 4, "{ok} admitted");
    assert!(refused >= 1, "{refused} refused");
    assert_eq!(ok + refused, n);
    let m = s.metrics().await;
    assert_eq!(
        metric(&m, "mor_requests_total{outcome=\"rejected_overload\"}"),
        refused as f64
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_times_the_capacity_gets_429s_admitted_requests_stay_correct_and_it_still_serves() {
    let (max_batch, max_queue) = (2, 2);
    let s = Server::start(ServeOptions {
        max_batch,
        max_queue,
        ..server_opts()
    })
    .await;
    let capacity = max_batch + max_queue;
    let n = 10 * capacity;
    let (model, tok) = (model(), tokenizer());
    let prompts: Vec<String> = (0..4)
        .map(|i| format!("When I do count the clock {i}"))
        .collect();
    let new_tokens = 96;
    let want: Vec<String> = prompts
        .iter()
        .map(|p| {
            let params = SamplingParams {
                max_new_tokens: new_tokens,
                ignore_eos: true,
                ..Default::default()
            };
            mor::engine::generate::generate(&model, &tok, p, &params, &mut |_| {})
                .unwrap()
                .text
        })
        .collect();
    let body = |i: usize, stream: bool| {
        json!({"prompt": prompts[i % prompts.len()], "max_tokens": new_tokens, "temperature": 0,
               "ignore_eos": true, "stream": stream})
    };
    // Fill the capacity with long streams first, so the burst meets a full server.
    let mut held = Vec::new();
    for i in 0..capacity {
        let r = s
            .client
            .post(s.url("/v1/completions"))
            .json(&body(i, true))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        held.push((i, r));
    }
    let burst: Vec<_> = (capacity..n)
        .map(|i| {
            let (client, url, body) = (
                s.client.clone(),
                s.url("/v1/completions"),
                body(i, i % 2 == 0),
            );
            tokio::spawn(async move {
                let r = client.post(url).json(&body).send().await.unwrap();
                let status = r.status().as_u16();
                let text = if status == 200 && body["stream"] == true {
                    stream_result(&parse_sse(&r.text().await.unwrap())).0
                } else {
                    let v: Value = r.json().await.unwrap();
                    if status == 429 {
                        assert_eq!(v["error"]["code"], "server_overloaded", "{v}");
                    }
                    v["choices"][0]["text"].as_str().unwrap_or("").to_string()
                };
                (i, status, text)
            })
        })
        .collect();
    let mut done = Vec::new();
    for (i, r) in held {
        done.push((i, 200, stream_result(&sse(r).await).0));
    }
    for t in burst {
        done.push(t.await.unwrap());
    }
    let (mut ok, mut refused) = (0, 0);
    for (i, status, text) in done {
        match status {
            200 => {
                ok += 1;
                assert_eq!(text, want[i % prompts.len()], "request {i}");
            }
            429 => refused += 1,
            other => panic!("request {i}: status {other}"),
        }
    }
    assert_eq!(ok + refused, n);
    assert!(ok >= capacity, "{ok} admitted");
    assert!(refused >= 1, "{refused} refused");
    let m = s.metrics().await;
    assert_eq!(
        metric(&m, "mor_requests_total{outcome=\"rejected_overload\"}"),
        refused as f64
    );

    // The load generator of `mor bench serve` in the same scenario: every request is ok or refused, none fails.
    let load = mor::bench::serve::LoadOptions {
        clients: n,
        requests: n,
        prompt_tokens: 8,
        new_tokens: 32,
        spread: 0.5,
        token_range: (10, tok.vocab_size() as u32),
        model: NAME.into(),
        temperature: 0.0,
        seed: 1,
        timeout: Duration::from_secs(300),
        server_pid: Some(std::process::id()),
    };
    let report = mor::bench::serve::run_load(&s.base, &load).await.unwrap();
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(report.ok + report.refused, n, "{report:?}");
    assert!(report.ok >= 1 && report.tokens >= report.ok, "{report:?}");
    assert_eq!(
        report.counted_by_chunks, 0,
        "mor serve sends usage: {report:?}"
    );
    assert!(report.peak_rss_bytes.is_some_and(|b| b > 0), "{report:?}");

    // Still serving, correctly.
    let (status, v) = s.post("/v1/completions", &body(0, false)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], want[0].as_str());
    let m = s.metrics().await;
    assert_eq!(metric(&m, "mor_running_sequences"), 0.0, "{m}");
    assert_eq!(metric(&m, "mor_queue_depth"), 0.0, "{m}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_and_body_limit() {
    let s = Server::start(ServeOptions {
        api_key: Some("sekret".into()),
        max_body_bytes: 4096,
        ..server_opts()
    })
    .await;
    let body = json!({"prompt": "a", "max_tokens": 2});
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("sekret"),
        Some("Basic sekret"),
    ] {
        let mut r = s.client.post(s.url("/v1/completions")).json(&body);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    let r = s.client.get(s.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = s
        .client
        .post(s.url("/v1/completions"))
        .bearer_auth("sekret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // /health needs no key.
    assert_eq!(
        s.client
            .get(s.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let big = json!({"prompt": "x".repeat(10_000)});
    let r = s
        .client
        .post(s.url("/v1/completions"))
        .bearer_auth("sekret")
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("4096"),
        "{v}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_stream_is_cancelled_and_frees_its_slot() {
    // The engine does not wait for a slow client: a request can finish before its client reads the first chunk.
    // So the request must be long enough to be still running when the client hangs up: thousands of tokens of a
    // larger context, against the client's few round trips before it hangs up.
    let ctx = 4096;
    let s = Server::start_model(
        ServeOptions {
            max_batch: 1,
            max_queue: 0,
            ..server_opts()
        },
        None,
        model_with_context(ctx),
    )
    .await;
    let body = json!({"prompt": "Devouring Time", "max_tokens": ctx - 64, "temperature": 0, "ignore_eos": true,
                      "stream": true});
    let resp = s
        .client
        .post(s.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    // Read the first chunk, so the sequence is running, then hang up.
    let first = stream.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data:"));
    let m = s.metrics().await;
    assert!(
        try_metric(&m, "mor_requests_total{outcome=\"length\"}").is_none(),
        "the request finished before its client hung up: make it longer\n{m}"
    );
    assert_eq!(metric(&m, "mor_running_sequences"), 1.0, "{m}");
    // With one slot and no queue, a second request is refused while the first runs.
    let (status, _) = s
        .post("/v1/completions", &json!({"prompt": "a", "max_tokens": 2}))
        .await;
    assert_eq!(status, 429);
    drop(stream);
    // Wait until the cancellation is observable as a whole: the request counted as cancelled, its slot and K/V
    // cache freed (the server publishes the count no later than the gauges, and releases the request's admission
    // before the engine can see it gone).
    let t0 = Instant::now();
    loop {
        let m = s.metrics().await;
        let cancelled = try_metric(&m, "mor_requests_total{outcome=\"cancelled\"}").unwrap_or(0.0);
        assert!(cancelled <= 1.0, "{m}");
        if cancelled == 1.0
            && metric(&m, "mor_running_sequences") == 0.0
            && metric(&m, "mor_kv_cache_bytes") == 0.0
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "not cancelled:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The slot is free again.
    let (status, v) = s
        .post("/v1/completions", &json!({"prompt": "a", "max_tokens": 2}))
        .await;
    assert_eq!(status, 200, "{v}");
    s.stop().await;
}

/// A random mutation of a JSON body: bytes deleted, inserted, flipped or truncated, or a field set to a value of a
/// random type.
fn mutate(rng: &mut StdRng, body: &Value) -> Vec<u8> {
    let randoms = [
        json!(null),
        json!(true),
        json!(-1),
        json!(0),
        json!(1e308),
        json!(-7.5),
        json!(""),
        json!("x"),
        json!([]),
        json!([1, 2]),
        json!({}),
        json!({"a": 1}),
        json!(u64::MAX),
        json!([["a"]]),
        json!(3),
    ];
    let mut v = body.clone();
    if rng.random_bool(0.5) {
        let fields = [
            "prompt",
            "messages",
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "top_k",
            "seed",
            "stop",
            "stream",
            "stream_options",
            "n",
            "logprobs",
            "top_logprobs",
            "model",
            "repetition_penalty",
        ];
        for _ in 0..rng.random_range(1..4) {
            let f = fields[rng.random_range(0..fields.len())];
            v[f] = randoms[rng.random_range(0..randoms.len())].clone();
        }
        // Keep generation short so the run stays bounded.
        if v["max_tokens"].as_u64().is_none_or(|m| m > 4) {
            v["max_tokens"] = json!(rng.random_range(1..5));
        }
        return v.to_string().into_bytes();
    }
    let mut b = v.to_string().into_bytes();
    for _ in 0..rng.random_range(1..6) {
        if b.is_empty() {
            break;
        }
        let i = rng.random_range(0..b.len());
        match rng.random_range(0..4) {
            0 => {
                b.remove(i);
            }
            1 => b.insert(i, rng.random()),
            2 => b[i] ^= 1 << rng.random_range(0..8),
            _ => b.truncate(i),
        }
    }
    b
}

/// Raw bytes on a TCP connection, the write half closed, the answer read with a deadline.
async fn raw_exchange(addr: &str, bytes: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = c.write_all(bytes).await;
    let _ = c.shutdown().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_bodies_headers_and_half_closed_connections_leave_it_serving() {
    let s = Server::start(ServeOptions {
        max_batch: 4,
        max_queue: 8,
        max_body_bytes: 16 * 1024,
        ..server_opts()
    })
    .await;
    let probe = json!({"prompt": "Let me not to the marriage", "max_tokens": 12, "temperature": 0});
    let (status, before) = s.post("/v1/completions", &probe).await;
    assert_eq!(status, 200);
    let addr = s.base.trim_start_matches("http://").to_string();

    let bases = [
        (
            "/v1/completions",
            json!({"prompt": "Thy", "max_tokens": 3, "temperature": 0.5, "seed": 1}),
        ),
        (
            "/v1/completions",
            json!({"prompt": [5, 6, 7], "max_tokens": 2, "stop": ["a"], "stream": true}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                        "stream": true, "stream_options": {"include_usage": true}}),
        ),
    ];
    let deadline = Instant::now() + Duration::from_secs(12);
    let mut rng = StdRng::seed_from_u64(2024);
    let mut sent = 0usize;
    let mut statuses = std::collections::BTreeMap::new();
    'rounds: for round in 0..250 {
        let mut tasks = Vec::new();
        for k in 0..12 {
            if Instant::now() > deadline {
                break 'rounds;
            }
            let (path, base) = &bases[rng.random_range(0..bases.len())];
            let body = mutate(&mut rng, base);
            let client = s.client.clone();
            let url = s.url(path);
            let addr = addr.clone();
            let kind = (round * 12 + k) % 10;
            let junk: Vec<u8> = (0..rng.random_range(0..300))
                .map(|_| rng.random())
                .collect();
            let ctype = [
                "application/json",
                "text/plain",
                "application/x-www-form-urlencoded",
                "\u{1}",
            ][rng.random_range(0..4)];
            tasks.push(tokio::spawn(async move {
                match kind {
                    // Half-closed connection with a partial request, or with garbage.
                    0 => {
                        let mut req = format!(
                            "POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                            url.rsplit_once(addr.as_str()).unwrap().1,
                            body.len() + 50
                        )
                        .into_bytes();
                        req.extend_from_slice(&body);
                        let _ = raw_exchange(&addr, &req).await;
                        None
                    }
                    1 => {
                        let _ = raw_exchange(&addr, &junk).await;
                        None
                    }
                    // A random method and path.
                    2 => {
                        let paths = [
                            "/",
                            "/v1",
                            "/v1/models",
                            "/metrics",
                            "/v1/completions/x",
                            "/%ff",
                            "/health?x=1",
                        ];
                        let p = paths[junk.len() % paths.len()];
                        let m = if junk.len().is_multiple_of(2) {
                            reqwest::Method::DELETE
                        } else {
                            reqwest::Method::GET
                        };
                        let r = client
                            .request(m, format!("{}{p}", url.split("/v1").next().unwrap()))
                            .send()
                            .await
                            .ok()?;
                        Some(r.status().as_u16())
                    }
                    _ => {
                        let r = client
                            .post(&url)
                            .header("content-type", ctype)
                            .header("x-random", format!("{}", junk.len()))
                            .body(body)
                            .timeout(Duration::from_secs(20))
                            .send()
                            .await
                            .ok()?;
                        let status = r.status().as_u16();
                        let text = r.text().await.ok()?;
                        if status != 200 {
                            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
                                panic!("{status} with a non-JSON body {text:?}: {e}")
                            });
                            assert!(v["error"]["message"].is_string(), "{text}");
                        } else if text.starts_with("data:") {
                            assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
                        }
                        Some(status)
                    }
                }
            }));
        }
        for t in tasks {
            sent += 1;
            if let Some(code) = t.await.unwrap() {
                *statuses.entry(code).or_insert(0usize) += 1;
            }
        }
    }
    println!("fuzz: {sent} requests, statuses {statuses:?}");
    assert!(sent >= 500, "only {sent} fuzz requests in the time bound");
    for code in statuses.keys() {
        assert!(
            [200, 400, 404, 405, 413, 429].contains(code),
            "status {code}: {statuses:?}"
        );
    }
    assert!(
        statuses.get(&200).copied().unwrap_or(0) > 0
            && statuses.get(&400).copied().unwrap_or(0) > 0
    );
    // Still serving, with the same answer, and nothing left running.
    let (status, after) = s.post("/v1/completions", &probe).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["choices"], before["choices"]);
    let t0 = Instant::now();
    while metric(&s.metrics().await, "mor_running_sequences") != 0.0 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.stop().await;
}

/// A checkpoint directory with the tiny model, its tokenizer and a chat template in tokenizer_config.json.
fn checkpoint_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    mor::io::checkpoint::save_model(dir.path(), &model()).unwrap();
    tokenizer().save(dir.path().join("tokenizer.json")).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        json!({"chat_template": TEMPLATE}).to_string(),
    )
    .unwrap();
    dir
}

/// The `mor` binary's `serve`, started on an ephemeral port; returns the child and its address once it listens.
fn spawn_serve(
    dir: &Path,
    extra: &[&str],
) -> (std::process::Child, String, std::thread::JoinHandle<String>) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mor"))
        .args(["serve", "--model"])
        .arg(dir)
        .args(["--port", "0", "--served-model-name", NAME])
        .args(extra)
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let log = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.unwrap_or_default();
            if let Some(i) = line.find("http://") {
                let addr: String = line[i + 7..]
                    .chars()
                    .take_while(|c| !c.is_whitespace() && *c != '\u{1b}')
                    .collect();
                let _ = tx.send(addr);
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let Ok(addr) = rx.recv_timeout(Duration::from_secs(60)) else {
        panic!("mor serve did not start:\n{}", log.join().unwrap());
    };
    (child, addr, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_streams_finish_then_exits_0() {
    let dir = checkpoint_dir();
    let (mut child, addr, log) = spawn_serve(dir.path(), &["--shutdown-grace", "20"]);
    let client = reqwest::Client::new();
    let body =
        json!({"prompt": "Those hours", "max_tokens": 100, "temperature": 0, "stream": true});
    let resp = client
        .post(format!("http://{addr}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut text = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let events = parse_sse(&text);
    let (_, finish, _) = stream_result(&events);
    assert!(finish == "length" || finish == "stop");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let log = log.join().unwrap();
    assert!(status.success(), "exit {status:?}\n{log}");
    assert!(log.contains("server stopped"), "{log}");
    assert!(client
        .get(format!("http://{addr}/health"))
        .send()
        .await
        .is_err());
}

#[test]
fn mor_chat_streams_replies_from_piped_stdin() {
    use std::io::Write;
    let dir = checkpoint_dir();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mor"))
        .args(["chat", "--model"])
        .arg(dir.path())
        .args([
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "--system",
            "Be kind.",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello there\n\n/reset\nHello there\nAnd again?\n/exit\nnot read\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let replies: Vec<&str> = stdout.lines().collect();
    // Three turns; the same first turn after /reset gives the same greedy reply.
    assert!(replies.len() >= 3, "{stdout:?}");
    assert!(stderr.contains("conversation reset"), "{stderr}");
    // Each reply is what the engine gives for the rendered conversation.
    let tok = tokenizer();
    let t = ChatTemplate::new(TEMPLATE, "", "</s>").unwrap();
    let conv = vec![
        mor::serve::api::Message {
            role: "system".into(),
            content: "Be kind.".into(),
        },
        mor::serve::api::Message {
            role: "user".into(),
            content: "Hello there".into(),
        },
    ];
    let prompt = t.render(&conv).unwrap();
    let want = mor::engine::generate::generate(
        &model(),
        &tok,
        &prompt,
        &SamplingParams {
            max_new_tokens: 12,
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap();
    assert!(
        stdout.starts_with(&format!("{}\n", want.text)),
        "{stdout:?} vs {:?}",
        want.text
    );
}
