//! The message box at the bottom: the draft, the context meter, "Think", Send and Stop.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use egui::{Key, KeyboardShortcut, Modifiers, RichText, Ui};

use super::actions::Action;
use super::app::App;
use super::model_panel::format_count;
use super::token_meter::{Count, CountRequest};
use super::{shortcuts, theme};

/// Tallest the message box grows before it scrolls, in points.
const MAX_INPUT_HEIGHT: f32 = 220.0;

/// The id of the message box (tests and focus requests use it).
pub fn input_id() -> egui::Id {
    egui::Id::unique("composer-input")
}

/// What the composer keeps between frames.
#[derive(Debug, Default)]
pub struct ComposerState {
    /// The message being written.
    pub draft: String,
    /// Bumped whenever the draft changes.
    pub revision: u64,
    /// Move the keyboard focus to the message box on the next frame.
    pub focus_requested: bool,
    /// Why the draft cannot be sent (too long for the context).
    pub blocked_reason: Option<String>,
}

/// The composer's frame.
pub fn frame(style: &egui::Style) -> egui::Frame {
    egui::Frame::side_top_panel(style).inner_margin(egui::Margin {
        left: 16,
        right: 16,
        top: 8,
        bottom: 12,
    })
}

/// Draws the composer.
pub fn show(app: &mut App, ui: &mut Ui) {
    let mut actions = Vec::new();
    update_meter(app, ui.ctx());
    ui.vertical_centered(|ui| {
        ui.set_max_width(theme::READING_WIDTH);
        ui.with_layout(egui::Layout::top_down(egui::Align::Min), |ui| {
            meter_row(app, ui);
            input_box(app, ui, &mut actions);
            ui.add_space(4.0);
            controls_row(app, ui, &mut actions);
        });
    });
    for action in actions {
        app.apply(action);
    }
}

fn input_box(app: &mut App, ui: &mut Ui, actions: &mut Vec<Action>) {
    let id = input_id();
    let focused = ui.memory(|m| m.has_focus(id));
    if focused && ui.input_mut(shortcuts::take_plain_enter) {
        actions.push(Action::Send);
    }
    let placeholder = match app.loaded_model() {
        Some(model) => format!("Message {}…", model.display_name()),
        None => "Load a model to start chatting…".to_string(),
    };
    let frame = egui::Frame::new()
        .fill(ui.visuals().extreme_bg_color)
        .stroke(ui.visuals().widgets.inactive.bg_stroke)
        .corner_radius(10)
        .inner_margin(egui::Margin::symmetric(10, 8));
    frame.show(ui, |ui| {
        egui::ScrollArea::vertical()
            .id_salt("composer-scroll")
            .max_height(MAX_INPUT_HEIGHT)
            .stick_to_bottom(true)
            .show(ui, |ui| {
                let response = ui.add(
                    egui::TextEdit::multiline(&mut app.composer.draft)
                        .id(id)
                        .hint_text(placeholder)
                        .desired_rows(2)
                        .desired_width(ui.available_width())
                        .frame(egui::Frame::NONE)
                        .return_key(KeyboardShortcut::new(Modifiers::SHIFT, Key::Enter)),
                );
                let response = response.accessible_name("Message");
                if response.changed() {
                    app.composer.revision += 1;
                }
                if app.composer.focus_requested {
                    response.request_focus();
                    app.composer.focus_requested = false;
                }
            });
    });
}

fn controls_row(app: &mut App, ui: &mut Ui, actions: &mut Vec<Action>) {
    ui.horizontal(|ui| {
        think_toggle(app, ui, actions);
        let chars = app.composer.draft.chars().count();
        if chars > 2000 {
            ui.label(
                RichText::new(format!("{} characters", format_count(chars)))
                    .small()
                    .color(theme::muted_text_color(ui.visuals())),
            );
        }
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            if app.is_generating() {
                let stopping = app.generation.as_ref().is_some_and(|g| g.stopping);
                let stop = ui
                    .add_enabled(
                        !stopping,
                        egui::Button::new(if stopping { "Stopping…" } else { "⏹ Stop" })
                            .min_size(egui::vec2(84.0, 30.0)),
                    )
                    .on_hover_text("Stop the reply (Esc)");
                if stop.clicked() {
                    actions.push(Action::Stop);
                }
            } else {
                let (enabled, why) = send_state(app);
                let send = ui
                    .add_enabled(
                        enabled,
                        egui::Button::new(RichText::new("Send").strong())
                            .min_size(egui::vec2(84.0, 30.0)),
                    )
                    .on_hover_text("Send (Enter) · new line: Shift+Enter")
                    .on_disabled_hover_text(why);
                if send.clicked() {
                    actions.push(Action::Send);
                }
            }
        });
    });
}

/// Whether Send is possible, and if not, why.
fn send_state(app: &App) -> (bool, String) {
    if app.loaded_model().is_none() {
        return (false, "Load a model first".to_string());
    }
    if app.composer.draft.trim().is_empty() {
        return (false, "Type a message first".to_string());
    }
    if let Some(reason) = &app.composer.blocked_reason {
        return (false, reason.clone());
    }
    (true, String::new())
}

fn think_toggle(app: &mut App, ui: &mut Ui, actions: &mut Vec<Action>) {
    let can_think = app.loaded_model().is_none_or(|m| m.info.can_think);
    let mut thinking = app
        .current_conversation()
        .map_or(app.prefs.think_by_default, |c| c.settings.thinking)
        && can_think;
    let tip = if can_think {
        "Let the model reason before it answers (slower, often better). Applies to this conversation."
    } else {
        "This model cannot think before answering."
    };
    let response = ui
        .add_enabled_ui(can_think, |ui| ui.toggle_value(&mut thinking, "💡 Think"))
        .inner
        .on_hover_text(tip)
        .on_disabled_hover_text(tip)
        .accessible_name("Think");
    if response.changed() {
        actions.push(Action::SetThinking(thinking));
    }
}

/// Keeps the token count in step with the draft (debounced, counted off the UI thread). Not
/// while a reply streams: the count would compete with the model for the CPU.
fn update_meter(app: &mut App, ctx: &egui::Context) {
    let Some(model) = app.loaded_model().map(|m| m.counting.clone()) else {
        app.composer.blocked_reason = None;
        return;
    };
    if app.is_generating() {
        return;
    }
    let Some(conversation) = app.conversations.get(&app.current) else {
        return;
    };
    let mut hasher = std::hash::DefaultHasher::new();
    (
        &conversation.id,
        app.revision,
        app.composer.revision,
        conversation.settings.thinking,
        conversation.settings.sampling.max_tokens,
        &conversation.settings.system_prompt,
        Arc::as_ptr(&model) as usize,
    )
        .hash(&mut hasher);
    let key = hasher.finish();
    let draft = &app.composer.draft;
    let make_request = || {
        Some(CountRequest {
            model: model.clone(),
            settings: conversation.settings.clone(),
            history: conversation.messages.clone(),
            draft: draft.clone(),
        })
    };
    let wait = app.meter.update(key, Instant::now(), make_request);
    if let Some(wait) = wait {
        ctx.request_repaint_after(wait);
    }
    app.composer.blocked_reason = match app.meter.latest() {
        Some((Ok(count), true)) if count.draft_too_long() => Some(too_long_message(count)),
        _ => None,
    };
}

/// Says how many old messages the next reply leaves out to fit the context.
pub fn left_out_note(left_out: usize) -> String {
    let (number, verb) = if left_out == 1 {
        ("1 older message is".to_string(), "it")
    } else {
        (
            format!("{} older messages are", format_count(left_out)),
            "them",
        )
    };
    format!("{number} left out of the next reply to make room: the model does not see {verb}.")
}

fn too_long_message(count: &Count) -> String {
    format!(
        "This message is too long: {} tokens, but the context holds {}. Shorten it, or raise \
         the context length in Settings and reload the model.",
        format_count(count.draft_alone),
        format_count(count.context_length)
    )
}

/// The context meter: tokens used of the context, and warnings.
fn meter_row(app: &App, ui: &mut Ui) {
    if app.loaded_model().is_none() {
        return;
    }
    let muted = theme::muted_text_color(ui.visuals());
    if let (Some(generation), Some(model)) = (&app.generation, app.loaded_model())
        && let Some(tokens) = generation.prompt_tokens
    {
        let text = format!(
            "Context: {} / {} tokens, plus the reply being written",
            format_count(tokens),
            format_count(model.context_length())
        );
        ui.label(RichText::new(text).small().color(muted));
        return;
    }
    let Some((count, current)) = app.meter.latest() else {
        ui.label(RichText::new("Counting tokens…").small().color(muted));
        return;
    };
    let count = match count {
        Ok(count) => count,
        Err(err) => {
            ui.label(
                RichText::new(format!("Token count unavailable: {err}"))
                    .small()
                    .color(muted),
            );
            return;
        }
    };
    let color = if count.draft_too_long() {
        theme::error_color(ui.visuals())
    } else if count.fraction() > 0.8 {
        theme::warn_color(ui.visuals())
    } else {
        muted
    };
    ui.horizontal(|ui| {
        let text = format!(
            "Context: {} / {} tokens",
            format_count(count.sent),
            format_count(count.context_length)
        );
        let label = RichText::new(text).small().color(color);
        ui.label(if current { label } else { label.italics() })
            .on_hover_text("The next reply's prompt: the system prompt, the messages that still fit and your draft, counted with the model's own template and tokenizer");
        let bar_width = 120.0;
        let (rect, _) = ui.allocate_exact_size(egui::vec2(bar_width, 4.0), egui::Sense::hover());
        ui.painter()
            .rect_filled(rect, 2.0, ui.visuals().widgets.inactive.bg_fill);
        let mut filled = rect;
        filled.set_width(bar_width * count.fraction());
        ui.painter().rect_filled(filled, 2.0, color);
    });
    if count.draft_too_long() {
        ui.label(RichText::new(too_long_message(count)).color(color));
    } else if count.history_overflows() {
        ui.label(
            RichText::new(left_out_note(count.left_out))
                .small()
                .color(color),
        );
    }
}
