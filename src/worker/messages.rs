//! What the UI sends to the inference thread ([`Command`]) and what it sends back ([`Event`]).

use std::path::PathBuf;
use std::sync::Arc;

use crate::chat::conversation::{ChatSettings, GenerationStats, Message};
pub use crate::chat::thinking::SegmentKind;
use crate::engine::ModelInfo;
use crate::engine::session::LoadOptions;
use crate::engine::tokenizer::GgufTokenizer;

/// Identifies one generation request so late events of a stopped request can be told apart.
pub type RequestId = u64;

/// A request to generate the next assistant reply of a conversation.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Chosen by the sender; echoed in every event of this request.
    pub id: RequestId,
    /// The conversation so far, ending with the user's newest message. No system message:
    /// the system prompt comes from `settings`.
    pub messages: Vec<Message>,
    /// System prompt, thinking mode and sampling.
    pub settings: ChatSettings,
    /// The conversation this reply belongs to, whose saved KV state the worker restores and
    /// updates (`None`: no state is kept).
    pub conversation: Option<String>,
}

/// Commands from the UI to the worker.
#[derive(Debug, Clone)]
pub enum Command {
    /// Load a model, replacing (and first stopping) whatever is loaded or generating.
    LoadModel {
        /// The GGUF file.
        path: PathBuf,
        /// Context length and threads.
        options: LoadOptions,
    },
    /// Generate the next reply.
    Generate(GenerateRequest),
    /// Use this chat template file instead of the model's own (`None`: the model's own).
    SetTemplateOverride(Option<PathBuf>),
    /// Drop the loaded model and free its memory.
    Unload,
    /// End the worker thread.
    Shutdown,
    /// Panics inside the worker, to test that a panic becomes an [`Event::Error`].
    #[doc(hidden)]
    TestPanic,
}

/// Events from the worker to the UI, in the order they happen.
#[derive(Debug, Clone)]
pub enum Event {
    /// Loading advanced; `fraction` runs from 0 to 1.
    LoadProgress {
        /// The file being loaded.
        path: PathBuf,
        /// Share of the weights read so far.
        fraction: f32,
    },
    /// The model is ready.
    Loaded {
        /// Its description.
        info: Box<ModelInfo>,
        /// Its tokenizer, for counting tokens on the UI side.
        tokenizer: Arc<GgufTokenizer>,
        /// Seconds the load took.
        load_secs: f64,
    },
    /// Loading failed or was cancelled; the previous model (if any) is gone.
    LoadFailed {
        /// The file that failed.
        path: PathBuf,
        /// What went wrong, for the user.
        message: String,
    },
    /// The model was unloaded.
    Unloaded,
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
    /// A reply ended.
    Finished {
        /// The request.
        id: RequestId,
        /// Measurements and the stop reason.
        stats: GenerationStats,
    },
    /// Something failed. The worker stays usable.
    Error {
        /// The request it belongs to, if any.
        id: Option<RequestId>,
        /// What went wrong, for the user.
        message: String,
    },
}
