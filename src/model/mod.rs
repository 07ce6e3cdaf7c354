//! Models in the Hugging Face layout: configuration, safetensors files, a
//! writer of random-weight checkpoints in exactly that layout, the tokenizer,
//! and the decode programs.

pub mod checkpoint;
pub mod config;
pub mod safetensors;
pub mod session;
pub mod tokenizer;

pub use config::{Arch, ModelConfig, MoeConfig};
pub use safetensors::{Checkpoint, SafeTensors, TensorDtype, TensorInfo};
pub use session::{ExpertUse, Model, Session, WeightSource, PREFILL_CHUNK};
pub use tokenizer::Tokenizer;
