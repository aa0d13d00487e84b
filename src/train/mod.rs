//! Training: AdamW, clipping and LR schedules, the trainer, up-training from pretrained models, metrics and plots, and
//! the isoFLOP study.

pub mod isoflop;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod trainer;
pub mod uptrain;

pub use optim::{clip_grad_norm, decay_by_name, AdamW, AdamWConfig, NamedParam};
pub use schedule::LrSchedule;
