//! mor: Mixture-of-Recursions language models (Bae et al., arXiv 2507.10524) on candle.
//!
//! Data flow: [`config`] -> [`model`] -> ([`train`] | [`engine`]); [`eval`] scores models, [`io`] moves them in and
//! out (checkpoints, GGUF, the official code's layout), [`bench`] measures them, [`data`] feeds the trainer.

pub mod alloc;
pub mod bench;
pub mod config;
pub mod data;
pub mod engine;
pub mod error;
pub mod eval;
pub mod io;
pub mod model;
pub mod serve;
pub mod train;

pub use config::ModelConfig;
pub use error::{MorError, Result};
pub use model::MorModel;
