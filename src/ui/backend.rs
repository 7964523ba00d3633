//! The UI's view of the inference thread: a small trait so tests can script the events a real
//! worker would send, while the app runs against [`WorkerHandle`].

use crate::worker::{Command, Event, WorkerHandle};

/// What the app needs from the inference thread. No method may block on the model.
pub trait Backend {
    /// Sends a command (load, generate, unload).
    fn send(&self, command: Command);
    /// Stops the reply being generated.
    fn stop_generation(&self);
    /// Cancels a model load in progress.
    fn cancel_load(&self);
    /// The next pending event, if any.
    fn try_recv(&self) -> Option<Event>;
}

impl Backend for WorkerHandle {
    fn send(&self, command: Command) {
        WorkerHandle::send(self, command);
    }

    fn stop_generation(&self) {
        WorkerHandle::stop_generation(self);
    }

    fn cancel_load(&self) {
        WorkerHandle::cancel_load(self);
    }

    fn try_recv(&self) -> Option<Event> {
        WorkerHandle::try_recv(self)
    }
}
