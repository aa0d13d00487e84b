//! Training infrastructure that does not depend on the model: optimizer, clipping and LR schedules.

pub mod optim;
pub mod schedule;
pub mod trainer;

pub use optim::{clip_grad_norm, decay_by_name, AdamW, AdamWConfig, NamedParam};
pub use schedule::LrSchedule;
