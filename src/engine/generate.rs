//! Text generation with causal routing (docs/architecture.md S5).
//!
//! [`generate`] is the continuous-batching [`Engine`] with one slot: the prompt is prefilled once into the KV cache
//! and each new token costs one cached step. [`generate_reference`] recomputes the whole context through the
//! full-sequence causal forward at every step, with the engine's validator, decoder and EOS rule; it is the
//! reference the cached path must match token for token (tests/engine.rs).

use candle_core::{IndexOp, Tensor};

use crate::data::Tokenizer;
use crate::engine::batch::{check_tokenizer, Decoder, EosRule, RequestCheck, RequestId};
use crate::engine::sampling::SamplingParams;
use crate::engine::{CachedModel, Engine, EngineOptions, Finish, Finished};
use crate::error::{MorError, Result};
use crate::model::{ForwardOptions, MorModel};

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Prompt tokens (after encoding; an empty prompt starts from EOS).
    pub prompt_tokens: Vec<u32>,
    /// Generated tokens.
    pub tokens: Vec<u32>,
    /// Generated text (without a matched stop sequence).
    pub text: String,
    /// Why it ended: [`Finish::Length`], [`Finish::Eos`] or [`Finish::Stop`].
    pub finish: Finish,
}

impl Generation {
    fn from_finished(f: Finished) -> Result<Self> {
        match f.finish {
            Finish::Failed(msg) => Err(MorError::Request(msg)),
            finish => Ok(Generation {
                prompt_tokens: f.prompt_tokens,
                tokens: f.tokens,
                text: f.text.unwrap_or_default(),
                finish,
            }),
        }
    }
}

/// Generate a continuation of `prompt` with the KV cache, calling `on_text` with each new piece of text as it is
/// produced. An empty prompt starts from the EOS token, as the paper's unconditional throughput runs do. A prompt
/// that fills the context is an error; `max_new_tokens` is clamped to the context that remains. Models the cache
/// does not support (hybrid KV sharing) fall back to [`generate_reference`].
pub fn generate(
    model: &MorModel,
    tokenizer: &Tokenizer,
    prompt: &str,
    params: &SamplingParams,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    match CachedModel::new(model) {
        Ok(cached) => generate_cached(cached, tokenizer, prompt, params, on_text),
        Err(e) => {
            tracing::warn!("{e}; generating by full recompute");
            generate_reference(model, tokenizer, prompt, params, on_text)
        }
    }
}

/// [`generate`] on a prepared [`CachedModel`] (e.g. one running quantized weights).
pub fn generate_cached(
    cached: CachedModel,
    tokenizer: &Tokenizer,
    prompt: &str,
    params: &SamplingParams,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let opts = EngineOptions {
        max_batch: 1,
        ..Default::default()
    };
    let mut engine = Engine::with_cached(cached, Some(tokenizer), opts)?;
    engine.submit(tokenizer.encode(prompt)?, params.clone())?;
    loop {
        engine.step()?;
        for p in engine.take_progress() {
            if !p.text.is_empty() {
                on_text(&p.text);
            }
        }
        if let Some(f) = engine.take_finished().pop() {
            return Generation::from_finished(f);
        }
    }
}

/// [`generate`] by full-sequence recompute: every step runs the whole context through the causal forward.
pub fn generate_reference(
    model: &MorModel,
    tokenizer: &Tokenizer,
    prompt: &str,
    params: &SamplingParams,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    check_tokenizer(model, tokenizer)?;
    let eos = EosRule::new(model, Some(tokenizer), None);
    let req =
        RequestCheck::new(model, &eos, true, None).check(tokenizer.encode(prompt)?, params)?;
    let mut decoder = Decoder::new(req, params, true)?;
    let opts = ForwardOptions::causal();
    let finish = loop {
        let context = decoder.context();
        let ids = Tensor::from_vec(context.to_vec(), (1, context.len()), model.device())?;
        let logits = model
            .forward(&ids, &opts)?
            .logits
            .i((0, context.len() - 1))?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        let adv = decoder.advance(&logits, &eos, false, Some(tokenizer));
        if !adv.text.is_empty() {
            on_text(&adv.text);
        }
        if let Some(f) = adv.finish {
            break f;
        }
    };
    let rest = decoder.flush();
    if !rest.is_empty() {
        on_text(&rest);
    }
    Generation::from_finished(decoder.finished(RequestId(0), finish))
}
