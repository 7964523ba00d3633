//! Models write poems, addresses and step lists with single line breaks, which Markdown would
//! join into one paragraph. [`with_hard_line_breaks`] turns them into Markdown hard breaks for
//! display only (copies and exports keep the model's text), leaving code blocks, tables and
//! everything else as Markdown reads it.

use std::borrow::Cow;

/// `markdown` with each single line break inside a paragraph made a hard break (two trailing
/// spaces), except in fenced or indented code, tables, before setext underlines and around
/// blank lines. Returns the text unchanged (borrowed) when there is nothing to change.
pub fn with_hard_line_breaks(markdown: &str) -> Cow<'_, str> {
    if !markdown.contains('\n') {
        return Cow::Borrowed(markdown);
    }
    let lines: Vec<&str> = markdown.split('\n').collect();
    let breaks = break_after(&lines);
    if !breaks.iter().any(|&b| b) {
        return Cow::Borrowed(markdown);
    }
    let mut out = String::with_capacity(markdown.len() + 2 * breaks.len());
    for (i, line) in lines.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        if breaks[i] {
            out.push_str(line.trim_end());
            out.push_str("  ");
        } else {
            out.push_str(line);
        }
    }
    Cow::Owned(out)
}

/// For each line, whether a hard break goes at its end.
fn break_after(lines: &[&str]) -> Vec<bool> {
    let mut breaks = vec![false; lines.len()];
    let mut fence: Option<Fence> = None;
    let mut in_table = false;
    let mut in_indented_code = false;
    for i in 0..lines.len() {
        let line = lines[i];
        if let Some(open) = &fence {
            if open.is_closed_by(line) {
                fence = None;
            }
            continue;
        }
        if let Some(open) = Fence::opened_by(line) {
            fence = Some(open);
            continue;
        }
        if is_blank(line) {
            in_table = false;
            in_indented_code = false;
            continue;
        }
        let previous_blank = i == 0 || is_blank(lines[i - 1]);
        if indent(line) >= 4 && (previous_blank || in_indented_code) && !in_list_context(lines, i) {
            in_indented_code = true;
            continue;
        }
        in_indented_code = false;
        let next = lines.get(i + 1).copied();
        if lines.get(i + 1).is_some_and(|n| is_table_delimiter(n)) && line.contains('|') {
            in_table = true;
        }
        if in_table {
            continue;
        }
        let Some(next) = next else {
            continue;
        };
        let next_starts_table =
            next.contains('|') && lines.get(i + 2).is_some_and(|n| is_table_delimiter(n));
        let keeps_going = !is_blank(next)
            && !is_setext_underline(next)
            && !next_starts_table
            && Fence::opened_by(next).is_none()
            && !line.trim_end().ends_with('\\')
            && !line.ends_with("  ")
            && !is_heading(line)
            && !is_thematic_break(line);
        breaks[i] = keeps_going;
    }
    breaks
}

/// An open fenced code block: its fence character and length.
struct Fence {
    marker: char,
    len: usize,
}

impl Fence {
    fn opened_by(line: &str) -> Option<Self> {
        if indent(line) >= 4 {
            return None;
        }
        let trimmed = line.trim_start();
        let marker = trimmed.chars().next().filter(|c| *c == '`' || *c == '~')?;
        let len = trimmed.chars().take_while(|c| *c == marker).count();
        let info = &trimmed[len..];
        (len >= 3 && !(marker == '`' && info.contains('`'))).then_some(Self { marker, len })
    }

    fn is_closed_by(&self, line: &str) -> bool {
        let trimmed = line.trim();
        indent(line) < 4
            && trimmed.chars().take_while(|c| *c == self.marker).count() >= self.len
            && trimmed.chars().all(|c| c == self.marker)
    }
}

fn is_blank(line: &str) -> bool {
    line.trim().is_empty()
}

/// Leading spaces, a tab counting as four.
fn indent(line: &str) -> usize {
    let mut width = 0;
    for c in line.chars() {
        match c {
            ' ' => width += 1,
            '\t' => width += 4,
            _ => break,
        }
    }
    width
}

/// Whether an indented line continues a list item (then it is not code).
fn in_list_context(lines: &[&str], index: usize) -> bool {
    lines[..index]
        .iter()
        .rev()
        .find(|l| !is_blank(l) && indent(l) < 4)
        .is_some_and(|l| is_list_item(l))
}

fn is_list_item(line: &str) -> bool {
    let trimmed = line.trim_start();
    let bullet = trimmed
        .strip_prefix(['-', '*', '+'])
        .is_some_and(|rest| rest.starts_with([' ', '\t']) || rest.is_empty());
    let digits = trimmed.chars().take_while(char::is_ascii_digit).count();
    let ordered = (1..=9).contains(&digits)
        && trimmed[digits..]
            .strip_prefix(['.', ')'])
            .is_some_and(|rest| rest.starts_with([' ', '\t']) || rest.is_empty());
    bullet || ordered
}

fn is_heading(line: &str) -> bool {
    let trimmed = line.trim_start();
    let hashes = trimmed.chars().take_while(|c| *c == '#').count();
    indent(line) < 4
        && (1..=6).contains(&hashes)
        && trimmed[hashes..]
            .chars()
            .next()
            .is_none_or(char::is_whitespace)
}

fn is_setext_underline(line: &str) -> bool {
    let trimmed = line.trim();
    indent(line) < 4
        && !trimmed.is_empty()
        && (trimmed.chars().all(|c| c == '=') || trimmed.chars().all(|c| c == '-'))
}

fn is_thematic_break(line: &str) -> bool {
    let compact: String = line.chars().filter(|c| !c.is_whitespace()).collect();
    indent(line) < 4
        && compact.len() >= 3
        && ['-', '*', '_']
            .iter()
            .any(|m| compact.chars().all(|c| c == *m))
}

/// A GFM table's delimiter row, such as `|---|:--:|` or `--- | ---`.
fn is_table_delimiter(line: &str) -> bool {
    let trimmed = line.trim();
    trimmed.contains('-')
        && (trimmed.contains('|') || trimmed.contains(':'))
        && trimmed
            .chars()
            .all(|c| matches!(c, '|' | '-' | ':' | ' ' | '\t'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_breaks_become_hard_breaks() {
        let poem = "The sea is wide,\nthe sea is deep,\nit sings at night.";
        assert_eq!(
            with_hard_line_breaks(poem),
            "The sea is wide,  \nthe sea is deep,  \nit sings at night."
        );
    }

    #[test]
    fn paragraphs_and_single_lines_are_unchanged() {
        for text in ["one line", "para one\n\npara two", "a\n\n\nb\n"] {
            assert!(
                matches!(with_hard_line_breaks(text), Cow::Borrowed(_)),
                "{text}"
            );
        }
    }

    #[test]
    fn code_blocks_are_left_alone() {
        let text = "Run this:\n```sh\nls\ncd /\n```\nThen\nthat";
        assert_eq!(
            with_hard_line_breaks(text),
            "Run this:\n```sh\nls\ncd /\n```\nThen  \nthat"
        );
        let tilde = "~~~\na\nb\n~~~";
        assert_eq!(with_hard_line_breaks(tilde), tilde);
        let indented = "Code:\n\n    let a = 1;\n    let b = 2;\n\nDone";
        assert_eq!(with_hard_line_breaks(indented), indented);
    }

    #[test]
    fn an_unclosed_fence_runs_to_the_end() {
        let streaming = "Here:\n```\nline one\nline two";
        assert_eq!(with_hard_line_breaks(streaming), streaming);
    }

    #[test]
    fn tables_are_left_alone() {
        let text = "| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |\n\nAfter\ntable";
        assert_eq!(
            with_hard_line_breaks(text),
            "| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |\n\nAfter  \ntable"
        );
        let before = "Intro\n| a | b |\n| - | - |\n| 1 | 2 |";
        assert_eq!(with_hard_line_breaks(before), before);
    }

    #[test]
    fn headings_rules_and_existing_breaks_are_kept() {
        let text = "# Title\nText\nTitle 2\n---\nmore\\\nend  \nlast";
        assert_eq!(
            with_hard_line_breaks(text),
            "# Title\nText  \nTitle 2\n---\nmore\\\nend  \nlast"
        );
    }

    #[test]
    fn list_items_break_inside_but_stay_lists() {
        let text = "1. first\n   still first\n2. second\n\n- a\n- b";
        assert_eq!(
            with_hard_line_breaks(text),
            "1. first  \n   still first  \n2. second\n\n- a  \n- b"
        );
        let nested = "- item\n\n      continued, not code\n  more";
        assert_eq!(
            with_hard_line_breaks(nested),
            "- item\n\n      continued, not code  \n  more"
        );
    }
}
