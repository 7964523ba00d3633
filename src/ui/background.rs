//! The app's background work off the UI thread, under one set of rules: every task gets an id
//! and its result names it, a panic inside a task is caught and reported as that task's
//! failure, and the UI is woken when a result is ready. Results are collected without blocking
//! (`poll`) at the start of a frame.
//!
//! - [`BackgroundTasks`]: one-shot jobs, each on its own thread (model card, file dialog,
//!   reading conversations; exports and chat templates, whose results are [`Completion`]s).
//! - [`TaskQueue`]: jobs served in order by one long-lived thread (the saver).
//! - [`spawn_service`]: a long-lived loop that keys its own results (the token meter).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};

use crate::worker::thread::panic_message;

/// Called when a result is ready, to wake the UI.
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// Identifies one task among those of its runner.
pub type TaskId = u64;

/// What a finished job does to the state `S` it was started for (the app), applied on the UI
/// thread.
pub type Completion<S> = Box<dyn FnOnce(&mut S) + Send>;

/// A task that panicked instead of returning.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{task} failed unexpectedly: {message}")]
pub struct TaskPanic {
    /// What the task was doing (its thread's name).
    pub task: String,
    /// The panic's message.
    pub message: String,
}

/// The result of one task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskDone<T> {
    /// The task.
    pub id: TaskId,
    /// What it returned, or how it panicked.
    pub outcome: Result<T, TaskPanic>,
}

/// Runs `job`, turning a panic into a [`TaskPanic`].
fn run_caught<T>(task: &str, job: impl FnOnce() -> T) -> Result<T, TaskPanic> {
    catch_unwind(AssertUnwindSafe(job)).map_err(|panic| {
        let message = panic_message(panic.as_ref());
        log::error!("background task {task} panicked: {message}");
        TaskPanic {
            task: task.to_string(),
            message,
        }
    })
}

/// One-shot jobs, each on its own named thread.
pub struct BackgroundTasks<T> {
    name: &'static str,
    results_tx: Sender<TaskDone<T>>,
    results: Receiver<TaskDone<T>>,
    next_id: TaskId,
    wake: Wake,
}

impl<T: Send + 'static> BackgroundTasks<T> {
    /// Jobs whose threads are called `name`; `wake` is called after each one ends.
    pub fn new(name: &'static str, wake: Wake) -> Self {
        let (results_tx, results) = unbounded();
        Self {
            name,
            results_tx,
            results,
            next_id: 1,
            wake,
        }
    }

    /// Starts a job; its result comes back from [`Self::poll`] under the returned id.
    pub fn spawn(&mut self, job: impl FnOnce() -> T + Send + 'static) -> std::io::Result<TaskId> {
        self.spawn_as(self.name, job)
    }

    /// Starts a job on a thread called `name` instead of the runner's name.
    pub fn spawn_as(
        &mut self,
        name: &'static str,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> std::io::Result<TaskId> {
        let id = self.next_id;
        self.next_id += 1;
        let tx = self.results_tx.clone();
        let wake = self.wake.clone();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let outcome = run_caught(name, job);
                let _ = tx.send(TaskDone { id, outcome });
                wake();
            })?;
        Ok(id)
    }

    /// The results of jobs that ended since the last call.
    pub fn poll(&self) -> Vec<TaskDone<T>> {
        self.results.try_iter().collect()
    }
}

/// How long dropping a [`TaskQueue`] waits for the jobs already queued (so that closing the
/// window never hangs on a stalled disk; the exit paths flush first).
pub const QUEUE_DROP_WAIT: Duration = Duration::from_millis(300);

/// Jobs served in order by one thread; dropping the queue waits up to [`QUEUE_DROP_WAIT`] for
/// the jobs already queued.
pub struct TaskQueue<J, T> {
    name: &'static str,
    jobs: Option<Sender<(TaskId, J)>>,
    results: Receiver<TaskDone<T>>,
    /// Results taken out of the channel by [`Self::wait_for`] and not yet polled.
    early: Vec<TaskDone<T>>,
    /// The last job whose result came back (jobs end in the order they were submitted).
    last_done: Option<TaskId>,
    next_id: TaskId,
    ended: Option<Receiver<()>>,
}

impl<J: Send + 'static, T: Send + 'static> TaskQueue<J, T> {
    /// Starts the thread `name`, which calls `handler` on each job in turn.
    pub fn new(
        name: &'static str,
        wake: Wake,
        mut handler: impl FnMut(J) -> T + Send + 'static,
    ) -> Self {
        let (jobs, job_rx) = unbounded::<(TaskId, J)>();
        let (results_tx, results) = unbounded();
        let (ended_tx, ended) = crossbeam_channel::bounded::<()>(0);
        let spawned = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let _ended = ended_tx;
                for (id, job) in job_rx {
                    let outcome = run_caught(name, || handler(job));
                    let _ = results_tx.send(TaskDone { id, outcome });
                    wake();
                }
            });
        let (jobs, ended) = match spawned {
            Ok(_) => (Some(jobs), Some(ended)),
            Err(err) => {
                log::error!("cannot start {name}: {err}");
                (None, None)
            }
        };
        Self {
            name,
            jobs,
            results,
            early: Vec::new(),
            last_done: None,
            next_id: 1,
            ended,
        }
    }

    /// Queues a job; `None` when the thread is not running (the job is dropped).
    pub fn submit(&mut self, job: J) -> Option<TaskId> {
        let id = self.next_id;
        self.next_id += 1;
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send((id, job)).is_ok());
        if !sent {
            log::error!("{} is not running; a job was dropped", self.name);
        }
        sent.then_some(id)
    }

    /// The results of jobs that ended since the last call.
    pub fn poll(&mut self) -> Vec<TaskDone<T>> {
        let mut done = std::mem::take(&mut self.early);
        done.extend(self.results.try_iter());
        if let Some(last) = done.iter().map(|d| d.id).max() {
            self.last_done = self.last_done.max(Some(last));
        }
        done
    }

    /// Waits until job `id` has ended, at most `timeout`; returns whether it did. Results
    /// received meanwhile stay available to [`Self::poll`].
    pub fn wait_for(&mut self, id: TaskId, timeout: Duration) -> bool {
        // Already ended, its result polled (on an earlier frame) or not.
        if self.last_done.is_some_and(|done| done >= id) || self.early.iter().any(|d| d.id >= id) {
            return true;
        }
        let deadline = Instant::now() + timeout;
        while let Ok(done) = self.results.recv_deadline(deadline) {
            let reached = done.id >= id;
            self.early.push(done);
            if reached {
                return true;
            }
        }
        false
    }
}

impl<J, T> Drop for TaskQueue<J, T> {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(ended) = self.ended.take() {
            // Returns when the thread ends (the channel disconnects) or at the timeout.
            let _ = ended.recv_timeout(QUEUE_DROP_WAIT);
        }
    }
}

/// Starts a long-lived thread running `service`, which keys its own results; a panic that
/// escapes it is logged (the service then no longer answers, and its owner sees its channel
/// close).
pub fn spawn_service(name: &'static str, service: impl FnOnce() + Send + 'static) {
    let spawned = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let _ = run_caught(name, service);
        });
    if let Err(err) = spawned {
        log::error!("cannot start {name}: {err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_wake() -> Wake {
        Arc::new(|| {})
    }

    fn poll_until<T>(mut poll: impl FnMut() -> Vec<TaskDone<T>>, n: usize) -> Vec<TaskDone<T>> {
        let mut all = Vec::new();
        let start = Instant::now();
        while all.len() < n && start.elapsed() < Duration::from_secs(10) {
            all.extend(poll());
            std::thread::sleep(Duration::from_millis(5));
        }
        all
    }

    #[test]
    fn one_shot_results_name_their_task_and_panics_are_reported() {
        let mut tasks = BackgroundTasks::new("test-task", no_wake());
        let ok = tasks.spawn(|| 7).unwrap();
        let bad = tasks.spawn(|| -> i32 { panic!("broken") }).unwrap();
        let mut done = poll_until(|| tasks.poll(), 2);
        done.sort_by_key(|d| d.id);
        assert_eq!(
            done[0],
            TaskDone {
                id: ok,
                outcome: Ok(7)
            }
        );
        assert_eq!(done[1].id, bad);
        let panic = done[1].outcome.clone().unwrap_err();
        assert_eq!(panic.message, "broken");
        assert_eq!(panic.task, "test-task");
    }

    #[test]
    fn a_job_can_run_under_its_own_thread_name() {
        let mut tasks = BackgroundTasks::new("test-task", no_wake());
        let id = tasks
            .spawn_as("test-named", || {
                std::thread::current().name().map(str::to_string)
            })
            .unwrap();
        let done = poll_until(|| tasks.poll(), 1);
        assert_eq!(done[0].id, id);
        assert_eq!(done[0].outcome, Ok(Some("test-named".to_string())));
    }

    #[test]
    fn waiting_for_a_job_whose_result_was_already_polled_returns_at_once() {
        let mut queue = TaskQueue::new("test-queue", no_wake(), |n: u32| n);
        let id = queue.submit(1).unwrap();
        assert_eq!(poll_until(|| queue.poll(), 1).len(), 1);
        let start = Instant::now();
        assert!(queue.wait_for(id, Duration::from_secs(5)));
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "it waited for nothing"
        );
    }

    #[test]
    fn queued_jobs_run_in_order_and_survive_a_panicking_job() {
        let mut queue = TaskQueue::new("test-queue", no_wake(), |n: u32| {
            assert!(n != 2, "two is not allowed");
            n * 10
        });
        let ids: Vec<_> = (1..=3).map(|n| queue.submit(n).unwrap()).collect();
        assert!(queue.wait_for(ids[2], Duration::from_secs(10)));
        let done = queue.poll();
        let ids_done: Vec<_> = done.iter().map(|d| d.id).collect();
        assert_eq!(ids_done, ids);
        assert_eq!(done[0].outcome, Ok(10));
        assert!(done[1].outcome.is_err());
        assert_eq!(done[2].outcome, Ok(30));
    }
}
