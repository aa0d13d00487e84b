//! mor: Mixture-of-Recursions language models (Bae et al., arXiv 2507.10524) on candle.
//!
//! Data flow: [`config`] -> [`model`] -> (trainer | engine).

pub mod alloc;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod engine;
pub mod error;
pub mod eval;
pub mod flops;
pub mod generate;
pub mod gguf;
pub mod metrics;
pub mod model;
pub mod official;
pub mod plot;
pub mod presets;
pub mod sampling;
pub mod train;
pub mod uptrain;
pub mod verify;

pub use config::ModelConfig;
pub use error::{MorError, Result};
pub use model::MorModel;
