//! Splitting generated tokens into thinking and answer segments while they stream.

/// Which part of a reply a piece of text belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SegmentKind {
    /// Inside `<think>…</think>`.
    Thinking,
    /// The answer shown to the user.
    Answer,
}
