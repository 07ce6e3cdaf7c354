//! Models in the Hugging Face layout: configuration, safetensors files, a
//! writer of random-weight checkpoints in exactly that layout, the tokenizer,
//! and the decode programs.

pub mod checkpoint;
pub mod config;
pub mod decoder;
pub mod safetensors;
pub mod tokenizer;

pub use config::{Arch, ModelConfig, MoeConfig};
pub use decoder::Decoder;
pub use safetensors::{Checkpoint, SafeTensors, TensorDtype, TensorInfo};
pub use tokenizer::Tokenizer;
