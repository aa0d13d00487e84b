//! Fast inference: KV caches, KV-cached depth-wise batched decoding and a continuous-batching engine
//! (paper §2.2.2, §3.3, App. E).
//!
//! - [`cache`]: per-sequence, per-layer K/V caches (recursion-wise caching or recursive KV sharing), in bytes.
//! - [`kernels`]: the f32 row kernels (RMSNorm, RoPE, matmuls); [`attention`]: attention over per-sequence caches.
//! - [`quant`], [`dense`], [`gemm_bf16`]: the matmuls themselves, on quantized GGUF blocks (integer SIMD), on few
//!   dense rows, and on bf16 weights with bf16 dot products (prefill); [`pool`]: the thread pool they run on.
//! - [`step`]: [`CachedModel::step`], prefill and decode over many sequences at once, with the causal routing rule
//!   of full-sequence causal forwards, so both give the same logits.
//! - [`pipeline`]: [`CachedModel::pipeline_step`], the paper's asynchronous depth-wise batching: one shared-block
//!   call per step over tokens at every recursion depth.
//! - [`batch`]: [`Engine`], a queue of requests with continuous (sequence- or depth-wise) batching.
//! - [`generate`], [`sampling`]: single-prompt generation and the samplers.

pub mod attention;
pub mod batch;
pub mod cache;
pub mod dense;
pub mod gemm_bf16;
pub mod gemm_f32;
pub mod generate;
pub mod kernels;
pub mod pipeline;
pub mod pool;
pub mod quant;
pub mod sampling;
pub mod step;

pub use batch::{
    Checked, Engine, EngineOptions, EngineStats, EosRule, Finish, Finished, Progress, RequestCheck,
    RequestId,
};
pub use cache::{LayerKv, SeqKv};
pub use kernels::{num_threads, pin_thread_count, set_thread_count};
pub use pipeline::{Flight, PipelineOutput};
pub use step::{CachedModel, StepOptions, StepOutput};
