//! The conversation list: new, search, select, rename, export and delete (with undo).

use egui::{RichText, Ui};

use super::actions::Action;
use super::app::App;
use super::conversation_list::Entry;
use super::{shortcuts, theme};
use crate::chat::conversation::{Conversation, now_ms};

/// What the list remembers between frames.
#[derive(Debug, Default)]
pub struct SidebarState {
    /// The search text.
    pub search: String,
    /// The conversation being renamed and the title typed so far.
    pub renaming: Option<(String, String)>,
    /// Ids matching the search, with what they were computed for.
    matches: Option<SearchCache>,
    /// How many times the search ran (to check it is not rerun needlessly).
    pub searches: u64,
}

/// The ids matching a search, and the query, revision, list version and number of
/// non-empty conversations they are for.
#[derive(Debug)]
struct SearchCache {
    query: String,
    revision: u64,
    list_version: u64,
    non_empty: usize,
    ids: Vec<String>,
}

/// The list's frame.
pub fn frame(style: &egui::Style) -> egui::Frame {
    egui::Frame::side_top_panel(style)
        .fill(theme::sidebar_fill(&style.visuals))
        .inner_margin(egui::Margin::symmetric(8, 10))
}

/// Draws the list.
pub fn show(app: &mut App, ui: &mut Ui) {
    let mut actions = Vec::new();
    let new_chat = egui::Button::new("➕ New chat")
        .shortcut_text(ui.ctx().format_shortcut(&shortcuts::NEW_CHAT))
        .min_size(egui::vec2(ui.available_width(), 32.0));
    if ui.add(new_chat).clicked() {
        actions.push(Action::NewChat);
    }
    ui.add_space(4.0);
    search_field(app, ui);
    ui.add_space(4.0);
    let ids = matching_ids(app);
    egui::ScrollArea::vertical()
        .id_salt("conversation-list")
        .auto_shrink(false)
        .show(ui, |ui| {
            if ids.is_empty() && app.sidebar.search.trim().is_empty() {
                ui.label(
                    RichText::new("No conversations yet")
                        .color(theme::muted_text_color(ui.visuals())),
                );
            }
            if ids.is_empty() && !app.sidebar.search.trim().is_empty() {
                ui.label(
                    RichText::new(format!("No chats match “{}”", app.sidebar.search.trim()))
                        .color(theme::muted_text_color(ui.visuals())),
                );
            }
            let mut last_group = None;
            let now = now_ms();
            if app.reader.listing() {
                ui.label(
                    RichText::new("Reading saved chats…")
                        .color(theme::muted_text_color(ui.visuals())),
                );
            }
            for id in &ids {
                let Some(entry) = app.conversations.entry(id) else {
                    continue;
                };
                let group = date_group(entry.updated_ms(), now);
                if last_group != Some(group) {
                    ui.add_space(6.0);
                    ui.label(
                        RichText::new(group)
                            .small()
                            .strong()
                            .color(theme::muted_text_color(ui.visuals())),
                    );
                    last_group = Some(group);
                }
                let selected = *id == app.current;
                ui.push_id(id, |ui| {
                    row(app, ui, id, selected, &mut actions);
                });
            }
        });
    for action in actions {
        app.apply(action);
    }
}

fn search_field(app: &mut App, ui: &mut Ui) {
    let size = egui::vec2(ui.available_width(), ui.spacing().interact_size.y);
    let layout = egui::Layout::right_to_left(egui::Align::Center);
    ui.allocate_ui_with_layout(size, layout, |ui| {
        if !app.sidebar.search.is_empty()
            && ui
                .small_button("✖")
                .on_hover_text("Clear the search")
                .accessible_name("Clear search")
                .clicked()
        {
            app.sidebar.search.clear();
        }
        ui.add(
            egui::TextEdit::singleline(&mut app.sidebar.search)
                .hint_text("🔍 Search chats")
                .desired_width(f32::INFINITY),
        )
        .accessible_name("Search conversations");
    });
}

/// One conversation: its title (or the rename field) and, when selected, its menu.
fn row(app: &mut App, ui: &mut Ui, id: &str, selected: bool, actions: &mut Vec<Action>) {
    if let Some((renaming_id, text)) = &mut app.sidebar.renaming
        && renaming_id == id
    {
        let response = ui.add(
            egui::TextEdit::singleline(text)
                .desired_width(ui.available_width())
                .hint_text("Title"),
        );
        let response = response.accessible_name("Conversation title");
        if !response.has_focus() && !response.lost_focus() {
            response.request_focus();
        }
        let cancelled = ui.input(|i| i.key_pressed(egui::Key::Escape));
        if response.lost_focus() {
            if !cancelled {
                actions.push(Action::Rename {
                    id: id.to_string(),
                    title: text.clone(),
                });
            }
            app.sidebar.renaming = None;
        }
        return;
    }
    let Some(entry) = app.conversations.entry(id) else {
        return;
    };
    let title = entry.title();
    let menu_info = RowMenu {
        id: id.to_string(),
        title: title.clone(),
        has_messages: entry.has_messages(),
        exports_dir: app.data_dir.join("exports"),
    };
    let mut start_rename = false;
    let menu_size = egui::vec2(32.0, 28.0);
    ui.horizontal(|ui| {
        let reserved = if selected {
            menu_size.x + ui.spacing().item_spacing.x
        } else {
            0.0
        };
        let size = egui::vec2((ui.available_width() - reserved).max(40.0), 28.0);
        let button = egui::Button::selectable(selected, (title.as_str(), egui::Atom::grow()))
            .truncate()
            .min_size(size);
        let response = ui.add_sized(size, button).on_hover_text(&title);
        if response.clicked() {
            actions.push(Action::Select(id.to_string()));
        }
        start_rename |= response.double_clicked();
        response.context_menu(|ui| start_rename |= menu_info.show(ui, actions));
        if selected {
            let button = egui::Button::new("⏷").min_size(menu_size);
            let (response, _) = egui::containers::menu::MenuButton::from_button(button)
                .ui(ui, |ui| start_rename |= menu_info.show(ui, actions));
            response
                .on_hover_text("Rename, export or delete")
                .accessible_name("Conversation menu");
        }
    });
    if start_rename {
        app.sidebar.renaming = Some((menu_info.id, menu_info.title));
    }
}

/// What a conversation's menu needs to know.
struct RowMenu {
    id: String,
    title: String,
    has_messages: bool,
    exports_dir: std::path::PathBuf,
}

impl RowMenu {
    /// Draws the menu; returns whether Rename was chosen.
    fn show(&self, ui: &mut Ui, actions: &mut Vec<Action>) -> bool {
        let rename = ui.button("Rename…").clicked();
        if ui
            .add_enabled(self.has_messages, egui::Button::new("Export as Markdown"))
            .on_hover_text(format!(
                "Write the conversation (answers only, no thinking) to {}",
                self.exports_dir.display()
            ))
            .clicked()
        {
            actions.push(Action::Export(self.id.clone()));
        }
        if ui
            .add_enabled(self.has_messages, egui::Button::new("Copy as Markdown"))
            .clicked()
        {
            actions.push(Action::CopyMarkdown(self.id.clone()));
        }
        ui.separator();
        if ui.button("Delete").clicked() {
            actions.push(Action::Delete(self.id.clone()));
        }
        rename
    }
}

/// The conversations matching the search, most recent first. Cached per query, revision and
/// list version; while a reply streams (every token is a revision) the cache holds until the
/// reply ends, so the search reruns on edits, not per token. Searching reads the bodies not
/// read yet, in the background; their messages are searched once they are in.
fn matching_ids(app: &mut App) -> Vec<String> {
    let query = app.sidebar.search.trim().to_lowercase();
    let version = app.conversations.version();
    // A new chat gets its first message without the list changing; counting non-empty
    // entries (cheap) lists it at once, even while its first reply streams.
    let non_empty = app
        .conversations
        .entries()
        .iter()
        .filter(|e| e.has_messages())
        .count();
    if let Some(cached) = &app.sidebar.matches
        && cached.query == query
        && cached.list_version == version
        && cached.non_empty == non_empty
        && (cached.revision == app.revision || app.is_generating())
    {
        return cached.ids.clone();
    }
    if !query.is_empty() {
        app.read_all_bodies();
    }
    app.sidebar.searches += 1;
    let ids: Vec<String> = app
        .conversations
        .entries()
        .iter()
        .filter(|e| e.has_messages() && entry_matches(e, &query))
        .map(|e| e.id().to_string())
        .collect();
    app.sidebar.matches = Some(SearchCache {
        query,
        revision: app.revision,
        list_version: version,
        non_empty,
        ids: ids.clone(),
    });
    ids
}

/// Whether an entry matches the (lower-case) query: by title until its body is read.
fn entry_matches(entry: &Entry, query: &str) -> bool {
    match entry {
        Entry::Loaded(conversation) => matches(conversation, query),
        Entry::Listed { summary, .. } => {
            query.is_empty() || summary.title.to_lowercase().contains(query)
        }
    }
}

impl App {
    /// How many times the conversation search has run (it reruns on edits, not per token).
    pub fn search_runs(&self) -> u64 {
        self.sidebar.searches
    }
}

/// Whether a conversation's title or any message contains the (lower-case) query.
pub fn matches(conversation: &Conversation, query: &str) -> bool {
    if query.is_empty() {
        return true;
    }
    conversation.display_title().to_lowercase().contains(query)
        || conversation
            .messages
            .iter()
            .any(|m| m.content.to_lowercase().contains(query))
}

/// "Today", "Yesterday", "Previous 7 days", "Previous 30 days" or "Older".
pub fn date_group(updated_ms: i64, now_ms: i64) -> &'static str {
    const DAY: i64 = 24 * 60 * 60 * 1000;
    let age = now_ms.saturating_sub(updated_ms);
    match age {
        a if a < DAY => "Today",
        a if a < 2 * DAY => "Yesterday",
        a if a < 7 * DAY => "Previous 7 days",
        a if a < 30 * DAY => "Previous 30 days",
        _ => "Older",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::conversation::{Message, Role};

    #[test]
    fn search_looks_at_titles_and_messages_ignoring_case() {
        let mut c = Conversation::default();
        c.messages
            .push(Message::new(Role::User, "Tell me about Rust"));
        c.messages
            .push(Message::new(Role::Assistant, "Rust is a language."));
        assert!(matches(&c, ""));
        assert!(matches(&c, "rust"));
        assert!(matches(&c, "language"));
        assert!(!matches(&c, "python"));
        c.title = "Programming".into();
        assert!(matches(&c, "programming"));
    }

    #[test]
    fn dates_are_grouped_by_age() {
        let day = 24 * 60 * 60 * 1000;
        let now = 100 * day;
        assert_eq!(date_group(now - 1000, now), "Today");
        assert_eq!(date_group(now - day - 1, now), "Yesterday");
        assert_eq!(date_group(now - 3 * day, now), "Previous 7 days");
        assert_eq!(date_group(now - 10 * day, now), "Previous 30 days");
        assert_eq!(date_group(now - 90 * day, now), "Older");
    }
}
