//! Writes conversations on a background thread ([`TaskQueue`]), in order, so a slow disk never
//! stalls a frame. [`Saver::flush`] waits (with a limit) for every queued write, for the app's
//! exit paths.

use std::time::Duration;

use super::background::{TaskId, TaskQueue, Wake};
use crate::chat::conversation::Conversation;
use crate::chat::store::ConversationStore;

/// One write.
pub enum Job {
    /// Write a conversation.
    Save(Box<Conversation>),
    /// Delete a conversation's file.
    Delete(String),
    /// Remove the temporary files of saves a crash interrupted (only the copy that owns the
    /// data folder may).
    RemoveStaleTemps,
}

/// The background writer of one [`ConversationStore`].
pub struct Saver {
    queue: TaskQueue<Job, Result<(), String>>,
    last: Option<TaskId>,
}

impl Saver {
    /// Starts the writer; `wake` is called after each write so the UI can show failures.
    pub fn new(store: ConversationStore, wake: Wake) -> Self {
        let queue = TaskQueue::new("smoldesk-saver", wake, move |job| {
            let result = match job {
                Job::Save(conversation) => store.save(&conversation),
                Job::Delete(id) => store.delete(&id),
                Job::RemoveStaleTemps => {
                    let removed = store.remove_stale_temp_files();
                    if removed > 0 {
                        log::info!("removed {removed} temporary files of interrupted saves");
                    }
                    Ok(())
                }
            };
            result.map_err(|err| {
                log::error!("{err}");
                err.to_string()
            })
        });
        Self { queue, last: None }
    }

    /// Queues writing a conversation.
    pub fn save(&mut self, conversation: &Conversation) {
        self.submit(Job::Save(Box::new(conversation.clone())));
    }

    /// Queues deleting a conversation's file.
    pub fn delete(&mut self, id: &str) {
        self.submit(Job::Delete(id.to_string()));
    }

    /// Queues removing the temporary files of interrupted saves (queued before any write, so
    /// it never races one).
    pub fn remove_stale_temps(&mut self) {
        self.submit(Job::RemoveStaleTemps);
    }

    /// Messages of writes that failed (or whose writer panicked) since the last call.
    pub fn take_errors(&mut self) -> Vec<String> {
        self.queue
            .poll()
            .into_iter()
            .filter_map(|done| match done.outcome {
                Ok(Ok(())) => None,
                Ok(Err(message)) => Some(message),
                Err(panic) => Some(panic.to_string()),
            })
            .collect()
    }

    /// Waits until every queued write is on disk, at most `timeout`; returns whether they are.
    pub fn flush(&mut self, timeout: Duration) -> bool {
        match self.last {
            Some(last) => self.queue.wait_for(last, timeout),
            None => true,
        }
    }

    fn submit(&mut self, job: Job) {
        if let Some(id) = self.queue.submit(job) {
            self.last = Some(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::conversation::{Message, Role};
    use std::sync::Arc;

    #[test]
    fn queued_writes_are_on_disk_after_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let store = ConversationStore::new(dir.path());
        let mut c = Conversation::default();
        c.messages.push(Message::new(Role::User, "hello"));
        let gone = Conversation::default();
        let mut saver = Saver::new(store.clone(), Arc::new(|| {}));
        saver.save(&gone);
        saver.save(&c);
        saver.delete(&gone.id);
        assert!(saver.flush(Duration::from_secs(10)));
        assert_eq!(store.load_all().conversations, vec![c.clone()]);
        c.messages.push(Message::new(Role::User, "again"));
        saver.save(&c);
        assert!(saver.flush(Duration::from_secs(10)));
        assert_eq!(store.load_all().conversations, vec![c]);
    }

    #[test]
    fn stale_temporary_files_are_removed_in_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join("x.json.1.tmp");
        std::fs::write(&stale, "half").unwrap();
        let mut saver = Saver::new(ConversationStore::new(dir.path()), Arc::new(|| {}));
        saver.remove_stale_temps();
        assert!(saver.flush(Duration::from_secs(10)));
        assert!(!stale.exists());
    }

    #[test]
    fn failures_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "x").unwrap();
        let mut saver = Saver::new(ConversationStore::new(&blocker), Arc::new(|| {}));
        saver.save(&Conversation::default());
        assert!(saver.flush(Duration::from_secs(10)));
        let errors = saver.take_errors();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].contains("cannot create"), "{}", errors[0]);
    }
}
