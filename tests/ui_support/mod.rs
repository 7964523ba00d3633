//! Shared helpers of the UI tests: a scripted backend standing in for the worker, harness
//! construction, and stepping the app until something happens.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use egui_kittest::Harness;
use smoldesk::chat::conversation::GenerationStats;
use smoldesk::engine::ModelInfo;
use smoldesk::engine::gguf::GgufFile;
use smoldesk::engine::tokenizer::GgufTokenizer;
use smoldesk::ui::{App, AppOptions, Backend};
use smoldesk::worker::messages::{GenerateRequest, RequestId, SegmentKind};
use smoldesk::worker::{Command, Event};

/// What the scripted backend saw and what it will answer.
#[derive(Default)]
pub struct FakeState {
    /// Commands received, in order.
    pub commands: Vec<Command>,
    /// Events the app will receive next.
    pub events: VecDeque<Event>,
    /// Times Stop was pressed.
    pub stops: usize,
    /// Times Cancel (load) was pressed.
    pub cancels: usize,
}

/// A backend the test drives by hand.
#[derive(Clone, Default)]
pub struct Fake(pub Arc<Mutex<FakeState>>);

impl Fake {
    /// Queues an event for the app.
    pub fn push(&self, event: Event) {
        self.0.lock().unwrap().events.push_back(event);
    }

    /// The generate requests received so far.
    pub fn requests(&self) -> Vec<GenerateRequest> {
        self.0
            .lock()
            .unwrap()
            .commands
            .iter()
            .filter_map(|c| match c {
                Command::Generate(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    /// The newest generate request.
    pub fn last_request(&self) -> GenerateRequest {
        self.requests()
            .pop()
            .expect("the app sent no generate request")
    }

    /// The model paths the app asked to load.
    pub fn loads(&self) -> Vec<PathBuf> {
        self.load_requests().into_iter().map(|(_, p)| p).collect()
    }

    /// The load requests received so far: (request id, path).
    pub fn load_requests(&self) -> Vec<(RequestId, PathBuf)> {
        self.0
            .lock()
            .unwrap()
            .commands
            .iter()
            .filter_map(|c| match c {
                Command::LoadModel { id, path, .. } => Some((*id, path.clone())),
                _ => None,
            })
            .collect()
    }

    /// The id of the newest load request (0 when there was none).
    pub fn last_load_id(&self) -> RequestId {
        self.load_requests().last().map_or(0, |(id, _)| *id)
    }

    /// Times Stop was pressed.
    pub fn stops(&self) -> usize {
        self.0.lock().unwrap().stops
    }

    /// Times Cancel was pressed.
    pub fn cancels(&self) -> usize {
        self.0.lock().unwrap().cancels
    }

    /// Queues a segment of a reply.
    pub fn segment(&self, id: RequestId, kind: SegmentKind, text: &str) {
        self.push(Event::Segment {
            id,
            kind,
            text: text.to_string(),
        });
    }

    /// Queues the start of a reply.
    pub fn started(&self, id: RequestId, prompt_text: &str, dropped_messages: usize) {
        self.push(Event::Started {
            id,
            prompt_tokens: 42,
            prompt_text: prompt_text.to_string(),
            template_fallback: None,
            dropped_messages,
        });
    }

    /// Queues the end of a reply.
    pub fn finished(&self, id: RequestId, stats: GenerationStats) {
        self.push(Event::Finished { id, stats });
    }
}

impl Backend for Fake {
    fn send(&self, command: Command) {
        self.0.lock().unwrap().commands.push(command);
    }

    fn stop_generation(&self) {
        self.0.lock().unwrap().stops += 1;
    }

    fn cancel_load(&self) {
        self.0.lock().unwrap().cancels += 1;
    }

    fn try_recv(&self) -> Option<Event> {
        self.0.lock().unwrap().events.pop_front()
    }
}

/// eframe storage in memory (preferences between app runs).
#[derive(Default, Clone)]
pub struct MemoryStorage(pub HashMap<String, String>);

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

/// Window size of the tests.
pub const SIZE: [f32; 2] = [1200.0, 800.0];

/// How long the tests wait for the background (reading conversations, saving).
pub const BACKGROUND_WAIT: Duration = Duration::from_secs(10);

/// The app in a test harness, with the given options and (optional) stored preferences, once
/// its open conversation has been read. Every character the app draws must have a glyph (the
/// harness panics on "tofu").
pub fn harness<'a>(options: AppOptions, storage: Option<&'a MemoryStorage>) -> Harness<'a, App> {
    opened(build(Harness::builder(), options, storage))
}

/// Like [`harness`], but drawing characters no font has is allowed (random models babble).
pub fn lenient_harness<'a>(
    options: AppOptions,
    storage: Option<&'a MemoryStorage>,
) -> Harness<'a, App> {
    opened(build(
        Harness::builder().allow_missing_glyphs(),
        options,
        storage,
    ))
}

/// The app in a test harness right after it started (its conversations may still be being
/// read).
pub fn starting_harness<'a>(
    options: AppOptions,
    storage: Option<&'a MemoryStorage>,
) -> Harness<'a, App> {
    build(Harness::builder(), options, storage)
}

/// Steps until the open conversation has been read and the model folders listed.
fn opened(mut harness: Harness<'_, App>) -> Harness<'_, App> {
    assert!(
        step_until(&mut harness, BACKGROUND_WAIT, |app| !app.is_opening()
            && !app.is_scanning_models()),
        "the conversations were not read"
    );
    harness
}

fn build<'a>(
    builder: egui_kittest::HarnessBuilder<App>,
    options: AppOptions,
    storage: Option<&'a MemoryStorage>,
) -> Harness<'a, App> {
    builder
        .with_size(SIZE)
        .with_max_steps(20)
        .build_eframe(move |cc| {
            if let Some(storage) = storage {
                cc.storage = Some(storage);
            }
            App::new(
                cc,
                AppOptions {
                    catch_panics: false,
                    ..options
                },
            )
        })
}

/// A data folder and a model folder holding a copy of the tiny SmolLM3 fixture.
pub struct Dirs {
    /// The data folder.
    pub data: tempfile::TempDir,
    /// The model folder.
    pub models: tempfile::TempDir,
    /// The model file in it.
    pub model: PathBuf,
}

/// Fresh [`Dirs`].
pub fn dirs() -> Dirs {
    let data = tempfile::tempdir().unwrap();
    let models = tempfile::tempdir().unwrap();
    let model = models.path().join("tiny-smollm3-q4_k_m.gguf");
    std::fs::copy(crate::common::fixture("tiny-smollm3-q4_k_m.gguf"), &model).unwrap();
    Dirs {
        data,
        models,
        model,
    }
}

/// The app on `dirs` with a model "loaded" by the fake backend.
pub fn loaded_app<'a>(fake: &Fake, dirs: &Dirs) -> Harness<'a, App> {
    let mut harness = harness(
        fake_options(fake, dirs.data.path(), dirs.models.path()),
        None,
    );
    load_model(&mut harness, fake, &dirs.model);
    assert!(
        harness.state().loaded_model().is_some(),
        "the model did not load"
    );
    harness
}

/// Options with a fake backend, a data folder and a model folder; nothing is reloaded.
pub fn fake_options(fake: &Fake, data_dir: &Path, model_dir: &Path) -> AppOptions {
    AppOptions {
        backend: Some(Box::new(fake.clone())),
        model_dirs: Some(vec![model_dir.to_path_buf()]),
        restore_last_model: false,
        ..AppOptions::new(data_dir)
    }
}

/// The event the worker sends when load request `id` finished, built from a real file.
pub fn loaded_event_for(id: RequestId, path: &Path) -> Event {
    let gguf = GgufFile::open(path).expect("the fixture opens");
    let info = ModelInfo::from_gguf(&gguf).expect("the fixture describes a model");
    let tokenizer = GgufTokenizer::from_gguf(&gguf).expect("the fixture has a tokenizer");
    Event::Loaded {
        id,
        info: Box::new(info),
        tokenizer: Arc::new(tokenizer),
        load_secs: 0.5,
        compute_threads: 2,
    }
}

/// The event the worker sends when a model finished loading, answering the newest load
/// request the fake saw (the tests push it as if the app had asked).
pub fn loaded_event(fake: &Fake, path: &Path) -> Event {
    loaded_event_for(fake.last_load_id(), path)
}

/// Has the app load a model, and answers as the worker would when it is loaded.
pub fn load_model(harness: &mut Harness<'_, App>, fake: &Fake, path: &Path) {
    harness
        .state_mut()
        .apply(smoldesk::ui::Action::Load(path.to_path_buf()));
    fake.push(loaded_event(fake, path));
    harness.run_steps(3);
}

/// Steps the app (sleeping a little between frames) until `done` holds; false on timeout.
pub fn step_until(
    harness: &mut Harness<'_, App>,
    timeout: Duration,
    mut done: impl FnMut(&App) -> bool,
) -> bool {
    let start = Instant::now();
    loop {
        harness.step();
        if done(harness.state()) {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Types text into the message box and presses Enter.
pub fn send_message(harness: &mut Harness<'_, App>, text: &str) {
    use egui_kittest::kittest::Queryable;
    harness.get_by_label("Message").focus();
    harness.step();
    harness.get_by_label("Message").type_text(text);
    harness.step();
    harness.key_press(egui::Key::Enter);
    harness.step();
}

/// Whether any node's label contains `text`.
pub fn shows(harness: &Harness<'_, App>, text: &str) -> bool {
    use egui_kittest::kittest::Queryable;
    harness.query_all_by_label_contains(text).next().is_some()
}

/// Steps the app until some label contains `text`; false on timeout.
pub fn step_until_shows(harness: &mut Harness<'_, App>, text: &str, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        harness.step();
        if shows(harness, text) {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
