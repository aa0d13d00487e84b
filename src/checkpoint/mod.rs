//! Checkpoint storage: atomic writes, safetensors I/O and rotating training checkpoints.

pub mod io;

pub use io::{
    latest, list_checkpoints, load_safetensors, read_safetensors, save_safetensors_atomic,
    write_atomic, write_json_atomic, CheckpointDir, SafetensorsFile,
};
