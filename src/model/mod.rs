//! Models in the Hugging Face layout: configuration, safetensors files, and a
//! writer of random-weight checkpoints in exactly that layout.

pub mod checkpoint;
pub mod config;
pub mod decoder;
pub mod safetensors;

pub use config::{Arch, ModelConfig, MoeConfig};
pub use decoder::Decoder;
pub use safetensors::{Checkpoint, SafeTensors, TensorDtype, TensorInfo};
