//! Keyboard shortcuts: what they are, catching them each frame, and the help window listing them.

use egui::{Key, KeyboardShortcut, Modifiers};

/// Start a new conversation.
pub const NEW_CHAT: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::N);
/// Open a model file.
pub const OPEN_MODEL: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::O);
/// Show or hide thinking.
pub const TOGGLE_THINKING: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::T);
/// Stop the reply being generated.
pub const STOP: KeyboardShortcut = KeyboardShortcut::new(Modifiers::NONE, Key::Escape);
/// Open the settings.
pub const SETTINGS: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::Comma);
/// Show this list.
pub const HELP: KeyboardShortcut = KeyboardShortcut::new(Modifiers::NONE, Key::F1);

/// Something a shortcut asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShortcutAction {
    /// Ctrl+N.
    NewChat,
    /// Ctrl+O.
    OpenModel,
    /// Ctrl+T.
    ToggleShowThinking,
    /// Esc while a reply streams.
    Stop,
    /// Ctrl+,.
    Settings,
    /// F1.
    Help,
}

/// Consumes this frame's shortcut key presses. Esc is only taken while `generating`, so that
/// otherwise it still closes windows and cancels edits.
pub fn take_actions(ctx: &egui::Context, generating: bool) -> Vec<ShortcutAction> {
    ctx.input_mut(|input| {
        let mut actions = Vec::new();
        let table = [
            (NEW_CHAT, ShortcutAction::NewChat),
            (OPEN_MODEL, ShortcutAction::OpenModel),
            (TOGGLE_THINKING, ShortcutAction::ToggleShowThinking),
            (SETTINGS, ShortcutAction::Settings),
            (HELP, ShortcutAction::Help),
        ];
        for (shortcut, action) in table {
            if input.consume_shortcut(&shortcut) {
                actions.push(action);
            }
        }
        if generating && input.consume_shortcut(&STOP) {
            actions.push(ShortcutAction::Stop);
        }
        actions
    })
}

/// Takes a press of Enter without Shift (or any other modifier) from this frame's input.
pub fn take_plain_enter(input: &mut egui::InputState) -> bool {
    let before = input.events.len();
    input.events.retain(|event| {
        !matches!(
            event,
            egui::Event::Key {
                key: Key::Enter,
                pressed: true,
                modifiers,
                ..
            } if modifiers.is_none()
        )
    });
    input.events.len() != before
}

/// Every shortcut with what it does, for the help window.
pub fn descriptions(ctx: &egui::Context) -> Vec<(String, &'static str)> {
    let f = |s: &KeyboardShortcut| ctx.format_shortcut(s);
    vec![
        ("Enter".to_string(), "Send the message"),
        ("Shift+Enter".to_string(), "New line in the message"),
        (f(&STOP), "Stop the reply"),
        (f(&NEW_CHAT), "New chat"),
        (f(&OPEN_MODEL), "Open a model file"),
        (f(&TOGGLE_THINKING), "Show or hide thinking"),
        (f(&SETTINGS), "Settings"),
        (f(&HELP), "This list of shortcuts"),
    ]
}

/// The window listing the shortcuts.
pub fn show_help(ctx: &egui::Context, open: &mut bool) {
    let rows = descriptions(ctx);
    egui::Window::new("Keyboard shortcuts")
        .open(open)
        .collapsible(false)
        .resizable(false)
        .anchor(egui::Align2::CENTER_CENTER, egui::Vec2::ZERO)
        .show(ctx, |ui| {
            egui::Grid::new("shortcut-grid")
                .num_columns(2)
                .spacing([24.0, 8.0])
                .striped(true)
                .show(ui, |ui| {
                    for (keys, what) in rows {
                        ui.label(egui::RichText::new(keys).monospace().strong());
                        ui.label(what);
                        ui.end_row();
                    }
                });
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(key: Key, modifiers: Modifiers) -> egui::Event {
        egui::Event::Key {
            key,
            physical_key: None,
            pressed: true,
            repeat: false,
            modifiers,
        }
    }

    fn run_with(events: Vec<egui::Event>, generating: bool) -> Vec<ShortcutAction> {
        let ctx = egui::Context::default();
        let mut actions = Vec::new();
        let input = egui::RawInput {
            events,
            ..Default::default()
        };
        let mut output = ctx.run_ui(input, |ui| actions = take_actions(ui.ctx(), generating));
        output.textures_delta.clear();
        actions
    }

    #[test]
    fn shortcuts_map_to_actions() {
        let events = vec![
            key(Key::N, Modifiers::COMMAND),
            key(Key::T, Modifiers::COMMAND),
            key(Key::O, Modifiers::COMMAND),
        ];
        assert_eq!(
            run_with(events, false),
            [
                ShortcutAction::NewChat,
                ShortcutAction::OpenModel,
                ShortcutAction::ToggleShowThinking
            ]
        );
    }

    #[test]
    fn escape_stops_only_while_generating() {
        let esc = || vec![key(Key::Escape, Modifiers::NONE)];
        assert!(run_with(esc(), false).is_empty());
        assert_eq!(run_with(esc(), true), [ShortcutAction::Stop]);
    }

    #[test]
    fn plain_enter_is_taken_but_shift_enter_is_left() {
        let ctx = egui::Context::default();
        let input = egui::RawInput {
            events: vec![
                key(Key::Enter, Modifiers::SHIFT),
                key(Key::Enter, Modifiers::NONE),
            ],
            ..Default::default()
        };
        let mut taken = false;
        let mut left = 0;
        let mut output = ctx.run_ui(input, |ui| {
            taken = ui.input_mut(take_plain_enter);
            left = ui.input(|i| i.events.len());
        });
        output.textures_delta.clear();
        assert!(taken);
        assert_eq!(left, 1);
    }

    #[test]
    fn every_shortcut_is_described() {
        let ctx = egui::Context::default();
        assert_eq!(descriptions(&ctx).len(), 8);
    }
}
