//! The desktop window (eframe/egui). One file per panel:
//! - [`app`]: the state and the frame loop; [`actions`] and [`events`]: what changes it;
//! - [`toolbar`], [`sidebar`], [`chat_view`], [`composer`], [`model_panel`], [`settings`]
//!   (with [`kv_cache_settings`]):
//!   the panels; [`notices`]: banners; [`shortcuts`]: the keyboard;
//! - [`theme`] and [`prefs`]: looks and remembered preferences;
//! - [`conversation_list`]: conversations listed by summary, bodies read when opened;
//! - [`token_meter`] and [`saver`]: background counting and saving, on [`background`]'s tasks;
//! - [`exit_signal`]: saving and exiting on SIGTERM/SIGINT;
//! - [`backend`]: the worker as the UI sees it; [`desktop`]: `--install-desktop`.

pub mod actions;
pub mod app;
pub mod backend;
pub mod background;
pub mod chat_view;
pub mod composer;
pub mod conversation_list;
pub mod desktop;
pub mod events;
pub mod exit_signal;
pub mod kv_cache_settings;
pub mod line_breaks;
pub mod model_panel;
pub mod notices;
pub mod prefs;
pub mod saver;
pub mod settings;
pub mod shortcuts;
pub mod sidebar;
pub mod theme;
pub mod token_meter;
pub mod toolbar;
pub mod widgets;

use std::path::PathBuf;

pub use actions::Action;
pub use app::{App, AppOptions};
pub use backend::Backend;

/// Opens the desktop app, or installs the desktop entry when asked.
pub fn run_app(model: Option<PathBuf>, install_desktop: bool) -> anyhow::Result<()> {
    if install_desktop {
        let installed = desktop::install_for_current_user()?;
        desktop::report(&installed);
        return Ok(());
    }
    install_panic_hook();
    let model = model.map(|path| std::path::absolute(&path).unwrap_or(path));
    let data_dir = crate::paths::data_dir();
    let options = eframe::NativeOptions {
        viewport: viewport(),
        ..Default::default()
    };
    eframe::run_native(
        "SmolDesk",
        options,
        Box::new(move |cc| {
            let options = AppOptions {
                model,
                handle_signals: true,
                ..AppOptions::new(data_dir)
            };
            Ok(Box::new(App::new(cc, options)))
        }),
    )
    .map_err(|err| anyhow::anyhow!("cannot open the window: {err}"))
}

/// The main window: title, app id (matches the desktop entry's `StartupWMClass`), size, icon.
fn viewport() -> egui::ViewportBuilder {
    let mut builder = egui::ViewportBuilder::default()
        .with_title("SmolDesk")
        .with_app_id(desktop::APP_ID)
        .with_inner_size([1120.0, 760.0])
        .with_min_inner_size([560.0, 420.0])
        .with_drag_and_drop(true);
    match eframe::icon_data::from_png_bytes(desktop::ICON_256) {
        Ok(icon) => builder = builder.with_icon(icon),
        Err(err) => log::warn!("cannot decode the window icon: {err}"),
    }
    builder
}

/// Logs panics (with their location) before the default handler runs, so a crash in any
/// thread leaves a trace in the log.
pub fn install_panic_hook() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("unnamed");
            log::error!("panic in thread {name}: {info}");
            previous(info);
        }));
    });
}
