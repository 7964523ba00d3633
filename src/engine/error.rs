//! Typed errors of the engine: opening GGUF files, building the model and tokenizer, running it.

use std::path::PathBuf;

/// Everything that can go wrong inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the GGUF magic bytes.
    #[error("{path} is not a GGUF model file (it does not start with \"GGUF\")")]
    NotGguf {
        /// The file involved.
        path: PathBuf,
    },
    /// The GGUF version is not 2 or 3.
    #[error("GGUF version {0} is not supported (only versions 2 and 3 are)")]
    UnsupportedVersion(u32),
    /// The file ended before a complete structure could be read.
    #[error("the file is truncated: it ends at byte {offset} while reading {what}")]
    Truncated {
        /// What was being read.
        what: String,
        /// Byte offset where the data ran out.
        offset: u64,
    },
    /// A count read from the file cannot possibly fit in the remaining bytes.
    #[error(
        "the file is corrupt: {what} claims {count} entries at byte {offset}, but only {remaining} bytes remain"
    )]
    ImplausibleCount {
        /// What was being counted.
        what: String,
        /// The count found in the file.
        count: u64,
        /// Byte offset of the count.
        offset: u64,
        /// Bytes left in the file.
        remaining: u64,
    },
    /// A string in the file is not valid UTF-8.
    #[error("the file is corrupt: {what} is not valid UTF-8")]
    InvalidUtf8 {
        /// Which string.
        what: String,
    },
    /// A metadata value has the wrong type or an invalid value.
    #[error("invalid metadata {key}: {reason}")]
    InvalidMetadata {
        /// The metadata key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A required metadata key is missing.
    #[error("the model file lacks the metadata key {0}")]
    MissingKey(String),
    /// The model's architecture is not one this engine implements.
    #[error("unsupported model architecture \"{found}\" (supported: {})", supported.join(", "))]
    UnsupportedArchitecture {
        /// The architecture named by the file.
        found: String,
        /// Architectures this build supports.
        supported: Vec<String>,
    },
    /// A tensor type id that no known quantization uses.
    #[error("tensor {name} has an unknown quantization type {type_id}")]
    UnknownQuantization {
        /// Tensor name.
        name: String,
        /// The type id found.
        type_id: u32,
    },
    /// A tensor entry is malformed.
    #[error("tensor {name} is invalid: {reason}")]
    BadTensor {
        /// Tensor name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor the architecture needs is missing.
    #[error("the model file lacks the tensor {0}")]
    MissingTensor(String),
    /// A tensor has a shape other than the hyper-parameters imply.
    #[error("tensor {name} has shape {found:?}, expected {expected:?}")]
    WrongShape {
        /// Tensor name.
        name: String,
        /// Shape implied by the hyper-parameters (GGUF order).
        expected: Vec<u64>,
        /// Shape found in the file (GGUF order).
        found: Vec<u64>,
    },
    /// The tokenizer could not be built or used.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// The prompt does not fit in the context window.
    #[error("the prompt has {tokens} tokens but the context holds only {context}")]
    ContextFull {
        /// Tokens needed.
        tokens: usize,
        /// Context length.
        context: usize,
    },
    /// The operation was cancelled by the caller.
    #[error("cancelled")]
    Cancelled,
    /// An error from candle's tensor operations.
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result type of the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
