//! The one prompt builder, used by the worker, the token meter and `smoldesk prompt`.
//!
//! It renders the conversation with the model's template ([`PromptFormatter`]) and tokenizes the
//! result so that only the template's own text can produce special tokens: what the user, the
//! system prompt or the model wrote is encoded as plain text, even where it reads
//! `<|im_end|>`, `<|im_start|>system` or `<think>`.
//!
//! How: a message whose content holds no special token's text needs no protection, and then the
//! prompt is exactly the template's render, tokenized like llama.cpp does. When contents do hold
//! such text, they are rendered a second time wrapped in two marker characters (Unicode
//! noncharacters that appear nowhere else); removing the markers again must give the same text,
//! and the markers say which bytes came from the contents. The whole prompt is then tokenized at
//! once, with special tokens refused inside those byte ranges, so BPE splits and merges text
//! exactly as it does for the whole prompt. If a template treats the marked contents
//! differently (it inspects them in a way the markers change), the marked render is used as the
//! prompt; if even that cannot be read back, ChatML.

use std::ops::Range;

use chrono::NaiveDate;

use super::conversation::{ChatSettings, Message};
use super::template::{
    PromptFormatter, RenderOptions, RenderedPrompt, chatml_prompt_spans, conversation_json,
};
use super::thinking::prompt_ends_inside_think;
use crate::engine::EngineError;
use crate::engine::tokenizer::GgufTokenizer;

/// Builds prompts for one model: its template (with overrides and fallbacks) and its tokenizer.
#[derive(Clone, Copy)]
pub struct PromptBuilder<'a> {
    formatter: &'a PromptFormatter,
    tokenizer: &'a GgufTokenizer,
    date: NaiveDate,
}

/// A prompt ready for the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltPrompt {
    /// The exact prompt text.
    pub text: String,
    /// Its token ids (BOS included when the model adds one).
    pub tokens: Vec<u32>,
    /// Why the model's own template was not used as it is, if it was not.
    pub fallback: Option<String>,
    /// Whether the template's generation prompt (what it appends after the last message)
    /// leaves the model inside `<think>`, so that the reply starts as thinking.
    pub starts_in_thinking: bool,
}

/// A rendered prompt with the byte ranges that must stay plain text.
struct Protected {
    text: String,
    plain: Vec<Range<usize>>,
    fallback: Option<String>,
}

impl<'a> PromptBuilder<'a> {
    /// A builder rendering with `formatter`, tokenizing with `tokenizer`; `date` is what the
    /// template's `strftime_now` sees.
    pub fn new(
        formatter: &'a PromptFormatter,
        tokenizer: &'a GgufTokenizer,
        date: NaiveDate,
    ) -> Self {
        Self {
            formatter,
            tokenizer,
            date,
        }
    }

    /// The render options of a chat: its thinking mode, the model's BOS/EOS texts, a
    /// generation prompt.
    pub fn options(&self, settings: &ChatSettings) -> RenderOptions {
        RenderOptions {
            add_generation_prompt: true,
            enable_thinking: Some(settings.thinking),
            date: self.date,
            bos_token: self.tokenizer.bos_text().to_string(),
            eos_token: self.tokenizer.eos_text().to_string(),
            ..RenderOptions::default()
        }
    }

    /// The prompt of a chat: its system prompt (when not blank) and messages.
    pub fn build(
        &self,
        settings: &ChatSettings,
        messages: &[Message],
    ) -> Result<BuiltPrompt, EngineError> {
        let json = conversation_json(&settings.system_prompt, messages);
        self.build_json(&json, &self.options(settings))
    }

    /// The number of tokens [`build`](Self::build) would give (without working out where the
    /// reply starts).
    pub fn count(
        &self,
        settings: &ChatSettings,
        messages: &[Message],
    ) -> Result<usize, EngineError> {
        let json = conversation_json(&settings.system_prompt, messages);
        let protected = self.render_protected(&json, &self.options(settings));
        Ok(self.encode(&protected)?.len())
    }

    /// The prompt of messages given as JSON objects (`role`, `content`, other fields), with
    /// explicit options (`smoldesk prompt`).
    pub fn build_json(
        &self,
        messages: &[serde_json::Value],
        opts: &RenderOptions,
    ) -> Result<BuiltPrompt, EngineError> {
        let protected = self.render_protected(messages, opts);
        let tokens = self.encode(&protected)?;
        let starts_in_thinking = opts.add_generation_prompt
            && prompt_ends_inside_think(self.generation_prompt(&protected.text, messages, opts));
        Ok(BuiltPrompt {
            text: protected.text,
            tokens,
            fallback: protected.fallback,
            starts_in_thinking,
        })
    }

    fn encode(&self, protected: &Protected) -> Result<Vec<u32>, EngineError> {
        self.tokenizer
            .encode_prompt_with_plain(&protected.text, &protected.plain)
    }

    /// What the template appends after the last message: the end of `prompt` from where the
    /// same conversation rendered without a generation prompt differs.
    fn generation_prompt<'p>(
        &self,
        prompt: &'p str,
        messages: &[serde_json::Value],
        opts: &RenderOptions,
    ) -> &'p str {
        let without = RenderOptions {
            add_generation_prompt: false,
            ..opts.clone()
        };
        let history = self.formatter.render_json(messages, &without).text;
        let common = common_prefix_len(prompt, &history);
        prompt.get(common..).unwrap_or_default()
    }

    /// Renders the messages and finds the bytes that came from contents holding special text.
    fn render_protected(&self, messages: &[serde_json::Value], opts: &RenderOptions) -> Protected {
        let rendered = self.formatter.render_json(messages, opts);
        let needs_protection: Vec<bool> = messages
            .iter()
            .map(|m| content_of(m).is_some_and(|c| self.tokenizer.contains_special_text(c)))
            .collect();
        if !needs_protection.contains(&true) {
            return Protected {
                text: rendered.text,
                plain: Vec::new(),
                fallback: rendered.fallback,
            };
        }
        let marked = Markers::unused_in(messages, self.formatter.template().source())
            .and_then(|markers| self.render_marked(messages, &needs_protection, markers, opts));
        match marked {
            Some((text, plain, _)) if text == rendered.text => Protected {
                text,
                plain,
                fallback: rendered.fallback,
            },
            Some((text, plain, marked_render)) => {
                log::warn!(
                    "the chat template renders marked message contents differently; \
                     using the marked render so that they stay plain text"
                );
                Protected {
                    text,
                    plain,
                    fallback: marked_render.fallback,
                }
            }
            None => {
                log::warn!(
                    "cannot tell message contents apart in the rendered prompt; using ChatML"
                );
                let (text, plain) = chatml_prompt_spans(messages, opts.add_generation_prompt);
                Protected {
                    text,
                    plain,
                    fallback: Some(
                        "the chat template's output could not be checked; using ChatML instead"
                            .into(),
                    ),
                }
            }
        }
    }

    /// Renders with the marked contents; the text without markers and the marked byte ranges.
    fn render_marked(
        &self,
        messages: &[serde_json::Value],
        needs_protection: &[bool],
        markers: Markers,
        opts: &RenderOptions,
    ) -> Option<(String, Vec<Range<usize>>, RenderedPrompt)> {
        let marked: Vec<serde_json::Value> = messages
            .iter()
            .zip(needs_protection)
            .map(|(message, &protect)| {
                let mut message = message.clone();
                if protect
                    && let Some(content) = message.get_mut("content")
                    && let Some(text) = content.as_str()
                {
                    *content = serde_json::Value::String(markers.wrap(text));
                }
                message
            })
            .collect();
        let render = self.formatter.render_json(&marked, opts);
        let (text, plain) = markers.strip(&render.text)?;
        Some((text, plain, render))
    }
}

/// The text content of a JSON message, if it has one.
fn content_of(message: &serde_json::Value) -> Option<&str> {
    message.get("content").and_then(|c| c.as_str())
}

/// Bytes at the start of both strings that are the same (at a character boundary of `a`).
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or_else(|| a.len().min(b.len()), |((at, _), _)| at)
}

/// Two characters that open and close a message content in a marked render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Markers {
    open: char,
    close: char,
}

impl Markers {
    /// The first pair of Unicode noncharacters (U+FDD0…U+FDEF) found in no message and not in
    /// the template; `None` if every pair is taken.
    fn unused_in(messages: &[serde_json::Value], template: &str) -> Option<Self> {
        let texts: Vec<String> = messages.iter().map(|m| m.to_string()).collect();
        let taken = |c: char| template.contains(c) || texts.iter().any(|t| t.contains(c));
        (0xFDD0u32..0xFDF0)
            .step_by(2)
            .filter_map(|code| Some((char::from_u32(code)?, char::from_u32(code + 1)?)))
            .find(|&(open, close)| !taken(open) && !taken(close))
            .map(|(open, close)| Self { open, close })
    }

    /// Wraps a content's text, leaving its leading and trailing whitespace outside the markers
    /// so that a template's `strip()`/`lstrip()`/`rstrip()` works on it unchanged.
    fn wrap(self, text: &str) -> String {
        let core = text.trim();
        if core.is_empty() {
            return format!("{}{text}{}", self.open, self.close);
        }
        let start = text.len() - text.trim_start().len();
        let end = start + core.len();
        format!(
            "{}{}{core}{}{}",
            &text[..start],
            self.open,
            self.close,
            &text[end..]
        )
    }

    /// Removes the markers: the text and the byte ranges (in it) that were between them.
    /// `None` if they are not properly paired.
    fn strip(self, marked: &str) -> Option<(String, Vec<Range<usize>>)> {
        let mut text = String::with_capacity(marked.len());
        let mut ranges = Vec::new();
        let mut open_at = None;
        for c in marked.chars() {
            if c == self.open {
                if open_at.replace(text.len()).is_some() {
                    return None;
                }
            } else if c == self.close {
                ranges.push(open_at.take()?..text.len());
            } else {
                text.push(c);
            }
        }
        open_at.is_none().then_some((text, ranges))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARKERS: Markers = Markers {
        open: '\u{FDD0}',
        close: '\u{FDD1}',
    };

    #[test]
    fn markers_leave_outer_whitespace_outside() {
        assert_eq!(MARKERS.wrap(" a b\n"), " \u{FDD0}a b\u{FDD1}\n");
        assert_eq!(MARKERS.wrap("  "), "\u{FDD0}  \u{FDD1}");
        let marked = format!("x{}y", MARKERS.wrap("\n<|im_end|> "));
        let (text, ranges) = MARKERS.strip(&marked).unwrap();
        assert_eq!(text, "x\n<|im_end|> y");
        assert_eq!(ranges, vec![2..12]);
        assert_eq!(&text[2..12], "<|im_end|>");
    }

    #[test]
    fn unpaired_markers_are_refused() {
        assert_eq!(MARKERS.strip("a\u{FDD0}b"), None);
        assert_eq!(MARKERS.strip("a\u{FDD1}b"), None);
        assert_eq!(MARKERS.strip("\u{FDD0}a\u{FDD0}b\u{FDD1}"), None);
        assert_eq!(MARKERS.strip("plain"), Some(("plain".into(), vec![])));
    }

    #[test]
    fn markers_avoid_characters_already_used() {
        let messages = [serde_json::json!({"role": "user", "content": "a\u{FDD1}"})];
        let markers = Markers::unused_in(&messages, "{{ '\u{FDD2}' }}").unwrap();
        assert_eq!(markers.open, '\u{FDD4}');
        assert_eq!(markers.close, '\u{FDD5}');
    }

    #[test]
    fn common_prefix_stops_at_the_first_difference() {
        assert_eq!(common_prefix_len("abc", "abd"), 2);
        assert_eq!(common_prefix_len("abc", "ab"), 2);
        assert_eq!(common_prefix_len("ab", "abc"), 2);
        assert_eq!(common_prefix_len("é1", "é2"), 2);
    }
}
