//! Instant resume: saved KV states restore a conversation's cache in a fresh engine, a restarted
//! worker or a new `smoldesk generate` process, so only new tokens are computed, with the same
//! logits and replies as computing everything; unusable states are ignored.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use smoldesk::chat::conversation::{ChatSettings, GenerationStats, Message, Role};
use smoldesk::chat::state_cache::{StateCache, StateCacheConfig};
use smoldesk::engine::kv_state::KvState;
use smoldesk::engine::sampling::SamplingParams;
use smoldesk::engine::session::{Engine, LoadOptions};
use smoldesk::worker::{Command, Event, WorkerHandle, messages::GenerateRequest};

const F32_MODEL: &str = "tiny-smollm3-f32.gguf";
const Q4_MODEL: &str = "tiny-smollm3-q4_k_m.gguf";

fn engine(path: &Path, context_length: usize) -> Engine {
    let options = LoadOptions {
        context_length,
        threads: 2,
    };
    Engine::load(path, &options, &mut |_| true).expect("load model")
}

fn tokens(n: u32, seed: u32) -> Vec<u32> {
    (0..n).map(|i| (i * 97 + seed * 31 + 13) % 4000).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn a_restored_state_computes_only_new_tokens_with_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::fixture(F32_MODEL);
    let history = tokens(40, 1);
    let mut full = history.clone();
    full.extend(tokens(9, 2));

    // The app before a restart: computes the history, saves its state.
    let mut before = engine(&model, 512);
    before.prefill(&history).unwrap();
    let path = dir.path().join("state.kv");
    before.export_kv_state().write_atomic(&path).unwrap();
    let kept = before.prefill(&full).unwrap();
    assert_eq!(kept.computed, 9);

    // After the restart: a fresh engine restores the state from disk.
    let mut after = engine(&model, 512);
    let state = KvState::read(&path).unwrap();
    assert_eq!(after.import_kv_state(&state).unwrap(), history.len());
    assert_eq!(after.cached_tokens(), &history[..]);
    let resumed = after.prefill(&full).unwrap();
    assert_eq!((resumed.reused, resumed.computed), (40, 9));
    assert_eq!(
        resumed.logits, kept.logits,
        "restored cache differs from the kept one"
    );

    // Computing everything from scratch agrees within the incremental-decoding tolerance.
    let mut scratch = engine(&model, 512);
    let everything = scratch.prefill(&full).unwrap();
    assert_eq!(everything.computed, full.len());
    let diff = max_abs_diff(&resumed.logits, &everything.logits);
    assert!(diff < 1e-3, "max logit difference {diff}");

    // And decoding on goes on matching.
    let next = 77;
    let a = after.decode(next).unwrap();
    let b = scratch.decode(next).unwrap();
    let diff = max_abs_diff(&a, &b);
    assert!(diff < 1e-3, "decode after restore: max difference {diff}");
}

#[test]
fn states_of_another_model_or_context_are_refused_and_the_cache_kept() {
    let f32_model = common::fixture(F32_MODEL);
    let mut source = engine(&f32_model, 512);
    source.prefill(&tokens(20, 3)).unwrap();
    let state = source.export_kv_state();

    let mut other_model = engine(&common::fixture(Q4_MODEL), 512);
    other_model.prefill(&tokens(5, 4)).unwrap();
    let err = other_model.import_kv_state(&state).unwrap_err();
    assert!(err.to_string().contains("another model file"), "{err}");
    assert_eq!(other_model.cached_tokens(), &tokens(5, 4)[..]);
    assert_eq!(other_model.prefill(&tokens(20, 3)).unwrap().computed, 20);

    let mut other_context = engine(&f32_model, 256);
    let err = other_context.import_kv_state(&state).unwrap_err();
    assert!(err.to_string().contains("context length"), "{err}");
}

#[test]
fn a_changed_model_file_invalidates_its_states() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("model.gguf");
    std::fs::copy(common::fixture(F32_MODEL), &copy).unwrap();
    let mut first = engine(&copy, 512);
    first.prefill(&tokens(10, 5)).unwrap();
    let state = first.export_kv_state();
    assert_eq!(engine(&copy, 512).import_kv_state(&state).unwrap(), 10);

    let file = std::fs::File::options().append(true).open(&copy).unwrap();
    file.set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))
        .unwrap();
    drop(file);
    assert!(engine(&copy, 512).import_kv_state(&state).is_err());
}

// ----- the worker: switching conversations and restarting -----

fn load(worker: &WorkerHandle, path: &Path) {
    worker.send(Command::LoadModel {
        id: 0,
        path: path.to_path_buf(),
        options: LoadOptions {
            context_length: 2048,
            threads: 2,
        },
    });
    loop {
        match worker.recv_timeout(Duration::from_secs(120)) {
            Some(Event::Loaded { .. }) => return,
            Some(Event::LoadFailed { error, .. }) => panic!("load failed: {error}"),
            Some(_) => {}
            None => panic!("no load event"),
        }
    }
}

fn user(text: &str) -> Message {
    Message::new(Role::User, text)
}

/// Sends one greedy request in `conversation` and returns its answer and stats.
fn reply(
    worker: &WorkerHandle,
    id: u64,
    conversation: &str,
    messages: &[Message],
) -> (String, GenerationStats) {
    let settings = ChatSettings {
        system_prompt: String::new(),
        thinking: false,
        sampling: SamplingParams {
            max_tokens: 8,
            ..SamplingParams::greedy()
        },
        ..ChatSettings::default()
    };
    worker.send(Command::Generate(GenerateRequest {
        id,
        messages: messages.to_vec(),
        settings,
        conversation: Some(conversation.to_string()),
        resume: false,
    }));
    let mut answer = String::new();
    loop {
        match worker.recv_timeout(Duration::from_secs(120)) {
            Some(Event::Segment { id: i, text, .. }) if i == id => answer.push_str(&text),
            Some(Event::Finished { id: i, stats }) if i == id => return (answer, stats),
            Some(Event::Error { error, .. }) => panic!("error: {error}"),
            Some(_) => {}
            None => panic!("no reply to {id}"),
        }
    }
}

/// Most of the prompt came from a saved state.
fn assert_mostly_reused(stats: &GenerationStats) {
    assert!(
        stats.prefilled_tokens < stats.prompt_tokens / 2,
        "{stats:?}"
    );
}

fn worker_with_cache(dir: &Path) -> CachedWorker {
    let cache = Arc::new(StateCache::open(StateCacheConfig {
        dir: Some(dir.to_path_buf()),
        memory_budget: u64::MAX,
        disk_cap: u64::MAX,
    }));
    let worker = WorkerHandle::spawn_with_state_cache(Arc::new(|| {}), cache.clone());
    load(&worker, &common::fixture(Q4_MODEL));
    CachedWorker {
        worker: Some(worker),
        cache,
    }
}

/// A worker and its state cache. Dropping it waits until the states it saved are on disk: the
/// worker's own shutdown waits only briefly (an app must close at once), and a test that
/// "restarts" reads the folder next.
struct CachedWorker {
    worker: Option<WorkerHandle>,
    cache: Arc<StateCache>,
}

impl std::ops::Deref for CachedWorker {
    type Target = WorkerHandle;
    fn deref(&self) -> &WorkerHandle {
        self.worker.as_ref().expect("the worker lives until drop")
    }
}

impl Drop for CachedWorker {
    fn drop(&mut self) {
        drop(self.worker.take());
        self.cache.flush();
    }
}

/// Conversation A's three turns, each after the previous answer.
struct ConversationA {
    messages: Vec<Message>,
}

impl ConversationA {
    fn new() -> Self {
        Self {
            messages: vec![user("What is the capital of France?")],
        }
    }

    fn next_turn(&mut self, answer: &str, question: &str) -> &[Message] {
        self.messages.push(Message::new(Role::Assistant, answer));
        self.messages.push(user(question));
        &self.messages
    }
}

#[test]
fn switching_conversations_and_restarting_compute_only_new_tokens() {
    let questions = ["And Germany? Answer briefly.", "And Italy, please?"];
    // Control: conversation A alone in one worker without switching.
    let control_dir = tempfile::tempdir().unwrap();
    let control = worker_with_cache(control_dir.path());
    let mut a = ConversationA::new();
    let (first, _) = reply(&control, 1, "A", &a.messages);
    let (second, control_second) = reply(&control, 2, "A", a.next_turn(&first, questions[0]));
    let (third, control_third) = reply(&control, 3, "A", a.next_turn(&second, questions[1]));
    drop(control);

    let dir = tempfile::tempdir().unwrap();
    let worker = worker_with_cache(dir.path());
    let mut a = ConversationA::new();
    let (answer, stats) = reply(&worker, 1, "A", &a.messages);
    assert_eq!(answer, first);
    assert_eq!(stats.prefilled_tokens, stats.prompt_tokens);
    // B fills the engine's cache with other tokens.
    reply(
        &worker,
        2,
        "B",
        &[user("Tell me a long story about dragons.")],
    );
    // Back to A: only its new tokens are computed, and the reply is the same.
    let (answer, stats) = reply(&worker, 3, "A", a.next_turn(&first, questions[0]));
    assert_eq!(answer, second);
    assert_eq!(stats.prefilled_tokens, control_second.prefilled_tokens);
    assert_mostly_reused(&stats);
    drop(worker);

    // A restart: a new worker finds A's state on disk.
    let worker = worker_with_cache(dir.path());
    let (answer, stats) = reply(&worker, 4, "A", a.next_turn(&second, questions[1]));
    assert_eq!(answer, third);
    assert_eq!(stats.prefilled_tokens, control_third.prefilled_tokens);
    assert_mostly_reused(&stats);
}

#[test]
fn a_corrupt_or_truncated_state_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let worker = worker_with_cache(dir.path());
    let mut a = ConversationA::new();
    let (first, _) = reply(&worker, 1, "A", &a.messages);
    drop(worker);
    let path = dir.path().join("A.kv");
    let good = std::fs::read(&path).unwrap();
    let mut messages = a.next_turn(&first, "And Germany?").to_vec();
    let mut answers = Vec::new();
    for (n, damaged) in [
        {
            let mut bad = good.clone();
            let at = bad.len() - 100;
            bad[at] ^= 0x40;
            bad
        },
        good[..good.len() - 1].to_vec(),
        b"not a state".to_vec(),
    ]
    .into_iter()
    .enumerate()
    {
        std::fs::write(&path, damaged).unwrap();
        let worker = worker_with_cache(dir.path());
        let (answer, stats) = reply(&worker, 10 + n as u64, "A", &messages);
        assert_eq!(stats.prefilled_tokens, stats.prompt_tokens, "case {n}");
        answers.push(answer);
        drop(worker);
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]));
    // The last run saved a good state again.
    let worker = worker_with_cache(dir.path());
    messages.push(Message::new(Role::Assistant, answers[0].clone()));
    messages.push(user("Thanks."));
    let (_, stats) = reply(&worker, 20, "A", &messages);
    assert_mostly_reused(&stats);
}

// ----- `smoldesk generate --cache-dir` -----

fn generate(model: &Path, prompt: &str, cache_dir: Option<&Path>) -> Value {
    let mut command = Process::new(env!("CARGO_BIN_EXE_smoldesk"));
    command.args(["generate", "--raw", "--json", "--temperature", "0"]);
    command.args(["--max-tokens", "4", "--context", "1024", "--threads", "2"]);
    command.arg("-m").arg(model).arg("--prompt").arg(prompt);
    if let Some(dir) = cache_dir {
        command.arg("--cache-dir").arg(dir);
    }
    let output = command.output().expect("run smoldesk");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let last = stdout.lines().last().expect("a JSON line");
    serde_json::from_str(last).expect("JSON")
}

fn stat(json: &Value, name: &str) -> u64 {
    json["stats"][name].as_u64().expect(name)
}

#[test]
fn generate_with_a_cache_dir_resumes_a_new_process() {
    let dir = tempfile::tempdir().unwrap();
    let model: PathBuf = common::fixture(F32_MODEL);
    let first = "<|im_start|>user\nHello there, how are you today?<|im_end|>\n";
    let second = format!("{first}<|im_start|>user\nAnd tomorrow?<|im_end|>\n");

    let run = generate(&model, first, Some(dir.path()));
    assert_eq!(stat(&run, "prefilled_tokens"), stat(&run, "prompt_tokens"));
    assert!(run["state_cache"]["saved_bytes"].as_u64().unwrap() > 0);
    let first_tokens = stat(&run, "prompt_tokens");

    let resumed = generate(&model, &second, Some(dir.path()));
    let uncached = generate(&model, &second, None);
    let second_tokens = stat(&uncached, "prompt_tokens");
    assert_eq!(stat(&uncached, "prefilled_tokens"), second_tokens);
    assert_eq!(
        stat(&resumed, "prefilled_tokens"),
        second_tokens - first_tokens
    );
    let restored = resumed["state_cache"]["restored_tokens"].as_u64().unwrap();
    assert!(restored >= first_tokens, "restored {restored} tokens");
    assert_eq!(resumed["tokens"], uncached["tokens"]);

    // Another model ignores those states.
    let other = generate(&common::fixture(Q4_MODEL), &second, Some(dir.path()));
    assert_eq!(
        stat(&other, "prefilled_tokens"),
        stat(&other, "prompt_tokens")
    );
}
