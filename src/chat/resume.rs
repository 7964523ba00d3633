//! Continuing an unfinished reply (one interrupted by a crash, a kill or closing the app): the
//! prompt is the conversation before the reply, rendered as usual, followed by what the model
//! had already written, so the model goes on from where it stopped.

use super::context::ContextError;
use super::conversation::{ChatSettings, Message, Role};
use super::generate::{
    GenerateError, GenerationContext, GenerationEvent, Reply, generate_from_tokens, generate_reply,
    sampling_for_reply,
};
use super::prompt::PromptBuilder;
use super::thinking::{CLOSE_TAG, OPEN_TAG};
use crate::engine::session::Engine;

/// Generates more of the last message of `messages` (an assistant reply). Events carry only
/// the new text. Without an assistant message at the end this is [`generate_reply`].
pub fn resume_reply(
    engine: &mut Engine,
    ctx: &GenerationContext<'_>,
    messages: &[Message],
    settings: &ChatSettings,
    on_event: &mut dyn FnMut(GenerationEvent),
) -> Result<Reply, GenerateError> {
    let Some((partial, history)) = messages
        .split_last()
        .filter(|(last, _)| last.role == Role::Assistant)
    else {
        return generate_reply(engine, ctx, messages, settings, on_event);
    };
    let tokenizer = engine.tokenizer().clone();
    let rendered =
        PromptBuilder::new(ctx.formatter, &tokenizer, ctx.date).build(settings, history)?;
    let (written, still_thinking) = written_so_far(partial, rendered.starts_in_thinking);
    let mut prompt = rendered.tokens;
    // The model's own text: only its think tags (user-defined tokens) become special tokens.
    prompt.extend(tokenizer.encode(&written, false)?);
    let context = engine.context_length();
    if prompt.len() >= context {
        return Err(ContextError::TooLong {
            tokens: prompt.len(),
            budget: context.saturating_sub(1),
        }
        .into());
    }
    on_event(GenerationEvent::Started {
        prompt_tokens: prompt.len(),
        prompt_text: format!("{}{written}", rendered.text),
        dropped_messages: 0,
        template_fallback: rendered.fallback,
    });
    generate_from_tokens(
        engine,
        ctx,
        &prompt,
        still_thinking,
        &sampling_for_reply(settings),
        settings.thinking_budget,
        on_event,
    )
}

/// The text the model wrote before it was interrupted, with its think tags, and whether it was
/// still thinking. `inside_think`: the prompt already opened the thinking span.
fn written_so_far(partial: &Message, inside_think: bool) -> (String, bool) {
    let thinking = partial.thinking.as_deref().unwrap_or("");
    let mut written = String::new();
    if thinking.is_empty() && partial.content.is_empty() {
        return (written, inside_think);
    }
    if !thinking.is_empty() {
        if !inside_think {
            written.push_str(OPEN_TAG);
            written.push('\n');
        }
        written.push_str(thinking);
        if partial.content.is_empty() {
            return (written, true);
        }
        written.push('\n');
        written.push_str(CLOSE_TAG);
        written.push('\n');
    }
    written.push_str(&partial.content);
    (written, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(thinking: Option<&str>, content: &str) -> Message {
        Message {
            thinking: thinking.map(str::to_string),
            ..Message::new(Role::Assistant, content)
        }
    }

    #[test]
    fn a_reply_cut_while_thinking_goes_on_thinking() {
        let (text, thinking) = written_so_far(&reply(Some("Let me see"), ""), false);
        assert_eq!(text, "<think>\nLet me see");
        assert!(thinking);
    }

    #[test]
    fn a_reply_cut_in_its_answer_goes_on_answering() {
        let (text, thinking) = written_so_far(&reply(Some("Hmm"), "The answer"), false);
        assert_eq!(text, "<think>\nHmm\n</think>\nThe answer");
        assert!(!thinking);
        let (text, thinking) = written_so_far(&reply(None, "Plain"), false);
        assert_eq!(text, "Plain");
        assert!(!thinking);
    }

    #[test]
    fn an_already_open_think_span_is_not_opened_twice() {
        let (text, thinking) = written_so_far(&reply(Some("go on"), ""), true);
        assert_eq!(text, "go on");
        assert!(thinking);
    }
}
