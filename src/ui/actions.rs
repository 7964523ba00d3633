//! What the user can do, as values the panels return, and how the app carries each out.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::app::{App, Generation, ModelState, Phase};
use super::conversation_list::Entry;
use super::shortcuts::ShortcutAction;
use crate::chat::conversation::{Conversation, Message, Role};
use crate::chat::store::export_markdown;
use crate::worker::Command;
use crate::worker::messages::GenerateRequest;

/// A user's request, produced by a panel and applied by [`App::apply`].
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start a new conversation.
    NewChat,
    /// Open a conversation.
    Select(String),
    /// Give a conversation a title.
    Rename {
        /// The conversation.
        id: String,
        /// The new title (empty: derive it from the first message).
        title: String,
    },
    /// Delete a conversation (undoable for a while).
    Delete(String),
    /// Bring a deleted conversation back.
    Undo(String),
    /// Write a conversation as Markdown into the exports folder.
    Export(String),
    /// Copy a conversation as Markdown.
    CopyMarkdown(String),
    /// Send the draft.
    Send,
    /// Stop the reply.
    Stop,
    /// Replace the last reply with a new one.
    Regenerate,
    /// Write more of the last reply (one that was interrupted).
    Continue,
    /// Replace a user message and everything after it, and answer again.
    EditAndResend {
        /// Index of the user message.
        index: usize,
        /// Its new text.
        text: String,
    },
    /// Put text on the clipboard.
    Copy(String),
    /// Show the system's file picker.
    OpenFileDialog,
    /// Show a model's card (without loading it).
    Inspect(PathBuf),
    /// Load a model.
    Load(PathBuf),
    /// Cancel the load in progress.
    CancelLoad,
    /// Unload the model.
    Unload,
    /// Load the current model again (to apply context length or threads).
    Reload,
    /// Turn reasoning on or off for the open conversation.
    SetThinking(bool),
    /// Show or hide thinking spans.
    ToggleShowThinking,
    /// Use this chat template file instead of the model's own (`None`: the model's own).
    SetTemplateOverride(Option<PathBuf>),
}

impl App {
    /// Carries out an action.
    pub fn apply(&mut self, action: Action) {
        if self.defer_until_read(&action) {
            return;
        }
        match action {
            Action::NewChat => self.new_chat(),
            Action::Select(id) => self.select(&id),
            Action::Rename { id, title } => self.rename(&id, title),
            Action::Delete(id) => self.delete(&id),
            Action::Undo(id) => self.undo_delete(&id),
            Action::Export(id) => self.export(&id),
            Action::CopyMarkdown(id) => self.copy_markdown(&id),
            Action::Send => self.send_draft(),
            Action::Stop => self.stop(),
            Action::Regenerate => self.regenerate(),
            Action::Continue => self.continue_reply(),
            Action::EditAndResend { index, text } => self.edit_and_resend(index, text),
            Action::Copy(text) => self.chat.copy_request = Some(text),
            Action::OpenFileDialog => {
                self.windows.model = true;
                self.picker.open_file_dialog();
            }
            Action::Inspect(path) => self.picker.inspect(path),
            Action::Load(path) => self.load_model(path),
            Action::CancelLoad => self.cancel_load(),
            Action::Unload => self.unload(),
            Action::Reload => self.reload(),
            Action::SetThinking(on) => self.set_thinking(on),
            Action::ToggleShowThinking => self.prefs.show_thinking = !self.prefs.show_thinking,
            Action::SetTemplateOverride(path) => self.set_template_override(path),
        }
        self.read_current_if_needed();
    }

    /// Carries out a keyboard shortcut.
    pub(crate) fn apply_shortcut(&mut self, shortcut: ShortcutAction) {
        match shortcut {
            ShortcutAction::NewChat => self.apply(Action::NewChat),
            ShortcutAction::OpenModel => self.apply(Action::OpenFileDialog),
            ShortcutAction::ToggleShowThinking => self.apply(Action::ToggleShowThinking),
            ShortcutAction::Stop => self.apply(Action::Stop),
            ShortcutAction::Settings => self.windows.settings = !self.windows.settings,
            ShortcutAction::Help => self.windows.shortcuts = !self.windows.shortcuts,
        }
    }

    // ----- conversations -----

    fn new_chat(&mut self) {
        self.chat.editing = None;
        if let Some(empty) = self.conversations.empty_id() {
            self.current = empty;
        } else {
            let conversation = Conversation::new(self.new_chat_settings());
            self.current = conversation.id.clone();
            self.conversations.insert(0, conversation);
        }
        self.revision += 1;
        self.composer.focus_requested = true;
    }

    fn select(&mut self, id: &str) {
        if self.conversations.contains(id) && self.current != id {
            self.current = id.to_string();
            self.chat.editing = None;
            self.chat.scroll_to_bottom = true;
            self.drop_empty_conversations_except(id);
            self.revision += 1;
        }
    }

    /// Unsaved empty conversations vanish when the user moves on.
    fn drop_empty_conversations_except(&mut self, keep: &str) {
        self.conversations.drop_empty_except(keep);
    }

    fn rename(&mut self, id: &str, title: String) {
        if let Some(c) = self.conversation_mut(id) {
            c.title = title.trim().to_string();
            c.touch();
            let id = id.to_string();
            self.save_conversation(&id);
        }
    }

    fn delete(&mut self, id: &str) {
        if !self.conversations.contains(id) {
            return;
        }
        if self
            .generation
            .as_ref()
            .is_some_and(|g| g.conversation_id == id)
        {
            self.stop();
            self.generation = None;
        }
        let Some((index, entry)) = self.conversations.remove(id) else {
            return;
        };
        if !self.read_only {
            self.saver.delete(id);
        }
        if let Entry::Loaded(conversation) = entry
            && !conversation.messages.is_empty()
        {
            self.deleted.push((index, conversation));
            self.offer_undo();
        }
        if self.current == id {
            match self.conversations.first_id() {
                Some(next) => self.current = next,
                None => self.new_chat(),
            }
        }
        self.revision += 1;
    }

    fn undo_delete(&mut self, id: &str) {
        let Some(pos) = self.deleted.iter().position(|(_, c)| c.id == id) else {
            return;
        };
        let (index, conversation) = self.deleted.remove(pos);
        self.current = conversation.id.clone();
        self.conversations.insert(index, conversation);
        self.notices.dismiss_undo(id);
        let id = id.to_string();
        self.save_conversation(&id);
        self.drop_empty_conversations_except(&id);
        self.offer_undo();
    }

    /// Offers to undo the newest deletion not undone yet (each Undo then offers the one before).
    fn offer_undo(&mut self) {
        if let Some((_, conversation)) = self.deleted.last() {
            let (title, id) = (conversation.display_title(), conversation.id.clone());
            self.notices.undo_delete(&title, &id);
        }
    }

    /// Writes the export on a background thread (the write ends with an fsync).
    fn export(&mut self, id: &str) {
        let Some(conversation) = self.conversations.get(id).cloned() else {
            return;
        };
        let dir = self.data_dir.join("exports");
        self.run_task("smoldesk-export", move || {
            let path = dir.join(export_file_name(&conversation));
            let written = std::fs::create_dir_all(&dir).and_then(|()| {
                let text = export_markdown(&conversation);
                crate::chat::store::write_atomically(&path, text.as_bytes())
            });
            Box::new(move |app: &mut App| {
                match written {
                    Ok(()) => app.notices.info(format!("Exported to {}", path.display())),
                    Err(err) => app
                        .notices
                        .error(format!("Could not export to {}: {err}", path.display())),
                };
            })
        });
    }

    fn copy_markdown(&mut self, id: &str) {
        if let Some(conversation) = self.conversations.get(id) {
            self.chat.copy_request = Some(export_markdown(conversation));
            self.notices.info("Copied the conversation as Markdown");
        }
    }

    fn set_thinking(&mut self, on: bool) {
        self.prefs.think_by_default = on;
        if let Some(c) = self.current_mut() {
            c.settings.thinking = on;
        }
        self.settings_changed();
    }

    /// Reads and compiles a chat template file on a background thread, then tells the worker
    /// (and the token counter) to use it.
    pub(crate) fn set_template_override(&mut self, path: Option<PathBuf>) {
        let model = self
            .loaded_model()
            .map(|m| (m.info.path.clone(), m.info.chat_template.clone()));
        self.run_task("smoldesk-template", move || {
            let source = match &path {
                None => Ok(None),
                Some(file) => crate::chat::template::read_template_file(file)
                    .map(|s| Some((file.clone(), s))),
            };
            let compiled = match (&source, model) {
                (Ok(source), Some((model_path, embedded))) => Some((
                    model_path,
                    crate::chat::template::PromptFormatter::new(
                        embedded.as_deref(),
                        source.as_ref().map(|(_, s)| s.as_str()),
                    ),
                )),
                _ => None,
            };
            Box::new(move |app: &mut App| match source {
                Ok(source) => app.use_template_override(path, source, compiled),
                Err(err) => {
                    app.notices.error(format!(
                        "Cannot read the chat template {}: {}. The model's own template stays in use.",
                        path.as_deref().unwrap_or(Path::new("")).display(),
                        err.reason()
                    ));
                }
            })
        });
    }

    /// Runs `work` on a thread named `name`; what it returns is applied to the app later.
    pub(crate) fn run_task(
        &mut self,
        name: &'static str,
        work: impl FnOnce() -> super::background::Completion<App> + Send + 'static,
    ) {
        if let Err(err) = self.tasks.spawn_as(name, work) {
            self.notices
                .error(format!("Cannot start a background task ({name}): {err}"));
        }
    }

    /// Puts a chat template read by [`App::set_template_override`] in use; `compiled` is the
    /// formatter made for the model loaded at the time (made again if another one is loaded).
    fn use_template_override(
        &mut self,
        path: Option<PathBuf>,
        source: Option<(PathBuf, String)>,
        compiled: Option<(PathBuf, crate::chat::template::PromptFormatter)>,
    ) {
        self.template_override = source;
        self.prefs.template_override = path.clone();
        let id = self.new_request_id();
        self.template_request = Some(id);
        self.backend.send(Command::SetTemplateOverride { id, path });
        if let ModelState::Ready(model) = &mut self.model {
            let formatter = match compiled {
                Some((for_model, formatter)) if for_model == model.info.path => formatter,
                _ => crate::chat::template::PromptFormatter::new(
                    model.info.chat_template.as_deref(),
                    self.template_override.as_ref().map(|(_, s)| s.as_str()),
                ),
            };
            if let Some(reason) = formatter.fallback_reason() {
                self.notices
                    .error(format!("The chat template cannot be used: {reason}"));
            }
            model.counting = std::sync::Arc::new(super::token_meter::CountingModel {
                formatter,
                ..(*model.counting).clone()
            });
            self.meter.reset();
        }
    }

    /// The text of the chat template file in use instead of the model's own, if any.
    pub(crate) fn template_override_source(&self) -> Option<String> {
        self.template_override.as_ref().map(|(_, s)| s.clone())
    }

    // ----- generating -----

    fn send_draft(&mut self) {
        let text = self.composer.draft.trim().to_string();
        if text.is_empty() || self.is_generating() || self.is_opening() {
            return;
        }
        if self.loaded_model().is_none() {
            self.notices
                .error("Load a model first: open a GGUF file with “Open model…” (Ctrl+O).");
            return;
        }
        if let Some(reason) = self.composer.blocked_reason.clone() {
            self.notices.error(reason);
            return;
        }
        if self.current_conversation().is_none() {
            self.new_chat();
        }
        let Some(conversation) = self.current_mut() else {
            return;
        };
        conversation.messages.push(Message::new(Role::User, text));
        conversation.touch();
        self.composer.draft.clear();
        self.composer.revision += 1;
        let id = self.current.clone();
        self.start_generation(&id);
    }

    /// Asks the worker for the next reply of a conversation whose last message is the user's.
    pub(crate) fn start_generation(&mut self, conversation_id: &str) {
        self.request_reply(conversation_id, false);
    }

    /// Asks the worker for a reply: a new one after the user's last message, or (`resume`) more
    /// of the assistant's last message. The reply is marked interrupted until it ends, so a
    /// copy saved while it streams reopens as interrupted if the app dies.
    fn request_reply(&mut self, conversation_id: &str, resume: bool) {
        let request_id = self.next_request_id;
        let Some(conversation) = self.conversation_mut(conversation_id) else {
            return;
        };
        let wanted_last = if resume { Role::Assistant } else { Role::User };
        if conversation.messages.last().map(|m| m.role) != Some(wanted_last) {
            return;
        }
        let request = GenerateRequest {
            id: request_id,
            messages: conversation.messages.clone(),
            settings: conversation.settings.clone(),
            conversation: Some(conversation_id.to_string()),
            resume,
        };
        if !resume {
            conversation
                .messages
                .push(Message::new(Role::Assistant, String::new()));
        }
        let message_index = conversation.messages.len() - 1;
        if let Some(reply) = conversation.messages.last_mut() {
            reply.interrupted = true;
            reply.stats = None;
        }
        conversation.touch();
        self.next_request_id += 1;
        self.backend.send(Command::Generate(request));
        self.generation = Some(Generation {
            id: request_id,
            conversation_id: conversation_id.to_string(),
            message_index,
            phase: Phase::Waiting,
            sent_at: Instant::now(),
            thinking_since: None,
            stopping: false,
            prompt_tokens: None,
            saved_at: Instant::now(),
            unsaved: false,
        });
        self.chat.scroll_to_bottom = true;
        self.save_conversation(conversation_id);
    }

    fn stop(&mut self) {
        if let Some(generation) = &mut self.generation {
            generation.stopping = true;
            self.backend.stop_generation();
        }
    }

    fn regenerate(&mut self) {
        if self.is_generating() {
            return;
        }
        let id = self.current.clone();
        let Some(conversation) = self.current_mut() else {
            return;
        };
        if conversation.messages.last().map(|m| m.role) == Some(Role::Assistant) {
            conversation.messages.pop();
        }
        self.start_generation(&id);
    }

    fn continue_reply(&mut self) {
        if self.is_generating() || self.loaded_model().is_none() {
            return;
        }
        let id = self.current.clone();
        self.request_reply(&id, true);
    }

    fn edit_and_resend(&mut self, index: usize, text: String) {
        let text = text.trim().to_string();
        if self.is_generating() || text.is_empty() || self.loaded_model().is_none() {
            return;
        }
        let id = self.current.clone();
        let Some(conversation) = self.current_mut() else {
            return;
        };
        if conversation.messages.get(index).map(|m| m.role) != Some(Role::User) {
            return;
        }
        conversation.messages.truncate(index);
        conversation.messages.push(Message::new(Role::User, text));
        conversation.touch();
        self.chat.editing = None;
        self.start_generation(&id);
    }

    // ----- the model -----

    pub(crate) fn open_initial_model(&mut self, model: Option<PathBuf>, restore_last: bool) {
        if let Some(path) = model {
            self.load_model(path);
            return;
        }
        if !restore_last {
            return;
        }
        // A missing file is reported by the worker (`WorkerError::ModelMissing`).
        if let Some(last) = self.prefs.last_model.clone() {
            self.load_model(last);
        }
    }

    fn load_model(&mut self, path: PathBuf) {
        if !crate::paths::has_model_extension(&path) {
            self.notices.info(format!(
                "{} does not end in .gguf; trying to open it anyway.",
                file_name(&path)
            ));
        }
        if let Some(generation) = self.generation.take() {
            self.finish_generation_locally(generation);
        }
        let id = self.new_request_id();
        self.backend.send(Command::LoadModel {
            id,
            path: path.clone(),
            options: self.prefs.load_options.clone(),
        });
        self.picker.inspect(path.clone());
        self.model = ModelState::Loading {
            id,
            path,
            fraction: 0.0,
            since: Instant::now(),
            cancelling: false,
        };
        self.meter.reset();
    }

    fn cancel_load(&mut self) {
        if let ModelState::Loading { cancelling, .. } = &mut self.model {
            *cancelling = true;
            self.backend.cancel_load();
        }
    }

    fn unload(&mut self) {
        if let Some(generation) = self.generation.take() {
            self.finish_generation_locally(generation);
        }
        let id = self.new_request_id();
        self.backend.send(Command::Unload { id });
        self.model = ModelState::Empty;
        self.prefs.last_model = None;
        self.meter.reset();
    }

    fn reload(&mut self) {
        let path = match &self.model {
            ModelState::Ready(model) => Some(model.info.path.clone()),
            ModelState::Loading { path, .. } => Some(path.clone()),
            ModelState::Empty => self.prefs.last_model.clone(),
        };
        if let Some(path) = path {
            self.load_model(path);
        }
    }

    /// Ends a reply on the UI side without waiting for the worker (it is being replaced).
    fn finish_generation_locally(&mut self, generation: Generation) {
        self.backend.stop_generation();
        self.end_reply(&generation, None, None);
    }

    /// Stores what a finished (or failed) reply left, and saves the conversation.
    pub(crate) fn end_reply(
        &mut self,
        generation: &Generation,
        stats: Option<crate::chat::conversation::GenerationStats>,
        error: Option<String>,
    ) {
        let id = generation.conversation_id.clone();
        let Some(conversation) = self.conversation_mut(&id) else {
            return;
        };
        let index = generation.message_index;
        let cut_short = error.is_some() || generation.stopping || stats.is_none();
        let empty = match conversation.messages.get_mut(index) {
            Some(message) => {
                if message
                    .thinking
                    .as_deref()
                    .is_some_and(|t| t.trim().is_empty())
                {
                    message.thinking = None;
                }
                // Only a reply that ran to its end (or was stopped) has statistics.
                message.interrupted = stats.is_none();
                message.stats = stats;
                message.content.trim().is_empty() && message.thinking.is_none()
            }
            None => false,
        };
        if empty && cut_short && index < conversation.messages.len() {
            conversation.messages.remove(index);
        }
        conversation.touch();
        if let Some(error) = error {
            self.notices.error(format!("The reply failed: {error}"));
        }
        self.save_conversation(&id);
    }

    // ----- dropped files -----

    pub(crate) fn take_dropped_files(&mut self, ctx: &egui::Context) {
        let dropped: Vec<PathBuf> = ctx.input(|i| {
            i.raw
                .dropped_files
                .iter()
                .map(|f| f.path().to_path_buf())
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        });
        self.open_dropped(dropped);
    }

    /// Loads the first model among dropped files; says so when none is a model.
    pub fn open_dropped(&mut self, dropped: Vec<PathBuf>) {
        if dropped.is_empty() {
            return;
        }
        match dropped
            .iter()
            .find(|p| crate::paths::has_model_extension(p))
        {
            Some(model) => self.load_model(model.clone()),
            None => {
                self.notices.error(format!(
                    "{} is not a model file. Drop a .gguf file to open it.",
                    file_name(&dropped[0])
                ));
            }
        }
    }
}

/// A file's name for messages.
pub(crate) fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// `Title-of-the-chat-<id>.md`, with only safe characters.
fn export_file_name(conversation: &Conversation) -> String {
    let title: String = conversation
        .display_title()
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { '-' })
        .collect();
    let title = title
        .split('-')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    let title: String = title.chars().take(60).collect();
    format!("{title}-{}.md", conversation.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names_are_safe_file_names() {
        let c = Conversation {
            title: "What's 2/3 of ../etc?".into(),
            ..Conversation::default()
        };
        let name = export_file_name(&c);
        assert!(name.starts_with("What-s-2-3-of-etc-"), "{name}");
        assert!(name.ends_with(".md"));
        assert!(!name.contains('/'));
    }
}
