//! The settings window: this conversation's system prompt and sampling, the model's context
//! length and threads (applied on reload), and the look (theme, font size).

use egui::{RichText, Ui};

use super::actions::Action;
use super::app::{App, ModelState};
use super::model_panel::format_count;
use super::prefs::{FONT_SIZE_RANGE, ThemeChoice};
use super::theme;
use crate::chat::conversation::ChatSettings;
use crate::engine::sampling::SamplingParams;

/// Thinking budgets offered: no limit, then most thinking tokens per reply.
pub const THINKING_BUDGET_CHOICES: [Option<usize>; 4] = [None, Some(256), Some(1024), Some(4096)];

/// A thinking budget as the settings show it: "Off", "256 tokens", "1k tokens".
pub fn thinking_budget_label(budget: Option<usize>) -> String {
    match budget {
        None => "Off".to_string(),
        Some(n) if n >= 1024 && n % 1024 == 0 => format!("{}k tokens", n / 1024),
        Some(n) => format!("{} tokens", format_count(n)),
    }
}

/// Context lengths offered, in tokens.
pub const CONTEXT_CHOICES: [usize; 7] = [2048, 4096, 8192, 16384, 32768, 65536, 131072];

/// Draws the settings window when it is open.
pub fn show_window(app: &mut App, ctx: &egui::Context) {
    let mut open = app.windows.settings;
    let screen = ctx.content_rect();
    egui::Window::new("Settings")
        .open(&mut open)
        .default_width(460.0)
        .default_pos(egui::pos2(screen.right() - 490.0, screen.top() + 48.0))
        .collapsible(false)
        .resizable(false)
        .show(ctx, |ui| {
            ui.spacing_mut().slider_width = 200.0;
            egui::ScrollArea::vertical()
                .max_height(screen.height() - 140.0)
                .auto_shrink([false, true])
                .show(ui, |ui| contents(app, ui));
        });
    app.windows.settings = open && app.windows.settings;
}

fn contents(app: &mut App, ui: &mut Ui) {
    section(ui, "This conversation");
    let mut changed = false;
    let defaults = app.new_chat_settings().sampling;
    if let Some(conversation) = app.current_mut() {
        changed = conversation_settings(ui, &mut conversation.settings, &defaults);
    }
    if changed {
        app.settings_changed();
    }
    ui.add_space(10.0);
    section(ui, "Model");
    model_settings(app, ui);
    ui.add_space(4.0);
    template_settings(app, ui);
    ui.add_space(10.0);
    section(ui, "Appearance");
    appearance(app, ui);
    ui.add_space(10.0);
    section(ui, "Saved conversation states");
    if super::kv_cache_settings::show(ui) {
        super::kv_cache_settings::clear_in_background(app);
    }
}

fn section(ui: &mut Ui, title: &str) {
    ui.label(
        RichText::new(title)
            .strong()
            .size(ui.text_style_height(&egui::TextStyle::Body) * 1.15),
    );
    ui.separator();
}

/// System prompt and sampling; returns whether anything changed. "Reset sampling" restores
/// `defaults` (the loaded model's recommended settings).
pub fn conversation_settings(
    ui: &mut Ui,
    settings: &mut ChatSettings,
    defaults: &SamplingParams,
) -> bool {
    let mut changed = false;
    let label = ui.label("System prompt");
    let prompt = ui.add(
        egui::TextEdit::multiline(&mut settings.system_prompt)
            .hint_text("e.g. You are a concise assistant. Answer in English.")
            .desired_rows(3)
            .desired_width(f32::INFINITY),
    );
    changed |= prompt.labelled_by(label.id).changed();
    ui.add_space(6.0);
    changed |= thinking_budget(ui, &mut settings.thinking_budget);
    changed |= sampling(ui, &mut settings.sampling, defaults);
    changed |= seed(ui, &mut settings.fixed_seed, &mut settings.sampling.seed);
    changed
}

/// The most tokens a reply may think before it is made to answer.
fn thinking_budget(ui: &mut Ui, budget: &mut Option<usize>) -> bool {
    let mut changed = false;
    ui.horizontal(|ui| {
        let label = ui.label("Thinking budget");
        egui::ComboBox::from_id_salt("thinking-budget")
            .selected_text(thinking_budget_label(*budget))
            .show_ui(ui, |ui| {
                for choice in THINKING_BUDGET_CHOICES {
                    changed |= ui
                        .selectable_value(budget, choice, thinking_budget_label(choice))
                        .changed();
                }
            })
            .response
            .labelled_by(label.id)
            .on_hover_text(
                "When the model has thought this many tokens, its thought is ended and it answers",
            );
    });
    changed
}

/// A fresh seed per reply (Regenerate gives a new reply), or a fixed one (the same reply).
fn seed(ui: &mut Ui, fixed: &mut bool, seed: &mut u64) -> bool {
    let mut changed = ui
        .checkbox(fixed, "Fixed seed")
        .on_hover_text(
            "Off: every reply draws a new seed (shown in the reply's details). On: the same \
             seed and conversation give the same reply",
        )
        .changed();
    changed |= ui
        .add_enabled(
            *fixed,
            egui::Slider::new(seed, 0..=u32::MAX as u64).text("Seed"),
        )
        .changed();
    changed
}

fn sampling(ui: &mut Ui, params: &mut SamplingParams, defaults: &SamplingParams) -> bool {
    let mut changed = false;
    let muted = theme::muted_text_color(ui.visuals());
    changed |= ui
        .add(
            egui::Slider::new(&mut params.temperature, 0.0..=2.0)
                .text("Temperature")
                .step_by(0.05),
        )
        .on_hover_text("Higher is more varied, 0 always picks the most likely word")
        .changed();
    changed |= ui
        .add(
            egui::Slider::new(&mut params.top_p, 0.05..=1.0)
                .text("Top-p")
                .step_by(0.01),
        )
        .on_hover_text("Keep the most likely words that add up to this probability (1 = off)")
        .changed();
    changed |= ui
        .add(egui::Slider::new(&mut params.top_k, 0..=200).text("Top-k"))
        .on_hover_text("Keep only this many most likely words (0 = off)")
        .changed();
    changed |= ui
        .add(
            egui::Slider::new(&mut params.min_p, 0.0..=0.5)
                .text("Min-p")
                .step_by(0.01),
        )
        .on_hover_text("Drop words less likely than this share of the most likely one (0 = off)")
        .changed();
    changed |= ui
        .add(
            egui::Slider::new(&mut params.repeat_penalty, 1.0..=2.0)
                .text("Repeat penalty")
                .step_by(0.01),
        )
        .on_hover_text("Discourage repeating recent words (1 = off)")
        .changed();
    changed |= ui
        .add(
            egui::Slider::new(&mut params.max_tokens, 16..=32768)
                .logarithmic(true)
                .text("Max reply tokens"),
        )
        .changed();
    ui.horizontal(|ui| {
        if ui
            .button("Reset sampling")
            .on_hover_text("The loaded model's recommended settings")
            .clicked()
        {
            *params = defaults.clone();
            changed = true;
        }
        ui.label(
            RichText::new("Saved with this conversation")
                .small()
                .color(muted),
        );
    });
    changed
}

fn model_settings(app: &mut App, ui: &mut Ui) {
    let options = &mut app.prefs.load_options;
    ui.horizontal(|ui| {
        let label = ui.label("Context length");
        egui::ComboBox::from_id_salt("context-length")
            .selected_text(format!("{} tokens", format_count(options.context_length)))
            .show_ui(ui, |ui| {
                for choice in CONTEXT_CHOICES {
                    ui.selectable_value(
                        &mut options.context_length,
                        choice,
                        format!("{} tokens", format_count(choice)),
                    );
                }
            })
            .response
            .labelled_by(label.id);
    });
    let (logical, physical) = cpu_counts();
    ui.add(
        egui::Slider::new(&mut options.threads, 0..=logical.max(1) * 2)
            .text("Threads")
            .custom_formatter(|n, _| {
                if n == 0.0 {
                    "auto".to_string()
                } else {
                    format!("{n:.0}")
                }
            }),
    )
    .on_hover_text(format!(
        "Compute threads (auto = one per physical core: {physical}); applies when the model reloads"
    ));
    let loaded = match &app.model {
        ModelState::Ready(model) => Some((
            model.options.clone(),
            model.info.ram_estimate_bytes(
                options
                    .context_length
                    .min(model.info.hparams.context_length),
            ),
        )),
        _ => None,
    };
    if let Some((in_use, ram)) = loaded {
        ui.label(
            RichText::new(format!(
                "Memory needed at this context: about {}",
                super::model_panel::format_bytes(ram)
            ))
            .small()
            .color(theme::muted_text_color(ui.visuals())),
        );
        if in_use != *options {
            ui.horizontal(|ui| {
                ui.label(
                    RichText::new("Takes effect when the model is reloaded.")
                        .color(theme::warn_color(ui.visuals())),
                );
                if ui.button("Reload now").clicked() {
                    app.apply(Action::Reload);
                }
            });
        }
    }
}

/// The chat template: the model's own, or a file the user picks.
fn template_settings(app: &mut App, ui: &mut Ui) {
    let id = egui::Id::unique("template-path-input");
    let mut input = ui.data(|d| d.get_temp::<String>(id)).unwrap_or_else(|| {
        app.prefs
            .template_override
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    });
    let status = match &app.template_override {
        Some((path, _)) => format!("Chat template: {}", path.display()),
        None => "Chat template: the model's own".to_string(),
    };
    ui.label(status);
    let mut action = None;
    ui.horizontal(|ui| {
        let field = ui.add(
            egui::TextEdit::singleline(&mut input)
                .hint_text("/path/to/template.jinja")
                .desired_width(ui.available_width() - 130.0),
        );
        field.accessible_name("Chat template file");
        let has_text = !input.trim().is_empty();
        if ui.add_enabled(has_text, egui::Button::new("Use")).clicked() {
            action = Some(Action::SetTemplateOverride(Some(input.trim().into())));
        }
        if ui
            .add_enabled(app.template_override.is_some(), egui::Button::new("Reset"))
            .on_hover_text("Use the model's own chat template")
            .clicked()
        {
            input.clear();
            action = Some(Action::SetTemplateOverride(None));
        }
    });
    ui.data_mut(|d| d.insert_temp(id, input));
    if let Some(action) = action {
        app.apply(action);
    }
}

fn appearance(app: &mut App, ui: &mut Ui) {
    ui.horizontal(|ui| {
        ui.label("Theme");
        for choice in ThemeChoice::ALL {
            ui.radio_value(&mut app.prefs.theme, choice, choice.label());
        }
    });
    ui.add(
        egui::Slider::new(&mut app.prefs.font_size, FONT_SIZE_RANGE)
            .text("Font size")
            .step_by(1.0)
            .suffix(" pt"),
    );
    let mut show = app.prefs.show_thinking;
    if ui.checkbox(&mut show, "Show thinking in replies").changed() {
        app.apply(Action::ToggleShowThinking);
    }
}

/// Logical CPUs and physical cores, counted once (the physical count reads `/proc/cpuinfo`,
/// which a frame should not do).
fn cpu_counts() -> (usize, usize) {
    static COUNTS: std::sync::OnceLock<(usize, usize)> = std::sync::OnceLock::new();
    *COUNTS.get_or_init(|| {
        let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
        (logical, crate::engine::cpu::pool::physical_cores())
    })
}
