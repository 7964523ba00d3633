//! The bar along the top: conversation list toggle, the model button, load progress, and the
//! "Show thinking", settings and shortcut controls.

use egui::{RichText, Ui};

use super::actions::{Action, file_name};
use super::app::{App, ModelState};
use super::model_panel::format_count;
use super::{shortcuts, theme};

/// The bar's frame.
pub fn frame(style: &egui::Style) -> egui::Frame {
    egui::Frame::side_top_panel(style).inner_margin(egui::Margin::symmetric(10, 6))
}

/// Draws the bar.
pub fn show(app: &mut App, ui: &mut Ui) {
    let mut actions = Vec::new();
    ui.horizontal(|ui| {
        let chats = ui
            .selectable_label(app.prefs.sidebar_open, "☰ Chats")
            .on_hover_text("Show or hide the conversation list");
        if chats.clicked() {
            app.prefs.sidebar_open = !app.prefs.sidebar_open;
        }
        ui.separator();
        let mut toggle_model_window = false;
        model_button(app, ui, &mut actions, &mut toggle_model_window);
        if toggle_model_window {
            app.windows.model = !app.windows.model;
        }
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            if ui
                .button("⌨")
                .on_hover_text("Keyboard shortcuts (F1)")
                .accessible_name("Keyboard shortcuts")
                .clicked()
            {
                app.windows.shortcuts = !app.windows.shortcuts;
            }
            let settings_tip = format!(
                "Settings ({})",
                ui.ctx().format_shortcut(&shortcuts::SETTINGS)
            );
            if ui
                .button("⚙ Settings")
                .on_hover_text(settings_tip)
                .clicked()
            {
                app.windows.settings = !app.windows.settings;
            }
            if app.read_only {
                ui.label(
                    RichText::new("🔒 Read-only")
                        .strong()
                        .color(theme::warn_color(ui.visuals())),
                )
                .on_hover_text(
                    "Another copy of SmolDesk owns this data folder; nothing here is saved.",
                );
            }
            let mut show = app.prefs.show_thinking;
            let toggle_tip = format!(
                "Show the model's reasoning in replies ({}). Only changes what you see.",
                ui.ctx().format_shortcut(&shortcuts::TOGGLE_THINKING)
            );
            if ui
                .checkbox(&mut show, "Show thinking")
                .on_hover_text(toggle_tip)
                .changed()
            {
                actions.push(Action::ToggleShowThinking);
            }
        });
    });
    for action in actions {
        app.apply(action);
    }
}

/// The model's name and context, or the load progress, or an invitation to open one.
fn model_button(app: &App, ui: &mut Ui, actions: &mut Vec<Action>, toggle_model_window: &mut bool) {
    let muted = theme::muted_text_color(ui.visuals());
    match &app.model {
        ModelState::Empty => {
            if ui
                .button("Open model…")
                .on_hover_text("Choose a GGUF model file (Ctrl+O)")
                .clicked()
            {
                actions.push(Action::OpenFileDialog);
            }
            ui.label(RichText::new("No model loaded").color(muted));
        }
        ModelState::Loading {
            path,
            fraction,
            cancelling,
            ..
        } => {
            super::widgets::spinner(ui);
            ui.label(format!("Loading {}", file_name(path)));
            ui.add(
                egui::ProgressBar::new(*fraction)
                    .desired_width(140.0)
                    .show_percentage(),
            );
            if ui
                .add_enabled(!cancelling, egui::Button::new("Cancel"))
                .on_hover_text("Stop loading this model")
                .clicked()
            {
                actions.push(Action::CancelLoad);
            }
        }
        ModelState::Ready(model) => {
            let quant = model.info.quantization_label().unwrap_or("?");
            let text = format!("{} · {quant}", model.display_name());
            let response = ui
                .button(RichText::new(text).strong())
                .on_hover_text("Model details, other models, reload or unload");
            if response.clicked() {
                *toggle_model_window = true;
            }
            ui.label(
                RichText::new(format!(
                    "{} tokens context",
                    format_count(model.context_length())
                ))
                .color(muted),
            );
        }
    }
}
