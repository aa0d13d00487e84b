//! The OpenAI HTTP API as mor serves it: request parsing with errors that name the field, the error body, and the
//! JSON of responses and stream chunks.
//!
//! Requests are read from a `serde_json::Value` field by field rather than derived, so that a wrong type is refused
//! with the field's name and unknown fields are ignored, as OpenAI's server does.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::data::Tokenizer;
use crate::engine::sampling::{
    SamplingParams, TokenLogprobs, MAX_NEW_TOKENS_LIMIT, MAX_TOP_LOGPROBS,
};
use crate::engine::Finish;

/// Most alternatives `/v1/completions` `logprobs` may ask for (OpenAI's limit).
pub const MAX_COMPLETION_LOGPROBS: usize = 5;

/// What a log-probability of `-inf` is reported as (JSON has no infinities; OpenAI and vLLM use the same value).
pub const LOGPROB_FLOOR: f64 = -9999.0;

/// An error answered as OpenAI does: a status and `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// OpenAI error type (`invalid_request_error`, `authentication_error`, …).
    pub kind: &'static str,
    /// The request field at fault, if any.
    pub param: Option<String>,
    /// A machine-readable code, if any.
    pub code: Option<&'static str>,
    /// Seconds for `Retry-After` (429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// 400 for the request field `param`.
    pub fn bad_field(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..Self::bad_request(message)
        }
    }

    /// 400 without a particular field.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// Another status with a type and code.
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: Some(code),
            retry_after: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, json_body(&self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert("retry-after", HeaderValue::from(s));
        }
        r
    }
}

/// A JSON response body with its content type.
pub fn json_body(v: &Value) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// The prompt of a completion request: text or token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Text to tokenize.
    Text(String),
    /// Token ids as given.
    Tokens(Vec<u32>),
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, …
    pub role: String,
    /// Its text.
    pub content: String,
}

/// What either endpoint asks the engine for.
#[derive(Debug, Clone)]
pub struct Generation {
    /// `max_tokens` / `max_completion_tokens` if given (the default depends on the endpoint and the context).
    pub max_tokens: Option<usize>,
    /// Sampling parameters (its `max_new_tokens` is set once the prompt length is known).
    pub params: SamplingParams,
    /// Stream as server-sent events.
    pub stream: bool,
    /// Send a final chunk with `usage` when streaming.
    pub include_usage: bool,
}

/// A parsed `/v1/completions` request.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    /// The `model` field, if any.
    pub model: Option<String>,
    /// The prompt.
    pub prompt: Prompt,
    /// Generation settings.
    pub generation: Generation,
}

/// A parsed `/v1/chat/completions` request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The `model` field, if any.
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Generation settings.
    pub generation: Generation,
}

/// The body as a JSON object.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::bad_request(
            "the request body must be a JSON object",
        )),
    }
}

/// Typed access to the fields of a request object; `null` counts as absent.
struct Fields<'a>(&'a Map<String, Value>);

fn wrong_type(field: &str, want: &str, got: &Value) -> ApiError {
    let got = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    ApiError::bad_field(field, format!("{field} must be {want}, got {got}"))
}

impl Fields<'_> {
    fn get(&self, f: &str) -> Option<&Value> {
        self.0.get(f).filter(|v| !v.is_null())
    }

    fn string(&self, f: &str) -> Result<Option<String>, ApiError> {
        match self.get(f) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(wrong_type(f, "a string", v)),
        }
    }

    fn bool(&self, f: &str) -> Result<Option<bool>, ApiError> {
        match self.get(f) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(wrong_type(f, "a boolean", v)),
        }
    }

    fn number(&self, f: &str) -> Result<Option<f64>, ApiError> {
        match self.get(f) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(v) => Err(wrong_type(f, "a number", v)),
        }
    }

    /// An integer (a float with an integral value counts, as JSON does not tell them apart).
    fn integer(&self, f: &str) -> Result<Option<i64>, ApiError> {
        match self.get(f) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(i) => Ok(Some(i)),
                None => match n.as_f64() {
                    Some(x) if x.fract() == 0.0 && x.abs() < 9.0e15 => Ok(Some(x as i64)),
                    _ if n.is_u64() => Err(ApiError::bad_field(f, format!("{f} is too large"))),
                    _ => Err(ApiError::bad_field(
                        f,
                        format!("{f} must be an integer, got {n}"),
                    )),
                },
            },
            Some(v) => Err(wrong_type(f, "an integer", v)),
        }
    }
}

/// The fields common to both endpoints.
fn parse_generation(f: &Fields) -> Result<Generation, ApiError> {
    let max_tokens = match (
        f.integer("max_completion_tokens")?,
        f.integer("max_tokens")?,
    ) {
        (Some(n), _) => Some(("max_completion_tokens", n)),
        (None, Some(n)) => Some(("max_tokens", n)),
        (None, None) => None,
    };
    let max_tokens = match max_tokens {
        Some((field, n)) if n <= 0 => {
            return Err(ApiError::bad_field(
                field,
                format!("{field} must be >= 1, got {n}"),
            ))
        }
        Some((field, n)) if n as u64 > MAX_NEW_TOKENS_LIMIT as u64 => {
            return Err(ApiError::bad_field(
                field,
                format!("{field} must be <= {MAX_NEW_TOKENS_LIMIT}, got {n}"),
            ))
        }
        Some((_, n)) => Some(n as usize),
        None => None,
    };
    let temperature = f.number("temperature")?.unwrap_or(1.0);
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(ApiError::bad_field(
            "temperature",
            format!("temperature must be >= 0, got {temperature}"),
        ));
    }
    let top_p = f.number("top_p")?;
    if let Some(p) = top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::bad_field(
                "top_p",
                format!("top_p must be in (0, 1], got {p}"),
            ));
        }
    }
    let top_k = match f.integer("top_k")? {
        // 0 and -1 mean "off" in llama.cpp and vLLM.
        None | Some(0) | Some(-1) => None,
        Some(k) if k < 0 => {
            return Err(ApiError::bad_field(
                "top_k",
                format!("top_k must be >= 0, got {k}"),
            ))
        }
        Some(k) => Some(k as usize),
    };
    let repetition_penalty = f.number("repetition_penalty")?.unwrap_or(1.0);
    if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
        return Err(ApiError::bad_field(
            "repetition_penalty",
            format!("repetition_penalty must be > 0 (1 = off), got {repetition_penalty}"),
        ));
    }
    let seed = match f.integer("seed")? {
        Some(s) => s as u64,
        // No seed: a fresh one per request, so unseeded sampling varies as clients expect.
        None => rand::random(),
    };
    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                v => Err(wrong_type(&format!("stop[{i}]"), "a string", v)),
            })
            .collect::<Result<_, _>>()?,
        Some(v) => return Err(wrong_type("stop", "a string or an array of strings", v)),
    };
    if let Some(i) = stop.iter().position(String::is_empty) {
        return Err(ApiError::bad_field(
            "stop",
            format!("stop[{i}] is an empty string"),
        ));
    }
    match f.integer("n")? {
        None | Some(1) => {}
        Some(n) => {
            return Err(ApiError::bad_field(
                "n",
                format!("n must be 1 (one choice per request), got {n}"),
            ))
        }
    }
    for field in ["presence_penalty", "frequency_penalty"] {
        if let Some(x) = f.number(field)? {
            if x != 0.0 {
                return Err(ApiError::bad_field(
                    field,
                    format!("{field} is not supported (use repetition_penalty), got {x}"),
                ));
            }
        }
    }
    if f.bool("echo")? == Some(true) {
        return Err(ApiError::bad_field("echo", "echo is not supported"));
    }
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields(o)
            .bool("include_usage")
            .map_err(|mut e| {
                e.param = Some("stream_options.include_usage".into());
                e.message = format!("stream_options.{}", e.message);
                e
            })?
            .unwrap_or(false),
        Some(v) => return Err(wrong_type("stream_options", "an object", v)),
    };
    Ok(Generation {
        max_tokens,
        params: SamplingParams {
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            max_new_tokens: 1,
            stop,
            ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
            // Set by the endpoint, whose fields differ.
            logprobs: None,
        },
        stream,
        include_usage,
    })
}

/// Parse a `/v1/completions` body.
pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let obj = parse_object(body)?;
    let f = Fields(&obj);
    let prompt = match f.get("prompt") {
        None => return Err(ApiError::bad_field("prompt", "prompt is required")),
        Some(v) => parse_prompt(v)?,
    };
    let mut generation = parse_generation(&f)?;
    generation.params.logprobs = match f.integer("logprobs")? {
        None => None,
        Some(n) if (0..=MAX_COMPLETION_LOGPROBS as i64).contains(&n) => Some(n as usize),
        Some(n) => {
            return Err(ApiError::bad_field(
                "logprobs",
                format!("logprobs must be in 0..={MAX_COMPLETION_LOGPROBS}, got {n}"),
            ))
        }
    };
    Ok(CompletionRequest {
        model: f.string("model")?,
        prompt,
        generation,
    })
}

fn token_id(v: &Value, field: &str) -> Result<u32, ApiError> {
    v.as_u64()
        .and_then(|t| u32::try_from(t).ok())
        .ok_or_else(|| {
            ApiError::bad_field(
                field,
                format!("{field} must be a token id (an integer >= 0)"),
            )
        })
}

fn parse_prompt(v: &Value) -> Result<Prompt, ApiError> {
    let one = "prompt: one prompt per request (a string or a list of token ids)";
    match v {
        Value::String(s) => Ok(Prompt::Text(s.clone())),
        Value::Array(a) if a.is_empty() => Ok(Prompt::Tokens(Vec::new())),
        Value::Array(a) => match &a[0] {
            Value::Number(_) => a
                .iter()
                .enumerate()
                .map(|(i, t)| token_id(t, &format!("prompt[{i}]")))
                .collect::<Result<_, _>>()
                .map(Prompt::Tokens),
            Value::String(_) | Value::Array(_) if a.len() > 1 => {
                Err(ApiError::bad_field("prompt", one))
            }
            Value::String(s) => Ok(Prompt::Text(s.clone())),
            Value::Array(inner) => inner
                .iter()
                .enumerate()
                .map(|(i, t)| token_id(t, &format!("prompt[0][{i}]")))
                .collect::<Result<_, _>>()
                .map(Prompt::Tokens),
            other => Err(wrong_type("prompt[0]", "a string or a token id", other)),
        },
        other => Err(wrong_type("prompt", "a string or an array", other)),
    }
}

/// Parse a `/v1/chat/completions` body.
pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let obj = parse_object(body)?;
    let f = Fields(&obj);
    let messages = match f.get("messages") {
        None => return Err(ApiError::bad_field("messages", "messages is required")),
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::bad_field(
                "messages",
                "messages must not be empty",
            ))
        }
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, m)| parse_message(i, m))
            .collect::<Result<_, _>>()?,
        Some(v) => return Err(wrong_type("messages", "an array", v)),
    };
    let mut generation = parse_generation(&f)?;
    let top = match f.integer("top_logprobs")? {
        Some(n) if !(0..=MAX_TOP_LOGPROBS as i64).contains(&n) => {
            return Err(ApiError::bad_field(
                "top_logprobs",
                format!("top_logprobs must be in 0..={MAX_TOP_LOGPROBS}, got {n}"),
            ))
        }
        top => top.map(|n| n as usize),
    };
    generation.params.logprobs = match (f.bool("logprobs")?.unwrap_or(false), top) {
        (true, top) => Some(top.unwrap_or(0)),
        (false, Some(n)) if n > 0 => {
            return Err(ApiError::bad_field(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ))
        }
        (false, _) => None,
    };
    Ok(ChatRequest {
        model: f.string("model")?,
        messages,
        generation,
    })
}

fn parse_message(i: usize, m: &Value) -> Result<Message, ApiError> {
    let at = format!("messages[{i}]");
    let Value::Object(o) = m else {
        return Err(wrong_type(&at, "an object", m));
    };
    let f = Fields(o);
    let role = f
        .string("role")
        .map_err(|e| ApiError::bad_field(&format!("{at}.role"), format!("{at}.{}", e.message)))?
        .ok_or_else(|| {
            ApiError::bad_field(&format!("{at}.role"), format!("{at}.role is required"))
        })?;
    let content = match f.get("content") {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        // Content parts: only text ones can be rendered.
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        return Err(ApiError::bad_field(
                            &format!("{at}.content[{j}]"),
                            format!("{at}.content[{j}] must be a text part ({{\"type\": \"text\", \"text\": ...}})"),
                        ))
                    }
                }
            }
            text
        }
        Some(v) => {
            return Err(wrong_type(
                &format!("{at}.content"),
                "a string or an array of parts",
                v,
            ))
        }
    };
    Ok(Message { role, content })
}

/// The OpenAI `finish_reason` of a finish.
pub fn finish_reason(f: &Finish) -> &'static str {
    match f {
        Finish::Length => "length",
        Finish::Eos | Finish::Stop => "stop",
        Finish::Cancelled => "cancelled",
        Finish::Failed(_) => "error",
    }
}

/// The `usage` object.
pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// Renders token log-probabilities as either endpoint reports them, and keeps the legacy format's text offsets
/// running across the chunks of a stream.
///
/// A token's bytes are its own (byte-level BPE vocabularies: the token string mapped back through GPT-2's byte
/// alphabet; other tokenizers: the UTF-8 of the token decoded on its own). Chat reports them as `bytes` with the
/// text (U+FFFD for a part of a multi-byte character); the legacy format names such a token as OpenAI does,
/// `bytes:\xe2\x80`.
pub struct LogprobsWriter {
    chat: bool,
    /// Characters of token text rendered so far (legacy `text_offset`).
    offset: usize,
}

impl LogprobsWriter {
    /// A writer for `/v1/chat/completions` (`chat`) or `/v1/completions`.
    pub fn new(chat: bool) -> Self {
        LogprobsWriter { chat, offset: 0 }
    }

    /// The `logprobs` object of a response or chunk for `tokens`: chat's `{"content": [{"token", "logprob",
    /// "bytes", "top_logprobs"}]}` (the top-N alternatives), or the legacy `{"tokens", "token_logprobs",
    /// "top_logprobs", "text_offset"}` (the top-N alternatives and the sampled token).
    pub fn render(&mut self, tokenizer: &Tokenizer, tokens: &[TokenLogprobs]) -> Value {
        let byte_level = matches!(
            tokenizer.inner().get_decoder(),
            Some(tokenizers::decoders::DecoderWrapper::ByteLevel(_))
        );
        let bytes = |id: u32| {
            let own = byte_level
                .then(|| tokenizer.id_to_token(id))
                .flatten()
                .and_then(|t| t.chars().map(byte_level_byte).collect::<Option<Vec<u8>>>());
            own.unwrap_or_else(|| tokenizer.decode(&[id]).unwrap_or_default().into_bytes())
        };
        let lp = |x: f32| {
            if x.is_finite() {
                f64::from(x)
            } else {
                LOGPROB_FLOOR
            }
        };
        if self.chat {
            let entry = |id: u32, x: f32| {
                let b = bytes(id);
                json!({"token": String::from_utf8_lossy(&b), "logprob": lp(x), "bytes": b})
            };
            let content: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let mut e = entry(t.token, t.logprob);
                    e["top_logprobs"] = t.top.iter().map(|&(id, x)| entry(id, x)).collect();
                    e
                })
                .collect();
            return json!({ "content": content });
        }
        let text = |id: u32| match String::from_utf8(bytes(id)) {
            Ok(t) => t,
            Err(e) => e.as_bytes().iter().fold("bytes:".to_string(), |mut t, b| {
                t.push_str(&format!("\\x{b:02x}"));
                t
            }),
        };
        let (mut strings, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
        for t in tokens {
            let s = text(t.token);
            offsets.push(self.offset);
            self.offset += s.chars().count();
            // Tokens with the same text share a key; the most likely one keeps it.
            let mut top = Map::new();
            for (key, x) in t.top.iter().map(|&(id, x)| (text(id), x)) {
                top.entry(key).or_insert_with(|| json!(lp(x)));
            }
            top.entry(s.clone()).or_insert_with(|| json!(lp(t.logprob)));
            strings.push(s);
            lps.push(lp(t.logprob));
            tops.push(Value::Object(top));
        }
        json!({"tokens": strings, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
    }
}

/// The byte a character of a byte-level BPE token stands for (GPT-2's `bytes_to_unicode` inverted): printable
/// Latin-1 characters stand for themselves, and U+0100.. for the other 68 bytes in increasing order.
fn byte_level_byte(c: char) -> Option<u8> {
    match c as u32 {
        c @ (0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff) => Some(c as u8),
        c @ 0x100..=0x143 => Some(match c - 0x100 {
            n @ 0..=32 => n as u8,
            n @ 33..=66 => (0x7f + n - 33) as u8,
            _ => 0xad,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::byte_level_byte;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;

    #[test]
    fn the_byte_level_alphabet_maps_back_to_every_byte_once() {
        let mut bytes: Vec<u8> = ByteLevel::alphabet()
            .into_iter()
            .map(|c| byte_level_byte(c).unwrap())
            .collect();
        bytes.sort_unstable();
        assert_eq!(bytes, (0..=255).collect::<Vec<u8>>());
        // 'Ġ' is the space of GPT-2 vocabularies.
        assert_eq!(byte_level_byte('\u{120}'), Some(b' '));
        assert_eq!(byte_level_byte('€'), None);
    }
}
