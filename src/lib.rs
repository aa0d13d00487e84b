//! mor: Mixture-of-Recursions language models (Bae et al., arXiv 2507.10524) on candle.
//!
//! Data flow: [`config`] -> [`model`] -> (trainer | engine).

pub mod error;

pub use error::{MorError, Result};
pub mod config;
pub mod model;

pub use config::ModelConfig;
pub use model::MorModel;
pub mod flops;
pub mod official;
pub mod presets;
pub mod verify;
