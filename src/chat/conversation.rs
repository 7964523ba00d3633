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
    /// The sampling seed this reply was drawn with (the same seed and prompt give it again).
    pub seed: u64,
    /// Whether thinking was ended because it reached the chat's thinking budget.
    pub thinking_budget_reached: bool,
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
    /// Set on a reply that was still being written when it was last saved (the app was
    /// killed or closed mid-reply): it can be continued or regenerated.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
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
    /// Use `sampling.seed` for every reply; otherwise each reply draws a fresh seed (so
    /// Regenerate gives a new reply) and records it in its statistics.
    pub fixed_seed: bool,
    /// Most tokens the model may think before it is made to answer (`None`: no limit).
    pub thinking_budget: Option<usize>,
}

impl Default for ChatSettings {
    fn default() -> Self {
        Self {
            system_prompt: String::new(),
            thinking: true,
            sampling: SamplingParams::default(),
            fixed_seed: false,
            thinking_budget: None,
        }
    }
}

/// A saved conversation: its messages, its own settings and when it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Conversation {
    /// Unique id; also the file name of the saved JSON.
    pub id: String,
    /// The title the user gave it (empty = derived from the first message).
    pub title: String,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: i64,
    /// Last change, milliseconds since the Unix epoch.
    pub updated_ms: i64,
    /// System prompt, thinking mode and sampling for this conversation.
    pub settings: ChatSettings,
    /// User and assistant messages, oldest first (no system message).
    pub messages: Vec<Message>,
}

impl Default for Conversation {
    fn default() -> Self {
        Self::new(ChatSettings::default())
    }
}

impl Conversation {
    /// Longest title derived from the first message, in characters.
    pub const AUTO_TITLE_CHARS: usize = 48;

    /// An empty conversation with a fresh id.
    pub fn new(settings: ChatSettings) -> Self {
        let now = now_ms();
        Self {
            id: new_conversation_id(now),
            title: String::new(),
            created_ms: now,
            updated_ms: now,
            settings,
            messages: Vec::new(),
        }
    }

    /// The title to show: the user's, else the start of the first user message, else "New chat".
    pub fn display_title(&self) -> String {
        let given = self.title.trim();
        if !given.is_empty() {
            return given.to_string();
        }
        let first_user = self
            .messages
            .iter()
            .find(|m| m.role == Role::User)
            .map(|m| m.content.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        if first_user.is_empty() {
            return "New chat".to_string();
        }
        truncate_chars(&first_user, Self::AUTO_TITLE_CHARS)
    }

    /// Records that the conversation changed now.
    pub fn touch(&mut self) {
        self.updated_ms = now_ms().max(self.updated_ms);
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A new unique conversation id made of digits and dashes (safe as a file name).
fn new_conversation_id(now_ms: i64) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{now_ms}-{}-{n}", std::process::id())
}

/// The first `max` characters of `text`, with "…" when cut.
fn truncate_chars(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", text[..cut].trim_end()),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod conversation_tests {
    use super::*;

    #[test]
    fn new_conversations_get_distinct_ids() {
        let a = Conversation::default();
        let b = Conversation::default();
        assert_ne!(a.id, b.id);
        assert!(a.id.chars().all(|c| c.is_ascii_digit() || c == '-'));
    }

    #[test]
    fn title_comes_from_the_first_user_message_when_not_given() {
        let mut c = Conversation::default();
        assert_eq!(c.display_title(), "New chat");
        c.messages
            .push(Message::new(Role::User, "  Why is\nthe sky blue?  "));
        assert_eq!(c.display_title(), "Why is the sky blue?");
        c.title = "Sky".into();
        assert_eq!(c.display_title(), "Sky");
    }

    #[test]
    fn long_titles_are_cut_on_a_character_boundary() {
        let mut c = Conversation::default();
        c.messages.push(Message::new(Role::User, "é".repeat(100)));
        let title = c.display_title();
        assert_eq!(title.chars().count(), Conversation::AUTO_TITLE_CHARS + 1);
        assert!(title.ends_with('…'));
    }

    #[test]
    fn old_files_without_new_fields_still_load() {
        let c: Conversation = serde_json::from_str(r#"{"id":"1","messages":[]}"#).unwrap();
        assert_eq!(c.id, "1");
        assert!(c.settings.thinking);
        assert!(
            !c.settings.fixed_seed,
            "old chats draw a fresh seed per reply"
        );
        assert_eq!(c.settings.thinking_budget, None);
    }
}
