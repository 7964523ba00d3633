//! Splitting generated tokens into thinking and answer segments while they stream.
//!
//! SmolLM3 reasons inside `<think>…</think>` before it answers. [`ThinkSplitter`] receives the
//! generated tokens one by one and hands back [`Segment`]s as early as it can: it holds back only
//! text that could still turn out to be the start of a tag, and whitespace at the end of the
//! thinking (dropped if `</think>` follows).
//!
//! Rules:
//! - a tag is recognised by its token id where the model has a single token for it, by its text
//!   otherwise (even when the text is split across tokens at any byte offset);
//! - tags are never emitted as text; an unfinished tag at the end of generation is plain text;
//! - whitespace right after `<think>`, right after `</think>` and at the very start of the reply
//!   is dropped, and so is whitespace at the end of the thinking;
//! - a `<think>` after the answer has started opens a new thinking span; a `<think>` inside
//!   thinking and a `</think>` outside it are dropped without changing anything else.

/// The text of the tag that opens a thinking span.
pub const OPEN_TAG: &str = "<think>";
/// The text of the tag that closes a thinking span.
pub const CLOSE_TAG: &str = "</think>";

/// Which part of a reply a piece of text belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SegmentKind {
    /// Inside `<think>…</think>`.
    Thinking,
    /// The answer shown to the user.
    Answer,
}

/// The token ids of the think tags, where the vocabulary has a single token for them.
///
/// A tag without an id is recognised by its text ([`OPEN_TAG`], [`CLOSE_TAG`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThinkTags {
    /// The id of the `<think>` token (SmolLM3: 128002).
    pub open_id: Option<u32>,
    /// The id of the `</think>` token (SmolLM3: 128003).
    pub close_id: Option<u32>,
}

/// A run of reply text of one kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Thinking or answer.
    pub kind: SegmentKind,
    /// The text, never empty.
    pub text: String,
}

/// Whether a rendered prompt leaves the model inside a thinking span (its last `<think>` comes
/// after its last `</think>`), so that generation starts in thinking.
pub fn prompt_ends_inside_think(prompt: &str) -> bool {
    match (prompt.rfind(OPEN_TAG), prompt.rfind(CLOSE_TAG)) {
        (Some(open), Some(close)) => open > close,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// One of the two think tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    Open,
    Close,
}

impl Tag {
    fn text(self) -> &'static str {
        match self {
            Tag::Open => OPEN_TAG,
            Tag::Close => CLOSE_TAG,
        }
    }
}

/// Where the next tag is in a piece of text.
enum TagSearch<'a> {
    /// A whole tag, with the text before and after it.
    Found {
        before: &'a str,
        tag: Tag,
        after: &'a str,
    },
    /// The text ends with what could be the start of a tag.
    Partial { before: &'a str, held: &'a str },
    /// No tag and nothing that could start one.
    None,
}

/// Turns a stream of generated tokens into thinking and answer segments.
#[derive(Debug, Clone)]
pub struct ThinkSplitter {
    tags: ThinkTags,
    kind: SegmentKind,
    /// Text that could still be the start of a tag.
    pending: String,
    /// Whitespace at the end of the thinking so far: emitted if more thinking follows.
    held_whitespace: String,
    /// Nothing has been emitted since the last tag (or the start): leading whitespace is dropped.
    at_span_start: bool,
}

impl ThinkSplitter {
    /// A splitter for one reply; `starts_in_thinking` when the prompt ends inside `<think>`
    /// (see [`prompt_ends_inside_think`]).
    pub fn new(tags: ThinkTags, starts_in_thinking: bool) -> Self {
        let kind = if starts_in_thinking {
            SegmentKind::Thinking
        } else {
            SegmentKind::Answer
        };
        Self {
            tags,
            kind,
            pending: String::new(),
            held_whitespace: String::new(),
            at_span_start: true,
        }
    }

    /// Feeds one generated token (its id and its decoded text, possibly empty) and returns the
    /// segments that are now certain, merged per kind, never empty.
    pub fn push(&mut self, token_id: u32, text: &str) -> Vec<Segment> {
        let mut out = Vec::new();
        match self.tag_of_token(token_id) {
            Some(tag) => {
                self.flush_pending(&mut out);
                self.apply_tag(tag);
            }
            None => self.push_text(text, &mut out),
        }
        out
    }

    /// Ends the reply: text held back as a possible tag start is emitted as plain text, an
    /// unclosed thinking span is flushed as thinking (without its trailing whitespace).
    pub fn finish(&mut self) -> Vec<Segment> {
        let mut out = Vec::new();
        self.flush_pending(&mut out);
        self.held_whitespace.clear();
        out
    }

    /// Whether the reply is currently inside a thinking span.
    pub fn in_thinking(&self) -> bool {
        self.kind == SegmentKind::Thinking
    }

    fn tag_of_token(&self, token_id: u32) -> Option<Tag> {
        if self.tags.open_id == Some(token_id) {
            Some(Tag::Open)
        } else if self.tags.close_id == Some(token_id) {
            Some(Tag::Close)
        } else {
            None
        }
    }

    /// The tags that are recognised by their text (those without a token id).
    fn text_tags(&self) -> impl Iterator<Item = Tag> + '_ {
        [
            (Tag::Open, self.tags.open_id),
            (Tag::Close, self.tags.close_id),
        ]
        .into_iter()
        .filter(|(_, id)| id.is_none())
        .map(|(tag, _)| tag)
    }

    fn push_text(&mut self, text: &str, out: &mut Vec<Segment>) {
        let mut buffer = std::mem::take(&mut self.pending);
        buffer.push_str(text);
        let mut rest = buffer.as_str();
        loop {
            match self.find_tag(rest) {
                TagSearch::Found { before, tag, after } => {
                    self.emit(before, out);
                    self.apply_tag(tag);
                    rest = after;
                }
                TagSearch::Partial { before, held } => {
                    self.emit(before, out);
                    self.pending = held.to_string();
                    return;
                }
                TagSearch::None => {
                    self.emit(rest, out);
                    return;
                }
            }
        }
    }

    fn find_tag<'a>(&self, text: &'a str) -> TagSearch<'a> {
        for (position, _) in text.match_indices('<') {
            let candidate = &text[position..];
            for tag in self.text_tags() {
                let tag_text = tag.text();
                if let Some(after) = candidate.strip_prefix(tag_text) {
                    return TagSearch::Found {
                        before: &text[..position],
                        tag,
                        after,
                    };
                }
                if tag_text.starts_with(candidate) {
                    return TagSearch::Partial {
                        before: &text[..position],
                        held: candidate,
                    };
                }
            }
        }
        TagSearch::None
    }

    fn flush_pending(&mut self, out: &mut Vec<Segment>) {
        let pending = std::mem::take(&mut self.pending);
        self.emit(&pending, out);
    }

    fn apply_tag(&mut self, tag: Tag) {
        match (tag, self.kind) {
            (Tag::Open, SegmentKind::Answer) => {
                self.kind = SegmentKind::Thinking;
                self.at_span_start = true;
            }
            (Tag::Close, SegmentKind::Thinking) => {
                self.held_whitespace.clear();
                self.kind = SegmentKind::Answer;
                self.at_span_start = true;
            }
            // A nested `<think>` or a stray `</think>`: the tag is dropped, nothing changes.
            (Tag::Open, SegmentKind::Thinking) | (Tag::Close, SegmentKind::Answer) => {}
        }
    }

    /// Emits text that contains no tag, applying the whitespace rules.
    fn emit(&mut self, text: &str, out: &mut Vec<Segment>) {
        let mut text = text;
        if self.at_span_start {
            text = text.trim_start();
            if text.is_empty() {
                return;
            }
            self.at_span_start = false;
        }
        match self.kind {
            SegmentKind::Answer => push_segment(out, SegmentKind::Answer, text),
            SegmentKind::Thinking => self.emit_thinking(text, out),
        }
    }

    /// Emits thinking text, holding back its trailing whitespace until more thinking follows.
    fn emit_thinking(&mut self, text: &str, out: &mut Vec<Segment>) {
        let body = text.trim_end();
        if body.is_empty() {
            self.held_whitespace.push_str(text);
            return;
        }
        let mut emitted = std::mem::take(&mut self.held_whitespace);
        emitted.push_str(body);
        push_segment(out, SegmentKind::Thinking, &emitted);
        self.held_whitespace.push_str(&text[body.len()..]);
    }
}

/// Appends text to the output, merging it into the last segment when that has the same kind.
fn push_segment(out: &mut Vec<Segment>, kind: SegmentKind, text: &str) {
    if text.is_empty() {
        return;
    }
    match out.last_mut() {
        Some(last) if last.kind == kind => last.text.push_str(text),
        _ => out.push(Segment {
            kind,
            text: text.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN_ID: u32 = 128_002;
    const CLOSE_ID: u32 = 128_003;
    const PLAIN_ID: u32 = 1;

    fn smollm3_tags() -> ThinkTags {
        ThinkTags {
            open_id: Some(OPEN_ID),
            close_id: Some(CLOSE_ID),
        }
    }

    /// The thinking and answer texts of a whole reply, each concatenated, plus the kinds in order.
    #[derive(Debug, Default, PartialEq)]
    struct Collected {
        thinking: String,
        answer: String,
        kinds: Vec<SegmentKind>,
    }

    impl Collected {
        fn add(&mut self, segments: Vec<Segment>) {
            for segment in segments {
                assert!(!segment.text.is_empty(), "empty segment emitted");
                match segment.kind {
                    SegmentKind::Thinking => self.thinking.push_str(&segment.text),
                    SegmentKind::Answer => self.answer.push_str(&segment.text),
                }
                if self.kinds.last() != Some(&segment.kind) {
                    self.kinds.push(segment.kind);
                }
            }
        }
    }

    /// Runs text pieces (as plain tokens) through a text-only splitter.
    fn split_pieces(pieces: &[&str], starts_in_thinking: bool) -> Collected {
        let mut splitter = ThinkSplitter::new(ThinkTags::default(), starts_in_thinking);
        let mut collected = Collected::default();
        for piece in pieces {
            collected.add(splitter.push(PLAIN_ID, piece));
        }
        collected.add(splitter.finish());
        collected
    }

    /// Runs (id, text) tokens through a splitter with SmolLM3's tag ids.
    fn split_tokens(tokens: &[(u32, &str)], starts_in_thinking: bool) -> Collected {
        let mut splitter = ThinkSplitter::new(smollm3_tags(), starts_in_thinking);
        let mut collected = Collected::default();
        for (id, text) in tokens {
            collected.add(splitter.push(*id, text));
        }
        collected.add(splitter.finish());
        collected
    }

    fn expected(thinking: &str, answer: &str) -> Collected {
        let mut kinds = Vec::new();
        if !thinking.is_empty() {
            kinds.push(SegmentKind::Thinking);
        }
        if !answer.is_empty() {
            kinds.push(SegmentKind::Answer);
        }
        Collected {
            thinking: thinking.to_string(),
            answer: answer.to_string(),
            kinds,
        }
    }

    fn char_boundaries(text: &str) -> Vec<usize> {
        (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect()
    }

    #[test]
    fn whole_reply_in_one_piece() {
        let got = split_pieces(&["<think>\nabc\n</think>\nHello"], false);
        assert_eq!(got, expected("abc", "Hello"));
    }

    #[test]
    fn tags_split_at_every_offset_into_two_pieces() {
        let reply = "<think>\nreason\n</think>\nanswer";
        for cut in char_boundaries(reply) {
            let got = split_pieces(&[&reply[..cut], &reply[cut..]], false);
            assert_eq!(got, expected("reason", "answer"), "cut at {cut}");
        }
    }

    #[test]
    fn tags_split_at_every_offset_into_three_pieces() {
        let reply = "<think>\nreason\n</think>\nanswer";
        let cuts = char_boundaries(reply);
        for &first in &cuts {
            for &second in cuts.iter().filter(|&&c| c >= first) {
                let pieces = [&reply[..first], &reply[first..second], &reply[second..]];
                let got = split_pieces(&pieces, false);
                assert_eq!(got, expected("reason", "answer"), "cuts {first}, {second}");
            }
        }
    }

    #[test]
    fn prefilled_thinking_split_at_every_offset() {
        let reply = "reason\n</think>\nanswer";
        let cuts = char_boundaries(reply);
        for &first in &cuts {
            for &second in cuts.iter().filter(|&&c| c >= first) {
                let pieces = [&reply[..first], &reply[first..second], &reply[second..]];
                let got = split_pieces(&pieces, true);
                assert_eq!(got, expected("reason", "answer"), "cuts {first}, {second}");
            }
        }
    }

    #[test]
    fn multibyte_text_split_at_every_character() {
        let reply = "<think> 思考 é </think> réponse 🙂";
        for cut in char_boundaries(reply) {
            let got = split_pieces(&[&reply[..cut], &reply[cut..]], false);
            assert_eq!(got, expected("思考 é", "réponse 🙂"), "cut at {cut}");
        }
    }

    #[test]
    fn one_character_per_token() {
        let reply = "<think>\nI should greet.\n\n</think>\n\nHi <b>there</b> < >";
        let pieces: Vec<String> = reply.chars().map(String::from).collect();
        let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
        let got = split_pieces(&pieces, false);
        assert_eq!(got, expected("I should greet.", "Hi <b>there</b> < >"));
    }

    #[test]
    fn tags_by_token_id() {
        let tokens = [
            (OPEN_ID, "<think>"),
            (PLAIN_ID, "\n"),
            (PLAIN_ID, "reason"),
            (PLAIN_ID, "\n"),
            (CLOSE_ID, "</think>"),
            (PLAIN_ID, "\n"),
            (PLAIN_ID, "answer"),
        ];
        assert_eq!(split_tokens(&tokens, false), expected("reason", "answer"));
    }

    #[test]
    fn tag_ids_ignore_the_decoded_text_of_the_tag_token() {
        let tokens = [
            (OPEN_ID, ""),
            (PLAIN_ID, "reason"),
            (CLOSE_ID, ""),
            (PLAIN_ID, "answer"),
        ];
        assert_eq!(split_tokens(&tokens, false), expected("reason", "answer"));
    }

    #[test]
    fn with_tag_ids_tag_text_in_plain_tokens_is_literal() {
        let tokens = [
            (PLAIN_ID, "Use "),
            (PLAIN_ID, "<think>"),
            (PLAIN_ID, " tags"),
        ];
        assert_eq!(
            split_tokens(&tokens, false),
            expected("", "Use <think> tags")
        );
    }

    #[test]
    fn held_tag_start_is_flushed_as_text_before_a_tag_token() {
        let tags = ThinkTags {
            open_id: Some(OPEN_ID),
            close_id: None,
        };
        let mut splitter = ThinkSplitter::new(tags, false);
        let mut collected = Collected::default();
        for (id, text) in [
            (PLAIN_ID, "x <"),
            (OPEN_ID, ""),
            (PLAIN_ID, "r"),
            (PLAIN_ID, "</th"),
            (PLAIN_ID, "ink>y"),
        ] {
            collected.add(splitter.push(id, text));
        }
        collected.add(splitter.finish());
        assert_eq!(collected.answer, "x <y");
        assert_eq!(collected.thinking, "r");
        assert_eq!(
            collected.kinds,
            vec![
                SegmentKind::Answer,
                SegmentKind::Thinking,
                SegmentKind::Answer
            ]
        );
    }

    #[test]
    fn prompt_prefilled_thinking_starts_in_thinking() {
        let prompt = "<|im_start|>assistant\n<think>\n";
        let starts = prompt_ends_inside_think(prompt);
        assert!(starts);
        let got = split_pieces(&["Let me", " think.\n", "</think>", "\nDone."], starts);
        assert_eq!(got, expected("Let me think.", "Done."));
    }

    #[test]
    fn prompt_ends_inside_think_cases() {
        assert!(prompt_ends_inside_think("x<think>\n"));
        assert!(prompt_ends_inside_think("<think></think> <think>"));
        assert!(!prompt_ends_inside_think("<think>\n\n</think>\n"));
        assert!(!prompt_ends_inside_think("no tags at all"));
        assert!(!prompt_ends_inside_think("only </think>"));
    }

    #[test]
    fn unclosed_thinking_is_flushed_by_finish() {
        let mut splitter = ThinkSplitter::new(ThinkTags::default(), false);
        let mut collected = Collected::default();
        collected.add(splitter.push(PLAIN_ID, "<think>\nstill thinking"));
        assert!(splitter.in_thinking());
        collected.add(splitter.push(PLAIN_ID, " about it\n\n"));
        collected.add(splitter.finish());
        assert_eq!(collected, expected("still thinking about it", ""));
    }

    #[test]
    fn finish_emits_an_unfinished_tag_as_text() {
        let got = split_pieces(&["<think>a</think>b </thi"], false);
        assert_eq!(got, expected("a", "b </thi"));
        let got = split_pieces(&["<think>a </thin"], false);
        assert_eq!(got, expected("a </thin", ""));
    }

    #[test]
    fn plain_answer_without_thinking() {
        let got = split_pieces(&["\n\nHello", ", world", "!\n"], false);
        assert_eq!(got, expected("", "Hello, world!\n"));
    }

    #[test]
    fn text_is_emitted_as_early_as_possible() {
        let mut splitter = ThinkSplitter::new(ThinkTags::default(), false);
        let answer = |text: &str| {
            vec![Segment {
                kind: SegmentKind::Answer,
                text: text.to_string(),
            }]
        };
        assert_eq!(splitter.push(PLAIN_ID, "Hello wor"), answer("Hello wor"));
        assert_eq!(splitter.push(PLAIN_ID, "ld <"), answer("ld "));
        assert_eq!(splitter.push(PLAIN_ID, "b>"), answer("<b>"));
        assert_eq!(splitter.push(PLAIN_ID, "x</"), answer("x"));
        assert_eq!(splitter.push(PLAIN_ID, "p>"), answer("</p>"));
    }

    #[test]
    fn thinking_is_streamed_before_it_closes() {
        let mut splitter = ThinkSplitter::new(ThinkTags::default(), false);
        assert!(splitter.push(PLAIN_ID, "<think>\n").is_empty());
        assert!(splitter.in_thinking());
        let segments = splitter.push(PLAIN_ID, "step one\n");
        assert_eq!(
            segments,
            vec![Segment {
                kind: SegmentKind::Thinking,
                text: "step one".into()
            }]
        );
        let segments = splitter.push(PLAIN_ID, "step two");
        assert_eq!(segments[0].text, "\nstep two");
    }

    #[test]
    fn one_push_can_return_both_kinds_merged() {
        let mut splitter = ThinkSplitter::new(ThinkTags::default(), false);
        let segments = splitter.push(PLAIN_ID, "<think>a</think>b");
        assert_eq!(
            segments,
            vec![
                Segment {
                    kind: SegmentKind::Thinking,
                    text: "a".into()
                },
                Segment {
                    kind: SegmentKind::Answer,
                    text: "b".into()
                },
            ]
        );
        assert!(!splitter.in_thinking());
    }

    #[test]
    fn empty_pieces_emit_nothing() {
        let mut splitter = ThinkSplitter::new(ThinkTags::default(), false);
        assert!(splitter.push(PLAIN_ID, "").is_empty());
        assert!(splitter.push(PLAIN_ID, "  \n").is_empty());
        assert!(splitter.finish().is_empty());
    }

    #[test]
    fn empty_thinking_span() {
        let got = split_pieces(&["<think>\n\n</think>\n\nAnswer"], false);
        assert_eq!(got, expected("", "Answer"));
    }

    #[test]
    fn second_think_after_the_answer_opens_thinking_again() {
        let got = split_pieces(&["<think>a</think>b <think> c </think> d"], false);
        assert_eq!(got.thinking, "ac");
        assert_eq!(got.answer, "b d");
        assert_eq!(
            got.kinds,
            vec![
                SegmentKind::Thinking,
                SegmentKind::Answer,
                SegmentKind::Thinking,
                SegmentKind::Answer
            ]
        );
    }

    #[test]
    fn nested_open_and_stray_close_tags_are_dropped() {
        let got = split_pieces(&["<think>a <think>b</think>c</think>d"], false);
        assert_eq!(got, expected("a b", "cd"));
    }

    #[test]
    fn less_than_signs_that_are_not_tags_pass_through() {
        let got = split_pieces(&["a<b", " <", "<", "<thin", "k", "er>"], false);
        assert_eq!(got, expected("", "a<b <<<thinker>"));
    }
}
