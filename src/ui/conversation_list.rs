//! The conversation list. At startup the saved conversations are listed by their summaries
//! (title, time, message count), read on a background thread; a conversation's messages are
//! read, also off the UI thread, when it is opened (or searched). Files that turn out
//! unreadable are moved into quarantine there too, and reported once.

use std::collections::HashMap;
use std::path::PathBuf;

use super::actions::Action;
use super::app::App;
use super::background::{BackgroundTasks, TaskDone, TaskId, Wake};
use crate::chat::conversation::Conversation;
use crate::chat::store::{ConversationStore, ConversationSummary, StoreError};

/// One conversation of the list.
#[derive(Debug, Clone)]
pub enum Entry {
    /// Its messages are in memory (read, or made in this session).
    Loaded(Conversation),
    /// Only its summary is known; `reading` while its body is being read.
    Listed {
        /// What the listing said.
        summary: ConversationSummary,
        /// Whether its body is being read.
        reading: bool,
    },
}

impl Entry {
    /// The conversation's id.
    pub fn id(&self) -> &str {
        match self {
            Entry::Loaded(c) => &c.id,
            Entry::Listed { summary, .. } => &summary.id,
        }
    }

    /// The title to show.
    pub fn title(&self) -> String {
        match self {
            Entry::Loaded(c) => c.display_title(),
            Entry::Listed { summary, .. } => summary.title.clone(),
        }
    }

    /// Last change, milliseconds since the Unix epoch.
    pub fn updated_ms(&self) -> i64 {
        match self {
            Entry::Loaded(c) => c.updated_ms,
            Entry::Listed { summary, .. } => summary.updated_ms,
        }
    }

    /// Whether it has any message.
    pub fn has_messages(&self) -> bool {
        match self {
            Entry::Loaded(c) => !c.messages.is_empty(),
            Entry::Listed { summary, .. } => summary.message_count > 0,
        }
    }

    /// The conversation, once its body is in memory.
    pub fn loaded(&self) -> Option<&Conversation> {
        match self {
            Entry::Loaded(c) => Some(c),
            Entry::Listed { .. } => None,
        }
    }
}

/// The conversations of the sidebar, most recently changed first (as listed; new ones go to
/// the top).
#[derive(Debug, Default)]
pub struct ConversationList {
    entries: Vec<Entry>,
    /// Bumped whenever an entry comes, goes or gets its body.
    version: u64,
}

impl ConversationList {
    /// Every entry, in list order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The conversations whose messages are in memory.
    pub fn loaded(&self) -> impl Iterator<Item = &Conversation> {
        self.entries.iter().filter_map(Entry::loaded)
    }

    /// How many conversations are listed.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Changes whenever an entry comes, goes or gets its body (for caches of the list).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The entry of `id`.
    pub fn entry(&self, id: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.id() == id)
    }

    /// Whether `id` is listed.
    pub fn contains(&self, id: &str) -> bool {
        self.entry(id).is_some()
    }

    /// Whether `id` is listed but its body is not in memory.
    pub fn is_listed_only(&self, id: &str) -> bool {
        matches!(self.entry(id), Some(Entry::Listed { .. }))
    }

    /// The conversation `id`, if its body is in memory.
    pub fn get(&self, id: &str) -> Option<&Conversation> {
        self.entry(id).and_then(Entry::loaded)
    }

    /// The conversation `id` for changes, if its body is in memory.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Conversation> {
        self.entries.iter_mut().find_map(|e| match e {
            Entry::Loaded(c) if c.id == id => Some(c),
            _ => None,
        })
    }

    /// The id of the first entry.
    pub fn first_id(&self) -> Option<String> {
        self.entries.first().map(|e| e.id().to_string())
    }

    /// The id of a loaded conversation without messages.
    pub fn empty_id(&self) -> Option<String> {
        self.loaded()
            .find(|c| c.messages.is_empty())
            .map(|c| c.id.clone())
    }

    /// Puts a conversation at `index` (at most the end).
    pub fn insert(&mut self, index: usize, conversation: Conversation) {
        let index = index.min(self.entries.len());
        self.entries.insert(index, Entry::Loaded(conversation));
        self.version += 1;
    }

    /// Takes `id` out of the list; returns its place and entry.
    pub fn remove(&mut self, id: &str) -> Option<(usize, Entry)> {
        let index = self.entries.iter().position(|e| e.id() == id)?;
        self.version += 1;
        Some((index, self.entries.remove(index)))
    }

    /// Drops loaded conversations without messages, except `keep` (they were never saved).
    pub fn drop_empty_except(&mut self, keep: &str) {
        let before = self.entries.len();
        self.entries.retain(|e| match e {
            Entry::Loaded(c) => !c.messages.is_empty() || c.id == keep,
            Entry::Listed { .. } => true,
        });
        if self.entries.len() != before {
            self.version += 1;
        }
    }

    /// Adds listed summaries after the entries already there, skipping ids already present
    /// or in `skip` (deleted this session).
    pub fn add_listed(&mut self, summaries: Vec<ConversationSummary>, skip: &[&str]) {
        for summary in summaries {
            if !self.contains(&summary.id) && !skip.contains(&summary.id.as_str()) {
                self.entries.push(Entry::Listed {
                    summary,
                    reading: false,
                });
            }
        }
        self.version += 1;
    }

    /// The listed-only ids among `ids` not being read yet, now marked as being read.
    pub fn start_reading(&mut self, ids: &[String]) -> Vec<String> {
        let mut started = Vec::new();
        for entry in &mut self.entries {
            if let Entry::Listed { summary, reading } = entry
                && !*reading
                && ids.contains(&summary.id)
            {
                *reading = true;
                started.push(summary.id.clone());
            }
        }
        started
    }

    /// The listed-only ids whose bodies are not being read.
    pub fn unread_ids(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter_map(|e| match e {
                Entry::Listed {
                    summary,
                    reading: false,
                } => Some(summary.id.clone()),
                _ => None,
            })
            .collect()
    }

    /// Replaces the summary of a listed conversation by its body; false when it is no longer
    /// listed (deleted meanwhile) or already loaded.
    pub fn set_loaded(&mut self, conversation: Conversation) -> bool {
        let Some(entry) = self
            .entries
            .iter_mut()
            .find(|e| matches!(e, Entry::Listed { summary, .. } if summary.id == conversation.id))
        else {
            return false;
        };
        *entry = Entry::Loaded(conversation);
        self.version += 1;
        true
    }
}

/// A conversation file that could not be read, and where it was moved.
#[derive(Debug, Clone, PartialEq)]
pub struct Unreadable {
    /// Why it could not be read.
    pub error: String,
    /// Where it was moved (`None`: left in place, as a read-only copy does), or why moving
    /// it failed.
    pub moved: Option<Result<PathBuf, String>>,
}

impl Unreadable {
    /// The notice shown for it.
    pub fn notice(&self) -> String {
        let error = &self.error;
        match &self.moved {
            Some(Ok(target)) => format!(
                "A saved conversation could not be read ({error}). The file was moved to {} \
                 so that nothing is lost.",
                target.display()
            ),
            Some(Err(quarantine_error)) => {
                format!("A saved conversation could not be read: {error}. {quarantine_error}")
            }
            None => format!("A saved conversation could not be read: {error}"),
        }
    }
}

/// What a background read found.
#[derive(Debug)]
pub enum ReadDone {
    /// The folder was listed.
    Listed {
        /// The readable conversations, most recent first.
        summaries: Vec<ConversationSummary>,
        /// The files that could not be read.
        unreadable: Vec<Unreadable>,
    },
    /// A conversation's body was read, or could not be.
    Opened {
        /// The conversation.
        id: String,
        /// Its body, or why there is none.
        result: Result<Box<Conversation>, Unreadable>,
    },
}

/// What a read task was started for (so a panic can be turned into its result).
enum ReadJob {
    List,
    Open(Vec<String>),
}

/// Lists and reads conversations off the UI thread.
pub struct ConversationReader {
    store: ConversationStore,
    /// Unreadable files are moved into quarantine unless another copy owns the folder.
    quarantine: bool,
    tasks: BackgroundTasks<Vec<ReadDone>>,
    jobs: HashMap<TaskId, ReadJob>,
    /// Results of jobs whose thread could not be started.
    not_started: Vec<ReadDone>,
}

impl ConversationReader {
    /// A reader of `store`; `quarantine` moves unreadable files aside.
    pub fn new(store: ConversationStore, quarantine: bool, wake: Wake) -> Self {
        Self {
            store,
            quarantine,
            tasks: BackgroundTasks::new("smoldesk-conversations", wake),
            jobs: HashMap::new(),
            not_started: Vec::new(),
        }
    }

    /// Whether the folder's listing has not come back yet.
    pub fn listing(&self) -> bool {
        self.jobs.values().any(|job| matches!(job, ReadJob::List))
    }

    /// Starts listing the folder.
    pub fn list(&mut self) {
        let (store, quarantine) = (self.store.clone(), self.quarantine);
        self.start(ReadJob::List, move || {
            let listing = store.list();
            let unreadable = listing
                .errors
                .iter()
                .map(|err| set_aside(&store, quarantine, err))
                .collect();
            vec![ReadDone::Listed {
                summaries: listing.summaries,
                unreadable,
            }]
        });
    }

    /// Starts reading the bodies of `ids`, in one task.
    pub fn open(&mut self, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        let (store, quarantine) = (self.store.clone(), self.quarantine);
        let job_ids = ids.clone();
        self.start(ReadJob::Open(job_ids), move || {
            ids.into_iter()
                .map(|id| {
                    let result = store
                        .load(&id)
                        .map(Box::new)
                        .map_err(|err| set_aside(&store, quarantine, &err));
                    ReadDone::Opened { id, result }
                })
                .collect()
        });
    }

    /// What the reads that ended since the last call found (a read that panicked counts as
    /// having found its files unreadable).
    pub fn poll(&mut self) -> Vec<ReadDone> {
        let mut found = std::mem::take(&mut self.not_started);
        for TaskDone { id, outcome } in self.tasks.poll() {
            let Some(job) = self.jobs.remove(&id) else {
                continue;
            };
            match outcome {
                Ok(done) => found.extend(done),
                Err(panic) => found.extend(failed(job, &panic.to_string())),
            }
        }
        found
    }

    fn start(&mut self, job: ReadJob, work: impl FnOnce() -> Vec<ReadDone> + Send + 'static) {
        match self.tasks.spawn(work) {
            Ok(id) => {
                self.jobs.insert(id, job);
            }
            Err(err) => {
                let message = format!("cannot start reading conversations: {err}");
                log::error!("{message}");
                self.not_started.extend(failed(job, &message));
            }
        }
    }
}

/// The results of a read job that did not run to its end.
fn failed(job: ReadJob, message: &str) -> Vec<ReadDone> {
    let unreadable = || Unreadable {
        error: message.to_string(),
        moved: None,
    };
    match job {
        ReadJob::List => vec![ReadDone::Listed {
            summaries: Vec::new(),
            unreadable: vec![unreadable()],
        }],
        ReadJob::Open(ids) => ids
            .into_iter()
            .map(|id| ReadDone::Opened {
                id,
                result: Err(unreadable()),
            })
            .collect(),
    }
}

/// Moves an unreadable file into quarantine (when allowed), so the notice comes once and
/// nothing is lost.
fn set_aside(store: &ConversationStore, quarantine: bool, error: &StoreError) -> Unreadable {
    let gone = matches!(error, StoreError::Read { source, .. }
        if source.kind() == std::io::ErrorKind::NotFound);
    let moved = match error.unreadable_file() {
        Some(path) if quarantine && !gone => {
            Some(store.quarantine(path).map_err(|e| e.to_string()))
        }
        _ => None,
    };
    Unreadable {
        error: error.to_string(),
        moved,
    }
}

impl App {
    /// Whether the open conversation is still being read (the chat shows "Opening…").
    pub fn is_opening(&self) -> bool {
        if self.current.is_empty() {
            return self.reader.listing();
        }
        self.conversations.is_listed_only(&self.current)
    }

    /// Starts reading the open conversation's body if only its summary is known.
    pub(crate) fn read_current_if_needed(&mut self) {
        let current = [self.current.clone()];
        let started = self.conversations.start_reading(&current);
        self.reader.open(started);
    }

    /// Starts reading every body not read yet (for a full-text search).
    pub(crate) fn read_all_bodies(&mut self) {
        let unread = self.conversations.unread_ids();
        let started = self.conversations.start_reading(&unread);
        self.reader.open(started);
    }

    /// Holds back an action on a conversation whose body is not read yet, and starts reading
    /// it; the action is carried out once the body is there. Returns whether it was held.
    pub(crate) fn defer_until_read(&mut self, action: &Action) -> bool {
        let Some(id) = action_conversation(action) else {
            return false;
        };
        if !self.conversations.is_listed_only(id) {
            return false;
        }
        let started = self.conversations.start_reading(&[id.to_string()]);
        self.reader.open(started);
        self.after_read.push(action.clone());
        true
    }

    /// Applies what the background reads found.
    pub(crate) fn apply_reads(&mut self) {
        for done in self.reader.poll() {
            match done {
                ReadDone::Listed {
                    summaries,
                    unreadable,
                } => self.on_listed(summaries, unreadable),
                ReadDone::Opened { id, result } => self.on_opened(&id, result),
            }
        }
        self.read_current_if_needed();
    }

    fn on_listed(&mut self, summaries: Vec<ConversationSummary>, unreadable: Vec<Unreadable>) {
        for file in unreadable {
            self.notices.error(file.notice());
        }
        let deleted: Vec<&str> = self.deleted.iter().map(|(_, c)| c.id.as_str()).collect();
        self.conversations.add_listed(summaries, &deleted);
        self.revision += 1;
        if !self.conversations.contains(&self.current) {
            self.pick_first_conversation();
        }
    }

    /// Opens the conversation open last time, else the newest, else a new one.
    fn pick_first_conversation(&mut self) {
        let wanted = self.prefs.last_conversation.clone();
        let pick = wanted
            .filter(|id| self.conversations.contains(id))
            .or_else(|| self.conversations.first_id());
        match pick {
            Some(id) => {
                self.current = id;
                self.chat.scroll_to_bottom = true;
            }
            None => self.apply(Action::NewChat),
        }
    }

    fn on_opened(&mut self, id: &str, result: Result<Box<Conversation>, Unreadable>) {
        let held = std::mem::take(&mut self.after_read);
        let (now, later): (Vec<Action>, Vec<Action>) = held
            .into_iter()
            .partition(|a| action_conversation(a) == Some(id));
        self.after_read = later;
        match result {
            Ok(conversation) => {
                if self.conversations.set_loaded(*conversation) {
                    self.revision += 1;
                    for action in now {
                        self.apply(action);
                    }
                }
            }
            Err(unreadable) => {
                self.notices.error(unreadable.notice());
                self.conversations.remove(id);
                self.revision += 1;
                if self.current == id {
                    self.current.clear();
                    self.pick_first_conversation();
                }
            }
        }
    }
}

/// The conversation an action held by [`App::defer_until_read`] is about.
fn action_conversation(action: &Action) -> Option<&str> {
    match action {
        Action::Rename { id, .. }
        | Action::Delete(id)
        | Action::Export(id)
        | Action::CopyMarkdown(id) => Some(id),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::conversation::{Message, Role};

    fn summary(id: &str, count: usize) -> ConversationSummary {
        ConversationSummary {
            id: id.into(),
            title: format!("Title {id}"),
            updated_ms: 1,
            message_count: count,
        }
    }

    fn with_message(id: &str) -> Conversation {
        let mut c = Conversation {
            id: id.into(),
            ..Conversation::default()
        };
        c.messages.push(Message::new(Role::User, "hello"));
        c
    }

    #[test]
    fn listed_entries_get_their_bodies_once_and_are_never_dropped_as_empty() {
        let mut list = ConversationList::default();
        list.insert(0, Conversation::default());
        list.add_listed(vec![summary("a", 2), summary("b", 1)], &["b"]);
        assert_eq!(list.len(), 2, "a deleted id is not listed again");
        assert!(list.is_listed_only("a"));
        assert_eq!(list.entry("a").unwrap().title(), "Title a");
        assert!(list.get("a").is_none());
        assert_eq!(list.start_reading(&["a".into()]), ["a"]);
        assert!(list.start_reading(&["a".into()]).is_empty(), "read once");
        assert!(list.unread_ids().is_empty());
        list.drop_empty_except("none");
        assert_eq!(
            list.len(),
            1,
            "the empty new chat goes, the listed one stays"
        );
        let version = list.version();
        assert!(list.set_loaded(with_message("a")));
        assert!(list.version() > version);
        assert!(!list.set_loaded(with_message("a")), "already loaded");
        assert_eq!(list.get("a").unwrap().messages.len(), 1);
    }

    #[test]
    fn a_body_read_after_its_entry_was_removed_is_dropped() {
        let mut list = ConversationList::default();
        list.add_listed(vec![summary("a", 1)], &[]);
        assert!(list.remove("a").is_some());
        assert!(!list.set_loaded(with_message("a")));
        assert!(list.is_empty());
    }

    #[test]
    fn notices_say_where_an_unreadable_file_went() {
        let moved = Unreadable {
            error: "bad".into(),
            moved: Some(Ok(PathBuf::from("/q/x.json"))),
        };
        assert!(moved.notice().contains("moved to /q/x.json"));
        let kept = Unreadable {
            error: "bad".into(),
            moved: None,
        };
        assert_eq!(kept.notice(), "A saved conversation could not be read: bad");
    }

    #[test]
    fn the_reader_lists_and_opens_off_the_calling_thread() {
        let dir = tempfile::tempdir().unwrap();
        let store = ConversationStore::new(dir.path());
        let c = with_message("x1");
        store.save(&c).unwrap();
        std::fs::write(dir.path().join("broken.json"), "{").unwrap();
        let mut reader = ConversationReader::new(store.clone(), true, std::sync::Arc::new(|| {}));
        reader.list();
        assert!(reader.listing());
        let done = poll_until(&mut reader, 1);
        let ReadDone::Listed {
            summaries,
            unreadable,
        } = &done[0]
        else {
            panic!("not a listing: {done:?}");
        };
        assert_eq!(summaries[0].id, "x1");
        assert!(matches!(unreadable[0].moved, Some(Ok(_))));
        assert!(!reader.listing());
        reader.open(vec!["x1".into(), "gone".into()]);
        let done = poll_until(&mut reader, 2);
        assert!(matches!(&done[0], ReadDone::Opened { result: Ok(body), .. } if **body == c));
        assert!(matches!(&done[1], ReadDone::Opened { result: Err(_), .. }));
        let me = std::thread::current().name().unwrap().to_string();
        assert!(store.read_counts().keys().all(|(_, thread)| *thread != me));
    }

    fn poll_until(reader: &mut ConversationReader, n: usize) -> Vec<ReadDone> {
        let start = std::time::Instant::now();
        let mut all = Vec::new();
        while all.len() < n && start.elapsed() < std::time::Duration::from_secs(10) {
            all.extend(reader.poll());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        all
    }
}
