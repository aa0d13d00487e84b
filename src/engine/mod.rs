//! Fast inference: KV caches, KV-cached depth-wise batched decoding and a continuous-batching engine
//! (paper §2.2.2, §3.3, App. E; spec §3, §4).
//!
//! - [`cache`]: per-sequence, per-layer K/V caches (recursion-wise caching or recursive KV sharing), in bytes.
//! - [`forward`]: [`CachedModel::step`], prefill and decode over many sequences at once, with the causal routing
//!   rule of full-sequence causal forwards (spec §10.4), so both give the same logits.
//! - [`pipeline`]: [`CachedModel::pipeline_step`], the paper's asynchronous depth-wise batching: one shared-block
//!   call per step over tokens at every recursion depth.
//! - [`batch`]: [`Engine`], a queue of requests with continuous (sequence- or depth-wise) batching.
//! - [`bench`](mod@bench): `mor bench generate` and `mor bench machine`.

pub mod batch;
pub mod bench;
pub mod cache;
pub mod forward;
pub mod pipeline;

pub use batch::{Engine, EngineOptions, EngineStats, Finish, Finished, RequestId};
pub use cache::{LayerKv, SeqKv};
pub use forward::{num_threads, pin_thread_count, CachedModel, StepOptions, StepOutput};
pub use pipeline::{Flight, PipelineOutput};
