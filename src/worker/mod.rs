//! The background inference thread that owns the engine, and the messages it exchanges with the UI.

pub mod messages;
pub mod thread;

pub use messages::{Command, Event};
pub use thread::WorkerHandle;
