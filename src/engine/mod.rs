//! The inference engine: GGUF parsing and validation, the quantized transformer, the tokenizer
//! built from GGUF metadata, and token sampling. Nothing here knows about the UI.

pub mod attention;
pub mod cpu;
pub mod error;
pub mod gguf;
pub mod kernels;
pub mod kv_state;
pub mod model;
pub mod model_info;
pub mod sampling;
pub mod session;
pub mod synth;
pub mod tokenizer;

pub use error::{EngineError, Result};
pub use model_info::{Architecture, HParams, ModelInfo};
pub use session::{Engine, LoadOptions};
