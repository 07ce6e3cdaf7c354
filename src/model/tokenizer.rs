//! Text to token ids and back through a Hugging Face `tokenizer.json`.

use std::path::Path;

use crate::error::LoadError;

/// A tokenizer loaded from a `tokenizer.json`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: String,
}

impl Tokenizer {
    /// Loads a `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Tokenizer, LoadError> {
        let label = path.display().to_string();
        if !path.is_file() {
            return Err(LoadError::Io {
                path: label,
                message: "no such file".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| LoadError::BadHeader {
            path: label.clone(),
            reason: e.to_string(),
        })?;
        Ok(Tokenizer { inner, path: label })
    }

    /// Token ids of `text`, with the special tokens the tokenizer adds by default.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, LoadError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| LoadError::BadHeader {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, LoadError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| LoadError::BadHeader {
                path: self.path.clone(),
                reason: e.to_string(),
            })
    }
}
