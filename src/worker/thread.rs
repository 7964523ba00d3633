//! The inference thread and the handle the UI holds to talk to it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, unbounded};

use super::messages::{Command, Event};

/// Called by the worker after it sends events, to wake the UI (e.g. `ctx.request_repaint()`).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// The UI's handle on the inference thread. Nothing here blocks on the model.
pub struct WorkerHandle {
    commands: Sender<Command>,
    events: Receiver<Event>,
    stop_generation: Arc<AtomicBool>,
    cancel_load: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Starts the inference thread.
    pub fn spawn(waker: Waker) -> Self {
        let (commands, command_rx) = unbounded();
        let (event_tx, events) = unbounded();
        let stop_generation = Arc::new(AtomicBool::new(false));
        let cancel_load = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("smoldesk-inference".into())
            .spawn({
                let stop = stop_generation.clone();
                let cancel = cancel_load.clone();
                move || run(command_rx, event_tx, waker, stop, cancel)
            })
            .ok();
        Self {
            commands,
            events,
            stop_generation,
            cancel_load,
            thread,
        }
    }

    /// Sends a command; never blocks. Loading a model or generating first stops the current
    /// generation.
    pub fn send(&self, command: Command) {
        if matches!(
            command,
            Command::LoadModel { .. } | Command::Unload | Command::Shutdown
        ) {
            self.stop_generation.store(true, Ordering::SeqCst);
            self.cancel_load.store(true, Ordering::SeqCst);
        }
        let _ = self.commands.send(command);
    }

    /// Stops the reply being generated; takes effect within one token.
    pub fn stop_generation(&self) {
        self.stop_generation.store(true, Ordering::SeqCst);
    }

    /// Cancels a model load in progress.
    pub fn cancel_load(&self) {
        self.cancel_load.store(true, Ordering::SeqCst);
    }

    /// The next pending event, if any (never blocks).
    pub fn try_recv(&self) -> Option<Event> {
        self.events.try_recv().ok()
    }

    /// Waits up to `timeout` for the next event (for tests and the CLI; the UI uses `try_recv`).
    pub fn recv_timeout(&self, timeout: std::time::Duration) -> Option<Event> {
        self.events.recv_timeout(timeout).ok()
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The thread's main loop. (Placeholder until the engine lands: answers every request with an
/// error.)
fn run(
    commands: Receiver<Command>,
    events: Sender<Event>,
    waker: Waker,
    _stop: Arc<AtomicBool>,
    _cancel: Arc<AtomicBool>,
) {
    while let Ok(command) = commands.recv() {
        if matches!(command, Command::Shutdown) {
            break;
        }
        let _ = events.send(Event::Error {
            id: None,
            message: "the inference engine is not available yet".into(),
        });
        waker();
    }
}
