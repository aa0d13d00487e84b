//! Text generation with causal routing (docs/architecture.md S5).
//!
//! [`generate`] decodes with the KV cache ([`crate::engine::CachedModel`]): the prompt is prefilled once and each
//! new token costs one cached step. [`generate_reference`] recomputes the whole context through the full-sequence
//! causal forward at every step; it is the reference the cached path must match token for token (tests/engine.rs).

use candle_core::{IndexOp, Tensor};

use crate::data::Tokenizer;
use crate::engine::sampling::{Sampler, SamplingParams, StopCheck, StopMatcher};
use crate::engine::{CachedModel, StepOptions};
use crate::error::{MorError, Result};
use crate::model::{ForwardOptions, MorModel};

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` reached (or the context filled up).
    Length,
    /// The model produced EOS.
    Eos,
    /// A stop sequence appeared.
    Stop,
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Prompt tokens (after encoding; an empty prompt starts from EOS).
    pub prompt_tokens: Vec<u32>,
    /// Generated tokens.
    pub tokens: Vec<u32>,
    /// Generated text (without a matched stop sequence).
    pub text: String,
    /// Why it ended.
    pub finish: FinishReason,
}

/// Generate a continuation of `prompt` with the KV cache, calling `on_text` with each new piece of text as it is
/// produced. An empty prompt starts from the EOS token, as the paper's unconditional throughput runs do. A prompt
/// that fills the context is an error; `max_new_tokens` is clamped to the context that remains (with a log line).
/// Models the cache does not support (hybrid KV sharing) fall back to [`generate_reference`].
pub fn generate(
    model: &MorModel,
    tokenizer: &Tokenizer,
    prompt: &str,
    params: &SamplingParams,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    match CachedModel::new(model) {
        Ok(cached) => generate_cached(&cached, tokenizer, prompt, params, on_text),
        Err(e) => {
            tracing::warn!("{e}; generating by full recompute");
            generate_reference(model, tokenizer, prompt, params, on_text)
        }
    }
}

/// [`generate`] on a prepared [`CachedModel`] (e.g. one running quantized weights).
pub fn generate_cached(
    cached: &CachedModel,
    tokenizer: &Tokenizer,
    prompt: &str,
    params: &SamplingParams,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let model = cached.model();
    let mut cache = cached.new_cache();
    let opts = StepOptions::default();
    generate_with(model, tokenizer, prompt, params, on_text, &mut |context| {
        let new = &context[cache.seq_len()..];
        let out = cached.step(&mut [&mut cache], &[new], &opts)?;
        Ok(out.logits.i(0)?)
    })
}

/// [`generate`] by full-sequence recompute: every step runs the whole context through the causal forward.
pub fn generate_reference(
    model: &MorModel,
    tokenizer: &Tokenizer,
    prompt: &str,
    params: &SamplingParams,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let opts = ForwardOptions::causal();
    generate_with(model, tokenizer, prompt, params, on_text, &mut |context| {
        let ids = Tensor::from_vec(context.to_vec(), (1, context.len()), model.device())?;
        Ok(model
            .forward(&ids, &opts)?
            .logits
            .i((0, context.len() - 1))?)
    })
}

/// The generation loop; `next_logits(context)` returns the logits [V] of the last context position.
fn generate_with(
    model: &MorModel,
    tokenizer: &Tokenizer,
    prompt: &str,
    params: &SamplingParams,
    on_text: &mut dyn FnMut(&str),
    next_logits: &mut dyn FnMut(&[u32]) -> Result<Tensor>,
) -> Result<Generation> {
    let ctx = model.config().max_position_embeddings;
    if tokenizer.vocab_size() > model.config().vocab_size {
        return Err(MorError::Request(format!(
            "the tokenizer has {} tokens but the model's vocabulary has {}: they do not belong together",
            tokenizer.vocab_size(),
            model.config().vocab_size
        )));
    }
    let mut prompt_tokens = tokenizer.encode(prompt)?;
    if prompt_tokens.is_empty() {
        prompt_tokens.push(tokenizer.eos_id());
    }
    if let Some(&bad) = prompt_tokens
        .iter()
        .find(|&&t| t as usize >= model.config().vocab_size)
    {
        return Err(MorError::Request(format!(
            "prompt token {bad} is outside the model's vocabulary ({}): tokenizer and model do not match",
            model.config().vocab_size
        )));
    }
    params.validate(prompt_tokens.len())?;
    if prompt_tokens.len() >= ctx {
        return Err(MorError::Request(format!(
            "prompt of {} tokens leaves no room in the model's context of {ctx}",
            prompt_tokens.len()
        )));
    }
    let max_new = params.max_new_tokens.min(ctx - prompt_tokens.len());
    if max_new < params.max_new_tokens {
        tracing::info!(
            requested = params.max_new_tokens,
            max_new,
            "max_new_tokens clamped to the remaining context"
        );
    }
    let mut sampler = Sampler::new(params.clone())?;
    let mut stop = StopMatcher::new(&params.stop);
    let mut context = prompt_tokens.clone();
    let mut tokens = Vec::new();
    let mut decoded_len = 0;
    let mut streamed = 0;
    let mut finish = FinishReason::Length;
    for _ in 0..max_new {
        let logits = next_logits(&context)?;
        let next = sampler.sample_tensor(&logits, &context)?;
        // The model's own end token (e.g. SmolLM2-Instruct's <|im_end|>) or the tokenizer's document separator.
        if Some(next) == model.config().eos_token_id || next == tokenizer.eos_id() {
            finish = FinishReason::Eos;
            break;
        }
        context.push(next);
        tokens.push(next);
        // Decode the whole continuation so characters spanning several tokens come out whole.
        let full = tokenizer.decode(&tokens)?;
        let piece = full.get(decoded_len..).unwrap_or("");
        decoded_len = full.len();
        let check = stop.push(piece);
        let safe = stop.stable_len();
        if safe > streamed {
            on_text(&stop.text()[streamed..safe]);
            streamed = safe;
        }
        if let StopCheck::Stop { .. } = check {
            finish = FinishReason::Stop;
            break;
        }
    }
    let text = stop.text().to_string();
    if text.len() > streamed {
        on_text(&text[streamed..]);
    }
    Ok(Generation {
        prompt_tokens,
        tokens,
        text,
        finish,
    })
}
