//! The settings section about saved conversation states (the KV cache kept per conversation so
//! continuing one is instant): how much they take, and a button to delete them.

use egui::{RichText, Ui};

use super::model_panel::format_bytes;
use super::theme;
use crate::chat::state_cache::{DEFAULT_DISK_CAP, StateCache};

/// Draws the section: sizes in memory and on disk, and "Clear saved states"; returns whether
/// that was clicked (the files are deleted off the UI thread, see [`clear_in_background`]).
pub fn show(ui: &mut Ui) -> bool {
    let cache = StateCache::app();
    let usage = cache.usage();
    ui.label(format!(
        "Saved conversation states: {} on disk ({} {}), {} in memory",
        format_bytes(usage.disk_bytes),
        usage.disk_files,
        if usage.disk_files == 1 {
            "conversation"
        } else {
            "conversations"
        },
        format_bytes(usage.memory_bytes),
    ));
    let folder = cache
        .dir()
        .map_or_else(|| "memory only".to_string(), |d| d.display().to_string());
    ui.label(
        RichText::new(format!(
            "Recent conversations continue without re-reading their history. Kept in {folder}, at most {}.",
            format_bytes(DEFAULT_DISK_CAP)
        ))
        .small()
        .color(theme::muted_text_color(ui.visuals())),
    );
    let empty = usage.disk_files == 0 && usage.memory_states == 0;
    ui.add_enabled(!empty, egui::Button::new("Clear saved states"))
        .clicked()
}

/// Deletes every saved conversation state on a background thread.
pub fn clear_in_background(app: &mut super::app::App) {
    app.run_task("smoldesk-clear-states", || {
        StateCache::app().clear();
        Box::new(|app: &mut super::app::App| {
            app.notices.info("Saved conversation states cleared");
        })
    });
}
