//! UI preferences kept in eframe's own storage (conversations live in the data folder instead).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::LoadOptions;

/// The key under which the preferences are stored.
pub const STORAGE_KEY: &str = "smoldesk.preferences";

/// How many recent models are remembered.
pub const MAX_RECENT_MODELS: usize = 8;

/// Shortest context length accepted from stored preferences, in tokens.
pub const MIN_CONTEXT_LENGTH: usize = 256;

/// Longest context length accepted from stored preferences: the longest the settings offer.
pub const MAX_CONTEXT_LENGTH: usize =
    super::settings::CONTEXT_CHOICES[super::settings::CONTEXT_CHOICES.len() - 1];

/// Smallest and largest font sizes offered, in points.
pub const FONT_SIZE_RANGE: std::ops::RangeInclusive<f32> = 11.0..=24.0;

/// Light, dark, or whatever the system uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ThemeChoice {
    /// Follow the operating system.
    #[default]
    System,
    /// Dark text on a light background.
    Light,
    /// Light text on a dark background.
    Dark,
}

impl ThemeChoice {
    /// All choices, in the order the settings show them.
    pub const ALL: [ThemeChoice; 3] = [Self::System, Self::Light, Self::Dark];

    /// The name shown to the user.
    pub fn label(self) -> &'static str {
        match self {
            Self::System => "System",
            Self::Light => "Light",
            Self::Dark => "Dark",
        }
    }
}

/// Everything about the window the user expects to find again on the next start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Preferences {
    /// Whether thinking spans are displayed.
    pub show_thinking: bool,
    /// Colour scheme.
    pub theme: ThemeChoice,
    /// Body text size in points.
    pub font_size: f32,
    /// Whether the conversation list is open.
    pub sidebar_open: bool,
    /// The model that was loaded last (reloaded on start).
    pub last_model: Option<PathBuf>,
    /// Recently loaded models, newest first.
    pub recent_models: Vec<PathBuf>,
    /// Context length and threads for loading models.
    pub load_options: LoadOptions,
    /// The conversation that was open.
    pub last_conversation: Option<String>,
    /// Whether new conversations start with thinking on.
    pub think_by_default: bool,
    /// A chat template file used instead of the model's own.
    pub template_override: Option<PathBuf>,
}

impl Default for Preferences {
    fn default() -> Self {
        Self {
            show_thinking: true,
            theme: ThemeChoice::System,
            font_size: 15.0,
            sidebar_open: true,
            last_model: None,
            recent_models: Vec::new(),
            load_options: LoadOptions::default(),
            last_conversation: None,
            think_by_default: true,
            template_override: None,
        }
    }
}

impl Preferences {
    /// Reads the preferences from eframe's storage (defaults when absent or unreadable).
    pub fn load(storage: Option<&dyn eframe::Storage>) -> Self {
        let Some(text) = storage.and_then(|s| s.get_string(STORAGE_KEY)) else {
            return Self::default();
        };
        match serde_json::from_str::<Self>(&text) {
            Ok(prefs) => prefs.sanitized(),
            Err(err) => {
                log::warn!("ignoring unreadable preferences: {err}");
                Self::default()
            }
        }
    }

    /// Writes the preferences into eframe's storage.
    pub fn store(&self, storage: &mut dyn eframe::Storage) {
        match serde_json::to_string(self) {
            Ok(text) => storage.set_string(STORAGE_KEY, text),
            Err(err) => log::error!("cannot encode preferences: {err}"),
        }
    }

    /// Records a successfully loaded model as the last and most recent one.
    pub fn remember_model(&mut self, path: &Path) {
        self.last_model = Some(path.to_path_buf());
        self.recent_models.retain(|p| p != path);
        self.recent_models.insert(0, path.to_path_buf());
        self.recent_models.truncate(MAX_RECENT_MODELS);
    }

    /// Forgets a model (e.g. its file is gone).
    pub fn forget_model(&mut self, path: &Path) {
        if self.last_model.as_deref() == Some(path) {
            self.last_model = None;
        }
        self.recent_models.retain(|p| p != path);
    }

    /// Clamps values a hand-edited or old storage file may have out of range.
    fn sanitized(mut self) -> Self {
        let size = if self.font_size.is_finite() {
            self.font_size
        } else {
            Self::default().font_size
        };
        self.font_size = size.clamp(*FONT_SIZE_RANGE.start(), *FONT_SIZE_RANGE.end());
        self.recent_models.truncate(MAX_RECENT_MODELS);
        self.load_options.context_length = self
            .load_options
            .context_length
            .clamp(MIN_CONTEXT_LENGTH, MAX_CONTEXT_LENGTH);
        // 0 (one thread per core) stays as it is.
        self.load_options.threads = self
            .load_options
            .threads
            .min(crate::engine::cpu::pool::max_threads());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct MemoryStorage(HashMap<String, String>);

    impl eframe::Storage for MemoryStorage {
        fn get_string(&self, key: &str) -> Option<String> {
            self.0.get(key).cloned()
        }
        fn set_string(&mut self, key: &str, value: String) {
            self.0.insert(key.to_string(), value);
        }
        fn remove_string(&mut self, key: &str) {
            self.0.remove(key);
        }
        fn flush(&mut self) {}
    }

    #[test]
    fn preferences_round_trip_through_storage() {
        let mut storage = MemoryStorage::default();
        let mut prefs = Preferences {
            show_thinking: false,
            theme: ThemeChoice::Dark,
            font_size: 18.0,
            ..Preferences::default()
        };
        prefs.remember_model(Path::new("/m/a.gguf"));
        prefs.store(&mut storage);
        assert_eq!(Preferences::load(Some(&storage)), prefs);
    }

    #[test]
    fn missing_or_garbled_storage_gives_defaults() {
        assert_eq!(Preferences::load(None), Preferences::default());
        let mut storage = MemoryStorage::default();
        eframe::Storage::set_string(&mut storage, STORAGE_KEY, "{oops".into());
        assert_eq!(Preferences::load(Some(&storage)), Preferences::default());
    }

    #[test]
    fn out_of_range_font_sizes_are_clamped() {
        let mut storage = MemoryStorage::default();
        eframe::Storage::set_string(&mut storage, STORAGE_KEY, r#"{"font_size":400}"#.into());
        assert_eq!(Preferences::load(Some(&storage)).font_size, 24.0);
    }

    #[test]
    fn out_of_range_context_lengths_and_thread_counts_are_clamped() {
        let load = |json: &str| {
            let mut storage = MemoryStorage::default();
            eframe::Storage::set_string(&mut storage, STORAGE_KEY, json.into());
            Preferences::load(Some(&storage)).load_options
        };
        let huge = load(&format!(
            r#"{{"load_options":{{"context_length":{max},"threads":{max}}}}}"#,
            max = u64::MAX
        ));
        assert_eq!(huge.context_length, MAX_CONTEXT_LENGTH);
        assert_eq!(huge.threads, crate::engine::cpu::pool::max_threads());
        let tiny = load(r#"{"load_options":{"context_length":0,"threads":0}}"#);
        assert_eq!(tiny.context_length, MIN_CONTEXT_LENGTH);
        assert_eq!(tiny.threads, 0, "0 means one thread per core");
        let fine = load(r#"{"load_options":{"context_length":65536,"threads":2}}"#);
        assert_eq!((fine.context_length, fine.threads), (65536, 2));
        assert_eq!(
            super::super::settings::CONTEXT_CHOICES.iter().max(),
            Some(&MAX_CONTEXT_LENGTH)
        );
    }

    #[test]
    fn recent_models_are_unique_newest_first_and_bounded() {
        let mut prefs = Preferences::default();
        for i in 0..12 {
            prefs.remember_model(Path::new(&format!("/m/{i}.gguf")));
        }
        prefs.remember_model(Path::new("/m/5.gguf"));
        assert_eq!(prefs.recent_models.len(), MAX_RECENT_MODELS);
        assert_eq!(prefs.recent_models[0], Path::new("/m/5.gguf"));
        assert_eq!(prefs.last_model.as_deref(), Some(Path::new("/m/5.gguf")));
        prefs.forget_model(Path::new("/m/5.gguf"));
        assert!(prefs.last_model.is_none());
        assert!(!prefs.recent_models.contains(&PathBuf::from("/m/5.gguf")));
    }
}
