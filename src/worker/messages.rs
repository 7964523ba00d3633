//! What the UI sends to the inference thread ([`Command`]) and what it sends back ([`Event`]).
//!
//! The protocol is request-scoped: every command that starts work carries a [`RequestId`]
//! chosen by the sender, and every event names the request it belongs to, so the UI can ignore
//! late events of a request it has moved past (a stopped reply, a replaced load). Each request
//! ends with exactly one final event: `Loaded`/`LoadFailed` for a load, `Finished`/`Error` for
//! a reply, `Unloaded`/`TemplateSet`/`Error` for the others. Failures are [`WorkerError`]s the UI
//! can match, including a panic caught inside the worker.

use std::path::PathBuf;
use std::sync::Arc;

use crate::chat::conversation::{ChatSettings, GenerationStats, Message};
pub use crate::chat::thinking::SegmentKind;
use crate::engine::ModelInfo;
use crate::engine::session::LoadOptions;
use crate::engine::tokenizer::GgufTokenizer;

/// Identifies one request so its events can be told apart from those of other requests.
pub type RequestId = u64;

/// A request to generate the next assistant reply of a conversation.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Chosen by the sender; echoed in every event of this request.
    pub id: RequestId,
    /// The conversation so far, ending with the user's newest message (or, with `resume`,
    /// with the assistant's unfinished reply). No system message: the system prompt comes from
    /// `settings`.
    pub messages: Vec<Message>,
    /// System prompt, thinking mode and sampling.
    pub settings: ChatSettings,
    /// The conversation this reply belongs to, whose saved KV state the worker restores and
    /// updates (`None`: no state is kept).
    pub conversation: Option<String>,
    /// Continue the last (assistant) message instead of writing a new one: the new text is
    /// appended to it.
    pub resume: bool,
}

/// Commands from the UI to the worker.
#[derive(Debug, Clone)]
pub enum Command {
    /// Load a model, replacing (and first stopping) whatever is loaded or generating.
    LoadModel {
        /// Chosen by the sender; echoed in this load's events.
        id: RequestId,
        /// The GGUF file.
        path: PathBuf,
        /// Context length and threads.
        options: LoadOptions,
    },
    /// Generate the next reply.
    Generate(GenerateRequest),
    /// Use this chat template file instead of the model's own (`None`: the model's own).
    SetTemplateOverride {
        /// Chosen by the sender; echoed in the answer.
        id: RequestId,
        /// The template file.
        path: Option<PathBuf>,
    },
    /// Drop the loaded model and free its memory.
    Unload {
        /// Chosen by the sender; echoed in the answer.
        id: RequestId,
    },
    /// End the worker thread.
    Shutdown,
}

impl Command {
    /// The request this command starts, if it starts one.
    pub fn request_id(&self) -> Option<RequestId> {
        match self {
            Command::LoadModel { id, .. }
            | Command::SetTemplateOverride { id, .. }
            | Command::Unload { id } => Some(*id),
            Command::Generate(request) => Some(request.id),
            Command::Shutdown => None,
        }
    }
}

/// Why a request failed. The UI matches on these; `Display` is the text for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkerError {
    /// A reply was asked for with no model loaded.
    #[error("no model is loaded: open a model first")]
    NoModel,
    /// The load was cancelled (by the user, or because another load replaced it).
    #[error("loading was cancelled")]
    LoadCancelled,
    /// There is no model file at the path (checked by the worker: the UI thread does not
    /// touch the disk).
    #[error("there is no model file there")]
    ModelMissing,
    /// The model file could not be loaded.
    #[error("{0}")]
    Load(String),
    /// The conversation does not fit the context.
    #[error("{0}")]
    Context(String),
    /// The engine failed while computing.
    #[error("{0}")]
    Engine(String),
    /// The chat template file could not be read.
    #[error("cannot read chat template {path}: {message}")]
    TemplateFile {
        /// The file.
        path: PathBuf,
        /// What is wrong: the operating system's error, or the file is too large or not a
        /// regular file.
        message: String,
    },
    /// The worker panicked while handling the request; it recovered and stays usable.
    #[error("internal error in the inference engine: {0}")]
    Panic(String),
    /// The inference thread is not running (it could not be started).
    #[error("the inference thread is not running")]
    WorkerGone,
}

/// Events from the worker to the UI, in the order they happen.
#[derive(Debug, Clone)]
pub enum Event {
    /// Loading advanced; `fraction` runs from 0 to 1.
    LoadProgress {
        /// The load request.
        id: RequestId,
        /// The file being loaded.
        path: PathBuf,
        /// Share of the weights read so far.
        fraction: f32,
    },
    /// The model is ready (ends a load).
    Loaded {
        /// The load request.
        id: RequestId,
        /// Its description.
        info: Box<ModelInfo>,
        /// Its tokenizer, for counting tokens on the UI side.
        tokenizer: Arc<GgufTokenizer>,
        /// Seconds the load took.
        load_secs: f64,
        /// Threads of the compute pool the model runs on (the Threads setting, resolved).
        compute_threads: usize,
    },
    /// Loading failed or was cancelled; the previous model (if any) is gone (ends a load).
    LoadFailed {
        /// The load request.
        id: RequestId,
        /// The file that failed.
        path: PathBuf,
        /// What went wrong.
        error: WorkerError,
    },
    /// The model was unloaded (ends an unload).
    Unloaded {
        /// The unload request.
        id: RequestId,
    },
    /// The chat template override is in use (ends a template change).
    TemplateSet {
        /// The request.
        id: RequestId,
    },
    /// A generation request started; old turns may have been dropped to fit the context.
    Started {
        /// The request.
        id: RequestId,
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// The exact prompt text sent to the model (after the chat template).
        prompt_text: String,
        /// Why the model's own chat template was not used (ChatML instead), if it was not.
        template_fallback: Option<String>,
        /// Messages dropped from the start of the conversation to fit.
        dropped_messages: usize,
    },
    /// New text of a reply.
    Segment {
        /// The request.
        id: RequestId,
        /// Thinking or answer.
        kind: SegmentKind,
        /// The text (whole UTF-8 characters, never a tag).
        text: String,
    },
    /// A reply ended (ends a reply).
    Finished {
        /// The request.
        id: RequestId,
        /// Measurements and the stop reason.
        stats: GenerationStats,
    },
    /// A request failed (ends it, whatever its kind). The worker stays usable.
    Error {
        /// The request it ends.
        id: RequestId,
        /// What went wrong.
        error: WorkerError,
    },
}

impl Event {
    /// The request this event belongs to.
    pub fn request_id(&self) -> RequestId {
        match self {
            Event::LoadProgress { id, .. }
            | Event::Loaded { id, .. }
            | Event::LoadFailed { id, .. }
            | Event::Unloaded { id }
            | Event::TemplateSet { id }
            | Event::Started { id, .. }
            | Event::Segment { id, .. }
            | Event::Finished { id, .. }
            | Event::Error { id, .. } => *id,
        }
    }

    /// Whether this is the last event of its request.
    pub fn ends_request(&self) -> bool {
        !matches!(
            self,
            Event::LoadProgress { .. } | Event::Started { .. } | Event::Segment { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_names_its_request_and_final_events_are_marked() {
        let progress = Event::LoadProgress {
            id: 3,
            path: "m.gguf".into(),
            fraction: 0.5,
        };
        let failed = Event::Error {
            id: 4,
            error: WorkerError::Panic("boom".into()),
        };
        assert_eq!(progress.request_id(), 3);
        assert!(!progress.ends_request());
        assert_eq!(failed.request_id(), 4);
        assert!(failed.ends_request());
        assert_eq!(
            WorkerError::Panic("boom".into()).to_string(),
            "internal error in the inference engine: boom"
        );
    }
}
