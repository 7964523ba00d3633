//! The conversation: messages rendered as Markdown, thinking blocks, streaming, per-reply
//! statistics and actions, auto-scroll that lets go when the user scrolls up, and the
//! start screens.

use std::collections::HashMap;

use egui::{RichText, Ui};
use egui_commonmark::{CommonMarkCache, CommonMarkViewer};

use super::actions::Action;
use super::app::{App, Generation, ModelState, Phase};
use super::model_panel::{self, format_count};
use super::theme;
use crate::chat::conversation::{GenerationStats, Message, Role, StopReason};

/// User messages longer than this (in characters) are shown folded.
const FOLD_CHARS: usize = 3000;

/// Characters of a folded message that are shown.
const FOLDED_PREVIEW_CHARS: usize = 1200;

/// Extra height around the visible area within which messages are always drawn.
const CULL_MARGIN: f32 = 600.0;

/// Prompts offered on an empty conversation.
pub const SUGGESTIONS: [&str; 4] = [
    "Explain how a transformer language model works, simply",
    "Write a haiku about autumn rain",
    "Plan a relaxed 3-day trip to Lisbon",
    "What are the pros and cons of Rust vs. Go?",
];

/// What the chat view remembers between frames.
#[derive(Debug, Default)]
pub struct ChatViewState {
    /// Scroll to the newest message on the next frame.
    pub scroll_to_bottom: bool,
    /// The user message being edited: its index and the new text.
    pub editing: Option<(usize, String)>,
    /// Whether each reply's thinking block is open, by conversation and message index.
    /// Opened when thinking starts streaming, folded when it ends; the user may toggle it.
    pub thinking_open: HashMap<(String, usize), bool>,
    /// Text to put on the clipboard this frame.
    pub copy_request: Option<String>,
    /// More worker events are waiting than one frame applies.
    pub more_events_pending: bool,
    /// Whether the view showed the bottom of the conversation last frame.
    pub at_bottom: bool,
    /// Height of the conversation last frame.
    pub content_height: f32,
    /// Measured heights of messages, for skipping those far outside the view.
    heights: HeightCache,
    /// The message at the top of the view last frame, to keep it there when Show thinking
    /// changes every height above it.
    anchor: Option<ScrollAnchor>,
    /// The scroll offset last frame.
    offset: f32,
}

/// The first message in view, how far the view's top is below that message's top, and the
/// Show thinking state it was measured in.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ScrollAnchor {
    index: usize,
    offset: f32,
    show_thinking: bool,
}

/// What the heights of all messages depend on: when it changes, every height is measured again.
/// (Show thinking is not part of it: heights are kept for both states.)
#[derive(Debug, Clone, Default, PartialEq)]
struct LayoutKey {
    conversation: String,
    width_bits: u32,
    font_bits: u32,
}

/// What one message's height depends on besides the [`LayoutKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MessageKey {
    content_len: usize,
    thinking_len: usize,
    has_stats: bool,
    context_start: bool,
}

/// A message's height in one Show thinking state: measured when it was laid out, else a
/// guess kept until it is.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Height {
    value: f32,
    measured: bool,
}

/// One message's heights with thinking hidden (`[0]`) and shown (`[1]`).
#[derive(Debug, Clone, Copy, PartialEq)]
struct MessageHeights {
    key: MessageKey,
    by_state: [Option<Height>; 2],
}

/// The height of each message of the open conversation in both Show thinking states, so that
/// only the messages in view are laid out and the rest take their remembered (or once
/// guessed) space, and toggling Show thinking measures nothing again.
#[derive(Debug, Default)]
struct HeightCache {
    layout: LayoutKey,
    heights: Vec<Option<MessageHeights>>,
    /// How much taller a reply with thinking is when thinking is shown (its folded header),
    /// as last measured.
    thinking_header: Option<f32>,
}

impl HeightCache {
    /// Forgets every height when the layout changed; makes room for `messages` entries.
    fn prepare(&mut self, layout: LayoutKey, messages: usize) {
        if self.layout != layout {
            self.layout = layout;
            self.heights.clear();
            self.thinking_header = None;
        }
        self.heights.resize(messages, None);
    }

    /// The height of message `index` with thinking shown or not: remembered, else derived
    /// from its height in the other state, else `estimate()` (remembered until measured).
    fn get(
        &mut self,
        index: usize,
        key: MessageKey,
        show_thinking: bool,
        header_guess: f32,
        estimate: impl FnOnce() -> f32,
    ) -> f32 {
        let header = self.thinking_header.unwrap_or(header_guess);
        let Some(slot) = self.heights.get_mut(index) else {
            return estimate();
        };
        let entry = slot.get_or_insert(MessageHeights {
            key,
            by_state: [None, None],
        });
        if entry.key != key {
            *entry = MessageHeights {
                key,
                by_state: [None, None],
            };
        }
        let state = usize::from(show_thinking);
        if let Some(height) = entry.by_state[state] {
            return height.value;
        }
        let value = match entry.by_state[1 - state] {
            Some(other) if key.thinking_len == 0 => other.value,
            Some(other) if show_thinking => other.value + header,
            Some(other) => (other.value - header).max(0.0),
            None => estimate(),
        };
        entry.by_state[state] = Some(Height {
            value,
            measured: false,
        });
        value
    }

    /// Where message `index` starts when thinking is shown or not: the heights of the
    /// messages before it (remembered, derived or guessed as [`Self::get`] does).
    fn top_of(
        &mut self,
        index: usize,
        messages: &[Message],
        show_thinking: bool,
        header_guess: f32,
        key_of: impl Fn(usize, &Message) -> MessageKey,
        mut estimate: impl FnMut(&Message) -> f32,
    ) -> f32 {
        messages
            .iter()
            .enumerate()
            .take(index)
            .map(|(i, m)| self.get(i, key_of(i, m), show_thinking, header_guess, || estimate(m)))
            .sum()
    }

    /// Records the measured height of message `index`.
    fn set(&mut self, index: usize, key: MessageKey, show_thinking: bool, value: f32) {
        let Some(slot) = self.heights.get_mut(index) else {
            return;
        };
        let entry = slot.get_or_insert(MessageHeights {
            key,
            by_state: [None, None],
        });
        if entry.key != key {
            entry.key = key;
            entry.by_state = [None, None];
        }
        let state = usize::from(show_thinking);
        entry.by_state[state] = Some(Height {
            value,
            measured: true,
        });
        if key.thinking_len > 0
            && let Some(other) = entry.by_state[1 - state].filter(|h| h.measured)
        {
            let (shown, hidden) = if show_thinking {
                (value, other.value)
            } else {
                (other.value, value)
            };
            self.thinking_header = Some(shown - hidden);
        }
    }
}

/// A first guess at the height of a message never laid out (it is measured once in view).
fn estimated_height(message: &Message, width: f32, row_height: f32, show_thinking: bool) -> f32 {
    let chars_per_row = (width / (row_height * 0.5)).max(10.0);
    let rows = |text: &str| -> f32 {
        text.lines()
            .map(|line| {
                (line.chars().count() as f32 / chars_per_row)
                    .ceil()
                    .max(1.0)
            })
            .sum()
    };
    let thinking = match (&message.thinking, show_thinking) {
        (Some(_), true) => 1.0,
        _ => 0.0,
    };
    (rows(&message.content) + thinking + 2.0) * row_height + 10.0
}

/// Whether the message box is shown (not on the start screen).
pub fn shows_composer(app: &App) -> bool {
    !shows_welcome(app)
}

/// The start screen is shown while no model is ready and the conversation is empty.
fn shows_welcome(app: &App) -> bool {
    !matches!(app.model, ModelState::Ready(_))
        && !app.is_opening()
        && app
            .current_conversation()
            .is_none_or(|c| c.messages.is_empty())
}

/// Draws the central area: banners, then the start screen or the conversation.
pub fn show_central(app: &mut App, ui: &mut Ui) {
    if let Some(text) = app.chat.copy_request.take() {
        ui.ctx().copy_text(text);
    }
    if app.chat.more_events_pending {
        app.chat.more_events_pending = false;
        ui.ctx().request_repaint();
    }
    notices(app, ui);
    if app.is_opening() {
        opening(ui);
    } else if shows_welcome(app) {
        model_panel::show_welcome(app, ui);
    } else if app
        .current_conversation()
        .is_none_or(|c| c.messages.is_empty())
    {
        empty_conversation(app, ui);
    } else {
        conversation(app, ui);
    }
}

/// Shown while the open conversation's messages are being read.
fn opening(ui: &mut Ui) {
    ui.vertical_centered(|ui| {
        ui.add_space(ui.available_height() * 0.3);
        ui.horizontal(|ui| {
            ui.spinner();
            ui.label(RichText::new("Opening…").color(theme::muted_text_color(ui.visuals())));
        });
    });
}

fn notices(app: &mut App, ui: &mut Ui) {
    if app.notices.items().is_empty() {
        return;
    }
    egui::Frame::new()
        .inner_margin(egui::Margin::symmetric(16, 8))
        .show(ui, |ui| {
            ui.vertical_centered(|ui| {
                ui.set_max_width(theme::READING_WIDTH);
                ui.with_layout(egui::Layout::top_down(egui::Align::Min), |ui| {
                    for response in app.notices.show(ui) {
                        match response {
                            super::notices::NoticeResponse::Undo(id) => {
                                app.apply(Action::Undo(id));
                            }
                        }
                    }
                });
            });
        });
}

fn empty_conversation(app: &mut App, ui: &mut Ui) {
    let name = app
        .loaded_model()
        .map(|m| m.display_name())
        .unwrap_or_default();
    let mut picked = None;
    ui.vertical_centered(|ui| {
        ui.set_max_width(theme::READING_WIDTH);
        ui.add_space((ui.available_height() * 0.22).max(24.0));
        ui.label(RichText::new("What can I help with?").heading().strong());
        ui.label(
            RichText::new(format!(
                "{name} runs on this computer — nothing you type leaves it."
            ))
            .color(theme::muted_text_color(ui.visuals())),
        );
        ui.add_space(18.0);
        for suggestion in SUGGESTIONS {
            let button = egui::Button::new(suggestion).min_size(egui::vec2(440.0, 32.0));
            if ui.add(button).clicked() {
                picked = Some(suggestion);
            }
        }
    });
    if let Some(text) = picked {
        app.composer.draft = text.to_string();
        app.composer.revision += 1;
        app.composer.focus_requested = true;
    }
}

/// What drawing one message needs, borrowed from separate parts of the app.
struct MessageView<'a> {
    markdown: &'a mut CommonMarkCache,
    editing: &'a mut Option<(usize, String)>,
    actions: &'a mut Vec<Action>,
    generation: Option<&'a Generation>,
    thinking_open: &'a mut HashMap<(String, usize), bool>,
    conversation_id: &'a str,
    show_thinking: bool,
    model_ready: bool,
    last_index: usize,
    /// The first message the model still sees, when older ones were dropped to fit.
    context_start: Option<usize>,
}

/// The first message of the conversation still in the model's context, when older ones were
/// dropped: from the reply being written, else from the newest finished reply.
fn context_start(
    app: &App,
    conversation: &crate::chat::conversation::Conversation,
) -> Option<usize> {
    let live = app
        .generation
        .as_ref()
        .filter(|g| g.conversation_id == conversation.id)
        .and_then(|g| app.last_prompt.as_ref().filter(|p| p.id == g.id))
        .map(|p| p.dropped_messages);
    let finished = || {
        conversation
            .messages
            .iter()
            .rev()
            .find_map(|m| m.stats.as_ref())
            .map(|s| s.dropped_messages)
    };
    live.or_else(finished).filter(|&dropped| dropped > 0)
}

/// The note above the first message the model still sees.
pub fn context_notice(dropped: usize) -> String {
    let noun = if dropped == 1 { "message" } else { "messages" };
    format!(
        "The {} earlier {noun} above no longer fit the context: the model does not see them",
        format_count(dropped)
    )
}

fn conversation(app: &mut App, ui: &mut Ui) {
    let mut actions = Vec::new();
    let Some(conversation) = app.conversations.get(&app.current) else {
        return;
    };
    let generation = app
        .generation
        .as_ref()
        .filter(|g| g.conversation_id == conversation.id);
    let context_start = context_start(app, conversation);
    let anchored = anchored_offset(
        ui,
        &mut app.chat,
        &conversation.messages,
        app.prefs.show_thinking,
        context_start,
    );
    let mut view = MessageView {
        markdown: &mut app.markdown,
        editing: &mut app.chat.editing,
        actions: &mut actions,
        generation,
        thinking_open: &mut app.chat.thinking_open,
        conversation_id: &conversation.id,
        show_thinking: app.prefs.show_thinking,
        model_ready: matches!(app.model, ModelState::Ready(_)),
        last_index: conversation.messages.len().saturating_sub(1),
        context_start,
    };
    let mut scroll = egui::ScrollArea::vertical()
        .id_salt(("chat", &conversation.id))
        .stick_to_bottom(true)
        .auto_shrink(false);
    if app.chat.scroll_to_bottom {
        // Past the end is clamped to the end; a finite value keeps egui's arithmetic finite.
        scroll = scroll.vertical_scroll_offset(app.chat.content_height + 100_000.0);
        app.chat.scroll_to_bottom = false;
    }
    let rubber_band = ui.spacing().scroll.kinetic.rubber_band;
    if let Some(offset) = anchored {
        scroll = scroll.vertical_scroll_offset(offset);
        // The new offset may lie past last frame's end (the content grew): it is not an
        // overscroll to spring back from.
        ui.spacing_mut().scroll.kinetic.rubber_band = false;
    }
    let heights = &mut app.chat.heights;
    let font_bits = app.prefs.font_size.to_bits();
    let mut anchor = None;
    let output = scroll.show_viewport(ui, |ui, viewport| {
        egui::Frame::new()
            .inner_margin(egui::Margin::symmetric(16, 12))
            .show(ui, |ui| {
                ui.vertical_centered(|ui| {
                    ui.set_max_width(theme::READING_WIDTH);
                    ui.with_layout(egui::Layout::top_down(egui::Align::Min), |ui| {
                        heights.prepare(
                            LayoutKey {
                                conversation: conversation.id.clone(),
                                width_bits: ui.available_width().to_bits(),
                                font_bits,
                            },
                            conversation.messages.len(),
                        );
                        anchor = messages_in_view(
                            ui,
                            &mut view,
                            heights,
                            &conversation.messages,
                            viewport,
                        );
                        ui.add_space(8.0);
                    });
                });
            });
    });
    ui.spacing_mut().scroll.kinetic.rubber_band = rubber_band;
    let bottom_gap =
        output.content_size.y - (output.state.clamped_offset().y + output.inner_rect.height());
    app.chat.at_bottom = bottom_gap <= 24.0;
    app.chat.anchor = anchor;
    app.chat.offset = output.state.clamped_offset().y;
    app.chat.content_height = output.content_size.y;
    if !app.chat.at_bottom {
        jump_to_latest(app, ui, output.inner_rect);
    }
    for action in actions {
        app.apply(action);
    }
}

/// Lays out the messages near the visible part of the conversation; the others only take
/// their measured (or, before they were ever shown, estimated) height, in one block per run.
fn messages_in_view(
    ui: &mut Ui,
    view: &mut MessageView<'_>,
    heights: &mut HeightCache,
    messages: &[Message],
    viewport: egui::Rect,
) -> Option<ScrollAnchor> {
    let top = ui.min_rect().top();
    let visible = viewport.expand(CULL_MARGIN);
    let width = ui.available_width();
    let row_height = ui.text_style_height(&egui::TextStyle::Body);
    let header_guess = thinking_header_guess(ui);
    let mut skipped = 0.0;
    let mut y = ui.cursor().top() - top;
    let start_y = y;
    let mut anchor = None;
    for (index, message) in messages.iter().enumerate() {
        let key = message_key(index, message, view.context_start);
        let live =
            index == view.last_index || view.editing.as_ref().is_some_and(|(i, _)| *i == index);
        let height = heights.get(index, key, view.show_thinking, header_guess, || {
            estimated_height(message, width, row_height, view.show_thinking)
        });
        if anchor.is_none() && y + height > viewport.top() {
            anchor = Some(ScrollAnchor {
                index,
                offset: viewport.top() - (y - start_y),
                show_thinking: view.show_thinking,
            });
        }
        if !live && (y + height < visible.top() || y > visible.bottom()) {
            skipped += height;
            y += height;
            continue;
        }
        if skipped > 0.0 {
            ui.allocate_space(egui::vec2(
                width,
                (skipped - ui.spacing().item_spacing.y).max(0.0),
            ));
            skipped = 0.0;
        }
        let before = ui.cursor().top();
        ui.push_id(index, |ui| message_ui(ui, view, index, message));
        let after = ui.cursor().top();
        heights.set(index, key, view.show_thinking, after - before);
        y = after - top;
    }
    if skipped > 0.0 {
        ui.allocate_space(egui::vec2(
            width,
            (skipped - ui.spacing().item_spacing.y).max(0.0),
        ));
    }
    anchor
}

/// What a message's height depends on besides the [`LayoutKey`].
fn message_key(index: usize, message: &Message, context_start: Option<usize>) -> MessageKey {
    MessageKey {
        content_len: message.content.len(),
        thinking_len: message.thinking.as_ref().map_or(0, String::len),
        has_stats: message.stats.is_some(),
        context_start: context_start == Some(index),
    }
}

/// Where to scroll after Show thinking changed, so that the same messages stay in view (and
/// need no new layout): the message at the top stays there, or, when the view was at the
/// bottom, it stays at the bottom. `None` when nothing changed.
fn anchored_offset(
    ui: &Ui,
    chat: &mut ChatViewState,
    messages: &[Message],
    show_thinking: bool,
    context_start: Option<usize>,
) -> Option<f32> {
    let anchor = chat.anchor.filter(|a| a.show_thinking != show_thinking)?;
    let width = f32::from_bits(chat.heights.layout.width_bits);
    let row_height = ui.text_style_height(&egui::TextStyle::Body);
    let header_guess = thinking_header_guess(ui);
    let mut top_of = |index: usize, show: bool| {
        chat.heights.top_of(
            index,
            messages,
            show,
            header_guess,
            |i, m| message_key(i, m, context_start),
            |m| estimated_height(m, width, row_height, show),
        )
    };
    if chat.at_bottom {
        let grown = top_of(messages.len(), show_thinking) - top_of(messages.len(), !show_thinking);
        return Some((chat.offset + grown).max(0.0));
    }
    Some(top_of(anchor.index, show_thinking) + anchor.offset)
}

/// A first guess at the height of a folded thinking header.
fn thinking_header_guess(ui: &Ui) -> f32 {
    ui.spacing().interact_size.y + ui.spacing().item_spacing.y
}

/// The floating "jump to latest" button shown once the user has scrolled up.
fn jump_to_latest(app: &mut App, ui: &mut Ui, area: egui::Rect) {
    let size = egui::vec2(150.0, 30.0);
    let center = egui::pos2(area.center().x, area.bottom() - size.y / 2.0 - 12.0);
    let button = egui::Button::new("⬇ Jump to latest").corner_radius(15);
    if ui
        .put(egui::Rect::from_center_size(center, size), button)
        .clicked()
    {
        app.chat.scroll_to_bottom = true;
    }
}

fn message_ui(ui: &mut Ui, view: &mut MessageView<'_>, index: usize, message: &Message) {
    if view.context_start == Some(index) {
        context_divider(ui, index);
    }
    match message.role {
        Role::User => user_message(ui, view, index, message),
        Role::Assistant => assistant_message(ui, view, index, message),
        Role::System => {
            ui.label(RichText::new(&message.content).italics());
        }
    }
    ui.add_space(10.0);
}

/// A rule with a note: everything above it is no longer in the model's context.
fn context_divider(ui: &mut Ui, dropped: usize) {
    let color = theme::muted_text_color(ui.visuals());
    ui.add_space(4.0);
    ui.separator();
    ui.label(
        RichText::new(format!("⬆ {}", context_notice(dropped)))
            .small()
            .color(color),
    )
    .on_hover_text(
        "To make room, older turns were left out of the prompt a block at a time, so the \
             next turns can reuse what the model already read",
    );
    ui.add_space(6.0);
}

fn user_message(ui: &mut Ui, view: &mut MessageView<'_>, index: usize, message: &Message) {
    if let Some((editing_index, text)) = view.editing.as_mut()
        && *editing_index == index
    {
        let cancelled = edit_box(
            ui,
            text,
            index,
            view.actions,
            view.model_ready,
            view.generation.is_some(),
        );
        if cancelled || ui.input(|i| i.key_pressed(egui::Key::Escape)) {
            *view.editing = None;
        }
        return;
    }
    let margin = egui::Margin::symmetric(12, 8);
    let max_text_width = ui.available_width() * 0.85 - margin.sum().x;
    ui.with_layout(egui::Layout::right_to_left(egui::Align::Min), |ui| {
        egui::Frame::new()
            .fill(theme::user_bubble_fill(ui.visuals()))
            .corner_radius(12)
            .inner_margin(margin)
            .show(ui, |ui| {
                folded_text(ui, index, &message.content, max_text_width)
            });
    });
    let busy = view.generation.is_some();
    ui.with_layout(egui::Layout::right_to_left(egui::Align::Min), |ui| {
        if small_action(ui, "Copy", "Copy this message").clicked() {
            view.actions.push(Action::Copy(message.content.clone()));
        }
        let edit = ui
            .add_enabled(
                !busy,
                egui::Button::new(RichText::new("Edit").small()).frame(false),
            )
            .on_hover_text("Change this message and get a new reply")
            .on_disabled_hover_text("Wait for the reply to finish (or stop it)");
        if edit.clicked() {
            *view.editing = Some((index, message.content.clone()));
        }
        if index == view.last_index && !busy && view.model_ready {
            let answer = small_action(ui, "Get a reply", "Ask the model to answer this message");
            if answer.clicked() {
                view.actions.push(Action::Regenerate);
            }
        }
    });
}

/// A user's message, as wide as its text (at most `max_width`); very long ones (pastes) are
/// folded to keep the view light.
fn folded_text(ui: &mut Ui, index: usize, text: &str, max_width: f32) {
    let chars = text.chars().count();
    let id = ui.make_persistent_id(("unfolded", index));
    let unfolded = ui.data(|d| d.get_temp::<bool>(id).unwrap_or(false));
    let folded = chars > FOLD_CHARS && !unfolded;
    let shown = if folded {
        let cut = text
            .char_indices()
            .nth(FOLDED_PREVIEW_CHARS)
            .map_or(text.len(), |(i, _)| i);
        format!("{}…", &text[..cut])
    } else {
        text.to_string()
    };
    let galley = egui::WidgetText::from(shown).into_galley(
        ui,
        Some(egui::TextWrapMode::Wrap),
        max_width,
        egui::TextStyle::Body,
    );
    let width = galley.size().x.max(40.0);
    let layout = egui::Layout::top_down(egui::Align::Min);
    ui.allocate_ui_with_layout(egui::vec2(width, 0.0), layout, |ui| {
        ui.set_width(width);
        ui.add(egui::Label::new(galley).selectable(true));
        if folded {
            let label = format!("Show all {} characters", format_count(chars));
            if ui.small_button(label).clicked() {
                ui.data_mut(|d| d.insert_temp(id, true));
            }
        } else if unfolded && ui.small_button("Show less").clicked() {
            ui.data_mut(|d| d.insert_temp(id, false));
        }
    });
}

/// The inline editor of a user message; returns whether the edit was cancelled.
fn edit_box(
    ui: &mut Ui,
    text: &mut String,
    index: usize,
    actions: &mut Vec<Action>,
    model_ready: bool,
    busy: bool,
) -> bool {
    let mut cancelled = false;
    egui::Frame::new()
        .fill(ui.visuals().extreme_bg_color)
        .stroke(ui.visuals().widgets.active.bg_stroke)
        .corner_radius(10)
        .inner_margin(10)
        .show(ui, |ui| {
            let edit = ui.add(
                egui::TextEdit::multiline(text)
                    .desired_width(ui.available_width())
                    .desired_rows(3)
                    .frame(egui::Frame::NONE),
            );
            edit.accessible_name("Edit message");
            ui.horizontal(|ui| {
                let can_send = model_ready && !busy && !text.trim().is_empty();
                if ui
                    .add_enabled(can_send, egui::Button::new("Save & send"))
                    .on_hover_text("Replace this message, drop the replies after it, and ask again")
                    .clicked()
                {
                    actions.push(Action::EditAndResend {
                        index,
                        text: text.clone(),
                    });
                }
                cancelled = ui.button("Cancel").clicked();
            });
        });
    cancelled
}

fn assistant_message(ui: &mut Ui, view: &mut MessageView<'_>, index: usize, message: &Message) {
    let live = view.generation.filter(|g| g.message_index == index);
    let thinking_now = live.is_some_and(|g| g.phase == Phase::Thinking);
    if view.show_thinking {
        thinking_block(ui, view, index, message, live);
    } else if thinking_now {
        ui.horizontal(|ui| {
            super::widgets::spinner(ui);
            ui.label(RichText::new("Thinking…").color(theme::thinking_text_color(ui.visuals())));
        });
    }
    if !message.content.is_empty() {
        ui.push_id("answer", |ui| {
            let shown = super::line_breaks::with_hard_line_breaks(&message.content);
            CommonMarkViewer::new().show(ui, view.markdown, &shown);
        });
    }
    if let Some(generation) = live {
        waiting_line(ui, generation);
        return;
    }
    reply_footer(ui, view, index, message);
}

/// While the model reads the prompt: a spinner and what it is doing. Once text streams in,
/// the text itself shows progress.
fn waiting_line(ui: &mut Ui, generation: &Generation) {
    let text = match generation.phase {
        Phase::Waiting => "Starting…".to_string(),
        Phase::Prefill => match generation.prompt_tokens {
            Some(tokens) => format!(
                "Reading the conversation ({} tokens)…",
                format_count(tokens)
            ),
            None => "Reading the conversation…".to_string(),
        },
        Phase::Thinking | Phase::Answering => return,
    };
    ui.horizontal(|ui| {
        super::widgets::spinner(ui);
        ui.label(RichText::new(text).color(theme::muted_text_color(ui.visuals())));
    });
}

/// The thinking span: open while it streams, then folded under "Thought for …".
fn thinking_block(
    ui: &mut Ui,
    view: &mut MessageView<'_>,
    index: usize,
    message: &Message,
    live: Option<&Generation>,
) {
    let thinking = message.thinking.as_deref().unwrap_or("");
    let streaming = live.is_some_and(|g| g.phase == Phase::Thinking);
    if thinking.is_empty() && !streaming {
        return;
    }
    let header = if streaming {
        "Thinking…".to_string()
    } else {
        thought_summary(message.stats.as_ref(), live)
    };
    let key = (view.conversation_id.to_string(), index);
    let open = view.thinking_open.get(&key).copied().unwrap_or(false);
    let color = theme::thinking_text_color(ui.visuals());
    let response = egui::CollapsingHeader::new(RichText::new(header).color(color))
        .id_salt(("thinking", index))
        .open(Some(open))
        .show(ui, |ui| {
            egui::Frame::new()
                .inner_margin(egui::Margin {
                    left: 10,
                    right: 0,
                    top: 2,
                    bottom: 2,
                })
                .show(ui, |ui| {
                    ui.add(
                        egui::Label::new(RichText::new(thinking.trim()).color(color))
                            .selectable(true)
                            .wrap(),
                    );
                });
        });
    if response.header_response.clicked() {
        view.thinking_open.insert(key, !open);
    }
}

/// "Thought for 12 s · 340 tokens" from the reply's statistics, with "(budget reached)" when
/// the thinking budget ended the thought.
pub fn thought_summary(stats: Option<&GenerationStats>, live: Option<&Generation>) -> String {
    match stats {
        Some(stats) if stats.thinking_tokens > 0 => format!(
            "Thought for {} · {} tokens{}",
            format_secs(stats.thinking_secs),
            format_count(stats.thinking_tokens),
            if stats.thinking_budget_reached {
                " (budget reached)"
            } else {
                ""
            }
        ),
        _ => match live.and_then(|g| g.thinking_since) {
            Some(since) => format!("Thought for {}", format_secs(since.elapsed().as_secs_f64())),
            None => "Thoughts".to_string(),
        },
    }
}

/// Seconds as "0.4 s", "12 s" or "2 min 5 s".
pub fn format_secs(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "?".to_string();
    }
    if secs < 10.0 {
        format!("{secs:.1} s")
    } else if secs < 60.0 {
        format!("{secs:.0} s")
    } else {
        let whole = secs.round() as u64;
        format!("{} min {} s", whole / 60, whole % 60)
    }
}

/// Statistics, stop reason and actions under a finished reply.
fn reply_footer(ui: &mut Ui, view: &mut MessageView<'_>, index: usize, message: &Message) {
    let muted = theme::muted_text_color(ui.visuals());
    ui.horizontal_wrapped(|ui| {
        if small_action(ui, "Copy", "Copy the answer (without thinking)").clicked() {
            view.actions.push(Action::Copy(message.content.clone()));
        }
        let can_answer = index == view.last_index && view.generation.is_none() && view.model_ready;
        if can_answer && message.interrupted {
            let resume = small_action(ui, "Continue", "Write more of this interrupted reply");
            if resume.clicked() {
                view.actions.push(Action::Continue);
            }
        }
        if can_answer {
            let regenerate = small_action(ui, "Regenerate", "Replace this reply with a new one");
            if regenerate.clicked() {
                view.actions.push(Action::Regenerate);
            }
        }
        if message.interrupted {
            ui.label(
                RichText::new("Interrupted: SmolDesk closed while this reply was being written")
                    .small()
                    .color(theme::warn_color(ui.visuals())),
            );
        } else if let Some(stats) = &message.stats {
            ui.label(RichText::new(stats_line(stats)).small().color(muted))
                .on_hover_text(stats_details(stats));
            if let Some(note) = stop_note(stats.stop_reason) {
                ui.label(
                    RichText::new(note)
                        .small()
                        .color(theme::warn_color(ui.visuals())),
                );
            }
        } else if message.content.is_empty() {
            ui.label(RichText::new("No answer").small().color(muted));
        }
    });
}

/// "0.4 s to first token · 9.3 tokens/s · 128 tokens".
pub fn stats_line(stats: &GenerationStats) -> String {
    format!(
        "{} to first token · {:.1} tokens/s · {} tokens",
        format_secs(stats.time_to_first_token_secs),
        stats.decode_tok_per_sec,
        format_count(stats.generated_tokens)
    )
}

/// The reply's statistics tooltip, ending with the seed that reproduces it.
pub fn stats_details(stats: &GenerationStats) -> String {
    format!(
        "Prompt: {} tokens ({} computed, the rest reused)\nReading speed: {:.1} tokens/s\n\
         Writing speed: {:.1} tokens/s\nThinking: {} tokens\nSeed: {} (set it as a fixed seed \
         in Settings to get this reply again)",
        format_count(stats.prompt_tokens),
        format_count(stats.prefilled_tokens),
        stats.prefill_tok_per_sec,
        stats.decode_tok_per_sec,
        format_count(stats.thinking_tokens),
        stats.seed
    )
}

fn stop_note(reason: StopReason) -> Option<&'static str> {
    match reason {
        StopReason::EndOfTurn => None,
        StopReason::Cancelled => Some("Stopped"),
        StopReason::MaxTokens => Some("Reached the reply length limit"),
        StopReason::ContextFull => Some("The context is full"),
    }
}

fn small_action(ui: &mut Ui, text: &str, tip: &str) -> egui::Response {
    ui.add(egui::Button::new(RichText::new(text).small()).frame(false))
        .on_hover_text(tip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(thinking_len: usize) -> MessageKey {
        MessageKey {
            content_len: 10,
            thinking_len,
            has_stats: true,
            context_start: false,
        }
    }

    #[test]
    fn heights_are_kept_per_show_thinking_state_and_guessed_once() {
        let mut cache = HeightCache::default();
        cache.prepare(LayoutKey::default(), 2);
        let estimates = std::cell::Cell::new(0);
        let estimate = || {
            estimates.set(estimates.get() + 1);
            100.0
        };
        assert_eq!(cache.get(0, key(5), true, 20.0, estimate), 100.0);
        assert_eq!(cache.get(0, key(5), true, 20.0, estimate), 100.0);
        assert_eq!(estimates.get(), 1, "a guess is remembered");
        cache.set(0, key(5), true, 130.0);
        cache.set(1, key(0), true, 50.0);
        // Hidden thinking: derived from the shown height, nothing estimated.
        assert_eq!(cache.get(0, key(5), false, 20.0, estimate), 110.0);
        assert_eq!(cache.get(1, key(0), false, 20.0, estimate), 50.0);
        assert_eq!(estimates.get(), 1);
        cache.set(0, key(5), false, 104.0);
        assert_eq!(cache.get(0, key(5), true, 20.0, estimate), 130.0);
        assert_eq!(
            cache.thinking_header,
            Some(26.0),
            "the header height is learned"
        );
        // A changed message is measured again.
        assert_eq!(cache.get(0, key(6), true, 20.0, estimate), 100.0);
        assert_eq!(estimates.get(), 2);
        cache.prepare(
            LayoutKey {
                width_bits: 1,
                ..LayoutKey::default()
            },
            2,
        );
        assert_eq!(cache.get(1, key(0), false, 20.0, estimate), 100.0);
        assert_eq!(estimates.get(), 3, "a new width forgets every height");
    }

    #[test]
    fn seconds_read_naturally() {
        assert_eq!(format_secs(0.42), "0.4 s");
        assert_eq!(format_secs(12.4), "12 s");
        assert_eq!(format_secs(125.0), "2 min 5 s");
        assert_eq!(format_secs(f64::NAN), "?");
    }

    #[test]
    fn thought_summary_uses_the_statistics() {
        let stats = GenerationStats {
            thinking_tokens: 340,
            thinking_secs: 12.0,
            ..GenerationStats::default()
        };
        assert_eq!(
            thought_summary(Some(&stats), None),
            "Thought for 12 s · 340 tokens"
        );
        assert_eq!(thought_summary(None, None), "Thoughts");
    }

    #[test]
    fn stats_line_shows_speed_and_count() {
        let stats = GenerationStats {
            time_to_first_token_secs: 0.8,
            decode_tok_per_sec: 9.26,
            generated_tokens: 1234,
            ..GenerationStats::default()
        };
        assert_eq!(
            stats_line(&stats),
            "0.8 s to first token · 9.3 tokens/s · 1,234 tokens"
        );
    }
}
