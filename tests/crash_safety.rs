//! A reply survives the app being killed: the real app runs headless in a child process
//! (`smoldesk headless-chat`: the real worker, storage and signal handling) with the scripted
//! thinker, which always thinks 300 tokens and then answers. After SIGKILL the saved reply holds
//! at least what had streamed 2 s before the kill; after SIGTERM it holds everything. Either way
//! it reopens marked as interrupted, with Continue and Regenerate.

mod common;
mod ui_support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, unbounded};
use smoldesk::chat::conversation::{Conversation, Role};
use smoldesk::chat::store::ConversationStore;
use ui_support::*;

const TIMEOUT: Duration = Duration::from_secs(120);

/// How much of a reply a kill may lose: what streamed in the last this long.
const MAY_LOSE: Duration = Duration::from_secs(2);

/// The reply as the child printed it, with when each piece arrived.
#[derive(Default)]
struct Streamed {
    conversation: Option<String>,
    /// (arrival, thinking length, answer length) after each piece.
    progress: Vec<(Instant, usize, usize)>,
    thinking: String,
    answer: String,
    exit: Option<String>,
}

impl Streamed {
    fn apply(&mut self, at: Instant, line: &serde_json::Value) {
        if let Some(id) = line["conversation"].as_str() {
            self.conversation = Some(id.to_string());
        }
        if let Some(text) = line["thinking"].as_str() {
            self.thinking.push_str(text);
        }
        if let Some(text) = line["answer"].as_str() {
            self.answer.push_str(text);
        }
        if let Some(exit) = line["exit"].as_str() {
            self.exit = Some(exit.to_string());
        }
        self.progress
            .push((at, self.thinking.len(), self.answer.len()));
    }

    /// Thinking and answer lengths streamed by `at`.
    fn lengths_at(&self, at: Instant) -> (usize, usize) {
        self.progress
            .iter()
            .take_while(|(t, _, _)| *t <= at)
            .last()
            .map_or((0, 0), |(_, t, a)| (*t, *a))
    }
}

/// Starts the headless app replying slowly (a pause after each piece) with thinking on.
fn start_child(data: &Path) -> (Child, Receiver<(Instant, serde_json::Value)>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_smoldesk"))
        .args([
            "headless-chat",
            "--think",
            "--delay-ms",
            "25",
            "--message",
            "Hello",
        ])
        .arg("--model")
        .arg(common::fixture("scripted-thinker.gguf"))
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::piped())
        .spawn()
        .expect("the app starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = unbounded();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON line: {line:?}: {e}"));
            if tx.send((Instant::now(), value)).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Reads the child's output until `enough` holds; returns what streamed so far.
fn stream_until(
    rx: &Receiver<(Instant, serde_json::Value)>,
    streamed: &mut Streamed,
    mut enough: impl FnMut(&Streamed) -> bool,
) {
    let start = Instant::now();
    while !enough(streamed) {
        assert!(
            start.elapsed() < TIMEOUT,
            "the reply did not stream in time"
        );
        match rx.recv_timeout(TIMEOUT) {
            Ok((at, line)) => streamed.apply(at, &line),
            Err(_) => panic!("the app stopped printing"),
        }
    }
}

/// Reads the rest of the child's output (it has exited or is exiting).
fn drain(rx: &Receiver<(Instant, serde_json::Value)>, streamed: &mut Streamed) {
    while let Ok((at, line)) = rx.recv_timeout(Duration::from_secs(10)) {
        streamed.apply(at, &line);
    }
}

fn saved(data: &Path, streamed: &Streamed) -> Conversation {
    let id = streamed
        .conversation
        .as_deref()
        .expect("the app named the chat");
    ConversationStore::new(data.join("conversations"))
        .load(id)
        .expect("the conversation was saved")
}

/// Streamed for a few seconds, well into the thinking.
fn streamed_for_a_while(streamed: &Streamed) -> bool {
    let first = streamed.progress.iter().find(|(_, t, _)| *t > 0);
    first.is_some_and(|(at, _, _)| at.elapsed() > Duration::from_secs(3))
}

#[test]
fn after_sigkill_the_reply_is_saved_up_to_two_seconds_before_the_kill() {
    let data = tempfile::tempdir().unwrap();
    let (mut child, rx) = start_child(data.path());
    let mut streamed = Streamed::default();
    stream_until(&rx, &mut streamed, streamed_for_a_while);
    let killed_at = Instant::now();
    child.kill().unwrap();
    child.wait().unwrap();
    drain(&rx, &mut streamed);
    assert_eq!(streamed.exit, None, "the child was killed mid-reply");

    let conversation = saved(data.path(), &streamed);
    let reply = conversation.messages.last().unwrap();
    assert_eq!(reply.role, Role::Assistant);
    assert!(reply.interrupted, "the reply is marked interrupted");
    let thinking = reply.thinking.as_deref().unwrap_or("");
    assert!(
        streamed.thinking.starts_with(thinking),
        "saved what was streamed"
    );
    assert!(streamed.answer.starts_with(&reply.content));
    let (thinking_then, answer_then) = streamed.lengths_at(killed_at - MAY_LOSE);
    assert!(thinking_then > 0, "something streamed 2 s before the kill");
    assert!(
        thinking.len() + reply.content.len() >= thinking_then + answer_then,
        "saved {} + {} bytes, but {thinking_then} + {answer_then} had streamed 2 s before the kill",
        thinking.len(),
        reply.content.len()
    );
    reopened_shows_it_interrupted(data.path());
}

#[test]
fn after_sigterm_the_whole_reply_so_far_is_saved_and_the_app_exits_cleanly() {
    let data = tempfile::tempdir().unwrap();
    let (mut child, rx) = start_child(data.path());
    let mut streamed = Streamed::default();
    stream_until(&rx, &mut streamed, streamed_for_a_while);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exited = child.wait().unwrap();
    drain(&rx, &mut streamed);
    assert!(exited.success(), "the app exits cleanly: {exited:?}");
    assert_eq!(streamed.exit.as_deref(), Some("signal"));

    let conversation = saved(data.path(), &streamed);
    let reply = conversation.messages.last().unwrap();
    assert!(reply.interrupted);
    assert_eq!(reply.thinking.as_deref().unwrap_or(""), streamed.thinking);
    assert_eq!(reply.content, streamed.answer);
    assert!(!streamed.thinking.is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(data.path().join("conversations"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "no temporary files are left");
}

/// The app opened on the folder shows the reply as interrupted, with Continue and Regenerate.
fn reopened_shows_it_interrupted(data: &Path) {
    use egui_kittest::kittest::Queryable;
    let fake = Fake::default();
    let models = tempfile::tempdir().unwrap();
    let mut harness = lenient_harness(fake_options(&fake, data, models.path()), None);
    load_model(
        &mut harness,
        &fake,
        &common::fixture("scripted-thinker.gguf"),
    );
    harness.run_steps(3);
    assert!(shows(&harness, "Interrupted"), "the reply is marked");
    harness.get_by_label("Continue").click();
    harness.run_steps(2);
    let request = fake.last_request();
    assert!(request.resume, "Continue asks for more of the same reply");
    assert_eq!(
        request.messages.last().map(|m| m.role),
        Some(Role::Assistant)
    );
    assert!(harness.state().generation().is_some());
}
