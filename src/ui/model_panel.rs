//! Choosing a model: the file dialog (off the UI thread), a path field, models found on disk,
//! recent models, drag and drop, the model card (read from the header off the UI thread), and
//! the load progress with Cancel.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use egui::{RichText, Ui};

use super::actions::{Action, file_name};
use super::app::{App, ModelState};
use super::background::{BackgroundTasks, TaskDone, TaskId};
use super::theme;
use crate::engine::ModelInfo;
use crate::engine::gguf::GgufFile;

/// A file dialog that answers faster than this most likely could not open at all.
const DIALOG_UNAVAILABLE_BELOW: Duration = Duration::from_millis(400);

/// What is known about the model whose card is shown.
#[derive(Debug, Clone)]
pub enum Card {
    /// Reading the header.
    Reading(PathBuf),
    /// The header was read.
    Ready(Box<ModelInfo>),
    /// The file is not a usable model.
    Failed {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

impl Card {
    /// The file the card is about.
    pub fn path(&self) -> &Path {
        match self {
            Card::Reading(path) | Card::Failed { path, .. } => path,
            Card::Ready(info) => &info.path,
        }
    }
}

type CardResult = Result<Box<ModelInfo>, String>;

/// Where to look for models: these folders, or the default ones of a data folder
/// ([`crate::paths::model_dirs`], which resolves links and so touches the disk).
#[derive(Debug, Clone)]
pub enum ModelDirs {
    /// Exactly these folders.
    Given(Vec<PathBuf>),
    /// The default folders for this data folder.
    Default(PathBuf),
}

impl ModelDirs {
    fn resolve(self) -> Vec<PathBuf> {
        match self {
            ModelDirs::Given(dirs) => dirs,
            ModelDirs::Default(data_dir) => crate::paths::model_dirs(&data_dir),
        }
    }
}

/// What a background look at the disk found: the model folders and the models in them (when
/// it was a rescan), and file sizes (`None`: the file is missing).
#[derive(Debug, Default)]
struct DiskLook {
    listing: Option<(Vec<PathBuf>, Vec<PathBuf>)>,
    sizes: Vec<(PathBuf, Option<u64>)>,
}

/// The size of a model file, `None` when it is not there.
fn file_size(path: &Path) -> Option<u64> {
    std::fs::metadata(path)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len())
}

/// State of the model chooser.
pub struct ModelPicker {
    /// The path typed by the user.
    pub path_input: String,
    /// Models found in the model folders.
    pub found: Vec<PathBuf>,
    /// File sizes of listed models, read in the background (`None`: missing).
    sizes: std::collections::HashMap<PathBuf, Option<u64>>,
    /// Files whose size was asked for and is not being read yet.
    sizes_wanted: Vec<PathBuf>,
    /// Where models are looked for (resolved in the background on the first scan).
    dirs: ModelDirs,
    /// Reads of the model folders and file sizes; the rescan in flight, if any.
    disk: BackgroundTasks<DiskLook>,
    scan_task: Option<TaskId>,
    sizes_task: Option<TaskId>,
    /// The card being shown.
    pub card: Option<Card>,
    /// Readers of model headers, and the one whose card is wanted.
    card_readers: BackgroundTasks<CardResult>,
    card_task: Option<TaskId>,
    /// The file dialog, and when the open one was opened.
    dialogs: BackgroundTasks<Option<PathBuf>>,
    dialog: Option<(Instant, TaskId)>,
    /// Set when the system file dialog seems unavailable (e.g. no desktop portal).
    pub dialog_unavailable: bool,
}

impl ModelPicker {
    /// A chooser looking for models in `dirs` (listed in the background).
    pub fn new(dirs: ModelDirs, wake: Arc<dyn Fn() + Send + Sync>) -> Self {
        let mut picker = Self {
            path_input: String::new(),
            found: Vec::new(),
            sizes: std::collections::HashMap::new(),
            sizes_wanted: Vec::new(),
            dirs,
            disk: BackgroundTasks::new("smoldesk-model-scan", wake.clone()),
            scan_task: None,
            sizes_task: None,
            card: None,
            card_readers: BackgroundTasks::new("smoldesk-model-card", wake.clone()),
            card_task: None,
            dialogs: BackgroundTasks::new("smoldesk-file-dialog", wake),
            dialog: None,
            dialog_unavailable: false,
        };
        picker.rescan();
        picker
    }

    /// Lists the model folders again, in the background (with the sizes of what it finds).
    pub fn rescan(&mut self) {
        if self.scan_task.is_some() {
            return;
        }
        let dirs = self.dirs.clone();
        let spawned = self.disk.spawn(move || {
            let dirs = dirs.resolve();
            let found = crate::paths::find_model_files(&dirs);
            let sizes = found.iter().map(|p| (p.clone(), file_size(p))).collect();
            DiskLook {
                listing: Some((dirs, found)),
                sizes,
            }
        });
        match spawned {
            Ok(task) => self.scan_task = Some(task),
            Err(err) => log::error!("cannot start looking for models: {err}"),
        }
    }

    /// Whether the model folders are being listed.
    pub fn scanning(&self) -> bool {
        self.scan_task.is_some()
    }

    /// A model's size in bytes: `Some(None)` when the file is gone, `None` while it is being
    /// read (drawing never touches the disk; the size is read in the background).
    pub fn size_of(&mut self, path: &Path) -> Option<Option<u64>> {
        let size = self.sizes.get(path).copied();
        if size.is_none() && !self.sizes_wanted.iter().any(|p| p == path) {
            self.sizes_wanted.push(path.to_path_buf());
        }
        size
    }

    /// The folders searched for models (once the first scan resolved them).
    pub fn model_dirs(&self) -> &[PathBuf] {
        match &self.dirs {
            ModelDirs::Given(dirs) => dirs,
            ModelDirs::Default(_) => &[],
        }
    }

    /// Reads a model's header on a background thread and shows its card.
    pub fn inspect(&mut self, path: PathBuf) {
        if self.card.as_ref().is_some_and(|c| c.path() == path) {
            return;
        }
        self.card = Some(Card::Reading(path.clone()));
        match self.card_readers.spawn(move || read_card(&path)) {
            Ok(task) => self.card_task = Some(task),
            Err(err) => log::error!("cannot start reading the model card: {err}"),
        }
    }

    /// Opens the system's file dialog on a background thread.
    pub fn open_file_dialog(&mut self) {
        if self.dialog.is_some() {
            return;
        }
        let dirs = self.model_dirs().to_vec();
        let spawned = self.dialogs.spawn(move || {
            let start_dir = dirs.into_iter().find(|d| d.is_dir());
            let mut dialog = rfd::FileDialog::new()
                .set_title("Open a model")
                .add_filter("GGUF model", &["gguf"])
                .add_filter("All files", &["*"]);
            if let Some(dir) = start_dir {
                dialog = dialog.set_directory(dir);
            }
            dialog.pick_file()
        });
        match spawned {
            Ok(task) => self.dialog = Some((Instant::now(), task)),
            Err(err) => {
                log::error!("cannot start the file dialog: {err}");
                self.dialog_unavailable = true;
            }
        }
    }

    /// Whether the file dialog is open.
    pub fn dialog_open(&self) -> bool {
        self.dialog.is_some()
    }

    /// Collects finished background work; returns the actions it leads to.
    pub fn poll(&mut self) -> Vec<Action> {
        self.poll_disk();
        for TaskDone { id, outcome } in self.card_readers.poll() {
            if self.card_task != Some(id) {
                continue;
            }
            self.card_task = None;
            let Some(path) = self.card.as_ref().map(|c| c.path().to_path_buf()) else {
                continue;
            };
            self.card = Some(match outcome {
                Ok(Ok(info)) => Card::Ready(info),
                Ok(Err(message)) => Card::Failed { path, message },
                Err(_panic) => Card::Failed {
                    path,
                    message: "the file could not be read".to_string(),
                },
            });
        }
        let mut actions = Vec::new();
        for TaskDone { id, outcome } in self.dialogs.poll() {
            let Some((opened, _)) = self.dialog.take_if(|(_, task)| *task == id) else {
                continue;
            };
            match outcome {
                Ok(Some(path)) => actions.push(Action::Load(path)),
                Ok(None) => self.dialog_unavailable = opened.elapsed() < DIALOG_UNAVAILABLE_BELOW,
                Err(_panic) => self.dialog_unavailable = true,
            }
        }
        actions
    }
}

impl ModelPicker {
    /// Takes in listings and sizes read in the background, and starts reading the sizes
    /// asked for since.
    fn poll_disk(&mut self) {
        for TaskDone { id, outcome } in self.disk.poll() {
            if self.scan_task == Some(id) {
                self.scan_task = None;
            }
            if self.sizes_task == Some(id) {
                self.sizes_task = None;
            }
            let Ok(look) = outcome else {
                continue;
            };
            if let Some((dirs, found)) = look.listing {
                self.dirs = ModelDirs::Given(dirs);
                self.found = found;
                self.sizes.clear();
            }
            self.sizes.extend(look.sizes);
        }
        if self.sizes_task.is_none() && !self.sizes_wanted.is_empty() {
            let wanted = std::mem::take(&mut self.sizes_wanted);
            let spawned = self.disk.spawn(move || DiskLook {
                listing: None,
                sizes: wanted
                    .into_iter()
                    .map(|p| {
                        let size = file_size(&p);
                        (p, size)
                    })
                    .collect(),
            });
            match spawned {
                Ok(task) => self.sizes_task = Some(task),
                Err(err) => log::error!("cannot start reading model sizes: {err}"),
            }
        }
    }
}

/// Reads the header of a model file and describes it.
fn read_card(path: &Path) -> Result<Box<ModelInfo>, String> {
    let gguf = GgufFile::open(path).map_err(|e| e.to_string())?;
    ModelInfo::from_gguf(&gguf)
        .map(Box::new)
        .map_err(|e| e.to_string())
}

// ----- drawing -----

/// The start screen: shown while no model is loaded and the conversation is empty.
pub fn show_welcome(app: &mut App, ui: &mut Ui) {
    egui::ScrollArea::vertical()
        .id_salt("welcome-scroll")
        .auto_shrink(false)
        .show(ui, |ui| {
            ui.vertical_centered(|ui| {
                ui.set_max_width(theme::READING_WIDTH.min(640.0));
                ui.add_space(36.0);
                ui.label(
                    RichText::new("SmolDesk")
                        .size(ui.text_style_height(&egui::TextStyle::Heading) * 1.5)
                        .strong(),
                );
                ui.label(
                    RichText::new("Chat with SmolLM3 privately — it runs on your own computer.")
                        .color(theme::muted_text_color(ui.visuals())),
                );
                ui.add_space(20.0);
            });
            ui.vertical_centered(|ui| {
                ui.set_max_width(theme::READING_WIDTH.min(640.0));
                egui::Frame::group(ui.style())
                    .inner_margin(16)
                    .corner_radius(10)
                    .show(ui, |ui| {
                        ui.set_width(ui.available_width());
                        ui.with_layout(egui::Layout::top_down(egui::Align::Min), |ui| {
                            picker_contents(app, ui);
                        });
                    });
            });
        });
}

/// The "Model" window: the loaded model's card, reload/unload, and the chooser.
pub fn show_window(app: &mut App, ctx: &egui::Context) {
    let mut open = app.windows.model;
    let screen = ctx.content_rect();
    egui::Window::new("Model")
        .open(&mut open)
        .default_width(540.0)
        .default_pos(egui::pos2(screen.left() + 120.0, screen.top() + 48.0))
        .collapsible(false)
        .resizable(false)
        .show(ctx, |ui| {
            egui::ScrollArea::vertical()
                .max_height(screen.height() - 140.0)
                .auto_shrink([false, true])
                .show(ui, |ui| {
                if let ModelState::Ready(model) = &app.model {
                    ui.heading(model.display_name());
                    let context = model.context_length();
                    let (load_secs, threads) = (model.load_secs, model.compute_threads);
                    model_card(ui, &model.info, context);
                    let plural = if threads == 1 { "" } else { "s" };
                    ui.label(
                        RichText::new(format!("Loaded in {load_secs:.1} s · computing on {threads} thread{plural}"))
                            .color(theme::muted_text_color(ui.visuals())),
                    );
                    let mut actions = Vec::new();
                    ui.horizontal(|ui| {
                        if ui.button("Reload").on_hover_text("Load the model again, applying the context length and thread settings").clicked() {
                            actions.push(Action::Reload);
                        }
                        if ui.button("Unload").on_hover_text("Free the memory the model uses").clicked() {
                            actions.push(Action::Unload);
                        }
                    });
                    for action in actions {
                        app.apply(action);
                    }
                    ui.separator();
                    ui.label(RichText::new("Open another model").strong());
                }
                picker_contents(app, ui);
            });
        });
    app.windows.model = open && app.windows.model;
}

/// The chooser: open button, path field, found and recent models, the card, load progress.
pub fn picker_contents(app: &mut App, ui: &mut Ui) {
    let mut actions = Vec::new();
    if load_progress(app, ui, &mut actions) {
        ui.add_space(8.0);
    }
    ui.horizontal(|ui| {
        let open = ui.add_enabled(
            !app.picker.dialog_open(),
            egui::Button::new("Open model…")
                .shortcut_text(ui.ctx().format_shortcut(&super::shortcuts::OPEN_MODEL)),
        );
        if open.clicked() {
            actions.push(Action::OpenFileDialog);
        }
        if app.picker.dialog_open() {
            super::widgets::spinner(ui);
            ui.label("Waiting for the file dialog…");
        }
    });
    if app.picker.dialog_unavailable {
        ui.label(
            RichText::new("No file dialog is available here. Type the model's path below or drop the file onto this window.")
                .color(theme::warn_color(ui.visuals())),
        );
    }
    ui.add_space(4.0);
    path_field(app, ui, &mut actions);
    ui.add_space(8.0);
    let found = app.picker.found.clone();
    model_list(
        ui,
        &mut app.picker,
        "Models found",
        &found,
        "found",
        &mut actions,
    );
    if app.picker.scanning() {
        ui.label(
            RichText::new("Looking for models…")
                .small()
                .color(theme::muted_text_color(ui.visuals())),
        );
    } else if app.picker.found.is_empty() {
        let dirs: Vec<String> = app
            .picker
            .model_dirs()
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        ui.label(
            RichText::new(format!(
                "No .gguf files in {}. Put SmolLM3-3B-Q4_K_M.gguf there, or open it from anywhere.",
                dirs.join(", ")
            ))
            .small()
            .color(theme::muted_text_color(ui.visuals())),
        );
    }
    if ui.small_button("Refresh list").clicked() {
        app.picker.rescan();
    }
    let recent: Vec<PathBuf> = app
        .prefs
        .recent_models
        .iter()
        .filter(|p| !app.picker.found.contains(p))
        .cloned()
        .collect();
    ui.add_space(6.0);
    model_list(
        ui,
        &mut app.picker,
        "Recent",
        &recent,
        "recent",
        &mut actions,
    );
    if let Some(card) = app.picker.card.clone() {
        ui.add_space(8.0);
        card_section(app, ui, &card, &mut actions);
    }
    for action in actions {
        app.apply(action);
    }
}

/// Shows the load progress bar; returns whether a load is in progress.
fn load_progress(app: &App, ui: &mut Ui, actions: &mut Vec<Action>) -> bool {
    let ModelState::Loading {
        path,
        fraction,
        since,
        cancelling,
        ..
    } = &app.model
    else {
        return false;
    };
    ui.label(RichText::new(format!("Loading {}…", file_name(path))).strong());
    ui.horizontal(|ui| {
        let secs = since.elapsed().as_secs();
        ui.add(
            egui::ProgressBar::new(*fraction)
                .desired_width((ui.available_width() - 90.0).max(120.0))
                .text(format!("{:.0} % · {secs} s", fraction * 100.0)),
        );
        let label = if *cancelling {
            "Cancelling…"
        } else {
            "Cancel loading"
        };
        let cancel = ui.add_enabled(!cancelling, egui::Button::new(label));
        if cancel.clicked() {
            actions.push(Action::CancelLoad);
        }
    });
    ui.ctx().request_repaint_after(Duration::from_millis(250));
    true
}

fn path_field(app: &mut App, ui: &mut Ui, actions: &mut Vec<Action>) {
    ui.horizontal(|ui| {
        let label = ui.label("Path:");
        let field = ui.add(
            egui::TextEdit::singleline(&mut app.picker.path_input)
                .hint_text("/path/to/SmolLM3-3B-Q4_K_M.gguf")
                .desired_width((ui.available_width() - 70.0).max(120.0)),
        );
        let field = field.labelled_by(label.id);
        let entered = field.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        let path = PathBuf::from(expand_home(app.picker.path_input.trim()));
        let has_text = !app.picker.path_input.trim().is_empty();
        let load = ui
            .add_enabled(has_text, egui::Button::new("Open"))
            .on_hover_text("Load the model at this path");
        if has_text && (load.clicked() || entered) {
            actions.push(Action::Load(path));
        }
    });
}

/// A list of model files, each with its name, folder, size and a Load button.
fn model_list(
    ui: &mut Ui,
    picker: &mut ModelPicker,
    title: &str,
    paths: &[PathBuf],
    salt: &str,
    actions: &mut Vec<Action>,
) {
    if paths.is_empty() {
        return;
    }
    ui.label(RichText::new(title).strong());
    for path in paths {
        ui.push_id((salt, path), |ui| {
            ui.horizontal(|ui| {
                let name = file_name(path);
                let size = picker.size_of(path);
                let exists = size != Some(None);
                let size = match size {
                    None => {
                        ui.ctx().request_repaint();
                        "…".to_string()
                    }
                    Some(None) => "missing".to_string(),
                    Some(Some(bytes)) => format_bytes(bytes),
                };
                if ui
                    .add_enabled(exists, egui::Button::new("Load"))
                    .on_hover_text(format!("Load {name}"))
                    .clicked()
                {
                    actions.push(Action::Load(path.clone()));
                }
                let details = ui
                    .add(egui::Button::new(RichText::new(&name).strong()).frame(false))
                    .on_hover_text(format!("{}\nClick for details", path.display()));
                if details.clicked() {
                    actions.push(Action::Inspect(path.clone()));
                }
                ui.label(
                    RichText::new(size)
                        .small()
                        .color(theme::muted_text_color(ui.visuals())),
                );
            });
        });
    }
}

fn card_section(app: &App, ui: &mut Ui, card: &Card, actions: &mut Vec<Action>) {
    let loaded_path = app.loaded_model().map(|m| m.info.path.clone());
    if loaded_path.as_deref() == Some(card.path()) {
        return;
    }
    egui::Frame::new()
        .fill(ui.visuals().faint_bg_color)
        .stroke(ui.visuals().widgets.noninteractive.bg_stroke)
        .corner_radius(8)
        .inner_margin(12)
        .show(ui, |ui| {
            ui.set_width(ui.available_width());
            match card {
                Card::Reading(path) => {
                    ui.horizontal(|ui| {
                        super::widgets::spinner(ui);
                        ui.label(format!("Reading {}…", file_name(path)));
                    });
                }
                Card::Failed { path, message } => {
                    ui.label(RichText::new(file_name(path)).strong());
                    ui.label(
                        RichText::new(format!("This file cannot be used: {message}"))
                            .color(theme::error_color(ui.visuals())),
                    );
                }
                Card::Ready(info) => {
                    ui.label(RichText::new(model_display_name(info)).strong());
                    let context = app
                        .prefs
                        .load_options
                        .context_length
                        .min(info.hparams.context_length);
                    model_card(ui, info, context);
                    let loading = matches!(app.model, ModelState::Loading { .. });
                    if ui
                        .add_enabled(
                            !loading,
                            egui::Button::new(format!("Load {}", file_name(&info.path))),
                        )
                        .clicked()
                    {
                        actions.push(Action::Load(info.path.clone()));
                    }
                }
            }
        });
}

/// The model's facts as a two-column grid.
pub fn model_card(ui: &mut Ui, info: &ModelInfo, context: usize) {
    let muted = theme::muted_text_color(ui.visuals());
    egui::Grid::new(("model-card", &info.path))
        .num_columns(2)
        .spacing([16.0, 4.0])
        .show(ui, |ui| {
            let row = |ui: &mut Ui, key: &str, value: String| {
                ui.label(RichText::new(key).color(muted));
                ui.label(value);
                ui.end_row();
            };
            row(ui, "Architecture", architecture_name(info).to_string());
            row(ui, "Parameters", format_params(info.n_params));
            row(ui, "Quantization", quantization_summary(info));
            row(
                ui,
                "Context",
                format!(
                    "{} tokens trained · {} in use",
                    format_count(info.hparams.context_length),
                    format_count(context)
                ),
            );
            row(ui, "File size", format_bytes(info.file_size));
            row(
                ui,
                "Memory needed",
                format!(
                    "about {} at {} tokens",
                    format_bytes(info.ram_estimate_bytes(context)),
                    format_count(context)
                ),
            );
            row(
                ui,
                "Thinking",
                if info.can_think {
                    "Yes — can reason before answering".to_string()
                } else {
                    "No".to_string()
                },
            );
            row(
                ui,
                "Chat template",
                if info.chat_template.is_some() {
                    "Embedded".to_string()
                } else {
                    "None (ChatML is used)".to_string()
                },
            );
        });
}

/// Shows a hint over the whole window while files are dragged over it.
pub fn show_drop_overlay(ctx: &egui::Context) {
    let hovered = ctx.input(|i| i.raw.hovered_files.clone());
    if hovered.is_empty() {
        return;
    }
    let is_model = hovered.iter().any(|f| {
        f.path
            .as_deref()
            .is_some_and(crate::paths::has_model_extension)
    });
    let text = if is_model {
        "Drop to open this model"
    } else {
        "Only .gguf model files can be opened"
    };
    let painter = ctx.layer_painter(egui::LayerId::new(
        egui::Order::Foreground,
        egui::Id::unique("drop-overlay"),
    ));
    let rect = ctx.content_rect();
    painter.rect_filled(rect, 0.0, egui::Color32::from_black_alpha(170));
    painter.text(
        rect.center(),
        egui::Align2::CENTER_CENTER,
        text,
        egui::FontId::proportional(24.0),
        egui::Color32::WHITE,
    );
}

// ----- formatting -----

/// The model's name: `general.name`, else the file name without extension.
pub fn model_display_name(info: &ModelInfo) -> String {
    info.name
        .clone()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| {
            info.path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "Model".to_string())
        })
}

fn architecture_name(info: &ModelInfo) -> &'static str {
    match info.architecture {
        crate::engine::Architecture::SmolLm3 => "SmolLM3",
        crate::engine::Architecture::Llama => "Llama",
    }
}

/// "Q4_K_M: Q4_K (217 tensors), Q6_K (37), F32 (73)": the file's recipe where it names one, then
/// the tensor types, main type first.
pub fn quantization_summary(info: &ModelInfo) -> String {
    let mut types: Vec<(&String, &usize)> = info.tensor_types.iter().collect();
    types.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    if types.is_empty() {
        return "no weights (vocabulary only)".to_string();
    }
    let recipe = info
        .file_type
        .as_deref()
        .map(|name| format!("{name}: "))
        .unwrap_or_default();
    let parts: Vec<String> = types
        .iter()
        .enumerate()
        .map(|(i, (name, count))| {
            if i == 0 {
                format!("{name} ({count} tensors)")
            } else {
                format!("{name} ({count})")
            }
        })
        .collect();
    format!("{recipe}{}", parts.join(", "))
}

/// Bytes as "1.9 GB", "512 MB", "3 KB".
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 || value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A parameter count as "3.08 B" or "135 M".
pub fn format_params(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.0} M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.0} K", n / 1e3)
    } else {
        format!("{n}")
    }
}

/// A count with thousands separators: 65536 → "65,536".
pub fn format_count(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Replaces a leading `~` with the home folder.
fn expand_home(path: &str) -> String {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest).display().to_string(),
        _ => path.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_counts_read_naturally() {
        assert_eq!(format_bytes(999), "999 B");
        assert_eq!(format_bytes(1_900_000_000), "1.9 GB");
        assert_eq!(format_bytes(135_000_000), "135 MB");
        assert_eq!(format_params(3_075_000_000), "3.08 B");
        assert_eq!(format_params(134_515_008), "135 M");
        assert_eq!(format_count(65536), "65,536");
        assert_eq!(format_count(512), "512");
        assert_eq!(format_count(1000), "1,000");
    }

    #[test]
    fn home_is_expanded() {
        if let Some(home) = std::env::var_os("HOME") {
            let expanded = expand_home("~/m.gguf");
            assert_eq!(PathBuf::from(expanded), Path::new(&home).join("m.gguf"));
        }
        assert_eq!(expand_home("/abs.gguf"), "/abs.gguf");
    }

    #[test]
    fn cards_are_read_off_the_ui_thread() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.gguf");
        std::fs::write(&bad, "not a model").unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut picker = ModelPicker::new(
            ModelDirs::Given(vec![dir.path().to_path_buf()]),
            Arc::new(move || {
                let _ = tx.send(());
            }),
        );
        assert!(picker.found.is_empty() && picker.scanning());
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(picker.poll().is_empty());
        assert!(!picker.scanning());
        assert_eq!(picker.found, vec![bad.clone()]);
        assert_eq!(picker.size_of(&bad), Some(Some(11)));
        let gone = dir.path().join("gone.gguf");
        assert_eq!(picker.size_of(&gone), None, "read in the background");
        picker.poll();
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        picker.poll();
        assert_eq!(picker.size_of(&gone), Some(None));
        picker.inspect(bad.clone());
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(picker.poll().is_empty());
        match &picker.card {
            Some(Card::Failed { message, .. }) => assert!(message.contains("GGUF"), "{message}"),
            other => panic!("expected a failed card, got {other:?}"),
        }
    }
}
