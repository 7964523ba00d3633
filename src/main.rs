//! Entry point: a subcommand runs headless; no subcommand opens the desktop app.
#![cfg_attr(all(windows, not(debug_assertions)), windows_subsystem = "windows")]

fn main() -> std::process::ExitCode {
    smoldesk::cli::main()
}
