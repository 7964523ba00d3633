//! The desktop window (eframe/egui). One file per panel.

use std::path::PathBuf;

/// Opens the desktop app (or installs the desktop entry when asked).
pub fn run_app(_model: Option<PathBuf>, _install_desktop: bool) -> anyhow::Result<()> {
    anyhow::bail!("the app is not written yet")
}
