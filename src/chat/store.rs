//! Saving conversations: one JSON file per conversation, each written atomically (temporary
//! file, fsync, rename) so a crash never leaves a half-written conversation behind.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use super::conversation::{Conversation, Message, Role};

/// What can go wrong reading or writing conversations.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The conversations folder could not be created.
    #[error("cannot create the conversations folder {path}: {source}")]
    CreateDir {
        /// The folder.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A conversation could not be written.
    #[error("cannot save the conversation to {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A conversation file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A conversation file is not valid JSON of a conversation.
    #[error("{path} is not a valid conversation file: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the JSON parser found.
        #[source]
        source: serde_json::Error,
    },
    /// A conversation file could not be deleted.
    #[error("cannot delete {path}: {source}")]
    Delete {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The id cannot be used as a file name.
    #[error("invalid conversation id {0:?}")]
    InvalidId(String),
    /// A conversation file is larger than any conversation SmolDesk writes.
    #[error(
        "{path} is {bytes} bytes, more than the {} a conversation file may have",
        MAX_CONVERSATION_BYTES
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
    /// An unreadable file could not be moved into the quarantine folder.
    #[error("cannot move {path} into {}: {source}", QUARANTINE_DIR)]
    Quarantine {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// The file a read error is about (`None` for errors not about one conversation file).
    pub fn unreadable_file(&self) -> Option<&Path> {
        match self {
            StoreError::Read { path, .. }
            | StoreError::Parse { path, .. }
            | StoreError::TooLarge { path, .. } => Some(path),
            _ => None,
        }
    }
}

/// The folder, inside the conversations folder, where unreadable files are moved.
pub const QUARANTINE_DIR: &str = "quarantine";

/// Largest conversation file read, in bytes: far above any real conversation (a full 131,072-token
/// context is about half a megabyte of text), so a huge or endless file is refused before it is
/// read into memory.
pub const MAX_CONVERSATION_BYTES: u64 = 64 << 20;

/// Ending of the temporary files of [`write_atomically`].
const TEMP_SUFFIX: &str = ".tmp";

/// Conversations loaded from the folder, and the files that could not be read.
#[derive(Debug, Default)]
pub struct LoadedConversations {
    /// The readable conversations, most recently changed first.
    pub conversations: Vec<Conversation>,
    /// One error per unreadable file (those files are left untouched; see
    /// [`ConversationStore::quarantine`]).
    pub errors: Vec<StoreError>,
}

/// What the conversation list shows of a saved conversation, read from its file without
/// keeping its messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationSummary {
    /// The conversation's id (its file name).
    pub id: String,
    /// The title to show ([`Conversation::display_title`]).
    pub title: String,
    /// Last change, milliseconds since the Unix epoch.
    pub updated_ms: i64,
    /// How many messages it has.
    pub message_count: usize,
}

/// The summaries of the conversations in the folder, and the files that could not be read.
#[derive(Debug, Default)]
pub struct Listing {
    /// The readable conversations, most recently changed first.
    pub summaries: Vec<ConversationSummary>,
    /// One error per unreadable file (left untouched; see [`ConversationStore::quarantine`]).
    pub errors: Vec<StoreError>,
}

/// What a read of the folder parsed: a conversation's summary or its whole body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReadKind {
    /// A summary for the list ([`ConversationStore::list`]).
    Summary,
    /// A whole conversation ([`ConversationStore::load`], [`ConversationStore::load_all`]).
    Body,
}

/// Counts of the files a store parsed, per kind and per thread name (for checking that the
/// UI thread never parses conversations).
pub type ReadCounts = HashMap<(ReadKind, String), usize>;

/// The folder of saved conversations.
#[derive(Debug, Clone)]
pub struct ConversationStore {
    dir: PathBuf,
    reads: Arc<Mutex<ReadCounts>>,
}

impl ConversationStore {
    /// A store in `dir` (created on the first save).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            reads: Arc::default(),
        }
    }

    /// How many files this store (and its clones) parsed, per kind and thread name.
    pub fn read_counts(&self) -> ReadCounts {
        self.reads.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn count_read(&self, kind: ReadKind) {
        let thread = std::thread::current().name().unwrap_or("").to_string();
        if let Ok(mut reads) = self.reads.lock() {
            *reads.entry((kind, thread)).or_default() += 1;
        }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file a conversation is saved in.
    pub fn path_of(&self, id: &str) -> Result<PathBuf, StoreError> {
        if !is_valid_id(id) {
            return Err(StoreError::InvalidId(id.to_string()));
        }
        Ok(self.dir.join(format!("{id}.json")))
    }

    /// Writes a conversation atomically, replacing its previous version.
    pub fn save(&self, conversation: &Conversation) -> Result<(), StoreError> {
        let path = self.path_of(&conversation.id)?;
        std::fs::create_dir_all(&self.dir).map_err(|source| StoreError::CreateDir {
            path: self.dir.clone(),
            source,
        })?;
        let json = serde_json::to_vec_pretty(conversation).map_err(|e| StoreError::Write {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        write_atomically(&path, &json).map_err(|source| StoreError::Write { path, source })
    }

    /// Reads one conversation. Its id is always the file name, whatever the JSON says.
    pub fn load(&self, id: &str) -> Result<Conversation, StoreError> {
        let path = self.path_of(id)?;
        self.count_read(ReadKind::Body);
        read_conversation(&path, id)
    }

    /// Reads every conversation in the folder, most recently changed first. A missing folder
    /// is an empty list; unreadable files are reported, not fatal.
    pub fn load_all(&self) -> LoadedConversations {
        let (conversations, errors) =
            self.read_each(ReadKind::Body, read_conversation, |c| (c.updated_ms, &c.id));
        LoadedConversations {
            conversations,
            errors,
        }
    }

    /// Summarises every conversation in the folder (title, time, message count) without
    /// keeping messages, most recently changed first. Each file is still parsed in full, so a
    /// file listed here is valid JSON; one whose messages turn out unreadable fails on
    /// [`Self::load`]. A missing folder is an empty list.
    pub fn list(&self) -> Listing {
        let (summaries, errors) =
            self.read_each(ReadKind::Summary, read_summary, |s| (s.updated_ms, &s.id));
        Listing { summaries, errors }
    }

    /// Reads every conversation file with `read`, newest first by `changed` (time, then id);
    /// the files that fail are returned apart.
    fn read_each<T>(
        &self,
        kind: ReadKind,
        read: fn(&Path, &str) -> Result<T, StoreError>,
        changed: fn(&T) -> (i64, &String),
    ) -> (Vec<T>, Vec<StoreError>) {
        let (mut read_ok, mut errors) = (Vec::new(), Vec::new());
        for (path, id) in self.conversation_files() {
            self.count_read(kind);
            match read(&path, &id) {
                Ok(item) => read_ok.push(item),
                Err(err) => errors.push(err),
            }
        }
        read_ok.sort_by(|a, b| changed(b).cmp(&changed(a)));
        (read_ok, errors)
    }

    /// The `<id>.json` files of the folder with their ids (none when it is missing).
    fn conversation_files(&self) -> Vec<(PathBuf, String)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter_map(|path| conversation_id_of(&path).map(|id| (path, id)))
            .collect()
    }

    /// Moves an unreadable conversation file into the `quarantine/` folder beside it (never
    /// deleting it); returns where it went. An existing file of that name there is kept too.
    pub fn quarantine(&self, path: &Path) -> Result<PathBuf, StoreError> {
        let fail = |source| StoreError::Quarantine {
            path: path.to_path_buf(),
            source,
        };
        let name = path
            .file_name()
            .ok_or_else(|| fail(std::io::Error::other("the path has no file name")))?;
        let dir = self.dir.join(QUARANTINE_DIR);
        std::fs::create_dir_all(&dir).map_err(fail)?;
        let mut target = dir.join(name);
        let mut n = 1;
        while target.exists() {
            let mut numbered = name.to_os_string();
            numbered.push(format!(".{n}"));
            target = dir.join(numbered);
            n += 1;
        }
        std::fs::rename(path, &target).map_err(fail)?;
        sync_dir(&self.dir);
        Ok(target)
    }

    /// Removes temporary files left by saves that were interrupted (a crash or kill between
    /// writing and renaming). Only the copy of the app that owns the data folder may call
    /// this. Returns how many were removed.
    pub fn remove_stale_temp_files(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let stale = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file() && p.to_string_lossy().ends_with(TEMP_SUFFIX));
        let mut removed = 0;
        for path in stale {
            match std::fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(err) => log::warn!("cannot remove {}: {err}", path.display()),
            }
        }
        removed
    }

    /// Deletes a conversation's file; deleting one that was never saved is not an error.
    pub fn delete(&self, id: &str) -> Result<(), StoreError> {
        let path = self.path_of(id)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Delete { path, source }),
        }
    }
}

/// Writes `bytes` to `path` so that readers see either the old or the new content: a
/// temporary file beside it, fsync, rename over the target, fsync of the folder.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the path has no file name"))?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(format!(".{}{TEMP_SUFFIX}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = write_and_sync(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    sync_dir(dir);
    Ok(())
}

/// The conversation as Markdown: title, system prompt, then the user's messages and the
/// model's answers (never its thinking).
pub fn export_markdown(conversation: &Conversation) -> String {
    let mut out = format!("# {}\n\n", conversation.display_title());
    let system = conversation.settings.system_prompt.trim();
    if !system.is_empty() {
        out.push_str("## System prompt\n\n");
        out.push_str(system);
        out.push_str("\n\n");
    }
    for message in &conversation.messages {
        let heading = match message.role {
            Role::User => "You",
            Role::Assistant => "Assistant",
            Role::System => "System",
        };
        out.push_str(&format!(
            "## {heading}\n\n{}\n\n",
            message.content.trim_end()
        ));
    }
    out.truncate(out.trim_end().len());
    out.push('\n');
    out
}

fn write_and_sync(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Makes a rename durable. Best effort: not every platform can open a folder for syncing.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(handle) = std::fs::File::open(dir) {
        let _ = handle.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// The bytes of a conversation file of at most [`MAX_CONVERSATION_BYTES`].
fn read_bounded(path: &Path) -> Result<Vec<u8>, StoreError> {
    use std::io::Read;
    let read_error = |source| StoreError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(MAX_CONVERSATION_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_CONVERSATION_BYTES {
        let bytes = std::fs::metadata(path).map_or(bytes.len() as u64, |m| m.len());
        return Err(StoreError::TooLarge {
            path: path.to_path_buf(),
            bytes,
        });
    }
    Ok(bytes)
}

fn read_conversation(path: &Path, id: &str) -> Result<Conversation, StoreError> {
    let bytes = read_bounded(path)?;
    let mut conversation: Conversation =
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
    conversation.id = id.to_string();
    Ok(conversation)
}

/// The fields of a conversation file that its summary needs; messages are skimmed by
/// [`MessagesDigest`].
#[derive(Deserialize, Default)]
#[serde(default)]
struct SummaryFields {
    title: String,
    updated_ms: i64,
    messages: MessagesDigest,
}

/// A conversation's messages reduced to their number and the first user message (which the
/// title may come from); the other messages are checked for valid JSON but not kept.
#[derive(Default)]
struct MessagesDigest {
    count: usize,
    first_user: Option<Message>,
}

/// The role of a message, without its text (parsed so an unknown role fails the listing, as
/// it fails loading).
#[derive(Deserialize)]
struct MessageRole {
    #[serde(default, rename = "role")]
    _role: Role,
}

impl<'de> Deserialize<'de> for MessagesDigest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = MessagesDigest;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of messages")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<MessagesDigest, A::Error> {
                let mut digest = MessagesDigest::default();
                loop {
                    let more = if digest.first_user.is_some() {
                        seq.next_element::<MessageRole>()?.is_some()
                    } else {
                        match seq.next_element::<Message>()? {
                            Some(message) => {
                                if message.role == Role::User {
                                    digest.first_user = Some(message);
                                }
                                true
                            }
                            None => false,
                        }
                    };
                    if !more {
                        return Ok(digest);
                    }
                    digest.count += 1;
                }
            }
        }
        deserializer.deserialize_seq(Visitor)
    }
}

fn read_summary(path: &Path, id: &str) -> Result<ConversationSummary, StoreError> {
    let bytes = read_bounded(path)?;
    let fields: SummaryFields =
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
    let titled = Conversation {
        title: fields.title,
        messages: fields.messages.first_user.into_iter().collect(),
        ..Conversation::default()
    };
    Ok(ConversationSummary {
        id: id.to_string(),
        title: titled.display_title(),
        updated_ms: fields.updated_ms,
        message_count: fields.messages.count,
    })
}

/// The id of a saved conversation file (`<id>.json`), or `None` for any other file.
fn conversation_id_of(path: &Path) -> Option<String> {
    if path.extension()? != "json" || !path.is_file() {
        return None;
    }
    let id = path.file_stem()?.to_str()?;
    is_valid_id(id).then(|| id.to_string())
}

/// Ids become file names: letters, digits, `-` and `_` only, at most 128 of them.
fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::conversation::{ChatSettings, Message};

    fn sample() -> Conversation {
        let mut c = Conversation::new(ChatSettings::default());
        c.messages.push(Message::new(Role::User, "Hi **there**"));
        let mut reply = Message::new(Role::Assistant, "Hello!");
        reply.thinking = Some("The user greets me.".into());
        c.messages.push(reply);
        c
    }

    #[test]
    fn a_saved_conversation_loads_back_equal() {
        let dir = tempfile::tempdir().unwrap();
        let store = ConversationStore::new(dir.path().join("conversations"));
        let c = sample();
        store.save(&c).unwrap();
        assert_eq!(store.load(&c.id).unwrap(), c);
        let all = store.load_all();
        assert_eq!(all.conversations, vec![c]);
        assert!(all.errors.is_empty());
    }

    #[test]
    fn saving_again_replaces_the_file_and_leaves_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = ConversationStore::new(dir.path());
        let mut c = sample();
        store.save(&c).unwrap();
        c.messages.push(Message::new(Role::User, "again"));
        store.save(&c).unwrap();
        assert_eq!(store.load(&c.id).unwrap().messages.len(), 3);
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(files.len(), 1);
    }

    #[test]
    fn corrupt_files_are_reported_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = ConversationStore::new(dir.path());
        store.save(&sample()).unwrap();
        let bad = dir.path().join("broken.json");
        std::fs::write(&bad, "{ not json").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let all = store.load_all();
        assert_eq!(all.conversations.len(), 1);
        assert_eq!(all.errors.len(), 1);
        assert!(matches!(all.errors[0], StoreError::Parse { .. }));
        assert!(bad.exists());
    }

    #[test]
    fn a_conversation_file_past_the_limit_is_refused_without_being_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = ConversationStore::new(dir.path());
        let huge = dir.path().join("huge.json");
        // A sparse file: nothing is written, but it reads as that many zero bytes.
        let file = std::fs::File::create(&huge).unwrap();
        file.set_len(MAX_CONVERSATION_BYTES + 1).unwrap();
        let too_large = |e: &StoreError| matches!(e, StoreError::TooLarge { bytes, .. } if *bytes == MAX_CONVERSATION_BYTES + 1);
        let loaded = store.load_all();
        assert!(loaded.conversations.is_empty());
        assert!(too_large(&loaded.errors[0]), "{:?}", loaded.errors);
        assert_eq!(loaded.errors[0].unreadable_file(), Some(huge.as_path()));
        let listing = store.list();
        assert!(too_large(&listing.errors[0]), "{:?}", listing.errors);
        assert!(matches!(store.load("huge"), Err(ref e) if too_large(e)));
    }

    #[test]
    fn unreadable_files_are_quarantined_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = ConversationStore::new(dir.path());
        let bad = dir.path().join("broken.json");
        std::fs::write(&bad, "{ not json").unwrap();
        let quarantine = dir.path().join(QUARANTINE_DIR);
        std::fs::create_dir(&quarantine).unwrap();
        std::fs::write(quarantine.join("broken.json"), "older").unwrap();
        let errors = store.load_all().errors;
        let path = errors[0].unreadable_file().unwrap();
        let moved = store.quarantine(path).unwrap();
        assert_eq!(moved, quarantine.join("broken.json.1"));
        assert_eq!(std::fs::read_to_string(&moved).unwrap(), "{ not json");
        assert_eq!(
            std::fs::read_to_string(quarantine.join("broken.json")).unwrap(),
            "older"
        );
        assert!(!bad.exists());
        let again = store.load_all();
        assert!(again.errors.is_empty() && again.conversations.is_empty());
    }

    #[test]
    fn stale_temporary_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = ConversationStore::new(dir.path());
        let c = sample();
        store.save(&c).unwrap();
        std::fs::write(dir.path().join(format!("{}.json.999.tmp", c.id)), "half").unwrap();
        assert_eq!(store.remove_stale_temp_files(), 1);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        assert_eq!(store.load(&c.id).unwrap(), c);
    }

    #[test]
    fn newest_conversations_come_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = ConversationStore::new(dir.path());
        let mut old = sample();
        old.updated_ms = 1;
        let mut new = sample();
        new.updated_ms = 2;
        store.save(&old).unwrap();
        store.save(&new).unwrap();
        let ids: Vec<_> = store
            .load_all()
            .conversations
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(ids, [new.id, old.id]);
    }

    #[test]
    fn listing_summarises_without_loading_bodies() {
        let dir = tempfile::tempdir().unwrap();
        let store = ConversationStore::new(dir.path());
        let mut untitled = sample();
        untitled.updated_ms = 2;
        let mut titled = sample();
        titled.title = "Given title".into();
        titled.updated_ms = 1;
        titled
            .messages
            .insert(0, Message::new(Role::Assistant, "Hello first"));
        store.save(&untitled).unwrap();
        store.save(&titled).unwrap();
        std::fs::write(dir.path().join("broken.json"), "{ not json").unwrap();
        let listing = store.list();
        let summary = |c: &Conversation| ConversationSummary {
            id: c.id.clone(),
            title: c.display_title(),
            updated_ms: c.updated_ms,
            message_count: c.messages.len(),
        };
        assert_eq!(
            listing.summaries,
            vec![summary(&untitled), summary(&titled)]
        );
        assert_eq!(listing.summaries[0].title, "Hi **there**");
        assert_eq!(listing.errors.len(), 1);
        let thread = std::thread::current().name().unwrap().to_string();
        let counts = store.read_counts();
        assert_eq!(counts.get(&(ReadKind::Summary, thread.clone())), Some(&3));
        assert_eq!(counts.get(&(ReadKind::Body, thread)), None);
    }

    #[test]
    fn a_file_whose_messages_are_broken_is_listed_only_if_its_json_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let store = ConversationStore::new(dir.path());
        std::fs::write(
            dir.path().join("bad-role.json"),
            r#"{"title":"x","messages":[{"role":"alien","content":"?"}]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("bad-stats.json"),
            r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","stats":7}]}"#,
        )
        .unwrap();
        let listing = store.list();
        assert_eq!(
            listing.errors.len(),
            1,
            "an unknown role is caught at listing"
        );
        assert_eq!(listing.summaries.len(), 1);
        assert_eq!(listing.summaries[0].message_count, 2);
        assert!(matches!(
            store.load("bad-stats"),
            Err(StoreError::Parse { .. })
        ));
    }

    #[test]
    fn ids_that_are_not_plain_names_are_refused() {
        let store = ConversationStore::new("/tmp");
        for id in ["", "../escape", "a/b", "x.json"] {
            assert!(matches!(store.path_of(id), Err(StoreError::InvalidId(_))));
        }
    }

    #[test]
    fn the_file_name_decides_the_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = ConversationStore::new(dir.path());
        let mut c = sample();
        c.id = "real-id".into();
        let mut json = serde_json::to_value(&c).unwrap();
        json["id"] = "../../evil".into();
        std::fs::write(dir.path().join("real-id.json"), json.to_string()).unwrap();
        assert_eq!(store.load_all().conversations[0].id, "real-id");
    }

    #[test]
    fn deleting_removes_the_file_and_tolerates_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = ConversationStore::new(dir.path());
        let c = sample();
        store.save(&c).unwrap();
        store.delete(&c.id).unwrap();
        assert!(store.load_all().conversations.is_empty());
        store.delete(&c.id).unwrap();
    }

    #[test]
    fn saving_into_a_path_that_is_a_file_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("conversations");
        std::fs::write(&blocker, "a file, not a folder").unwrap();
        let store = ConversationStore::new(&blocker);
        assert!(matches!(
            store.save(&sample()),
            Err(StoreError::CreateDir { .. })
        ));
    }

    #[test]
    fn markdown_export_has_answers_but_no_thinking() {
        let mut c = sample();
        c.settings.system_prompt = "Be brief.".into();
        let md = export_markdown(&c);
        assert!(md.starts_with("# Hi **there**\n"));
        assert!(md.contains("## System prompt\n\nBe brief."));
        assert!(md.contains("## You\n\nHi **there**"));
        assert!(md.contains("## Assistant\n\nHello!"));
        assert!(!md.contains("greets"));
        assert!(md.ends_with("Hello!\n"));
    }
}
