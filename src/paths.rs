//! Where SmolDesk keeps its files: the models folder, conversations, the data directory.

use std::path::{Path, PathBuf};

/// Environment variable that overrides the data directory (tests point it at a temp dir).
pub const DATA_DIR_ENV: &str = "SMOLDESK_DATA_DIR";

/// Environment variable that overrides the folder of saved KV states.
pub const CACHE_DIR_ENV: &str = "SMOLDESK_CACHE_DIR";

/// File extension of model files.
pub const MODEL_EXTENSION: &str = "gguf";

/// The folder for conversations and downloaded models: `$SMOLDESK_DATA_DIR` if set, else the
/// platform's per-user data folder (e.g. `~/.local/share/smoldesk` on Linux), else `./smoldesk-data`.
pub fn data_dir() -> PathBuf {
    env_dir(DATA_DIR_ENV)
        .unwrap_or_else(|| platform_dir(directories::ProjectDirs::data_dir, "smoldesk-data"))
}

/// The folder of saved conversation KV states: `$SMOLDESK_CACHE_DIR` if set, else `kv` in the
/// platform's per-user cache folder (e.g. `~/.cache/smoldesk/kv` on Linux), else
/// `./smoldesk-cache/kv`.
pub fn kv_cache_dir() -> PathBuf {
    env_dir(CACHE_DIR_ENV).unwrap_or_else(|| {
        platform_dir(directories::ProjectDirs::cache_dir, "smoldesk-cache").join("kv")
    })
}

/// The folder named by the environment variable `env`, if it is set and not empty.
fn env_dir(env: &str) -> Option<PathBuf> {
    std::env::var_os(env)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}

/// SmolDesk's per-user platform folder that `pick` chooses, else `fallback`.
fn platform_dir(pick: fn(&directories::ProjectDirs) -> &Path, fallback: &str) -> PathBuf {
    directories::ProjectDirs::from("org", "smoldesk", "SmolDesk")
        .map(|dirs| pick(&dirs).to_path_buf())
        .unwrap_or_else(|| PathBuf::from(fallback))
}

/// The folder holding one JSON file per conversation.
pub fn conversations_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("conversations")
}

/// The folders searched for model files: `models/` next to the executable, `models/` in the
/// working directory, and `models/` in the data folder (duplicates removed, order kept).
pub fn model_dirs(data_dir: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        dirs.push(exe_dir.join("models"));
    }
    if let Ok(cwd) = std::env::current_dir() {
        dirs.push(cwd.join("models"));
    }
    dirs.push(data_dir.join("models"));
    dedup_paths(dirs)
}

/// The GGUF files directly inside the given folders, sorted by file name; missing or unreadable
/// folders are skipped.
pub fn find_model_files(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = dirs
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flat_map(|entries| entries.filter_map(Result::ok))
        .map(|entry| entry.path())
        .filter(|path| path.is_file() && has_model_extension(path))
        .collect();
    found = dedup_paths(found);
    found.sort_by(|a, b| a.file_name().cmp(&b.file_name()).then_with(|| a.cmp(b)));
    found
}

/// Whether a path ends in `.gguf` (any case).
pub fn has_model_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|ext| ext.to_str())
        .is_some_and(|ext| ext.eq_ignore_ascii_case(MODEL_EXTENSION))
}

/// Removes paths that point at the same file or folder, keeping the first occurrence.
fn dedup_paths(paths: Vec<PathBuf>) -> Vec<PathBuf> {
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for path in paths {
        let key = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if !seen.contains(&key) {
            seen.push(key);
            out.push(path);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_only_gguf_files_sorted_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.gguf", "a.GGUF", "notes.txt", "c.gguf.part"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        std::fs::create_dir(dir.path().join("folder.gguf")).unwrap();
        let dirs = vec![dir.path().to_path_buf(), dir.path().join("missing")];
        let names: Vec<String> = find_model_files(&dirs)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.GGUF", "b.gguf"]);
    }

    #[test]
    fn the_same_folder_twice_lists_each_file_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.gguf"), b"x").unwrap();
        let dirs = vec![dir.path().to_path_buf(), dir.path().join(".")];
        assert_eq!(find_model_files(&dirs).len(), 1);
    }

    #[test]
    fn model_dirs_end_with_the_data_folder() {
        let data = PathBuf::from("/nonexistent/smoldesk-data");
        assert_eq!(model_dirs(&data).last(), Some(&data.join("models")));
    }
}
