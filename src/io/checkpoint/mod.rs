//! Checkpoint storage: atomic writes, safetensors I/O and rotating training checkpoints.

pub mod io;
pub mod model;

pub use io::{
    latest, list_checkpoints, load_safetensors, read_safetensors, save_safetensors_atomic,
    write_atomic, write_json_atomic, CheckpointDir, SafetensorsFile,
};
pub use model::{load_config, load_model, load_model_with_config, load_tensors, save_model};
