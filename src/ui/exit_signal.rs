//! Termination signals (SIGTERM from a logout or shutdown, SIGINT from Ctrl+C, SIGHUP from a
//! closed terminal): the app is asked to save and exit at its next frame; if it has not exited
//! within [`ExitSignal::GRACE`], or a second signal comes, the process exits anyway.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::background::Wake;

/// Whether a termination signal asked the app to exit.
#[derive(Clone, Default)]
pub struct ExitSignal {
    requested: Arc<AtomicBool>,
}

impl ExitSignal {
    /// How long the app has to save and exit after a signal before the process ends anyway.
    pub const GRACE: Duration = Duration::from_secs(3);

    /// Starts listening for termination signals; `wake` is called when one comes so the app
    /// runs a frame (even with its window hidden).
    #[cfg(unix)]
    pub fn install(wake: Wake) -> std::io::Result<Self> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        let exit = Self::default();
        let requested = exit.requested.clone();
        std::thread::Builder::new()
            .name("smoldesk-signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    let code = 128 + signal;
                    if requested.swap(true, Ordering::SeqCst) {
                        log::warn!("second termination signal: exiting now");
                        std::process::exit(code);
                    }
                    log::info!("termination signal {signal}: saving and exiting");
                    wake();
                    let _ = std::thread::Builder::new()
                        .name("smoldesk-exit-grace".into())
                        .spawn(move || {
                            std::thread::sleep(Self::GRACE);
                            log::warn!("the app did not exit in time after a signal");
                            std::process::exit(code);
                        });
                }
            })?;
        Ok(exit)
    }

    /// Signals are not handled on this platform.
    #[cfg(not(unix))]
    pub fn install(_wake: Wake) -> std::io::Result<Self> {
        Ok(Self::default())
    }

    /// Whether a signal asked the app to exit.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }
}
