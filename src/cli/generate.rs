//! `mor generate`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use mor::io::load::{load, LoadOptions};

#[derive(Args)]
pub struct GenerateArgs {
    /// Checkpoint directory (config.json, model.safetensors, tokenizer.json), a run directory, or a .gguf file.
    #[arg(long, visible_alias = "model")]
    pub checkpoint: PathBuf,
    /// With a .gguf checkpoint: run the matmuls, embedding and LM head on the stored quantized weights (the
    /// engine's integer kernels) instead of dequantized f32; no dense copy is made.
    #[arg(long)]
    pub quantized: bool,
    /// Convert the weights to this dtype after loading (bf16: half the memory traffic per token).
    #[arg(long, value_enum)]
    pub dtype: Option<super::WeightDtype>,
    /// Threads of the engine (default: the cores available).
    #[arg(long)]
    pub threads: Option<usize>,
    /// tokenizer.json (default: the one in the checkpoint).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Prompt text.
    #[arg(long)]
    pub prompt: String,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Tokens to generate.
    #[arg(long, default_value_t = 100)]
    pub max_tokens: usize,
    /// Temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Keep the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling mass.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop sequences.
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// The engine's sampling parameters for these flags.
    pub fn params(&self) -> mor::engine::sampling::SamplingParams {
        mor::engine::sampling::SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            max_new_tokens: self.max_tokens,
            stop: self.stop.clone(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

/// Set the engine's thread count from a `--threads` flag.
pub fn apply_threads(n: usize) -> Result<()> {
    if n == 0 {
        anyhow::bail!("--threads must be positive");
    }
    if !mor::engine::set_thread_count(n) {
        anyhow::bail!("--threads {n}: the engine's thread pool already runs with another count");
    }
    Ok(())
}

/// Generate from a checkpoint or GGUF file, streaming the text to stdout; returns the generated text.
pub fn run_generate(a: &GenerateArgs) -> Result<String> {
    if let Some(n) = a.threads {
        apply_threads(n)?;
    }
    let opts = LoadOptions {
        tokenizer: a.tokenizer.clone(),
        quantized: a.quantized,
        dtype: a.dtype.map(super::WeightDtype::dtype),
        ..Default::default()
    };
    let mut loaded = load(&a.checkpoint, &opts)?;
    let quantized = loaded.quantized.take();
    let (model, tokenizer) = (&loaded.model, loaded.tokenizer()?);
    let params = a.sampling.params();
    let emit = &mut |piece: &str| {
        use std::io::Write;
        print!("{piece}");
        let _ = std::io::stdout().flush();
    };
    let cached = match quantized {
        Some(weights) => Some(mor::engine::CachedModel::quantized(model, weights)?),
        None => None,
    };
    let start = std::time::Instant::now();
    let out = match cached {
        Some(c) => mor::engine::generate::generate_cached(c, tokenizer, &a.prompt, &params, emit)?,
        None => mor::engine::generate::generate(model, tokenizer, &a.prompt, &params, emit)?,
    };
    let secs = start.elapsed().as_secs_f64();
    println!();
    tracing::info!(
        prompt_tokens = out.prompt_tokens.len(),
        new_tokens = out.tokens.len(),
        seconds = format!("{secs:.3}"),
        tokens_per_sec = format!("{:.1}", out.tokens.len() as f64 / secs.max(1e-9)),
        "generated (prefill + decode, model loading excluded)"
    );
    Ok(out.text)
}
