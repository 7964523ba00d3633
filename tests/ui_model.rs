//! The desktop app with the real inference worker and real model files: a reply streams in,
//! Stop ends it, "Think" changes the prompt, a corrupt file is reported and the app goes on.

mod common;
mod ui_support;

use std::path::Path;
use std::time::Duration;

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use smoldesk::chat::conversation::StopReason;
use smoldesk::ui::app::ModelState;
use smoldesk::ui::{App, AppOptions};
use ui_support::*;

/// Generous: debug builds on two shared cores.
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);

fn real_app<'a>(data_dir: &Path, model: &Path) -> Harness<'a, App> {
    let options = AppOptions {
        model: Some(model.to_path_buf()),
        model_dirs: Some(Vec::new()),
        restore_last_model: false,
        ..AppOptions::new(data_dir)
    };
    let mut harness = lenient_harness(options, None);
    let loaded = step_until(&mut harness, LOAD_TIMEOUT, |app| {
        !matches!(app.model_state(), ModelState::Loading { .. })
    });
    assert!(loaded, "loading {} did not finish", model.display());
    assert!(
        harness.state().loaded_model().is_some(),
        "{} did not load: {:?}",
        model.display(),
        harness.state().notice_texts()
    );
    harness
}

/// Makes replies short (or long) and deterministic; the settings window edits the same values.
fn set_max_tokens(harness: &mut Harness<'_, App>, max_tokens: usize) {
    let conversation = harness
        .state_mut()
        .current_conversation_mut()
        .expect("a conversation is open");
    conversation.settings.sampling.max_tokens = max_tokens;
    conversation.settings.sampling.temperature = 0.0;
}

#[test]
fn smollm2_answers_like_llama_cpp_and_the_reply_streams_in() {
    let reference = common::read_json("smollm2-135m-chat.ref.json");
    let case = &reference["cases"][0];
    let question = case["question"].as_str().unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut harness = real_app(data.path(), &common::smollm2_path());
    set_max_tokens(&mut harness, 64);
    send_message(&mut harness, question);
    assert!(
        harness.state().generation().is_some(),
        "no request was sent"
    );
    let mut saw_partial = false;
    let finished = step_until(&mut harness, REPLY_TIMEOUT, |app| {
        let reply = &app.current_conversation().unwrap().messages[1].content;
        saw_partial |= app.generation().is_some() && !reply.is_empty();
        app.generation().is_none()
    });
    assert!(finished, "the reply did not finish");
    assert!(
        saw_partial,
        "the reply did not stream (no partial text was seen)"
    );
    let prompt = &harness
        .state()
        .last_prompt()
        .expect("the worker started")
        .text;
    assert_eq!(prompt, case["prompt"].as_str().unwrap());
    let conversation = harness.state().current_conversation().unwrap().clone();
    let reply = &conversation.messages[1];
    // The prompt is the UI's business and must match exactly; the reply is the engine's, so
    // only its gist is checked here (llama.cpp answered: "The answer to this classic math
    // problem is 4.").
    assert!(reply.content.contains('4'), "{:?}", reply.content);
    assert!(reply.thinking.is_none());
    let stats = reply.stats.as_ref().expect("the reply has statistics");
    assert!(stats.generated_tokens > 0);
    assert!(step_until_shows(
        &mut harness,
        "tokens/s",
        Duration::from_secs(10)
    ));
    assert!(shows(&harness, reply.content.trim()));
}

#[test]
fn think_on_and_off_change_the_prompt_sent_to_smollm3() {
    let data = tempfile::tempdir().unwrap();
    let mut harness = real_app(data.path(), &common::fixture("tiny-smollm3-q4_k_m.gguf"));
    set_max_tokens(&mut harness, 4);
    send_message(&mut harness, "Hello");
    assert!(step_until(&mut harness, REPLY_TIMEOUT, |app| app
        .generation()
        .is_none()));
    let with_thinking = harness.state().last_prompt().expect("started").text.clone();
    assert!(
        with_thinking.ends_with("<|im_start|>assistant\n"),
        "{with_thinking:?}"
    );

    harness.get_by_label("Think").click();
    harness.run_steps(2);
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::N);
    harness.run_steps(2);
    set_max_tokens(&mut harness, 4);
    send_message(&mut harness, "Hello");
    assert!(step_until(&mut harness, REPLY_TIMEOUT, |app| app
        .generation()
        .is_none()));
    let without = harness.state().last_prompt().expect("started").text.clone();
    assert!(without.ends_with("<think>\n\n</think>\n"), "{without:?}");
}

#[test]
fn stop_ends_a_long_reply() {
    let data = tempfile::tempdir().unwrap();
    let mut harness = real_app(data.path(), &common::fixture("tiny-smollm3-q4_k_m.gguf"));
    set_max_tokens(&mut harness, 100_000);
    send_message(&mut harness, "Write a very long story.");
    assert!(step_until(&mut harness, REPLY_TIMEOUT, |app| {
        app.current_conversation().unwrap().messages[1]
            .content
            .len()
            + app.current_conversation().unwrap().messages[1]
                .thinking
                .as_ref()
                .map_or(0, String::len)
            > 20
    }));
    harness.get_by_label("⏹ Stop").click();
    harness.step();
    assert!(step_until(&mut harness, Duration::from_secs(30), |app| app
        .generation()
        .is_none()));
    let reply = &harness.state().current_conversation().unwrap().messages[1];
    let stats = reply
        .stats
        .as_ref()
        .expect("a stopped reply keeps its statistics");
    assert_eq!(stats.stop_reason, StopReason::Cancelled);
    assert!(shows(&harness, "Stopped"));
}

#[test]
fn a_corrupt_model_file_is_reported_and_another_model_then_works() {
    let data = tempfile::tempdir().unwrap();
    let bad = data.path().join("corrupt.gguf");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&[3, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
    std::fs::write(&bad, bytes).unwrap();
    let options = AppOptions {
        model: Some(bad.clone()),
        model_dirs: Some(Vec::new()),
        restore_last_model: false,
        ..AppOptions::new(data.path())
    };
    let mut harness = lenient_harness(options, None);
    assert!(step_until(&mut harness, LOAD_TIMEOUT, |app| {
        matches!(app.model_state(), ModelState::Empty)
    }));
    assert!(
        shows(&harness, "Could not open corrupt.gguf"),
        "{:?}",
        harness.state().notice_texts()
    );
    harness.get_by_label("Path:").focus();
    harness.step();
    let good = common::smollm2_path();
    harness
        .get_by_label("Path:")
        .type_text(&good.display().to_string());
    harness.step();
    harness.get_by_label("Open").click();
    harness.step();
    assert!(step_until(&mut harness, LOAD_TIMEOUT, |app| app
        .loaded_model()
        .is_some()));
}
