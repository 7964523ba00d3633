//! The inference worker end to end on real models: event order, stop, reloads, errors, KV reuse.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded};
use smoldesk::chat::conversation::{ChatSettings, GenerationStats, Message, Role, StopReason};
use smoldesk::engine::sampling::SamplingParams;
use smoldesk::engine::session::LoadOptions;
use smoldesk::worker::WorkerHandle;
use smoldesk::worker::messages::{
    Command, Event, GenerateRequest, RequestId, SegmentKind, WorkerError,
};

const TIMEOUT: Duration = Duration::from_secs(120);

/// The two ends the gate uses: "reached" to the test, "release" from it.
type GateEnds = (Sender<()>, Receiver<()>);

/// A waker that can hold the worker still at its next event until the test lets it go.
#[derive(Clone, Default)]
struct Gate {
    armed: Arc<Mutex<Option<GateEnds>>>,
}

impl Gate {
    fn waker(&self) -> smoldesk::worker::thread::Waker {
        let armed = self.armed.clone();
        Arc::new(move || {
            let gate = armed.lock().ok().and_then(|mut g| g.take());
            if let Some((reached, release)) = gate {
                let _ = reached.send(());
                let _ = release.recv_timeout(TIMEOUT);
            }
        })
    }

    /// Arms the gate; returns (reached, release).
    fn arm(&self) -> (Receiver<()>, Sender<()>) {
        let (reached_tx, reached_rx) = bounded(1);
        let (release_tx, release_rx) = bounded(1);
        *self.armed.lock().expect("gate lock") = Some((reached_tx, release_rx));
        (reached_rx, release_tx)
    }
}

fn next(worker: &WorkerHandle) -> Event {
    worker
        .recv_timeout(TIMEOUT)
        .expect("worker event within timeout")
}

/// Id of the load requests of [`load`].
const LOAD_ID: RequestId = 1000;

fn load(worker: &WorkerHandle, path: &Path, context_length: usize) {
    worker.send(Command::LoadModel {
        id: LOAD_ID,
        path: path.to_path_buf(),
        options: LoadOptions {
            context_length,
            threads: 0,
        },
    });
    let mut last_fraction = 0.0;
    loop {
        match next(worker) {
            Event::LoadProgress { id, fraction, .. } => {
                assert_eq!(id, LOAD_ID);
                assert!(fraction >= last_fraction, "progress must not go back");
                last_fraction = fraction;
            }
            Event::Loaded { id, info, .. } => {
                assert_eq!(id, LOAD_ID);
                assert_eq!(info.path, path);
                assert!((last_fraction - 1.0).abs() < 1e-6, "progress ends at 1");
                return;
            }
            other => panic!("unexpected event while loading: {other:?}"),
        }
    }
}

fn settings(thinking: bool, max_tokens: usize) -> ChatSettings {
    ChatSettings {
        system_prompt: String::new(),
        thinking,
        sampling: SamplingParams {
            max_tokens,
            ..SamplingParams::greedy()
        },
        ..ChatSettings::default()
    }
}

fn request(id: u64, messages: Vec<Message>, settings: ChatSettings) -> Command {
    Command::Generate(GenerateRequest {
        id,
        messages,
        settings,
        conversation: None,
        resume: false,
    })
}

/// The events of one request until it finishes.
struct Outcome {
    prompt_text: String,
    prompt_tokens: usize,
    thinking: String,
    answer: String,
    stats: GenerationStats,
}

fn collect(worker: &WorkerHandle, id: u64) -> Outcome {
    let mut outcome = Outcome {
        prompt_text: String::new(),
        prompt_tokens: 0,
        thinking: String::new(),
        answer: String::new(),
        stats: GenerationStats::default(),
    };
    let mut started = false;
    loop {
        match next(worker) {
            Event::Started {
                id: got,
                prompt_text,
                prompt_tokens,
                ..
            } => {
                assert_eq!(got, id);
                assert!(!started, "Started comes once");
                started = true;
                outcome.prompt_text = prompt_text;
                outcome.prompt_tokens = prompt_tokens;
            }
            Event::Segment {
                id: got,
                kind,
                text,
            } => {
                assert_eq!(got, id);
                assert!(started, "segments come after Started");
                match kind {
                    SegmentKind::Thinking => outcome.thinking.push_str(&text),
                    SegmentKind::Answer => outcome.answer.push_str(&text),
                }
            }
            Event::Finished { id: got, stats } => {
                assert_eq!(got, id);
                outcome.stats = stats;
                return outcome;
            }
            other => panic!("unexpected event during generation: {other:?}"),
        }
    }
}

fn user(text: &str) -> Message {
    Message::new(Role::User, text)
}

#[test]
fn events_arrive_in_order_and_thinking_mode_shapes_the_prompt() {
    let worker = WorkerHandle::spawn(Arc::new(|| {}));
    load(&worker, &common::fixture("tiny-smollm3-q4_k_m.gguf"), 1024);

    worker.send(request(1, vec![user("Hello there")], settings(false, 12)));
    let off = collect(&worker, 1);
    assert!(
        off.prompt_text
            .ends_with("<|im_start|>assistant\n<think>\n\n</think>\n"),
        "thinking off pre-fills an empty think block: {:?}",
        off.prompt_text
    );
    assert!(off.stats.generated_tokens >= 1);
    assert!(
        off.thinking.is_empty(),
        "nothing can be thinking after </think>"
    );

    worker.send(request(2, vec![user("Hello there")], settings(true, 12)));
    let on = collect(&worker, 2);
    assert!(
        on.prompt_text.ends_with("<|im_start|>assistant\n"),
        "thinking on lets the model open <think>: {:?}",
        on.prompt_text
    );
    assert_eq!(on.stats.prompt_tokens, on.prompt_tokens);
}

#[test]
fn stop_takes_effect_within_one_token() {
    let gate = Gate::default();
    let worker = WorkerHandle::spawn(gate.waker());
    load(&worker, &common::fixture("tiny-smollm3-q4_k_m.gguf"), 2048);

    worker.send(request(
        7,
        vec![user("Tell me a long story")],
        settings(false, 1500),
    ));
    // Wait for the first streamed text, then hold the worker at its next event and stop.
    loop {
        match next(&worker) {
            Event::Segment { .. } => break,
            Event::Started { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let (reached, release) = gate.arm();
    reached
        .recv_timeout(TIMEOUT)
        .expect("worker reached the gate");
    let mut seen_before_stop = 0;
    while let Some(event) = worker.try_recv() {
        match event {
            Event::Segment { .. } => seen_before_stop += 1,
            Event::Finished { .. } => panic!("finished before the stop"),
            other => panic!("unexpected {other:?}"),
        }
    }
    worker.stop_generation();
    release.send(()).expect("release worker");

    let mut after_stop = 0;
    let stats = loop {
        match next(&worker) {
            Event::Segment { .. } => after_stop += 1,
            Event::Finished { stats, .. } => break stats,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(stats.stop_reason, StopReason::Cancelled);
    assert!(
        after_stop <= 2,
        "{after_stop} segments after stop (one token yields at most two)"
    );
    assert!(stats.generated_tokens < 1500);
    let _ = seen_before_stop;
}

#[test]
fn loading_a_model_during_generation_stops_it_cleanly() {
    let worker = WorkerHandle::spawn(Arc::new(|| {}));
    load(&worker, &common::fixture("tiny-smollm3-q4_k_m.gguf"), 4096);
    worker.send(request(
        3,
        vec![user("Go on forever")],
        settings(false, 3000),
    ));
    // Make sure it is generating.
    loop {
        if let Event::Segment { .. } = next(&worker) {
            break;
        }
    }
    let smollm2 = common::smollm2_path();
    worker.send(Command::LoadModel {
        id: 5,
        path: smollm2.clone(),
        options: LoadOptions::default(),
    });
    // The generation ends first, as cancelled.
    loop {
        match next(&worker) {
            Event::Segment { .. } => {}
            Event::Finished { id, stats } => {
                assert_eq!(id, 3);
                assert_eq!(stats.stop_reason, StopReason::Cancelled);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let loaded = loop {
        match next(&worker) {
            Event::LoadProgress { .. } => {}
            Event::Loaded { info, .. } => break info,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(loaded.path, smollm2);
    worker.send(request(4, vec![user("What is 2+2?")], settings(false, 16)));
    let reply = collect(&worker, 4);
    assert!(!reply.answer.is_empty(), "the new model answers");
}

#[test]
fn errors_are_reported_and_the_worker_stays_usable() {
    let worker = WorkerHandle::spawn(Arc::new(|| {}));

    // No model yet.
    worker.send(request(10, vec![user("hi")], settings(false, 4)));
    match next(&worker) {
        Event::Error { id, error } => {
            assert_eq!(id, 10);
            assert_eq!(error, WorkerError::NoModel);
        }
        other => panic!("unexpected {other:?}"),
    }

    // A corrupt file fails to load with a clear message.
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("notes.gguf");
    std::fs::write(&bad, "these are my notes, not a model").expect("write");
    worker.send(Command::LoadModel {
        id: 7,
        path: bad.clone(),
        options: LoadOptions::default(),
    });
    let failed = loop {
        match next(&worker) {
            Event::LoadProgress { id: 7, .. } => {}
            other => break other,
        }
    };
    match failed {
        Event::LoadFailed {
            id,
            path,
            error: WorkerError::Load(message),
        } => {
            assert_eq!((id, path), (7, bad));
            assert!(message.contains("not a GGUF"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }

    // A path with no file says so (the UI does not look at the disk itself).
    let missing = dir.path().join("gone.gguf");
    worker.send(Command::LoadModel {
        id: 8,
        path: missing.clone(),
        options: LoadOptions::default(),
    });
    match next(&worker) {
        Event::LoadFailed {
            id: 8,
            path,
            error: WorkerError::ModelMissing,
        } => assert_eq!(path, missing),
        other => panic!("unexpected {other:?}"),
    }

    load(&worker, &common::fixture("tiny-smollm3-q4_k_m.gguf"), 256);
    // A message longer than the whole context is refused with a clear error.
    let long = "word ".repeat(2000);
    worker.send(request(11, vec![user(&long)], settings(false, 4)));
    match next(&worker) {
        Event::Error {
            id: 11,
            error: WorkerError::Context(message),
        } => assert!(message.contains("context"), "{message}"),
        other => panic!("unexpected {other:?}"),
    }
    // And the next request works.
    worker.send(request(12, vec![user("short")], settings(false, 4)));
    let reply = collect(&worker, 12);
    assert!(reply.stats.generated_tokens >= 1);
}

#[test]
fn second_turn_prefills_only_the_new_tokens() {
    let worker = WorkerHandle::spawn(Arc::new(|| {}));
    load(&worker, &common::fixture("tiny-smollm3-q4_k_m.gguf"), 2048);

    let mut messages = vec![user("What is the capital of France?")];
    worker.send(request(20, messages.clone(), settings(false, 10)));
    let first = collect(&worker, 20);
    assert_eq!(first.stats.prefilled_tokens, first.stats.prompt_tokens);

    let mut previous = first;
    for turn in 0..3u64 {
        messages.push(Message::new(Role::Assistant, previous.answer.clone()));
        messages.push(user("And what about Germany? Please answer briefly."));
        worker.send(request(21 + turn, messages.clone(), settings(false, 10)));
        let next_turn = collect(&worker, 21 + turn);
        let reused = next_turn.stats.prompt_tokens - next_turn.stats.prefilled_tokens;
        // Everything up to the previous reply comes from the cache; only the reply as the
        // template re-renders it and the new user message are computed.
        assert!(
            reused + 8 >= previous.stats.prompt_tokens,
            "turn {turn}: reused {reused} of previous prompt {}",
            previous.stats.prompt_tokens
        );
        assert!(
            next_turn.stats.prefilled_tokens < 60,
            "turn {turn}: prefilled {} tokens for a short new message",
            next_turn.stats.prefilled_tokens
        );
        previous = next_turn;
    }
}

#[test]
fn a_panic_names_the_request_it_ends_and_the_worker_goes_on() {
    use smoldesk::worker::thread::FaultPoint;
    let panic_next_prefill = Arc::new(Mutex::new(true));
    let armed = panic_next_prefill.clone();
    let worker = WorkerHandle::spawn_with_faults(
        Arc::new(|| {}),
        Arc::new(move |point| {
            let fire = point == FaultPoint::Prefill && std::mem::take(&mut *armed.lock().unwrap());
            if fire {
                panic!("injected");
            }
        }),
    );
    load(&worker, &common::fixture("tiny-smollm3-q4_k_m.gguf"), 256);
    worker.send(request(30, vec![user("hi")], settings(false, 4)));
    assert!(matches!(next(&worker), Event::Started { id: 30, .. }));
    match next(&worker) {
        Event::Error {
            id: 30,
            error: WorkerError::Panic(message),
        } => assert!(message.contains("injected"), "{message}"),
        other => panic!("unexpected {other:?}"),
    }
    worker.send(request(31, vec![user("short")], settings(false, 4)));
    let reply = collect(&worker, 31);
    assert!(reply.stats.generated_tokens >= 1);
}

#[test]
fn dropping_the_handle_does_not_wait_for_a_long_step() {
    let worker = WorkerHandle::spawn_with_faults(
        Arc::new(|| {}),
        Arc::new(|point| {
            if point == smoldesk::worker::thread::FaultPoint::Prefill {
                std::thread::sleep(Duration::from_secs(5));
            }
        }),
    );
    load(&worker, &common::fixture("tiny-smollm3-q4_k_m.gguf"), 256);
    worker.send(request(40, vec![user("hi")], settings(false, 4)));
    assert!(matches!(next(&worker), Event::Started { id: 40, .. }));
    let start = std::time::Instant::now();
    drop(worker);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "dropping took {:?}",
        start.elapsed()
    );
}

#[test]
fn template_files_that_are_not_small_regular_files_are_refused() {
    let worker = WorkerHandle::spawn(Arc::new(|| {}));
    let dir = tempfile::tempdir().expect("tempdir");
    let big = dir.path().join("big.jinja");
    std::fs::write(&big, "x".repeat(2 << 20)).expect("write");
    let good = dir.path().join("good.jinja");
    std::fs::write(&good, smoldesk::chat::template::CHATML_TEMPLATE).expect("write");
    let cases = [
        (dir.path().to_path_buf(), "not a regular file"),
        ("/dev/zero".into(), "not a regular file"),
        (big, "more than the 1048576 allowed"),
    ];
    for (id, (path, expected)) in (20..).zip(cases) {
        if !path.exists() {
            continue;
        }
        worker.send(Command::SetTemplateOverride {
            id,
            path: Some(path.clone()),
        });
        match next(&worker) {
            Event::Error {
                id: got,
                error: WorkerError::TemplateFile { path: p, message },
            } => {
                assert_eq!((got, &p), (id, &path));
                assert!(message.contains(expected), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // A good file is still taken.
    worker.send(Command::SetTemplateOverride {
        id: 30,
        path: Some(good),
    });
    match next(&worker) {
        Event::TemplateSet { id } => assert_eq!(id, 30),
        other => panic!("unexpected {other:?}"),
    }
}
