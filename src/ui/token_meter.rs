//! The context meter: how many tokens the conversation plus the draft will take, counted on a
//! background thread with the model's own template and tokenizer so typing (or pasting 100k
//! characters) never stalls a frame.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};

use crate::chat::conversation::{ChatSettings, Message, Role};
use crate::chat::generate::{fit_for_reply, prompt_budget};
use crate::chat::prompt::PromptBuilder;
use crate::chat::template::PromptFormatter;
use crate::engine::tokenizer::GgufTokenizer;

/// How long the draft must stay unchanged before it is counted.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// What the counting thread needs from the loaded model.
#[derive(Clone)]
pub struct CountingModel {
    /// The template the worker renders prompts with (the same override and fallbacks).
    pub formatter: PromptFormatter,
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
    /// The conversation's system prompt, thinking mode and sampling.
    pub settings: ChatSettings,
    /// The conversation so far (answers only).
    pub history: Vec<Message>,
    /// The draft message.
    pub draft: String,
}

/// The counts for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Count {
    /// Tokens of the whole prompt: system prompt, history and draft.
    pub total: usize,
    /// Tokens of the prompt the next reply gets: `total`, or less once old turns are left out.
    pub sent: usize,
    /// Old messages left out of that prompt to make room (in blocks, as the worker drops them).
    pub left_out: usize,
    /// Tokens of the prompt with the draft alone (what must fit at the very least).
    pub draft_alone: usize,
    /// Tokens the context holds.
    pub context_length: usize,
    /// Tokens the prompt may take: the context minus the room kept for the reply.
    pub budget: usize,
}

impl Count {
    /// Whether even the draft alone does not fit (the worker would refuse it).
    pub fn draft_too_long(&self) -> bool {
        self.draft_alone > self.budget
    }

    /// Whether old messages will be dropped to make room.
    pub fn history_overflows(&self) -> bool {
        self.left_out > 0 && !self.draft_too_long()
    }

    /// Share of the context the next prompt uses, from 0 to 1.
    pub fn fraction(&self) -> f32 {
        (self.sent as f32 / self.context_length.max(1) as f32).min(1.0)
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
        super::background::spawn_service("smoldesk-token-meter", move || {
            count_loop(request_rx, result_tx, wake)
        });
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
        let current_key = self.seen.map(|(key, _)| key);
        self.latest
            .as_ref()
            .map(|(key, count)| (count, Some(*key) == current_key))
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
        let count =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| count_request(&request)))
                .unwrap_or_else(|_| Err("the token counter failed".to_string()));
        if results.send((key, count)).is_err() {
            break;
        }
        wake();
    }
}

/// Counts one request: the whole prompt, the draft alone, and the prompt the next reply gets
/// once old turns are left out.
pub fn count_request(request: &CountRequest) -> Result<Count, String> {
    let model = &request.model;
    let settings = &request.settings;
    let draft = Message::new(Role::User, request.draft.clone());
    let mut all = request.history.clone();
    all.push(draft.clone());
    let total = count_prompt(model, settings, &all)?;
    let draft_alone = count_prompt(model, settings, std::slice::from_ref(&draft))?;
    let context_length = model.context_length;
    let max_tokens = settings.sampling.max_tokens;
    let budget = prompt_budget(context_length, max_tokens);
    let (sent, left_out) = if total > budget && draft_alone <= budget {
        let mut count = |m: &[Message]| count_prompt(model, settings, m).unwrap_or(usize::MAX);
        fit_for_reply(&all, context_length, max_tokens, &mut count)
            .map_or((total, 0), |fitted| (fitted.prompt_tokens, fitted.dropped))
    } else {
        (total, 0)
    };
    Ok(Count {
        total,
        sent,
        left_out,
        draft_alone,
        context_length,
        budget,
    })
}

/// Tokens of the prompt the worker would build for these messages: the same template, options
/// and tokenizer.
fn count_prompt(
    model: &CountingModel,
    settings: &ChatSettings,
    messages: &[Message],
) -> Result<usize, String> {
    let today = chrono::Local::now().date_naive();
    PromptBuilder::new(&model.formatter, &model.tokenizer, today)
        .count(settings, messages)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::generate::reply_reserve;

    #[test]
    fn counts_flag_drafts_that_cannot_fit() {
        let count = Count {
            total: 9000,
            sent: 9000,
            left_out: 0,
            draft_alone: 7000,
            context_length: 8192,
            budget: 6144,
        };
        assert!(count.draft_too_long());
        assert!(!count.history_overflows());
        let count = Count {
            total: 9000,
            sent: 6000,
            left_out: 4,
            draft_alone: 100,
            context_length: 8192,
            budget: 6144,
        };
        assert!(!count.draft_too_long());
        assert!(count.history_overflows());
        assert_eq!(count.fraction(), 6000.0 / 8192.0);
    }

    #[test]
    fn the_reply_reserve_is_the_reply_limit_but_at_most_a_quarter() {
        assert_eq!(reply_reserve(8192, 512), 512);
        assert_eq!(reply_reserve(8192, 100_000), 2048);
        assert_eq!(reply_reserve(8192, 0), 1);
    }

    fn smollm3_model(context_length: usize) -> Arc<CountingModel> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures/tiny-smollm3-q4_k_m.gguf");
        let path = if path.is_file() {
            path
        } else {
            "/work/shared/fixtures/tiny-smollm3-q4_k_m.gguf".into()
        };
        let gguf = crate::engine::gguf::GgufFile::open(&path).unwrap();
        let info = crate::engine::ModelInfo::from_gguf(&gguf).unwrap();
        let tokenizer = Arc::new(GgufTokenizer::from_gguf(&gguf).unwrap());
        Arc::new(CountingModel {
            formatter: PromptFormatter::new(info.chat_template.as_deref(), None),
            tokenizer,
            context_length,
        })
    }

    #[test]
    fn counts_match_the_prompt_the_worker_builds() {
        let model = smollm3_model(4096);
        let settings = ChatSettings::default();
        let history = vec![
            Message::new(Role::User, "Hello there"),
            Message::new(Role::Assistant, "Hi! How can I help?"),
        ];
        let request = CountRequest {
            model: model.clone(),
            settings: settings.clone(),
            history: history.clone(),
            draft: "Tell me a joke".into(),
        };
        let count = count_request(&request).unwrap();
        let mut all = history;
        all.push(Message::new(Role::User, "Tell me a joke"));
        let today = chrono::Local::now().date_naive();
        let prompt = PromptBuilder::new(&model.formatter, &model.tokenizer, today)
            .build(&settings, &all)
            .unwrap();
        assert_eq!(count.total, prompt.tokens.len());
        assert_eq!(
            prompt.tokens,
            model.tokenizer.encode_prompt(&prompt.text).unwrap()
        );
        assert!(count.draft_alone < count.total);
        assert_eq!(count.budget, 4096 - 1024);
    }

    #[test]
    fn an_overflowing_conversation_counts_the_prompt_the_next_reply_gets() {
        let model = smollm3_model(4096);
        let settings = ChatSettings {
            thinking: false,
            ..ChatSettings::default()
        };
        let mut history = Vec::new();
        for turn in 0..40 {
            history.push(Message::new(
                Role::User,
                format!("Question {turn}: ").repeat(8),
            ));
            history.push(Message::new(Role::Assistant, "A long answer. ".repeat(10)));
        }
        let request = CountRequest {
            model: model.clone(),
            settings: settings.clone(),
            history: history.clone(),
            draft: "One more question".into(),
        };
        let count = count_request(&request).unwrap();
        assert!(count.total > count.budget, "{count:?}");
        assert!(count.history_overflows());
        assert!(
            count.left_out > 0 && count.left_out < history.len(),
            "{count:?}"
        );
        assert!(count.sent <= count.budget, "{count:?}");
        let mut all = history;
        all.push(Message::new(Role::User, "One more question"));
        assert_eq!(
            count.sent,
            count_prompt(&model, &settings, &all[count.left_out..]).unwrap()
        );
        assert!(count.fraction() < 1.0);
    }

    #[test]
    fn thinking_changes_the_count() {
        let model = smollm3_model(4096);
        let mut request = CountRequest {
            model,
            settings: ChatSettings::default(),
            history: Vec::new(),
            draft: "Hi".into(),
        };
        let with_thinking = count_request(&request).unwrap().total;
        request.settings.thinking = false;
        let without = count_request(&request).unwrap().total;
        // SmolLM3's template explains the reasoning mode in its system block, and pre-fills an
        // empty think block when thinking is off: the two prompts differ.
        assert_ne!(without, with_thinking);
    }

    #[test]
    fn the_meter_counts_in_the_background_and_keeps_the_newest() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut meter = TokenMeter::new(Arc::new(move || {
            let _ = tx.send(());
        }));
        let model = smollm3_model(1024);
        let request = |draft: &str| CountRequest {
            model: model.clone(),
            settings: ChatSettings::default(),
            history: Vec::new(),
            draft: draft.to_string(),
        };
        let start = Instant::now();
        assert_eq!(meter.update(1, start, || Some(request("short"))), None);
        rx.recv_timeout(Duration::from_secs(30)).unwrap();
        meter.update(1, start, || None);
        let (first, current) = meter.latest().unwrap();
        assert!(current);
        let first = first.clone().unwrap();
        assert!(!first.draft_too_long());
        // A new draft waits for the debounce, then counts.
        let long = "word ".repeat(1000);
        assert!(meter.update(2, start, || Some(request(&long))).is_some());
        assert!(!meter.latest().unwrap().1, "the old count is stale now");
        meter.update(2, start + DEBOUNCE, || Some(request(&long)));
        rx.recv_timeout(Duration::from_secs(30)).unwrap();
        meter.update(2, start + DEBOUNCE, || None);
        let (second, current) = meter.latest().unwrap();
        assert!(current);
        assert!(second.as_ref().unwrap().draft_too_long());
    }
}
