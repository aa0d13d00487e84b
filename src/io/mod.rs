//! Models in and out: mor checkpoints ([`checkpoint`]), llama.cpp GGUF files ([`gguf`]), the official MoR code's
//! checkpoint layout and config knobs ([`official`]), and comparison against reference runs of the official code
//! ([`verify`]).

pub mod checkpoint;
pub mod gguf;
pub mod load;
pub mod official;
pub mod verify;
