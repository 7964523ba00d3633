//! Work the UI thread must not wait for (writing exports, reading and compiling a chat
//! template) runs on short-lived named threads; each task ends with a change to apply to the
//! app, which the frame loop picks up without blocking.

use std::sync::Arc;

use crossbeam_channel::{Receiver, TryRecvError, bounded};

use super::app::App;

/// What a finished task does to the app, applied on the UI thread.
pub type Completion = Box<dyn FnOnce(&mut App) + Send>;

/// Runs `work` on a new thread named `name` and returns where its result arrives; `wake` is
/// called once it is there. When no thread can be started, `work` runs right away.
pub fn spawn<T: Send + 'static>(
    name: &str,
    wake: Arc<dyn Fn() + Send + Sync>,
    work: impl FnOnce() -> T + Send + 'static,
) -> Receiver<T> {
    let (done, result) = bounded(1);
    let job = move || {
        let _ = done.send(work());
        wake();
    };
    let shared = Arc::new(std::sync::Mutex::new(Some(job)));
    let in_thread = shared.clone();
    let started = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || run_once(&in_thread));
    if let Err(err) = started {
        log::error!("cannot start the {name} thread ({err}); running it here");
        run_once(&shared);
    }
    result
}

fn run_once<F: FnOnce()>(job: &std::sync::Mutex<Option<F>>) {
    let taken = job.lock().ok().and_then(|mut slot| slot.take());
    if let Some(job) = taken {
        job();
    }
}

/// The app's background tasks that have not finished yet.
pub struct Tasks {
    wake: Arc<dyn Fn() + Send + Sync>,
    pending: Vec<Receiver<Completion>>,
}

impl Tasks {
    /// No tasks yet; `wake` asks for a frame when one finishes.
    pub fn new(wake: Arc<dyn Fn() + Send + Sync>) -> Self {
        Self {
            wake,
            pending: Vec::new(),
        }
    }

    /// Starts `work` on a thread named `name`; what it returns is applied to the app later.
    pub fn run(&mut self, name: &str, work: impl FnOnce() -> Completion + Send + 'static) {
        self.pending.push(spawn(name, self.wake.clone(), work));
    }

    /// The changes of the tasks that finished since the last call, in the order they started.
    pub fn take_finished(&mut self) -> Vec<Completion> {
        let mut finished = Vec::new();
        self.pending.retain(|task| match task.try_recv() {
            Ok(completion) => {
                finished.push(completion);
                false
            }
            Err(TryRecvError::Empty) => true,
            Err(TryRecvError::Disconnected) => false,
        });
        finished
    }

    /// Whether a task is still running.
    pub fn busy(&self) -> bool {
        !self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_spawned_task_delivers_its_result_on_a_named_thread() {
        let (woke_tx, woke) = bounded(1);
        let result = spawn(
            "smoldesk-test-task",
            Arc::new(move || {
                let _ = woke_tx.send(());
            }),
            || std::thread::current().name().map(str::to_string),
        );
        let name = result.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(name.as_deref(), Some("smoldesk-test-task"));
        woke.recv_timeout(Duration::from_secs(10)).unwrap();
    }
}
