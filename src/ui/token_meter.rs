//! The context meter: how many tokens the conversation plus the draft will take, counted on a
//! background thread with the model's own template and tokenizer so typing (or pasting 100k
//! characters) never stalls a frame.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};

use crate::chat::conversation::{Message, Role};
use crate::engine::tokenizer::GgufTokenizer;

/// How long the draft must stay unchanged before it is counted.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// What the counting thread needs from the loaded model.
#[derive(Clone)]
pub struct CountingModel {
    /// The chat template embedded in the model, if any.
    pub chat_template: Option<String>,
    /// The model's tokenizer.
    pub tokenizer: Arc<GgufTokenizer>,
    /// Tokens the context holds.
    pub context_length: usize,
}

/// One counting request.
#[derive(Clone)]
pub struct CountRequest {
    /// The model to count with.
    pub model: Arc<CountingModel>,
    /// The conversation's system prompt.
    pub system_prompt: String,
    /// The conversation so far (answers only).
    pub history: Vec<Message>,
    /// The draft message.
    pub draft: String,
    /// Whether thinking is on (it changes the template's ending).
    pub thinking: bool,
}

/// The counts for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Count {
    /// Tokens of the whole prompt: system prompt, history and draft.
    pub total: usize,
    /// Tokens of the prompt with the draft alone (what must fit at the very least).
    pub draft_alone: usize,
    /// Tokens the context holds.
    pub context_length: usize,
}

impl Count {
    /// Whether even the draft alone does not fit.
    pub fn draft_too_long(&self) -> bool {
        self.draft_alone >= self.context_length
    }

    /// Whether old messages will be dropped to make room.
    pub fn history_overflows(&self) -> bool {
        self.total >= self.context_length && !self.draft_too_long()
    }

    /// Share of the context used, from 0 to 1.
    pub fn fraction(&self) -> f32 {
        (self.total as f32 / self.context_length.max(1) as f32).min(1.0)
    }
}

/// Counts prompts on a background thread, keeping only the newest request.
pub struct TokenMeter {
    requests: Sender<(u64, CountRequest)>,
    results: Receiver<(u64, Result<Count, String>)>,
    /// Key of the state last sent for counting.
    sent_key: Option<u64>,
    /// Key of the state seen last frame and when it first appeared.
    seen: Option<(u64, Instant)>,
    latest: Option<(u64, Result<Count, String>)>,
}

impl Default for TokenMeter {
    fn default() -> Self {
        Self::new(Arc::new(|| {}))
    }
}

impl TokenMeter {
    /// Starts the counting thread; `wake` is called when a result is ready.
    pub fn new(wake: Arc<dyn Fn() + Send + Sync>) -> Self {
        let (requests, request_rx) = unbounded::<(u64, CountRequest)>();
        let (result_tx, results) = unbounded();
        let spawned = std::thread::Builder::new()
            .name("smoldesk-token-meter".into())
            .spawn(move || count_loop(request_rx, result_tx, wake));
        if let Err(err) = spawned {
            log::error!("cannot start the token counter: {err}");
        }
        Self {
            requests,
            results,
            sent_key: None,
            seen: None,
            latest: None,
        }
    }

    /// Called every frame with a key that changes whenever the input changes. The request is
    /// built (cloning the conversation) only once the key has been stable for [`DEBOUNCE`].
    /// Returns how long to wait before calling again, if a count is pending.
    pub fn update(
        &mut self,
        key: u64,
        now: Instant,
        make_request: impl FnOnce() -> Option<CountRequest>,
    ) -> Option<Duration> {
        while let Ok(result) = self.results.try_recv() {
            self.latest = Some(result);
        }
        if self.sent_key == Some(key) {
            return None;
        }
        let since = match self.seen {
            Some((seen_key, since)) if seen_key == key => since,
            _ => {
                self.seen = Some((key, now));
                now
            }
        };
        let waited = now.saturating_duration_since(since);
        if waited < DEBOUNCE && self.latest.is_some() {
            return Some(DEBOUNCE - waited);
        }
        self.sent_key = Some(key);
        if let Some(request) = make_request() {
            let _ = self.requests.send((key, request));
        }
        None
    }

    /// The newest count, and whether it is for the current input (`false` while re-counting).
    pub fn latest(&self) -> Option<(&Result<Count, String>, bool)> {
        self.latest
            .as_ref()
            .map(|(key, count)| (count, Some(*key) == self.sent_key))
    }

    /// Forgets all counts (e.g. another model was loaded).
    pub fn reset(&mut self) {
        self.sent_key = None;
        self.seen = None;
        self.latest = None;
    }
}

fn count_loop(
    requests: Receiver<(u64, CountRequest)>,
    results: Sender<(u64, Result<Count, String>)>,
    wake: Arc<dyn Fn() + Send + Sync>,
) {
    while let Ok(mut next) = requests.recv() {
        while let Ok(newer) = requests.try_recv() {
            next = newer;
        }
        let (key, request) = next;
        let count = std::panic::catch_unwind(|| count_request(&request))
            .unwrap_or_else(|_| Err("the token counter failed".to_string()));
        if results.send((key, count)).is_err() {
            break;
        }
        wake();
    }
}

/// Counts one request: the whole prompt, and the draft alone.
pub fn count_request(request: &CountRequest) -> Result<Count, String> {
    let model = &request.model;
    let draft = Message::new(Role::User, request.draft.clone());
    let mut all = request.history.clone();
    all.push(draft.clone());
    let total = count_prompt(model, &request.system_prompt, &all, request.thinking)?;
    let draft_alone = count_prompt(
        model,
        &request.system_prompt,
        std::slice::from_ref(&draft),
        request.thinking,
    )?;
    Ok(Count {
        total,
        draft_alone,
        context_length: model.context_length,
    })
}

/// Tokens of the prompt the model would see for these messages.
fn count_prompt(
    model: &CountingModel,
    system_prompt: &str,
    messages: &[Message],
    thinking: bool,
) -> Result<usize, String> {
    let text = render_prompt(model, system_prompt, messages, thinking);
    count_tokens(model, &text)
}

/// Renders the prompt. (Until the template work lands: ChatML, which is what SmolLM models use.)
fn render_prompt(
    _model: &CountingModel,
    system_prompt: &str,
    messages: &[Message],
    thinking: bool,
) -> String {
    let mut text = String::new();
    if !system_prompt.is_empty() {
        text.push_str(&format!("<|im_start|>system\n{system_prompt}<|im_end|>\n"));
    }
    for m in messages {
        text.push_str(&format!(
            "<|im_start|>{}\n{}<|im_end|>\n",
            m.role.as_str(),
            m.content
        ));
    }
    text.push_str("<|im_start|>assistant\n");
    if !thinking {
        text.push_str("<think>\n\n</think>\n");
    }
    text
}

/// Counts tokens. (Until the tokenizer work lands: an estimate of four bytes per token.)
fn count_tokens(_model: &CountingModel, text: &str) -> Result<usize, String> {
    Ok(text.len().div_ceil(4))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_flag_drafts_that_cannot_fit() {
        let count = Count {
            total: 9000,
            draft_alone: 9000,
            context_length: 8192,
        };
        assert!(count.draft_too_long());
        assert!(!count.history_overflows());
        let count = Count {
            total: 9000,
            draft_alone: 100,
            context_length: 8192,
        };
        assert!(!count.draft_too_long());
        assert!(count.history_overflows());
        assert_eq!(count.fraction(), 1.0);
    }
}
