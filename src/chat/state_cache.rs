//! Saved KV states of recent conversations, so continuing one never recomputes its history:
//! kept in memory up to a budget, written to a cache folder on disk (in the background) up to a
//! cap, least recently used first. [`ConversationResume`] is the worker's side: restore a
//! conversation's state before its reply, save it after.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, Sender, unbounded};

use crate::engine::kv_state::{KvState, KvStateError, KvStateInfo};
use crate::engine::session::{Engine, common_prefix};

/// Default cap on the state files on disk.
pub const DEFAULT_DISK_CAP: u64 = 4 << 30;
/// Memory budget when the free memory cannot be read.
const FALLBACK_MEMORY_BUDGET: u64 = 1 << 30;
/// Extension of state files.
const EXTENSION: &str = "kv";
/// Longest key (conversation id) that is cached.
const MAX_KEY_LEN: usize = 100;
/// Age after which a leftover temporary file (from a crash) is deleted.
const STALE_TEMP_AGE: Duration = Duration::from_secs(600);

/// Where and how much the cache keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateCacheConfig {
    /// Folder of the state files (`None`: memory only).
    pub dir: Option<PathBuf>,
    /// Most bytes of states kept in memory; the most recently used one is always kept.
    pub memory_budget: u64,
    /// Most bytes of state files on disk.
    pub disk_cap: u64,
}

impl StateCacheConfig {
    /// The app's defaults: the platform's cache folder, a quarter of the free memory, 4 GB.
    pub fn app_default() -> Self {
        Self {
            dir: Some(crate::paths::kv_cache_dir()),
            memory_budget: default_memory_budget(),
            disk_cap: DEFAULT_DISK_CAP,
        }
    }
}

/// A quarter of the memory available now (`MemAvailable` on Linux), or 1 GiB if unknown.
pub fn default_memory_budget() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_available(&text))
        .map_or(FALLBACK_MEMORY_BUDGET, |bytes| bytes / 4)
}

/// Bytes of `MemAvailable` in the text of `/proc/meminfo`.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// What the cache holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheUsage {
    /// Bytes of states in memory.
    pub memory_bytes: u64,
    /// States in memory.
    pub memory_states: usize,
    /// Bytes of state files on disk.
    pub disk_bytes: u64,
    /// State files on disk.
    pub disk_files: usize,
}

/// KV states by key (conversation id), in memory and on disk.
pub struct StateCache {
    shared: Arc<Shared>,
    jobs: Option<Sender<Job>>,
    writer: Option<JoinHandle<()>>,
}

struct Shared {
    config: StateCacheConfig,
    index: Mutex<Index>,
}

#[derive(Default)]
struct Index {
    /// Least recently used first.
    memory: Vec<MemoryEntry>,
    disk: Vec<DiskEntry>,
    /// The newest version put for each key (older pending writes are skipped).
    versions: HashMap<String, u64>,
    next_version: u64,
}

struct MemoryEntry {
    key: String,
    state: Arc<KvState>,
}

struct DiskEntry {
    key: String,
    bytes: u64,
    used: SystemTime,
}

enum Job {
    Write {
        key: String,
        version: u64,
        state: Arc<KvState>,
    },
    Flush(Sender<()>),
}

impl StateCache {
    /// Opens a cache: lists the state files already in the folder (deleting leftover
    /// temporary files) and starts the background writer.
    pub fn open(config: StateCacheConfig) -> Self {
        let mut index = Index::default();
        if let Some(dir) = &config.dir {
            index.disk = scan_dir(dir);
        }
        let shared = Arc::new(Shared {
            config,
            index: Mutex::new(index),
        });
        let (jobs, writer) = match &shared.config.dir {
            Some(_) => spawn_writer(shared.clone()),
            None => (None, None),
        };
        Self {
            shared,
            jobs,
            writer,
        }
    }

    /// The app's cache (default folder and budgets), shared by the worker and the settings.
    pub fn app() -> Arc<Self> {
        static APP: OnceLock<Arc<StateCache>> = OnceLock::new();
        APP.get_or_init(|| Arc::new(Self::open(StateCacheConfig::app_default())))
            .clone()
    }

    /// The state saved for `key`: from memory, else read (and fully validated) from disk. On
    /// disk, the header is read first and must satisfy `fits` (checked on it alone) before the
    /// keys and values are read, so a file that could not be used, however large, costs no
    /// more than its header. A file that fails to read or does not fit is deleted. A state in
    /// memory is returned as it is.
    pub fn get(&self, key: &str, fits: &dyn Fn(&KvStateInfo) -> bool) -> Option<Arc<KvState>> {
        let path = {
            let mut index = self.shared.lock();
            if let Some(state) = index.touch_memory(key) {
                return Some(state);
            }
            index
                .disk
                .iter()
                .any(|e| e.key == key)
                .then(|| self.path(key))??
        };
        let check = |info: &KvStateInfo| {
            if fits(info) {
                Ok(())
            } else {
                Err(KvStateError::Mismatch(
                    "it was saved for another model or shape".into(),
                ))
            }
        };
        match KvState::read_checked(&path, check) {
            Ok(state) => {
                let state = Arc::new(state);
                mark_used(&path);
                let mut index = self.shared.lock();
                if let Some(entry) = index.disk.iter_mut().find(|e| e.key == key) {
                    entry.used = SystemTime::now();
                }
                index.insert_memory(key, state.clone(), self.shared.config.memory_budget);
                Some(state)
            }
            Err(err) => {
                log::warn!("ignoring saved state {}: {err}", path.display());
                self.remove(key);
                None
            }
        }
    }

    /// Keeps `state` for `key` in memory and writes it to disk in the background (a failed
    /// write is logged; the state is then just not on disk).
    pub fn put(&self, key: &str, state: KvState) {
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return;
        }
        let state = Arc::new(state);
        let version = {
            let mut index = self.shared.lock();
            index.insert_memory(key, state.clone(), self.shared.config.memory_budget);
            index.next_version += 1;
            let version = index.next_version;
            index.versions.insert(key.to_string(), version);
            version
        };
        if let Some(jobs) = &self.jobs {
            let job = Job::Write {
                key: key.to_string(),
                version,
                state,
            };
            if jobs.send(job).is_err() {
                log::warn!("the state writer has stopped; state not saved");
            }
        }
    }

    /// Of the saved states that `fits` accepts (checked on their headers alone), the one
    /// sharing the longest prefix with `prompt`, with its key.
    pub fn longest_prefix(
        &self,
        prompt: &[u32],
        fits: &dyn Fn(&KvStateInfo) -> bool,
    ) -> Option<(String, Arc<KvState>)> {
        let (mut best, on_disk) = {
            let index = self.shared.lock();
            let best = index
                .memory
                .iter()
                .filter(|e| fits(e.state.info()))
                .map(|e| (common_prefix(e.state.tokens(), prompt), e.key.clone()))
                .max_by_key(|(shared, _)| *shared);
            let on_disk: Vec<String> = index.disk.iter().map(|e| e.key.clone()).collect();
            (best, on_disk)
        };
        for key in on_disk {
            let Some(path) = self.path(&key) else {
                continue;
            };
            let Ok(info) = KvStateInfo::read(&path) else {
                continue;
            };
            let shared = common_prefix(&info.tokens, prompt);
            if fits(&info) && best.as_ref().is_none_or(|(b, _)| shared > *b) {
                best = Some((shared, key));
            }
        }
        let (shared, key) = best.filter(|(shared, _)| *shared > 0)?;
        log::debug!("state {key} shares {shared} tokens with the prompt");
        let state = self.get(&key, fits)?;
        Some((key, state))
    }

    /// Forgets the state of `key`, in memory and on disk.
    pub fn remove(&self, key: &str) {
        let mut index = self.shared.lock();
        index.memory.retain(|e| e.key != key);
        index.versions.remove(key);
        if let Some(pos) = index.disk.iter().position(|e| e.key == key) {
            index.disk.remove(pos);
            if let Some(path) = self.path(key) {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// Forgets every state, in memory and on disk.
    pub fn clear(&self) {
        let mut index = self.shared.lock();
        index.memory.clear();
        index.versions.clear();
        index.disk.clear();
        if let Some(dir) = &self.shared.config.dir {
            for path in state_files(dir) {
                if let Err(err) = std::fs::remove_file(&path) {
                    log::warn!("cannot delete {}: {err}", path.display());
                }
            }
        }
    }

    /// Sizes of what is kept.
    pub fn usage(&self) -> CacheUsage {
        let index = self.shared.lock();
        CacheUsage {
            memory_bytes: index.memory.iter().map(|e| e.state.size_bytes()).sum(),
            memory_states: index.memory.len(),
            disk_bytes: index.disk.iter().map(|e| e.bytes).sum(),
            disk_files: index.disk.len(),
        }
    }

    /// Bytes of the state file saved for `key`, if there is one.
    pub fn stored_bytes(&self, key: &str) -> Option<u64> {
        let index = self.shared.lock();
        index.disk.iter().find(|e| e.key == key).map(|e| e.bytes)
    }

    /// The cache folder, if states go to disk.
    pub fn dir(&self) -> Option<&Path> {
        self.shared.config.dir.as_deref()
    }

    /// Waits until every state put so far is written (or has failed to write).
    pub fn flush(&self) {
        if let Some(jobs) = &self.jobs {
            let (done, wait) = unbounded();
            if jobs.send(Job::Flush(done)).is_ok() {
                let _ = wait.recv();
            }
        }
    }

    fn path(&self, key: &str) -> Option<PathBuf> {
        self.shared.path(key)
    }
}

impl Drop for StateCache {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn path(&self, key: &str) -> Option<PathBuf> {
        let dir = self.config.dir.as_ref()?;
        Some(dir.join(format!("{}.{EXTENSION}", encode_key(key))))
    }

    /// Writes one state if it is still the newest for its key, then keeps the disk under its
    /// cap.
    fn write(&self, key: &str, version: u64, state: &KvState) {
        let current = |index: &Index| index.versions.get(key) == Some(&version);
        if !current(&self.lock()) {
            return;
        }
        let (Some(dir), Some(path)) = (self.config.dir.as_ref(), self.path(key)) else {
            return;
        };
        let written = std::fs::create_dir_all(dir)
            .map_err(|e| e.to_string())
            .and_then(|()| state.write_atomic(&path).map_err(|e| e.to_string()));
        let mut index = self.lock();
        match written {
            Ok(bytes) if current(&index) => {
                index.disk.retain(|e| e.key != key);
                index.disk.push(DiskEntry {
                    key: key.to_string(),
                    bytes,
                    used: SystemTime::now(),
                });
                self.enforce_cap(&mut index);
            }
            // Cleared or removed while writing.
            Ok(_) if !index.versions.contains_key(key) => {
                let _ = std::fs::remove_file(&path);
            }
            Ok(_) => {}
            Err(err) => log::warn!("state of {key} not saved: {err}"),
        }
    }

    /// Deletes the least recently used files until the total fits the cap.
    fn enforce_cap(&self, index: &mut Index) {
        let mut total: u64 = index.disk.iter().map(|e| e.bytes).sum();
        index.disk.sort_by_key(|e| e.used);
        while total > self.config.disk_cap && !index.disk.is_empty() {
            let entry = index.disk.remove(0);
            total -= entry.bytes;
            if let Some(path) = self.path(&entry.key) {
                log::info!("state cache over its cap: deleting {}", path.display());
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

impl Index {
    /// The memory entry of `key`, moved to most recently used.
    fn touch_memory(&mut self, key: &str) -> Option<Arc<KvState>> {
        let pos = self.memory.iter().position(|e| e.key == key)?;
        let entry = self.memory.remove(pos);
        let state = entry.state.clone();
        self.memory.push(entry);
        Some(state)
    }

    /// Adds (or replaces) `key` as most recently used and drops the least recently used
    /// entries beyond `budget`, always keeping the newest.
    fn insert_memory(&mut self, key: &str, state: Arc<KvState>, budget: u64) {
        self.memory.retain(|e| e.key != key);
        self.memory.push(MemoryEntry {
            key: key.to_string(),
            state,
        });
        let mut total: u64 = self.memory.iter().map(|e| e.state.size_bytes()).sum();
        while total > budget && self.memory.len() > 1 {
            total -= self.memory.remove(0).state.size_bytes();
        }
    }
}

fn spawn_writer(shared: Arc<Shared>) -> (Option<Sender<Job>>, Option<JoinHandle<()>>) {
    let (jobs, rx) = unbounded();
    let thread = std::thread::Builder::new()
        .name("smoldesk-state-writer".into())
        .spawn(move || write_jobs(&shared, &rx));
    match thread {
        Ok(handle) => (Some(jobs), Some(handle)),
        Err(err) => {
            log::warn!("cannot start the state writer, states stay in memory: {err}");
            (None, None)
        }
    }
}

fn write_jobs(shared: &Shared, jobs: &Receiver<Job>) {
    for job in jobs {
        match job {
            Job::Write {
                key,
                version,
                state,
            } => shared.write(&key, version, &state),
            Job::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// The state files in `dir` with their sizes and last use; deletes stale temporary files.
fn scan_dir(dir: &Path) -> Vec<DiskEntry> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains(".tmp-") {
            let stale = used.elapsed().is_ok_and(|age| age > STALE_TEMP_AGE);
            if stale {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        let key = name
            .strip_suffix(&format!(".{EXTENSION}"))
            .and_then(decode_key);
        if let (Some(key), true) = (key, meta.is_file()) {
            found.push(DiskEntry {
                key,
                bytes: meta.len(),
                used,
            });
        }
    }
    found
}

/// The state files (and temporary files) in `dir`.
fn state_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.ends_with(&format!(".{EXTENSION}")) || name.contains(&format!(".{EXTENSION}.tmp-"))
        })
        .collect()
}

/// Marks a state file as just used (its modification time orders eviction across restarts).
fn mark_used(path: &Path) {
    let touched = std::fs::File::options()
        .append(true)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now()));
    if let Err(err) = touched {
        log::debug!("cannot mark {} as used: {err}", path.display());
    }
}

/// A file-name-safe, reversible form of a key: ASCII letters, digits and `-` stay, every other
/// byte becomes `_` and two hex digits.
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02X}"));
        }
    }
    out
}

/// The key a file name stem encodes, if it is one [`encode_key`] makes.
fn decode_key(stem: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(stem.len());
    let mut chars = stem.bytes();
    while let Some(b) = chars.next() {
        if b == b'_' {
            let hex = [chars.next()?, chars.next()?];
            bytes.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            bytes.push(b);
        }
    }
    String::from_utf8(bytes).ok()
}

/// Keeps the engine's KV cache in step with conversations for the worker: before a reply,
/// restores the conversation's saved state unless the engine already holds it; after a reply,
/// saves the state (written to disk off the worker's thread).
pub struct ConversationResume {
    cache: Arc<StateCache>,
    /// The conversation whose tokens the engine's cache holds.
    owner: Option<String>,
}

impl ConversationResume {
    /// Works with `cache`.
    pub fn new(cache: Arc<StateCache>) -> Self {
        Self { cache, owner: None }
    }

    /// Before a reply in `conversation`: unless the engine holds that conversation already,
    /// restores its saved state (memory first, then disk). Returns the tokens restored. A state
    /// that does not fit the model is dropped and the prompt is computed as usual.
    pub fn before_reply(&mut self, engine: &mut Engine, conversation: Option<&str>) -> usize {
        let Some(key) = conversation else {
            self.owner = None;
            return 0;
        };
        let holds_it = self.owner.as_deref() == Some(key) && !engine.cached_tokens().is_empty();
        self.owner = Some(key.to_string());
        if holds_it {
            return 0;
        }
        let fits = |info: &KvStateInfo| engine.check_kv_state(info).is_ok();
        let Some(state) = self.cache.get(key, &fits) else {
            return 0;
        };
        match engine.import_kv_state(&state) {
            Ok(restored) => {
                log::info!("restored {restored} cached tokens of conversation {key}");
                restored
            }
            Err(err) => {
                log::warn!("saved state of conversation {key} ignored: {err}");
                self.cache.remove(key);
                0
            }
        }
    }

    /// After a reply in `conversation` (finished, stopped or failed): saves the engine's state.
    pub fn after_reply(&mut self, engine: &Engine, conversation: Option<&str>) {
        if let Some(key) = conversation
            && !engine.cached_tokens().is_empty()
        {
            self.cache.put(key, engine.export_kv_state());
            self.owner = Some(key.to_string());
        }
    }

    /// The engine was replaced or unloaded: it holds no conversation.
    pub fn engine_changed(&mut self) {
        self.owner = None;
    }

    /// Waits until saved states are on disk.
    pub fn flush(&self) {
        self.cache.flush();
    }
}

/// Restores into `engine` the saved state sharing the longest prefix with `prompt` (for
/// `smoldesk generate --cache-dir`); returns its key and the tokens restored. A state that
/// fails to load or import is deleted and ignored.
pub fn restore_longest_prefix(
    cache: &StateCache,
    engine: &mut Engine,
    prompt: &[u32],
) -> Option<(String, usize)> {
    let fits = |info: &KvStateInfo| engine.check_kv_state(info).is_ok();
    let (key, state) = cache.longest_prefix(prompt, &fits)?;
    match engine.import_kv_state(&state) {
        Ok(restored) => Some((key, restored)),
        Err(err) => {
            log::warn!("saved state {key} ignored: {err}");
            cache.remove(&key);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kv_state::{KvElement, KvLayerBytes, ModelFileIdentity};

    fn state(tokens: &[u32]) -> KvState {
        let info = KvStateInfo {
            identity: ModelFileIdentity {
                file_size: 1,
                modified_secs: 2,
                modified_nanos: 3,
                header_len: 4,
                header_crc: 5,
            },
            element: KvElement::F32,
            context_length: 4096,
            n_layer: 1,
            row_width: 256,
            tokens: tokens.to_vec(),
        };
        let values: Vec<f32> = (0..info.stored_positions() * 256)
            .map(|i| i as f32)
            .collect();
        KvState::new(info, vec![KvLayerBytes::encode(&values, &values)]).unwrap()
    }

    fn config(dir: &Path, memory_budget: u64, disk_cap: u64) -> StateCacheConfig {
        StateCacheConfig {
            dir: Some(dir.to_path_buf()),
            memory_budget,
            disk_cap,
        }
    }

    #[test]
    fn reads_mem_available() {
        let text = "MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n";
        assert_eq!(mem_available(text), Some(8_000_000 * 1024));
        assert_eq!(mem_available("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn keys_round_trip_through_file_names() {
        for key in ["1733-42-0", "a/b c_d", "ünï", ""] {
            let name = encode_key(key);
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            );
            assert_eq!(decode_key(&name).as_deref(), Some(key));
        }
        assert_eq!(decode_key("bad_z"), None);
    }

    #[test]
    fn a_state_survives_a_restart_of_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let saved = state(&[1, 2, 3]);
        {
            let cache = StateCache::open(config(dir.path(), u64::MAX, u64::MAX));
            cache.put("conv-1", saved.clone());
            cache.flush();
            assert_eq!(cache.usage().disk_files, 1);
        }
        let cache = StateCache::open(config(dir.path(), u64::MAX, u64::MAX));
        assert_eq!(cache.usage().memory_states, 0);
        assert_eq!(*cache.get("conv-1", &|_| true).unwrap(), saved);
        assert!(cache.get("conv-2", &|_| true).is_none());
    }

    #[test]
    fn a_saved_state_that_does_not_fit_is_refused_on_its_header_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = StateCache::open(config(dir.path(), u64::MAX, u64::MAX));
            cache.put("conv-1", state(&[1, 2, 3]));
            cache.flush();
        }
        // Damage the keys and values: only a read of the body would notice.
        let files = state_files(dir.path());
        assert_eq!(files.len(), 1);
        let mut bytes = std::fs::read(&files[0]).unwrap();
        let last_data = bytes.len() - 5;
        bytes[last_data] ^= 0x55;
        std::fs::write(&files[0], &bytes).unwrap();

        let cache = StateCache::open(config(dir.path(), u64::MAX, u64::MAX));
        let asked = std::cell::Cell::new(0);
        let refuse = |info: &KvStateInfo| {
            asked.set(asked.get() + 1);
            info.n_layer == 99
        };
        assert!(cache.get("conv-1", &refuse).is_none());
        assert_eq!(asked.get(), 1, "the header was checked");
        assert!(
            state_files(dir.path()).is_empty(),
            "the unusable file is gone"
        );
        assert_eq!(cache.usage().disk_files, 0);
    }

    #[test]
    fn memory_keeps_the_budget_but_always_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let one = state(&[1, 2]).size_bytes();
        let cache = StateCache::open(StateCacheConfig {
            dir: None,
            ..config(dir.path(), one * 2, u64::MAX)
        });
        for key in ["a", "b", "c"] {
            cache.put(key, state(&[1, 2]));
        }
        assert_eq!(cache.usage().memory_states, 2);
        assert!(
            cache.get("a", &|_| true).is_none(),
            "the least recently used went first"
        );
        // States are stored in whole blocks of the cache: 600 tokens take three.
        let big: Vec<u32> = (1..=600).collect();
        cache.put("big", state(&big));
        assert_eq!(cache.usage().memory_states, 1);
        assert!(cache.get("big", &|_| true).is_some());
    }

    #[test]
    fn the_disk_cap_evicts_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let file = state(&[1, 2, 3]).info().file_bytes();
        let cache = StateCache::open(config(dir.path(), 0, file * 2));
        cache.put("a", state(&[1, 2, 3]));
        cache.flush();
        std::thread::sleep(Duration::from_millis(20));
        cache.put("b", state(&[4, 5, 6]));
        cache.flush();
        std::thread::sleep(Duration::from_millis(20));
        // Reading "a" from disk makes it more recent than "b".
        assert!(cache.get("a", &|_| true).is_some());
        std::thread::sleep(Duration::from_millis(20));
        cache.put("c", state(&[7, 8, 9]));
        cache.flush();
        let usage = cache.usage();
        assert_eq!(usage.disk_files, 2);
        assert!(usage.disk_bytes <= file * 2);
        assert_eq!(state_files(dir.path()).len(), 2);
        drop(cache);
        let cache = StateCache::open(config(dir.path(), 0, file * 2));
        assert!(
            cache.get("b", &|_| true).is_none(),
            "b was the least recently used"
        );
        assert!(cache.get("a", &|_| true).is_some() && cache.get("c", &|_| true).is_some());
    }

    #[test]
    fn a_state_larger_than_the_cap_is_not_kept_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let cache = StateCache::open(config(dir.path(), 0, 100));
        cache.put("a", state(&[1, 2, 3]));
        cache.flush();
        assert_eq!(cache.usage().disk_files, 0);
        assert!(state_files(dir.path()).is_empty());
    }

    #[test]
    fn a_corrupt_file_is_ignored_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = StateCache::open(config(dir.path(), 0, u64::MAX));
        cache.put("a", state(&[1, 2, 3]));
        cache.put("b", state(&[9, 9]));
        cache.flush();
        drop(cache);
        let path = dir.path().join("a.kv");
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 10;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let cache = StateCache::open(config(dir.path(), 0, u64::MAX));
        assert!(cache.get("a", &|_| true).is_none());
        assert!(!path.exists());
        assert!(cache.get("b", &|_| true).is_some());
    }

    #[test]
    fn the_longest_prefix_wins_among_fitting_states() {
        let dir = tempfile::tempdir().unwrap();
        let cache = StateCache::open(config(dir.path(), 0, u64::MAX));
        cache.put("short", state(&[1, 2]));
        cache.put("long", state(&[1, 2, 3, 4]));
        cache.put("other", state(&[7, 8, 9, 10, 11]));
        cache.flush();
        let (key, found) = cache.longest_prefix(&[1, 2, 3, 4, 5], &|_| true).unwrap();
        assert_eq!((key.as_str(), found.tokens()), ("long", &[1, 2, 3, 4][..]));
        assert!(cache.longest_prefix(&[1, 2, 3], &|_| false).is_none());
        assert!(cache.longest_prefix(&[5, 5], &|_| true).is_none());
    }

    #[test]
    fn clear_empties_memory_and_disk() {
        let dir = tempfile::tempdir().unwrap();
        let cache = StateCache::open(config(dir.path(), u64::MAX, u64::MAX));
        cache.put("a", state(&[1]));
        cache.flush();
        cache.clear();
        assert_eq!(cache.usage(), CacheUsage::default());
        assert!(state_files(dir.path()).is_empty());
        assert!(cache.get("a", &|_| true).is_none());
    }

    #[test]
    fn a_write_error_only_means_not_saved() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"x").unwrap();
        // The cache folder's path is a file: every write fails.
        let cache = StateCache::open(config(&blocker.join("kv"), u64::MAX, u64::MAX));
        cache.put("a", state(&[1]));
        cache.flush();
        assert_eq!(cache.usage().disk_files, 0);
        assert!(cache.get("a", &|_| true).is_some(), "still in memory");
    }
}
