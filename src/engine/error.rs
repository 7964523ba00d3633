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
    #[error(
        "{path} is not a GGUF model file (it does not start with \"GGUF\"); choose a .gguf file such as SmolLM3-3B-Q4_K_M.gguf"
    )]
    NotGguf {
        /// The file involved.
        path: PathBuf,
    },
    /// The GGUF version is not 2 or 3.
    #[error(
        "GGUF version {0} is not supported (only versions 2 and 3 are); the file is either very old or damaged"
    )]
    UnsupportedVersion(u32),
    /// The file ended before a complete structure could be read.
    #[error(
        "the model file is incomplete (was the download interrupted?): it ends at byte {offset}, in the middle of {what}"
    )]
    Truncated {
        /// What was being read.
        what: String,
        /// Byte offset where the data ran out.
        offset: u64,
    },
    /// A count read from the file cannot possibly fit in the remaining bytes.
    #[error(
        "the model file is damaged or incomplete: {what} claims {count} entries at byte {offset}, but only {remaining} bytes remain in the file"
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
    #[error("the model file is damaged: {what} is not valid UTF-8 text")]
    InvalidUtf8 {
        /// Which string.
        what: String,
    },
    /// A metadata value has the wrong type or an invalid value.
    #[error("the model file has an invalid metadata entry {key}: {reason}")]
    InvalidMetadata {
        /// The metadata key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A required metadata key is missing.
    #[error("the model file lacks the metadata entry {0}, which this kind of model needs")]
    MissingKey(String),
    /// A metadata key appears twice.
    #[error("the model file is damaged: the metadata entry {0} appears twice")]
    DuplicateKey(String),
    /// A count or length exceeds what any real model file uses.
    #[error(
        "the model file is damaged: {what} has {count} entries, more than the {limit} a model file can reasonably have"
    )]
    LimitExceeded {
        /// What was being counted.
        what: String,
        /// The count found in the file.
        count: u64,
        /// The largest count accepted.
        limit: u64,
    },
    /// The strings of the header (metadata keys and values, tensor names) take more bytes
    /// than any real model file's.
    #[error(
        "the model file is damaged: its header holds at least {bytes} bytes of text, more than the {limit} a model file can reasonably have (real models have a few megabytes)"
    )]
    MetadataTooLarge {
        /// Bytes of text found so far.
        bytes: u64,
        /// The largest total accepted.
        limit: u64,
    },
    /// The model needs a feature this engine does not implement.
    #[error("this model uses {0}, which SmolDesk cannot run")]
    UnsupportedModel(String),
    /// The model's architecture is not one this engine implements.
    #[error(
        "the model architecture \"{found}\" is not supported; SmolDesk runs these architectures: {}",
        supported.join(", ")
    )]
    UnsupportedArchitecture {
        /// The architecture named by the file.
        found: String,
        /// Architectures this build supports.
        supported: Vec<String>,
    },
    /// A tensor type id that no supported quantization uses.
    #[error(
        "tensor {name} is stored as {}, which SmolDesk cannot run; choose a file quantized as Q4_K_M, Q5_K_M, Q6_K, Q8_0, Q4_0 or F16",
        super::gguf::ggml_type_label(*type_id)
    )]
    UnknownQuantization {
        /// Tensor name.
        name: String,
        /// The type id found.
        type_id: u32,
    },
    /// A tensor entry is malformed.
    #[error("the model file is damaged: tensor {name} is invalid because {reason}")]
    BadTensor {
        /// Tensor name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor the architecture needs is missing.
    #[error("the model file lacks the tensor {0}, which this kind of model needs")]
    MissingTensor(String),
    /// Two tensors have the same name.
    #[error("the model file is damaged: the tensor {0} appears twice")]
    DuplicateTensor(String),
    /// A tensor's data does not start on the file's alignment.
    #[error(
        "the model file is damaged: the data of tensor {name} starts at offset {offset}, which is not a multiple of the alignment {alignment}"
    )]
    MisalignedTensor {
        /// Tensor name.
        name: String,
        /// Offset relative to the start of the tensor data.
        offset: u64,
        /// The file's alignment.
        alignment: u64,
    },
    /// The data of two tensors share bytes.
    #[error("the model file is damaged: the data of tensors {first} and {second} overlap")]
    OverlappingTensors {
        /// The tensor that starts first.
        first: String,
        /// The tensor that starts inside the first one.
        second: String,
    },
    /// A tensor has a shape other than the hyper-parameters imply.
    #[error(
        "tensor {name} has shape {found:?} but the model's settings imply {expected:?}; the file is damaged or its metadata does not match its weights"
    )]
    WrongShape {
        /// Tensor name.
        name: String,
        /// Shape implied by the hyper-parameters (GGUF order).
        expected: Vec<u64>,
        /// Shape found in the file (GGUF order).
        found: Vec<u64>,
    },
    /// The context length asked for needs tables larger than SmolDesk allows for this model.
    #[error(
        "a context of {context} tokens needs {bytes} bytes of rotary-position tables for this model's heads of {head_dim}, more than the {limit} allowed; choose a shorter context length"
    )]
    ContextTooLarge {
        /// The context length (clamped to the model's trained context).
        context: usize,
        /// The model's head size.
        head_dim: usize,
        /// Bytes the tables would take.
        bytes: u64,
        /// The largest size accepted.
        limit: u64,
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
    /// A saved KV state could not be used.
    #[error(transparent)]
    KvState(#[from] super::kv_state::KvStateError),
    /// An error from candle's tensor operations.
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result type of the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
