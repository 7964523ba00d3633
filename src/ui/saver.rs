//! Writes conversations on a background thread, in order, so a slow disk never stalls a frame.
//! Dropping the saver waits for every queued write.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, unbounded};

use crate::chat::conversation::Conversation;
use crate::chat::store::ConversationStore;

enum Job {
    Save(Box<Conversation>),
    Delete(String),
}

/// The background writer of one [`ConversationStore`].
pub struct Saver {
    jobs: Option<Sender<Job>>,
    errors: Receiver<String>,
    thread: Option<JoinHandle<()>>,
}

impl Saver {
    /// Starts the writer; `wake` is called after a failure so the UI can show it.
    pub fn new(store: ConversationStore, wake: Arc<dyn Fn() + Send + Sync>) -> Self {
        let (jobs, job_rx) = unbounded::<Job>();
        let (error_tx, errors) = unbounded();
        let thread = std::thread::Builder::new()
            .name("smoldesk-saver".into())
            .spawn(move || write_loop(&store, &job_rx, &error_tx, &*wake))
            .map_err(|err| log::error!("cannot start the saver thread: {err}"))
            .ok();
        Self {
            jobs: Some(jobs),
            errors,
            thread,
        }
    }

    /// Queues writing a conversation.
    pub fn save(&self, conversation: &Conversation) {
        self.submit(Job::Save(Box::new(conversation.clone())));
    }

    /// Queues deleting a conversation's file.
    pub fn delete(&self, id: &str) {
        self.submit(Job::Delete(id.to_string()));
    }

    /// Messages of writes that failed since the last call.
    pub fn take_errors(&self) -> Vec<String> {
        self.errors.try_iter().collect()
    }

    fn submit(&self, job: Job) {
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(job).is_ok());
        if !sent {
            log::error!("the saver thread is not running; a change was not saved");
        }
    }
}

impl Drop for Saver {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write_loop(
    store: &ConversationStore,
    jobs: &Receiver<Job>,
    errors: &Sender<String>,
    wake: &(dyn Fn() + Send + Sync),
) {
    for job in jobs {
        let result = match job {
            Job::Save(conversation) => store.save(&conversation),
            Job::Delete(id) => store.delete(&id),
        };
        if let Err(err) = result {
            log::error!("{err}");
            let _ = errors.send(err.to_string());
            wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::conversation::{Message, Role};

    #[test]
    fn queued_writes_are_on_disk_after_drop() {
        let dir = tempfile::tempdir().unwrap();
        let store = ConversationStore::new(dir.path());
        let mut c = Conversation::default();
        c.messages.push(Message::new(Role::User, "hello"));
        let gone = Conversation::default();
        {
            let saver = Saver::new(store.clone(), Arc::new(|| {}));
            saver.save(&gone);
            saver.save(&c);
            saver.delete(&gone.id);
        }
        let all = store.load_all().conversations;
        assert_eq!(all, vec![c]);
    }

    #[test]
    fn failures_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "x").unwrap();
        let (tx, rx) = unbounded();
        let saver = Saver::new(
            ConversationStore::new(&blocker),
            Arc::new(move || {
                let _ = tx.send(());
            }),
        );
        saver.save(&Conversation::default());
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        let errors = saver.take_errors();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].contains("cannot create"), "{}", errors[0]);
    }
}
