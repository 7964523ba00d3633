//! The application state and the frame loop: drains worker events, applies the user's actions,
//! and lays out the panels (each panel lives in its own file).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use egui_commonmark::CommonMarkCache;

use super::backend::Backend;
use super::background::{BackgroundTasks, Completion};
use super::conversation_list::{ConversationList, ConversationReader};
use super::exit_signal::ExitSignal;
use super::model_panel::ModelPicker;
use super::notices::Notices;
use super::prefs::Preferences;
use super::saver::Saver;
use super::theme::{self, AppliedTheme};
use super::token_meter::{CountingModel, TokenMeter};
use super::{chat_view, composer, model_panel, settings, shortcuts, sidebar, toolbar};
use crate::chat::conversation::{ChatSettings, Conversation};
use crate::chat::lock::{DataLock, LockError};
use crate::chat::store::ConversationStore;
use crate::engine::sampling::model_defaults;
use crate::engine::tokenizer::GgufTokenizer;
use crate::engine::{LoadOptions, ModelInfo};
use crate::worker::WorkerHandle;
use crate::worker::messages::RequestId;

/// Longest wait between a background event (a token, load progress) and the frame that shows
/// it: about 30 frames a second with a GPU.
pub const WAKE_DELAY: Duration = Duration::from_millis(30);

/// The same without a GPU (the window is drawn in software, which costs CPU the model needs):
/// about 10 frames a second, still smooth for streaming text.
pub const SOFTWARE_WAKE_DELAY: Duration = Duration::from_millis(100);

/// How often a reply being written is saved (so a crash or kill loses at most this much, plus
/// one write).
pub const AUTOSAVE_INTERVAL: Duration = Duration::from_secs(1);

/// Longest wait for the disk when the app exits (window close, a termination signal).
pub const EXIT_SAVE_WAIT: Duration = Duration::from_millis(700);

/// How the app starts.
pub struct AppOptions {
    /// Where conversations are kept (see [`crate::paths::data_dir`]).
    pub data_dir: PathBuf,
    /// A model to open right away (from the command line).
    pub model: Option<PathBuf>,
    /// Reload the last model when no `model` is given.
    pub restore_last_model: bool,
    /// Folders searched for model files (`None`: [`crate::paths::model_dirs`]).
    pub model_dirs: Option<Vec<PathBuf>>,
    /// The inference backend (`None`: start the real worker thread).
    pub backend: Option<Box<dyn Backend>>,
    /// Turn a panic while drawing into an error banner (tests turn this off to see panics).
    pub catch_panics: bool,
    /// Save and exit on SIGTERM, SIGINT and SIGHUP (the real app; tests leave signals alone).
    pub handle_signals: bool,
}

impl AppOptions {
    /// Options for a data folder, with everything else at its default.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            model: None,
            restore_last_model: true,
            model_dirs: None,
            backend: None,
            catch_panics: true,
            handle_signals: false,
        }
    }
}

/// A loaded model.
pub struct LoadedModel {
    /// Its description.
    pub info: Box<ModelInfo>,
    /// Its tokenizer.
    pub tokenizer: Arc<GgufTokenizer>,
    /// Seconds the load took.
    pub load_secs: f64,
    /// The options it was loaded with.
    pub options: LoadOptions,
    /// Threads its compute pool really has (`options.threads` with 0 resolved to the cores).
    pub compute_threads: usize,
    pub(crate) counting: Arc<CountingModel>,
}

impl LoadedModel {
    /// Tokens the context holds: the requested length, at most what the model was trained for.
    pub fn context_length(&self) -> usize {
        self.options
            .context_length
            .min(self.info.hparams.context_length)
            .max(1)
    }

    /// The model's name for display.
    pub fn display_name(&self) -> String {
        model_panel::model_display_name(&self.info)
    }
}

/// Where the model stands.
pub enum ModelState {
    /// No model.
    Empty,
    /// A model is loading.
    Loading {
        /// The load request.
        id: RequestId,
        /// The file.
        path: PathBuf,
        /// Progress from 0 to 1.
        fraction: f32,
        /// When loading started.
        since: Instant,
        /// Whether the user asked to cancel.
        cancelling: bool,
    },
    /// A model is ready.
    Ready(Box<LoadedModel>),
}

/// Where the reply being generated stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Sent; the worker has not started yet.
    Waiting,
    /// The worker is reading the prompt.
    Prefill,
    /// The model is thinking.
    Thinking,
    /// The model is writing its answer.
    Answering,
}

/// The reply being generated.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The request id.
    pub id: RequestId,
    /// The conversation it belongs to.
    pub conversation_id: String,
    /// Index of the assistant message being written.
    pub message_index: usize,
    /// Where it stands.
    pub phase: Phase,
    /// When the request was sent.
    pub sent_at: Instant,
    /// When thinking started.
    pub thinking_since: Option<Instant>,
    /// Whether the user pressed Stop.
    pub stopping: bool,
    /// Tokens in the prompt (after Started).
    pub prompt_tokens: Option<usize>,
    /// When the reply was last saved.
    pub saved_at: Instant,
    /// Whether text came in since then.
    pub unsaved: bool,
}

/// What the worker reported when it started the latest request.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptReport {
    /// The request.
    pub id: RequestId,
    /// The exact prompt text.
    pub text: String,
    /// Its tokens.
    pub tokens: usize,
    /// Messages left out to fit.
    pub dropped_messages: usize,
}

/// Which windows are open.
#[derive(Debug, Default, Clone, Copy)]
pub struct OpenWindows {
    /// Settings.
    pub settings: bool,
    /// Keyboard shortcuts.
    pub shortcuts: bool,
    /// The model picker and card.
    pub model: bool,
}

/// The desktop app.
pub struct App {
    pub(crate) backend: Box<dyn Backend>,
    pub(crate) store: ConversationStore,
    pub(crate) saver: Saver,
    pub(crate) data_dir: PathBuf,
    pub(crate) prefs: Preferences,
    applied_theme: Option<AppliedTheme>,
    pub(crate) conversations: ConversationList,
    /// Lists the saved conversations and reads their bodies off the UI thread.
    pub(crate) reader: ConversationReader,
    /// Actions on conversations waiting for their bodies to be read.
    pub(crate) after_read: Vec<super::actions::Action>,
    pub(crate) current: String,
    pub(crate) model: ModelState,
    pub(crate) generation: Option<Generation>,
    pub(crate) next_request_id: RequestId,
    pub(crate) last_prompt: Option<PromptReport>,
    pub(crate) composer: composer::ComposerState,
    pub(crate) notices: Notices,
    pub(crate) meter: TokenMeter,
    pub(crate) picker: ModelPicker,
    pub(crate) sidebar: sidebar::SidebarState,
    pub(crate) chat: chat_view::ChatViewState,
    /// Every conversation deleted this session, with its place in the list, newest last.
    pub(crate) deleted: Vec<(usize, Conversation)>,
    pub(crate) markdown: CommonMarkCache,
    pub(crate) windows: OpenWindows,
    pub(crate) settings_dirty_since: Option<Instant>,
    /// Bumped on every change to any conversation (for caches keyed on content).
    pub(crate) revision: u64,
    /// The chat template file in use instead of the model's own, and its text.
    pub(crate) template_override: Option<(PathBuf, String)>,
    /// The template change the worker has not answered yet.
    pub(crate) template_request: Option<RequestId>,
    /// This copy's hold on the data folder (`None`: another copy holds it, or it failed).
    _data_lock: Option<DataLock>,
    /// Another copy owns the data folder: nothing is written.
    pub(crate) read_only: bool,
    exit_signal: ExitSignal,
    /// Set once everything was saved for exiting.
    shut_down: bool,
    /// Disk and template work running off the UI thread.
    pub(crate) tasks: BackgroundTasks<Completion<App>>,
    catch_panics: bool,
}

impl App {
    /// Creates the app: reads preferences, starts listing the conversations (in the
    /// background), starts the worker (unless a backend is given) and opens the requested or
    /// last model.
    pub fn new(cc: &eframe::CreationContext<'_>, options: AppOptions) -> Self {
        let prefs = Preferences::load(cc.storage);
        let delay = if renders_in_software(cc) {
            log::info!("drawing without a GPU: fewer frames while text streams");
            SOFTWARE_WAKE_DELAY
        } else {
            WAKE_DELAY
        };
        Self::start(cc.egui_ctx.clone(), prefs, delay, options)
    }

    /// The app without a window (the hidden `headless-chat` subcommand): the same state,
    /// worker, events and saving, driven by calling [`App::tick`]; nothing is drawn.
    pub fn headless(options: AppOptions) -> Self {
        Self::start(
            egui::Context::default(),
            Preferences::default(),
            WAKE_DELAY,
            options,
        )
    }

    fn start(ctx: egui::Context, prefs: Preferences, delay: Duration, options: AppOptions) -> Self {
        let signal_ctx = ctx.clone();
        let wake: Arc<dyn Fn() + Send + Sync> = Arc::new(move || ctx.request_repaint_after(delay));
        let backend = options.backend.unwrap_or_else(|| {
            let wake = wake.clone();
            Box::new(WorkerHandle::spawn(Arc::new(move || wake())))
        });
        let store = ConversationStore::new(crate::paths::conversations_dir(&options.data_dir));
        let (data_lock, lock_problem) = match DataLock::acquire(&options.data_dir) {
            Ok(lock) => (Some(lock), None),
            Err(err) => (None, Some(err)),
        };
        let read_only = matches!(lock_problem, Some(LockError::Held(_)));
        let exit_signal = if options.handle_signals {
            ExitSignal::install(Arc::new(move || signal_ctx.request_repaint())).unwrap_or_else(
                |err| {
                    log::error!("cannot listen for termination signals: {err}");
                    ExitSignal::default()
                },
            )
        } else {
            ExitSignal::default()
        };
        let model_dirs = match options.model_dirs {
            Some(dirs) => model_panel::ModelDirs::Given(dirs),
            None => model_panel::ModelDirs::Default(options.data_dir.clone()),
        };
        let mut app = Self {
            backend,
            saver: Saver::new(store.clone(), wake.clone()),
            reader: ConversationReader::new(store.clone(), !read_only, wake.clone()),
            after_read: Vec::new(),
            store,
            data_dir: options.data_dir,
            applied_theme: None,
            conversations: ConversationList::default(),
            current: String::new(),
            model: ModelState::Empty,
            generation: None,
            next_request_id: 1,
            last_prompt: None,
            composer: composer::ComposerState::default(),
            notices: Notices::default(),
            meter: TokenMeter::new(wake.clone()),
            tasks: BackgroundTasks::new("smoldesk-task", wake.clone()),
            picker: ModelPicker::new(model_dirs, wake),
            sidebar: sidebar::SidebarState::default(),
            chat: chat_view::ChatViewState::default(),
            deleted: Vec::new(),
            markdown: CommonMarkCache::default(),
            windows: OpenWindows::default(),
            settings_dirty_since: None,
            revision: 0,
            template_override: None,
            template_request: None,
            _data_lock: data_lock,
            read_only,
            exit_signal,
            shut_down: false,
            catch_panics: options.catch_panics,
            prefs,
        };
        app.report_data_lock(lock_problem);
        if !app.read_only {
            app.saver.remove_stale_temps();
        }
        app.reader.list();
        if let Some(path) = app.prefs.template_override.clone() {
            app.set_template_override(Some(path));
        }
        app.open_initial_model(options.model, options.restore_last_model);
        app
    }

    // ----- read access (also for tests) -----

    /// The user's preferences.
    pub fn preferences(&self) -> &Preferences {
        &self.prefs
    }

    /// The conversation list (bodies are read when a conversation is opened).
    pub fn conversations(&self) -> &ConversationList {
        &self.conversations
    }

    /// Whether the model folders are being listed (in the background).
    pub fn is_scanning_models(&self) -> bool {
        self.picker.scanning()
    }

    /// The open conversation (`None` while it is being read).
    pub fn current_conversation(&self) -> Option<&Conversation> {
        self.conversations.get(&self.current)
    }

    /// The counts of conversation files parsed so far, per kind and thread.
    pub fn store_reads(&self) -> crate::chat::store::ReadCounts {
        self.store.read_counts()
    }

    /// The open conversation, for changes outside the panels (tests, scripts).
    pub fn current_conversation_mut(&mut self) -> Option<&mut Conversation> {
        self.current_mut()
    }

    /// The model's state.
    pub fn model_state(&self) -> &ModelState {
        &self.model
    }

    /// The loaded model, if any.
    pub fn loaded_model(&self) -> Option<&LoadedModel> {
        match &self.model {
            ModelState::Ready(model) => Some(model),
            _ => None,
        }
    }

    /// The reply being generated, if any.
    pub fn generation(&self) -> Option<&Generation> {
        self.generation.as_ref()
    }

    /// What the worker said about the latest prompt it started.
    pub fn last_prompt(&self) -> Option<&PromptReport> {
        self.last_prompt.as_ref()
    }

    /// The texts of the banners shown.
    pub fn notice_texts(&self) -> Vec<String> {
        self.notices
            .items()
            .iter()
            .map(|n| n.text.clone())
            .collect()
    }

    /// The draft message.
    pub fn draft(&self) -> &str {
        &self.composer.draft
    }

    /// Replaces the draft message (as if the user had typed it).
    pub fn set_draft(&mut self, text: &str) {
        self.composer.draft = text.to_string();
        self.composer.revision += 1;
    }

    /// The data folder.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// Whether another running copy owns the data folder, so this one saves nothing.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Conversations deleted this session that Undo can still bring back, newest last.
    pub fn deleted_conversations(&self) -> impl Iterator<Item = &Conversation> {
        self.deleted.iter().map(|(_, c)| c)
    }

    // ----- the frame's background work and exiting -----

    /// Applies what came from the worker and the background tasks, saves a reply being written
    /// when it is due, and on a termination signal saves everything. Called every frame (the
    /// headless app calls it in a loop). Returns true when the app should exit now.
    pub fn tick(&mut self) -> bool {
        let now = Instant::now();
        self.drain_events();
        self.poll_background();
        self.autosave_reply(now);
        self.flush_settings(now);
        if self.exit_signal.requested() && !self.shut_down {
            self.shutdown();
            return true;
        }
        false
    }

    /// Saves everything now (a reply being written is kept and marked interrupted) and tells
    /// the worker to stop, without waiting for it; waits at most [`EXIT_SAVE_WAIT`] for the
    /// disk. For window close, app exit and termination signals; later calls do nothing.
    pub fn shutdown(&mut self) {
        if self.shut_down {
            return;
        }
        self.shut_down = true;
        self.backend.stop_generation();
        self.backend.cancel_load();
        self.settings_dirty_since = None;
        if let Some(generation) = self.generation.take() {
            self.save_conversation(&generation.conversation_id);
        }
        let id = self.current.clone();
        self.save_conversation(&id);
        if !self.saver.flush(EXIT_SAVE_WAIT) {
            log::error!("the conversations could not all be written before exiting");
        }
    }

    /// Whether [`App::shutdown`] ran.
    pub fn has_shut_down(&self) -> bool {
        self.shut_down
    }

    fn autosave_reply(&mut self, now: Instant) {
        let Some(generation) = self.generation.as_mut() else {
            return;
        };
        if !generation.unsaved || now.duration_since(generation.saved_at) < AUTOSAVE_INTERVAL {
            return;
        }
        generation.unsaved = false;
        generation.saved_at = now;
        let id = generation.conversation_id.clone();
        self.save_conversation(&id);
    }

    fn report_data_lock(&mut self, problem: Option<LockError>) {
        match problem {
            None => {}
            Some(LockError::Held(dir)) => {
                self.notices.error(format!(
                    "Another copy of SmolDesk is already running with the data folder {}. This \
                     window is read-only: nothing you change here is saved. Close the other copy \
                     and start SmolDesk again to save.",
                    dir.display()
                ));
            }
            Some(err) => {
                self.notices.error(format!(
                    "{err}. SmolDesk cannot make sure no other copy writes the same \
                     conversations."
                ));
            }
        }
    }

    // ----- helpers shared by the panels -----

    pub(crate) fn current_mut(&mut self) -> Option<&mut Conversation> {
        self.conversations.get_mut(&self.current)
    }

    pub(crate) fn conversation_mut(&mut self, id: &str) -> Option<&mut Conversation> {
        self.conversations.get_mut(id)
    }

    pub(crate) fn is_generating(&self) -> bool {
        self.generation.is_some()
    }

    /// Settings for a new conversation.
    pub(crate) fn new_chat_settings(&self) -> ChatSettings {
        let mut settings = ChatSettings {
            thinking: self.prefs.think_by_default,
            ..ChatSettings::default()
        };
        if let Some(model) = self.loaded_model() {
            settings.thinking &= model.info.can_think;
            settings.sampling = model_defaults(model.info.architecture);
        }
        settings
    }

    /// Saves a conversation in the background (only once it has messages; never in a
    /// read-only copy).
    pub(crate) fn save_conversation(&mut self, id: &str) {
        self.revision += 1;
        if self.read_only {
            return;
        }
        if let Some(conversation) = self.conversations.get(id)
            && !conversation.messages.is_empty()
        {
            self.saver.save(conversation);
        }
    }

    /// Notes that the open conversation's settings changed; they are saved shortly.
    pub(crate) fn settings_changed(&mut self) {
        self.revision += 1;
        self.settings_dirty_since.get_or_insert_with(Instant::now);
    }

    fn flush_settings(&mut self, now: Instant) {
        if let Some(since) = self.settings_dirty_since
            && now.duration_since(since) >= Duration::from_millis(500)
        {
            self.settings_dirty_since = None;
            let id = self.current.clone();
            if let Some(c) = self.current_mut() {
                c.touch();
            }
            self.save_conversation(&id);
        }
    }

    fn apply_theme(&mut self, ctx: &egui::Context) {
        let wanted = AppliedTheme {
            choice: self.prefs.theme,
            font_size: self.prefs.font_size,
        };
        if self.applied_theme != Some(wanted) {
            theme::apply(ctx, wanted);
            self.applied_theme = Some(wanted);
        }
    }

    pub(crate) fn new_request_id(&mut self) -> RequestId {
        let id = self.next_request_id;
        self.next_request_id += 1;
        id
    }

    fn poll_background(&mut self) {
        for error in self.saver.take_errors() {
            self.notices.error(format!(
                "Could not save the conversation: {error}. Your messages are still here; \
                 SmolDesk will try again after the next message."
            ));
        }
        for done in self.tasks.poll() {
            match done.outcome {
                Ok(finish) => finish(self),
                Err(panic) => {
                    self.notices.error(panic.to_string());
                }
            }
        }
        self.apply_reads();
        let picked = self.picker.poll();
        for action in picked {
            self.apply(action);
        }
    }

    fn draw(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        egui::Panel::top("toolbar")
            .frame(toolbar::frame(ui.style()))
            .show(ui, |ui| toolbar::show(self, ui));
        if self.prefs.sidebar_open {
            egui::Panel::left("sidebar")
                .resizable(true)
                .default_size(260.0)
                .size_range(180.0..=480.0)
                .frame(sidebar::frame(ui.style()))
                .show(ui, |ui| sidebar::show(self, ui));
        }
        if chat_view::shows_composer(self) {
            egui::Panel::bottom("composer")
                .frame(composer::frame(ui.style()))
                .show(ui, |ui| composer::show(self, ui));
        }
        egui::CentralPanel::default()
            .frame(egui::Frame::central_panel(ui.style()).inner_margin(0))
            .show(ui, |ui| chat_view::show_central(self, ui));
        settings::show_window(self, &ctx);
        model_panel::show_window(self, &ctx);
        shortcuts::show_help(&ctx, &mut self.windows.shortcuts);
        model_panel::show_drop_overlay(&ctx);
    }

    fn schedule_repaint(&mut self, ctx: &egui::Context, now: Instant) {
        let mut wait = self.notices.expire(now);
        if self.settings_dirty_since.is_some() {
            wait = Some(wait.map_or(Duration::from_millis(500), |w| {
                w.min(Duration::from_millis(500))
            }));
        }
        if let Some(wait) = wait {
            ctx.request_repaint_after(wait);
        }
    }
}

impl eframe::App for App {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        if self.tick() {
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
        }
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let ctx = ui.ctx().clone();
        let now = Instant::now();
        self.apply_theme(&ctx);
        for action in shortcuts::take_actions(&ctx, self.is_generating()) {
            self.apply_shortcut(action);
        }
        self.take_dropped_files(&ctx);
        if !self.catch_panics {
            self.draw(ui);
        } else if let Err(panic) =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.draw(ui)))
        {
            self.notices.error(format!(
                "Something went wrong while drawing the window ({}). SmolDesk recovered; if it \
                 keeps happening, please report it.",
                panic_message(panic.as_ref())
            ));
        }
        self.schedule_repaint(&ctx, now);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        if !self.current.is_empty() {
            self.prefs.last_conversation = Some(self.current.clone());
        }
        self.prefs.store(storage);
    }

    fn on_exit(&mut self) {
        self.shutdown();
    }
}

impl Drop for App {
    /// However the app ends, what it holds is saved first.
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Whether the window is drawn by a software rasterizer (e.g. llvmpipe) rather than a GPU.
fn renders_in_software(cc: &eframe::CreationContext<'_>) -> bool {
    cc.wgpu_render_state
        .as_ref()
        .is_some_and(|state| state.adapter.get_info().device_type == eframe::wgpu::DeviceType::Cpu)
}

pub(crate) use crate::worker::thread::panic_message;
