//! Conversations and messages as the chat layer, the worker and the saved JSON files see them.

use serde::{Deserialize, Serialize};

use crate::engine::sampling::SamplingParams;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions that frame the conversation.
    System,
    /// The person using the app.
    #[default]
    User,
    /// The model.
    Assistant,
}

impl Role {
    /// The role name chat templates expect.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// Measurements of one generated reply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationStats {
    /// Tokens in the prompt sent to the model.
    pub prompt_tokens: usize,
    /// Prompt tokens actually computed (the rest were reused from the KV cache).
    pub prefilled_tokens: usize,
    /// Tokens generated (thinking and answer).
    pub generated_tokens: usize,
    /// Of those, tokens inside the thinking span.
    pub thinking_tokens: usize,
    /// Seconds spent thinking (from the first to the last thinking token).
    pub thinking_secs: f64,
    /// Seconds from the request to the first generated token.
    pub time_to_first_token_secs: f64,
    /// Prefill speed in tokens per second.
    pub prefill_tok_per_sec: f64,
    /// Decode speed in tokens per second.
    pub decode_tok_per_sec: f64,
    /// Why generation ended.
    pub stop_reason: StopReason,
    /// Messages dropped from the start of the conversation to fit the context.
    pub dropped_messages: usize,
}

/// Why a reply ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced an end-of-turn token.
    #[default]
    EndOfTurn,
    /// The reply reached the maximum number of tokens.
    MaxTokens,
    /// The context window is full.
    ContextFull,
    /// The user pressed Stop.
    Cancelled,
}

/// One message of a conversation. Assistant messages keep their thinking apart from the answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// The visible text (for the assistant: the answer only, never the thinking).
    pub content: String,
    /// The assistant's reasoning, if it thought.
    pub thinking: Option<String>,
    /// Measurements, for generated replies.
    pub stats: Option<GenerationStats>,
}

impl Message {
    /// A message with just a role and text.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            ..Self::default()
        }
    }
}

/// Per-conversation generation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChatSettings {
    /// The system prompt (empty = none).
    pub system_prompt: String,
    /// Whether the model should reason before answering (the template's `enable_thinking`).
    pub thinking: bool,
    /// Sampling settings.
    pub sampling: SamplingParams,
}

impl Default for ChatSettings {
    fn default() -> Self {
        Self {
            system_prompt: String::new(),
            thinking: true,
            sampling: SamplingParams::default(),
        }
    }
}
