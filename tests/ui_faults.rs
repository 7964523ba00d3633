//! The app against the real worker with faults injected at each stage (a panic while loading
//! at 0% and 50%, during prefill, while streaming; a failing disk): each time the app ends up
//! usable, and the next message gets a reply. Also: loading model A, then B before A is done;
//! the Threads setting reaching the compute pool.

mod common;
mod ui_support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use smoldesk::chat::conversation::Role;
use smoldesk::ui::app::ModelState;
use smoldesk::ui::{Action, App, AppOptions};
use smoldesk::worker::WorkerHandle;
use smoldesk::worker::thread::{FaultHook, FaultPoint};
use ui_support::*;

/// Generous: debug builds on two shared cores.
const TIMEOUT: Duration = Duration::from_secs(120);

/// Where the next injected panic happens.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// When loading reaches this fraction.
    LoadAt(f32),
    /// Just before the prompt is computed.
    Prefill,
    /// After the first piece of the reply was sent.
    Streaming,
}

/// A fault armed by the test and fired (once) by the worker's hook; optionally every load
/// step is slowed down.
#[derive(Clone, Default)]
struct Faults {
    armed: Arc<Mutex<Option<Stage>>>,
    load_step_delay: Arc<Mutex<Duration>>,
    prefill_delay: Arc<Mutex<Duration>>,
}

impl Faults {
    fn arm(&self, stage: Stage) {
        *self.armed.lock().unwrap() = Some(stage);
    }

    fn hook(&self) -> FaultHook {
        let armed = self.armed.clone();
        let delay = self.load_step_delay.clone();
        let prefill_delay = self.prefill_delay.clone();
        Arc::new(move |point| {
            match point {
                FaultPoint::Load { .. } => std::thread::sleep(*delay.lock().unwrap()),
                FaultPoint::Prefill => std::thread::sleep(*prefill_delay.lock().unwrap()),
                FaultPoint::Segment => {}
            }
            let fire = {
                let mut armed = armed.lock().unwrap();
                let fire = match (*armed, point) {
                    (Some(Stage::LoadAt(at)), FaultPoint::Load { fraction }) => fraction >= at,
                    (Some(Stage::Prefill), FaultPoint::Prefill) => true,
                    (Some(Stage::Streaming), FaultPoint::Segment) => true,
                    _ => false,
                };
                if fire {
                    *armed = None;
                }
                fire
            };
            if fire {
                panic!("injected fault at {point:?}");
            }
        })
    }
}

fn tiny_model() -> PathBuf {
    common::fixture("tiny-smollm3-q4_k_m.gguf")
}

fn app<'a>(data: &Path, faults: &Faults) -> Harness<'a, App> {
    let worker = WorkerHandle::spawn_with_faults(Arc::new(|| {}), faults.hook());
    let options = AppOptions {
        backend: Some(Box::new(worker)),
        model_dirs: Some(Vec::new()),
        restore_last_model: false,
        ..AppOptions::new(data)
    };
    lenient_harness(options, None)
}

fn load(harness: &mut Harness<'_, App>, path: &Path) {
    harness.state_mut().apply(Action::Load(path.to_path_buf()));
    assert!(
        step_until(harness, TIMEOUT, |app| !matches!(
            app.model_state(),
            ModelState::Loading { .. }
        )),
        "the load never ended"
    );
}

/// Sends a message and waits for the reply to end; returns whether it ended with a reply
/// (statistics saved, nothing marked interrupted).
fn send_and_wait(harness: &mut Harness<'_, App>, text: &str) -> bool {
    if let Some(c) = harness.state_mut().current_conversation_mut() {
        c.settings.sampling.max_tokens = 6;
    }
    harness.state_mut().set_draft(text);
    harness.state_mut().apply(Action::Send);
    assert!(
        harness.state().generation().is_some(),
        "the message was sent"
    );
    assert!(
        step_until(harness, TIMEOUT, |app| app.generation().is_none()),
        "the reply never ended"
    );
    harness.run_steps(2);
    let last = harness
        .state()
        .current_conversation()
        .and_then(|c| c.messages.last().cloned());
    last.is_some_and(|m| m.role == Role::Assistant && m.stats.is_some() && !m.interrupted)
}

fn notices_mention(app: &App, text: &str) -> bool {
    app.notice_texts().iter().any(|n| n.contains(text))
}

#[test]
fn a_panic_while_loading_at_0_or_50_percent_leaves_the_app_ready_for_the_next_load() {
    let data = tempfile::tempdir().unwrap();
    let faults = Faults::default();
    let mut harness = app(data.path(), &faults);
    for at in [0.0, 0.5] {
        faults.arm(Stage::LoadAt(at));
        load(&mut harness, &tiny_model());
        assert!(
            matches!(harness.state().model_state(), ModelState::Empty),
            "at {at}: the failed load leaves no model"
        );
        assert!(
            notices_mention(harness.state(), "internal error"),
            "at {at}: {:?}",
            harness.state().notice_texts()
        );
    }
    load(&mut harness, &tiny_model());
    assert!(harness.state().loaded_model().is_some());
    assert!(
        send_and_wait(&mut harness, "Hello"),
        "the next message works"
    );
}

#[test]
fn a_panic_during_prefill_or_streaming_ends_the_reply_and_the_next_message_works() {
    let data = tempfile::tempdir().unwrap();
    let faults = Faults::default();
    let mut harness = app(data.path(), &faults);
    load(&mut harness, &tiny_model());
    for stage in [Stage::Prefill, Stage::Streaming] {
        faults.arm(stage);
        assert!(
            !send_and_wait(&mut harness, "Hello"),
            "{stage:?}: no full reply"
        );
        assert!(
            notices_mention(harness.state(), "The reply failed: internal error"),
            "{stage:?}: {:?}",
            harness.state().notice_texts()
        );
        assert!(harness.state().loaded_model().is_some(), "the model stays");
        assert!(
            send_and_wait(&mut harness, "Hello again"),
            "{stage:?}: the next message works"
        );
    }
}

#[test]
fn a_failing_disk_mid_reply_is_shown_and_the_next_message_works() {
    let data = tempfile::tempdir().unwrap();
    let faults = Faults::default();
    let mut harness = app(data.path(), &faults);
    load(&mut harness, &tiny_model());
    assert!(send_and_wait(&mut harness, "First"));
    // The conversations folder becomes a file: every save fails from now on.
    // A rename, not a removal: the app's background saver may be writing into
    // the folder at this moment, and a recursive removal would race with it.
    let folder = data.path().join("conversations");
    std::fs::rename(&folder, data.path().join("conversations.moved")).unwrap();
    std::fs::write(&folder, "not a folder").unwrap();
    assert!(
        send_and_wait(&mut harness, "Second"),
        "the reply still comes"
    );
    assert!(
        step_until(&mut harness, TIMEOUT, |app| notices_mention(
            app,
            "Could not save the conversation"
        )),
        "{:?}",
        harness.state().notice_texts()
    );
    std::fs::remove_file(&folder).unwrap();
    assert!(send_and_wait(&mut harness, "Third"), "and the next one");
    let id = harness.state().current_conversation().unwrap().id.clone();
    harness.state_mut().shutdown();
    let saved = smoldesk::chat::store::ConversationStore::new(&folder)
        .load(&id)
        .unwrap();
    assert_eq!(
        saved.messages.len(),
        6,
        "everything is saved once the disk works"
    );
}

#[test]
fn loading_a_then_b_before_a_is_done_ends_with_b_and_no_error_about_a() {
    let data = tempfile::tempdir().unwrap();
    let faults = Faults::default();
    *faults.load_step_delay.lock().unwrap() = Duration::from_millis(20);
    let mut harness = app(data.path(), &faults);
    let a = common::smollm2_path();
    let b = tiny_model();
    harness.state_mut().apply(Action::Load(a.clone()));
    assert!(
        step_until(&mut harness, TIMEOUT, |app| matches!(
            app.model_state(),
            ModelState::Loading { fraction, .. } if *fraction > 0.0
        )),
        "A's load made progress"
    );
    harness.state_mut().apply(Action::Load(b.clone()));
    let mut saw_b_progress = false;
    assert!(
        step_until(&mut harness, TIMEOUT, |app| {
            if let ModelState::Loading { path, fraction, .. } = app.model_state() {
                saw_b_progress |= *path == b && *fraction > 0.0;
            }
            !matches!(app.model_state(), ModelState::Loading { .. })
        }),
        "the loads ended"
    );
    let loaded = harness.state().loaded_model().expect("a model is loaded");
    assert_eq!(loaded.info.path, b);
    assert!(saw_b_progress, "B's progress was shown");
    let a_name = a.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        !harness
            .state()
            .notice_texts()
            .iter()
            .any(|n| n.contains(&a_name) || n.contains("cancelled")),
        "{:?}",
        harness.state().notice_texts()
    );
    assert!(send_and_wait(&mut harness, "Hello B"));
}

#[test]
fn closing_the_window_during_a_long_step_takes_under_a_second_and_keeps_the_chat() {
    let data = tempfile::tempdir().unwrap();
    let faults = Faults::default();
    let mut harness = app(data.path(), &faults);
    load(&mut harness, &tiny_model());
    *faults.prefill_delay.lock().unwrap() = Duration::from_secs(20);
    harness
        .state_mut()
        .set_draft("Think about this for a long time");
    harness.state_mut().apply(Action::Send);
    assert!(step_until(&mut harness, TIMEOUT, |app| app
        .generation()
        .is_some_and(|g| g.phase == smoldesk::ui::app::Phase::Prefill)));
    let id = harness.state().current_conversation().unwrap().id.clone();
    let start = std::time::Instant::now();
    eframe::App::on_exit(harness.state_mut());
    drop(harness);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "closing took {:?}",
        start.elapsed()
    );
    let saved = smoldesk::chat::store::ConversationStore::new(data.path().join("conversations"))
        .load(&id)
        .unwrap();
    assert_eq!(
        saved.messages[0].content,
        "Think about this for a long time"
    );
    assert!(
        saved.messages[1].interrupted,
        "the unfinished reply is marked"
    );
}

/// Moves the Settings window's Threads slider one step up with the keyboard (as a person
/// would), presses "Reload now" and waits until a model loaded with `threads` is ready.
fn next_threads_and_reload(harness: &mut Harness<'_, App>, threads: usize) {
    harness
        .get_by_role_and_label(egui::accesskit::Role::Slider, "Threads")
        .focus();
    harness.run_steps(1);
    harness.key_press(egui::Key::ArrowRight);
    harness.run_steps(1);
    harness.get_by_label("Reload now").click_accesskit();
    harness.run_steps(1);
    assert!(
        step_until(harness, TIMEOUT, |app| app
            .loaded_model()
            .is_some_and(|model| model.options.threads == threads)),
        "no reload with {threads} threads: {:?}, {:?}",
        harness.state().loaded_model().map(|m| &m.options),
        harness.state().notice_texts()
    );
}

#[test]
fn the_threads_setting_reaches_the_compute_pool() {
    let data = tempfile::tempdir().unwrap();
    let faults = Faults::default();
    let mut harness = app(data.path(), &faults);
    load(&mut harness, &tiny_model());
    let auto = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = |harness: &Harness<'_, App>| {
        harness
            .state()
            .loaded_model()
            .map(|model| model.compute_threads)
    };
    assert!(
        threads(&harness).is_some_and(|n| (1..=auto).contains(&n)),
        "auto: one thread per physical core, found {:?}",
        threads(&harness)
    );
    harness.get_by_label("⚙ Settings").click();
    harness.run_steps(2);
    for n in 1..=3 {
        next_threads_and_reload(&mut harness, n);
        assert_eq!(threads(&harness), Some(n), "Threads = {n}");
    }
    assert!(send_and_wait(&mut harness, "Hello"), "a reply on 3 threads");
}
