//! SmolDesk: a private desktop chat app that runs SmolLM3-3B (GGUF) on the user's own CPU.
//!
//! Layers, bottom to top:
//! - [`engine`]: GGUF files, the quantized model, the tokenizer and sampling (no UI types).
//! - [`chat`]: chat templates, thinking spans, conversations, context fitting, the generation loop.
//! - [`worker`]: the background inference thread and the messages it exchanges with the UI.
//! - [`ui`]: the egui/eframe window, one file per panel.
//! - [`cli`]: the headless command line sharing the same pieces.

pub mod chat;
pub mod cli;
pub mod engine;
pub mod paths;
pub mod ui;
pub mod worker;
