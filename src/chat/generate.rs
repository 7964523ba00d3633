//! The generation loop shared by the worker thread and the CLI: fit the conversation into the
//! context, render the prompt with the model's template, prefill (reusing the KV cache), sample
//! until a stop condition, and stream the reply split into thinking and answer.

use std::time::Instant;

use chrono::NaiveDate;

use super::context::{ContextError, Fitted, fit_in_blocks};
use super::conversation::{ChatSettings, GenerationStats, Message, StopReason};
use super::prompt::PromptBuilder;
use super::template::PromptFormatter;
use super::thinking::{Segment, SegmentKind, ThinkSplitter, ThinkTags};
use crate::engine::EngineError;
use crate::engine::sampling::{Sampler, SamplingParams};
use crate::engine::session::Engine;
use crate::engine::tokenizer::{GgufTokenizer, StreamDecoder, TokenType};

/// Why a reply could not be generated.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Even the newest message alone does not fit the context.
    #[error(transparent)]
    Context(#[from] ContextError),
}

/// Progress of one reply, in order.
#[derive(Debug, Clone)]
pub enum GenerationEvent {
    /// The prompt is ready and about to be computed.
    Started {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// The prompt text after the chat template.
        prompt_text: String,
        /// Messages dropped from the start to fit the context.
        dropped_messages: usize,
        /// Why the model's own template was not used, if it was not.
        template_fallback: Option<String>,
    },
    /// New text of the reply.
    Segment(Segment),
}

/// A finished reply.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    /// The reasoning text (without tags).
    pub thinking: String,
    /// The answer text.
    pub answer: String,
    /// Every generated token id, end-of-turn token excluded.
    pub tokens: Vec<u32>,
    /// Measurements.
    pub stats: GenerationStats,
}

/// What the generation loop needs besides the engine.
pub struct GenerationContext<'a> {
    /// The template to render the conversation with.
    pub formatter: &'a PromptFormatter,
    /// The date the template's `strftime_now` sees.
    pub date: NaiveDate,
    /// Returns true when the reply should stop (checked before every token and between
    /// prefill chunks).
    pub cancelled: &'a dyn Fn() -> bool,
}

/// When old turns must go, at least this share of the context is freed at once (see
/// [`fit_in_blocks`]), so the following turns reuse the KV cache again.
const DROP_BLOCK_DIVISOR: usize = 4;

/// The tag that ends a thought early (parsed as a special token where the vocabulary has one).
const THINK_CLOSE_TEXT: &str = "</think>";

/// What follows the tag when the budget ends a thought, as SmolLM3's template writes it after
/// every thought (encoded as plain text).
const AFTER_THINK_CLOSE_TEXT: &str = "\n";

/// Tokens kept free for the reply when fitting the conversation into the context: the reply's
/// token limit, at most a quarter of the context.
pub fn reply_reserve(context: usize, max_tokens: usize) -> usize {
    max_tokens.clamp(1, (context / 4).max(1))
}

/// Tokens the prompt of a reply may take: the context minus the room kept for the reply.
pub fn prompt_budget(context: usize, max_tokens: usize) -> usize {
    context.saturating_sub(reply_reserve(context, max_tokens))
}

/// The messages the next reply's prompt holds: old turns dropped in blocks when the
/// conversation no longer fits (the rule of [`generate_reply`], shared with the token meter).
pub fn fit_for_reply(
    messages: &[Message],
    context: usize,
    max_tokens: usize,
    count_tokens: &mut dyn FnMut(&[Message]) -> usize,
) -> Result<Fitted, ContextError> {
    let block = (context / DROP_BLOCK_DIVISOR).max(1);
    fit_in_blocks(
        messages,
        prompt_budget(context, max_tokens),
        block,
        count_tokens,
    )
}

/// Generates the assistant's next reply to `messages` (which end with the user's message).
pub fn generate_reply(
    engine: &mut Engine,
    ctx: &GenerationContext<'_>,
    messages: &[Message],
    settings: &ChatSettings,
    on_event: &mut dyn FnMut(GenerationEvent),
) -> Result<Reply, GenerateError> {
    let tokenizer = engine.tokenizer().clone();
    let context = engine.context_length();
    let builder = PromptBuilder::new(ctx.formatter, &tokenizer, ctx.date);
    let mut count_tokens =
        |candidate: &[Message]| builder.count(settings, candidate).unwrap_or(usize::MAX);
    let fitted = fit_for_reply(
        messages,
        context,
        settings.sampling.max_tokens,
        &mut count_tokens,
    )?;
    let prompt = builder.build(settings, &fitted.messages)?;
    on_event(GenerationEvent::Started {
        prompt_tokens: prompt.tokens.len(),
        prompt_text: prompt.text,
        dropped_messages: fitted.dropped,
        template_fallback: prompt.fallback,
    });
    let mut reply = generate_from_tokens(
        engine,
        ctx,
        &prompt.tokens,
        prompt.starts_in_thinking,
        &sampling_for_reply(settings),
        settings.thinking_budget,
        on_event,
    )?;
    reply.stats.dropped_messages = fitted.dropped;
    Ok(reply)
}

/// The chat's sampling settings with the seed of this reply: the chat's own when it is fixed,
/// else a fresh one (so Regenerate gives a new reply).
pub fn sampling_for_reply(settings: &ChatSettings) -> SamplingParams {
    let mut sampling = settings.sampling.clone();
    if !settings.fixed_seed {
        sampling.seed = fresh_seed();
    }
    sampling
}

/// A random seed from the OS-seeded hasher and the clock, within `u32` so it can be typed into
/// the seed setting to reproduce a reply.
fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(nanos);
    hasher.finish() & u64::from(u32::MAX)
}

/// Generates a completion of an already tokenized prompt (no template), streaming segments.
/// With a `thinking_budget`, a thought that reaches that many tokens is closed (`</think>` and a
/// newline are fed to the model as if it wrote them, and no new thought may start) and the
/// model answers.
pub fn generate_from_tokens(
    engine: &mut Engine,
    ctx: &GenerationContext<'_>,
    prompt: &[u32],
    starts_in_thinking: bool,
    sampling: &SamplingParams,
    thinking_budget: Option<usize>,
    on_event: &mut dyn FnMut(GenerationEvent),
) -> Result<Reply, GenerateError> {
    let request_start = Instant::now();
    let tokenizer = engine.tokenizer().clone();
    let context = engine.context_length();
    let prefill_start = Instant::now();
    let prefill = engine.prefill_cancellable(prompt, ctx.cancelled)?;
    let prefill_secs = prefill_start.elapsed().as_secs_f64();

    let mut run = ReplyRun::new(&tokenizer, starts_in_thinking, on_event);
    run.stats.prompt_tokens = prompt.len();
    run.stats.prefilled_tokens = prefill.computed;
    run.stats.prefill_tok_per_sec = prefill.computed as f64 / prefill_secs.max(1e-9);
    run.stats.seed = sampling.seed;

    let mut budget = ThinkingBudget::new(&tokenizer, thinking_budget);
    let mut sampler = Sampler::new(sampling);
    let mut history: Vec<u32> = prompt.to_vec();
    let mut logits = prefill.logits;
    let decode_start = Instant::now();
    let stop_reason = loop {
        if (ctx.cancelled)() {
            break StopReason::Cancelled;
        }
        let next = match budget.forced.pop_front() {
            Some(forced) => forced,
            None => {
                budget.forbid_new_thought(&mut logits);
                let window_start = history.len().saturating_sub(sampling.repeat_last_n);
                sampler.sample(&logits, &history[window_start..])
            }
        };
        if run.reply.tokens.is_empty() {
            run.stats.time_to_first_token_secs = request_start.elapsed().as_secs_f64();
        }
        if tokenizer.is_end_of_turn(next) {
            break StopReason::EndOfTurn;
        }
        run.push_token(next);
        history.push(next);
        if budget.close_now(&run) {
            run.stats.thinking_budget_reached = true;
        }
        if run.reply.tokens.len() >= sampling.max_tokens {
            break StopReason::MaxTokens;
        }
        if engine.cached_tokens().len() >= context {
            break StopReason::ContextFull;
        }
        logits = engine.decode(next)?;
    };
    let decode_secs = decode_start.elapsed().as_secs_f64();
    let generated = run.reply.tokens.len();
    run.stats.decode_tok_per_sec = if generated > 1 {
        (generated - 1) as f64 / decode_secs.max(1e-9)
    } else {
        0.0
    };
    Ok(run.finish(stop_reason))
}

/// A limit on thinking tokens and the tokens it feeds the model once the limit is reached.
struct ThinkingBudget {
    limit: Option<usize>,
    close: Vec<u32>,
    open_id: Option<u32>,
    /// Tokens to feed next instead of sampling.
    forced: std::collections::VecDeque<u32>,
    reached: bool,
}

impl ThinkingBudget {
    fn new(tokenizer: &GgufTokenizer, limit: Option<usize>) -> Self {
        let close = match limit {
            Some(_) => thought_closing_tokens(tokenizer)
                .inspect_err(|err| {
                    log::warn!("no thinking budget: cannot encode the end tag: {err}")
                })
                .unwrap_or_default(),
            None => Vec::new(),
        };
        Self {
            limit: limit.filter(|_| !close.is_empty()),
            close,
            open_id: tokenizer.think_ids().map(|(open, _)| open),
            forced: std::collections::VecDeque::new(),
            reached: false,
        }
    }

    /// Whether the thought must end now (the end tag then makes it exactly the budget long);
    /// queues the end tag once.
    fn close_now(&mut self, run: &ReplyRun<'_>) -> bool {
        let Some(limit) = self.limit else {
            return false;
        };
        if self.reached || !run.splitter.in_thinking() || run.stats.thinking_tokens + 1 < limit {
            return false;
        }
        self.reached = true;
        self.forced.extend(self.close.iter().copied());
        true
    }

    /// Once the budget ended a thought, the model may not start another one.
    fn forbid_new_thought(&self, logits: &mut [f32]) {
        if self.reached
            && let Some(slot) = self.open_id.and_then(|id| logits.get_mut(id as usize))
        {
            *slot = f32::NEG_INFINITY;
        }
    }
}

/// The tokens fed when the budget ends a thought: the end tag, then the newline as plain text.
fn thought_closing_tokens(tokenizer: &GgufTokenizer) -> Result<Vec<u32>, EngineError> {
    let mut tokens = tokenizer.encode(THINK_CLOSE_TEXT, true)?;
    tokens.extend(tokenizer.encode(AFTER_THINK_CLOSE_TEXT, false)?);
    Ok(tokens)
}

/// The state of one reply while tokens stream in.
struct ReplyRun<'a> {
    tokenizer: &'a GgufTokenizer,
    decoder: StreamDecoder,
    splitter: ThinkSplitter,
    on_event: &'a mut dyn FnMut(GenerationEvent),
    reply: Reply,
    stats: GenerationStats,
    started: Instant,
    thinking_ended_at: Option<f64>,
}

impl<'a> ReplyRun<'a> {
    fn new(
        tokenizer: &'a GgufTokenizer,
        starts_in_thinking: bool,
        on_event: &'a mut dyn FnMut(GenerationEvent),
    ) -> Self {
        let (open_id, close_id) = tokenizer.think_ids().unzip();
        Self {
            tokenizer,
            decoder: StreamDecoder::new(),
            splitter: ThinkSplitter::new(ThinkTags { open_id, close_id }, starts_in_thinking),
            on_event,
            reply: Reply::default(),
            stats: GenerationStats::default(),
            started: Instant::now(),
            thinking_ended_at: None,
        }
    }

    fn push_token(&mut self, id: u32) {
        let was_thinking = self.splitter.in_thinking();
        // Control tokens (`<|im_start|>`…) are never shown; think tags are still seen by id.
        let text = if self.tokenizer.token_type(id) == Some(TokenType::Control) {
            String::new()
        } else {
            self.decoder.push(self.tokenizer, id)
        };
        let segments = self.splitter.push(id, &text);
        let now_thinking = self.splitter.in_thinking();
        if was_thinking || now_thinking {
            self.stats.thinking_tokens += 1;
        }
        if was_thinking && !now_thinking {
            self.thinking_ended_at = Some(self.started.elapsed().as_secs_f64());
        }
        self.reply.tokens.push(id);
        self.emit(segments);
    }

    fn emit(&mut self, segments: Vec<Segment>) {
        for segment in segments {
            match segment.kind {
                SegmentKind::Thinking => self.reply.thinking.push_str(&segment.text),
                SegmentKind::Answer => self.reply.answer.push_str(&segment.text),
            }
            (self.on_event)(GenerationEvent::Segment(segment));
        }
    }

    fn finish(mut self, stop_reason: StopReason) -> Reply {
        let tail = self.decoder.finish();
        let mut segments = if tail.is_empty() {
            Vec::new()
        } else {
            self.splitter.push(u32::MAX, &tail)
        };
        let still_thinking = self.splitter.in_thinking();
        segments.extend(self.splitter.finish());
        self.emit(segments);
        if self.stats.thinking_tokens > 0 {
            self.stats.thinking_secs = match (self.thinking_ended_at, still_thinking) {
                (Some(t), false) => t,
                _ => self.started.elapsed().as_secs_f64(),
            };
        }
        self.stats.generated_tokens = self.reply.tokens.len();
        self.stats.stop_reason = stop_reason;
        self.reply.stats = self.stats;
        self.reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_smollm3_tokenizer() -> GgufTokenizer {
        let beside = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures/tiny-smollm3-q4_k_m.gguf");
        let path = if beside.is_file() {
            beside
        } else {
            "/work/shared/fixtures/tiny-smollm3-q4_k_m.gguf".into()
        };
        let gguf = crate::engine::gguf::GgufFile::open(&path).unwrap();
        GgufTokenizer::from_gguf(&gguf).unwrap()
    }

    #[test]
    fn control_tokens_other_than_end_of_turn_are_not_shown() {
        let tokenizer = tiny_smollm3_tokenizer();
        let im_start = tokenizer.token_id("<|im_start|>").unwrap();
        assert_eq!(tokenizer.token_type(im_start), Some(TokenType::Control));
        let mut shown = String::new();
        let mut on_event = |event: GenerationEvent| {
            if let GenerationEvent::Segment(segment) = event {
                shown.push_str(&segment.text);
            }
        };
        let mut run = ReplyRun::new(&tokenizer, false, &mut on_event);
        let words = tokenizer.encode("Hello world", false).unwrap();
        run.push_token(words[0]);
        run.push_token(im_start);
        for &id in &words[1..] {
            run.push_token(id);
        }
        let reply = run.finish(StopReason::EndOfTurn);
        assert_eq!(reply.answer, "Hello world");
        assert_eq!(shown, "Hello world");
        assert_eq!(reply.tokens.len(), words.len() + 1);
    }

    #[test]
    fn a_thought_is_closed_with_the_end_tag_and_a_plain_newline() {
        let tokenizer = tiny_smollm3_tokenizer();
        let (_, close) = tokenizer.think_ids().unwrap();
        let tokens = thought_closing_tokens(&tokenizer).unwrap();
        assert_eq!(tokens[0], close);
        assert!(tokens.len() > 1, "{tokens:?}");
        let mut decoder = StreamDecoder::new();
        let rest: String = tokens[1..]
            .iter()
            .map(|&id| decoder.push(&tokenizer, id))
            .collect();
        assert_eq!(rest + &decoder.finish(), "\n");
        assert!(
            tokens[1..]
                .iter()
                .all(|&id| tokenizer.token_type(id) != Some(TokenType::Control))
        );
    }

    #[test]
    fn the_newline_after_a_closed_thought_is_not_shown_in_the_answer() {
        let tokenizer = tiny_smollm3_tokenizer();
        let (open, _) = tokenizer.think_ids().unwrap();
        let mut shown = String::new();
        let mut on_event = |event: GenerationEvent| {
            if let GenerationEvent::Segment(segment) = event
                && segment.kind == SegmentKind::Answer
            {
                shown.push_str(&segment.text);
            }
        };
        let mut run = ReplyRun::new(&tokenizer, false, &mut on_event);
        let thought = tokenizer.encode("Let me see", false).unwrap();
        let answer = tokenizer.encode("Hello world", false).unwrap();
        let closing = thought_closing_tokens(&tokenizer).unwrap();
        for &id in std::iter::once(&open)
            .chain(&thought)
            .chain(&closing)
            .chain(&answer)
        {
            run.push_token(id);
        }
        let reply = run.finish(StopReason::EndOfTurn);
        assert_eq!(reply.thinking, "Let me see");
        assert_eq!(reply.answer, "Hello world");
        assert_eq!(shown, "Hello world");
        // The tag is counted as thinking, the newline is not.
        assert_eq!(reply.stats.thinking_tokens, 1 + thought.len() + 1);
    }

    #[test]
    fn replies_get_fresh_seeds_unless_the_chat_fixes_one() {
        let mut settings = ChatSettings::default();
        settings.sampling.seed = 9;
        let seeds: Vec<u64> = (0..4).map(|_| sampling_for_reply(&settings).seed).collect();
        assert!(seeds.iter().all(|&s| s <= u64::from(u32::MAX)));
        assert!(seeds.windows(2).any(|w| w[0] != w[1]), "{seeds:?}");
        settings.fixed_seed = true;
        assert_eq!(sampling_for_reply(&settings).seed, 9);
    }
}
