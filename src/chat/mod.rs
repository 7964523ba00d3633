//! The chat layer: conversations, the model's own chat template, thinking spans, context fitting
//! and the generation loop shared by the worker thread and the CLI.

pub mod context;
pub mod conversation;
pub mod generate;
pub mod lock;
pub mod prompt;
pub mod resume;
pub mod state_cache;
pub mod store;
pub mod template;
pub mod thinking;
