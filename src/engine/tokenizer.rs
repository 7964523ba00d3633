//! The tokenizer, built from a GGUF file's own metadata. (Stub: filled in by the tokenizer work.)

use super::error::{EngineError, Result};
use super::gguf::GgufFile;

/// A tokenizer built from GGUF metadata.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {}

impl GgufTokenizer {
    /// Builds the tokenizer described by the file's `tokenizer.ggml.*` keys.
    pub fn from_gguf(_gguf: &GgufFile) -> Result<Self> {
        Err(EngineError::Tokenizer("not implemented yet".into()))
    }
}
