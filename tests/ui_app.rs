//! The desktop app driven through its widgets, with a scripted backend in place of the worker:
//! welcome screen, loading, sending, streaming, thinking display, stop, persistence, errors.

mod common;
mod ui_support;

use std::path::PathBuf;
use std::time::Duration;

use egui::{Key, Modifiers};
use egui_kittest::kittest::Queryable;
use smoldesk::chat::conversation::{GenerationStats, Role, StopReason};
use smoldesk::ui::app::ModelState;
use smoldesk::worker::Event;
use smoldesk::worker::messages::{SegmentKind, WorkerError};
use ui_support::*;

fn thinking_stats() -> GenerationStats {
    GenerationStats {
        prompt_tokens: 42,
        generated_tokens: 360,
        thinking_tokens: 340,
        thinking_secs: 12.0,
        time_to_first_token_secs: 0.4,
        decode_tok_per_sec: 9.5,
        ..GenerationStats::default()
    }
}

#[test]
fn welcome_screen_lists_found_models_and_loads_a_typed_path() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = harness(
        fake_options(&fake, dirs.data.path(), dirs.models.path()),
        None,
    );
    harness.run_steps(2);
    assert!(shows(&harness, "Open model…"));
    assert!(
        shows(&harness, "tiny-smollm3-q4_k_m.gguf"),
        "the found model is listed"
    );
    let path_field = harness.get_by_label("Path:");
    path_field.focus();
    harness.step();
    harness
        .get_by_label("Path:")
        .type_text(&dirs.model.display().to_string());
    harness.step();
    harness.get_by_label("Open").click();
    harness.run_steps(2);
    assert_eq!(fake.loads(), vec![dirs.model.clone()]);
    assert!(matches!(
        harness.state().model_state(),
        ModelState::Loading { .. }
    ));
}

#[test]
fn load_progress_can_be_cancelled() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut options = fake_options(&fake, dirs.data.path(), dirs.models.path());
    options.model = Some(dirs.model.clone());
    let mut harness = harness(options, None);
    fake.push(Event::LoadProgress {
        id: fake.last_load_id(),
        path: dirs.model.clone(),
        fraction: 0.5,
    });
    harness.run_steps(2);
    match harness.state().model_state() {
        ModelState::Loading { fraction, .. } => assert_eq!(*fraction, 0.5),
        _ => panic!("not loading"),
    }
    harness.get_by_label("Cancel loading").click();
    harness.run_steps(2);
    assert_eq!(fake.cancels(), 1);
    fake.push(Event::LoadFailed {
        id: fake.last_load_id(),
        path: dirs.model.clone(),
        error: WorkerError::LoadCancelled,
    });
    harness.run_steps(2);
    assert!(matches!(harness.state().model_state(), ModelState::Empty));
    assert!(shows(&harness, "Loading was cancelled."));
}

#[test]
fn a_failed_load_shows_an_error_and_the_app_stays_usable() {
    let fake = Fake::default();
    let dirs = dirs();
    let bad = dirs.models.path().join("broken.gguf");
    std::fs::write(&bad, "this is not a model").unwrap();
    let mut options = fake_options(&fake, dirs.data.path(), dirs.models.path());
    options.model = Some(bad.clone());
    let mut harness = harness(options, None);
    fake.push(Event::LoadFailed {
        id: fake.last_load_id(),
        path: bad,
        error: WorkerError::Load("broken.gguf is not a GGUF model file".into()),
    });
    harness.run_steps(2);
    assert!(shows(&harness, "Could not open broken.gguf"));
    harness.get_by_label("Dismiss").click();
    harness.run_steps(2);
    assert!(harness.state().notice_texts().is_empty());
    assert!(shows(&harness, "Open model…"), "the picker is still there");
}

#[test]
fn a_missing_last_model_is_reported_and_forgotten() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut storage = MemoryStorage::default();
    let prefs = smoldesk::ui::prefs::Preferences {
        last_model: Some(PathBuf::from("/nonexistent/SmolLM3-3B-Q4_K_M.gguf")),
        ..Default::default()
    };
    prefs.store(&mut storage);
    let mut options = fake_options(&fake, dirs.data.path(), dirs.models.path());
    options.restore_last_model = true;
    let mut harness = harness(options, Some(&storage));
    harness.run_steps(2);
    // The UI asks the worker, which checks the disk and answers that the file is missing.
    let missing = PathBuf::from("/nonexistent/SmolLM3-3B-Q4_K_M.gguf");
    assert_eq!(fake.loads(), vec![missing.clone()]);
    fake.push(Event::LoadFailed {
        id: fake.last_load_id(),
        path: missing,
        error: WorkerError::ModelMissing,
    });
    harness.run_steps(2);
    assert!(shows(&harness, "is no longer there"));
    assert!(harness.state().preferences().last_model.is_none());
    assert!(
        shows(&harness, "Open model…"),
        "the picker is there to open another"
    );
}

#[test]
fn dropping_a_file_that_is_not_a_model_says_so() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = harness(
        fake_options(&fake, dirs.data.path(), dirs.models.path()),
        None,
    );
    harness
        .state_mut()
        .open_dropped(vec![PathBuf::from("/tmp/holiday.jpg")]);
    harness.run_steps(2);
    assert!(shows(&harness, "holiday.jpg is not a model file"));
    harness.state_mut().open_dropped(vec![dirs.model.clone()]);
    harness.run_steps(2);
    assert_eq!(fake.loads(), vec![dirs.model.clone()]);
}

#[test]
fn a_reply_streams_in_with_its_thinking_shown_hidden_and_shown_again() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    send_message(&mut harness, "Why is the sky blue?");
    let request = fake.last_request();
    assert_eq!(request.messages.len(), 1);
    assert_eq!(request.messages[0].content, "Why is the sky blue?");
    assert!(request.settings.thinking);
    assert!(harness.state().draft().is_empty());
    fake.started(request.id, "<|im_start|>user\nWhy…", 0);
    fake.segment(
        request.id,
        SegmentKind::Thinking,
        "Rayleigh scattering favours",
    );
    harness.run_steps(3);
    assert!(shows(&harness, "Thinking…"));
    assert!(shows(&harness, "Rayleigh scattering favours"));

    // Hide thinking while it streams: the text goes, a compact indicator stays.
    harness.get_by_label("Show thinking").click();
    harness.run_steps(2);
    assert!(!harness.state().preferences().show_thinking);
    assert!(!shows(&harness, "Rayleigh"));
    assert!(shows(&harness, "Thinking…"));
    fake.segment(request.id, SegmentKind::Thinking, " short wavelengths.");
    harness.run_steps(2);
    assert!(!shows(&harness, "short wavelengths"));

    // Show it again (keyboard this time): the whole span is back, still streaming.
    harness.key_press_modifiers(Modifiers::COMMAND, Key::T);
    harness.run_steps(2);
    assert!(harness.state().preferences().show_thinking);
    assert!(shows(
        &harness,
        "Rayleigh scattering favours short wavelengths."
    ));

    fake.segment(
        request.id,
        SegmentKind::Answer,
        "Because of **Rayleigh** scattering.",
    );
    fake.finished(request.id, thinking_stats());
    harness.run_steps(3);
    assert!(harness.state().generation().is_none());
    assert!(shows(&harness, "Thought for 12 s · 340 tokens"));
    assert!(shows(
        &harness,
        "0.4 s to first token · 9.5 tokens/s · 360 tokens"
    ));
    assert!(shows(&harness, "Rayleigh"));
    let reply = harness.state().current_conversation().unwrap().messages[1].clone();
    assert_eq!(reply.role, Role::Assistant);
    assert_eq!(reply.content, "Because of **Rayleigh** scattering.");
    assert_eq!(
        reply.thinking.as_deref(),
        Some("Rayleigh scattering favours short wavelengths.")
    );

    // Hidden, a finished reply shows nothing of its thinking.
    harness.get_by_label("Show thinking").click();
    harness.run_steps(2);
    assert!(!shows(&harness, "Thought for"));
    assert!(!shows(&harness, "favours"));
}

#[test]
fn stop_ends_the_reply_and_keeps_what_was_written() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    send_message(&mut harness, "Count to a million");
    let request = fake.last_request();
    fake.started(request.id, "", 0);
    fake.segment(request.id, SegmentKind::Answer, "1, 2, 3");
    harness.run_steps(2);
    harness.get_by_label("⏹ Stop").click();
    harness.run_steps(2);
    assert_eq!(fake.stops(), 1);
    assert!(shows(&harness, "Stopping…"));
    fake.finished(
        request.id,
        GenerationStats {
            stop_reason: StopReason::Cancelled,
            generated_tokens: 5,
            ..GenerationStats::default()
        },
    );
    harness.run_steps(2);
    assert!(harness.state().generation().is_none());
    assert!(shows(&harness, "Stopped"));
    assert_eq!(
        harness.state().current_conversation().unwrap().messages[1].content,
        "1, 2, 3"
    );
}

#[test]
fn escape_stops_a_reply() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    send_message(&mut harness, "Hello");
    harness.key_press(Key::Escape);
    harness.run_steps(2);
    assert_eq!(fake.stops(), 1);
}

#[test]
fn think_off_is_sent_with_the_request() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    harness.get_by_label("Think").click();
    harness.run_steps(2);
    send_message(&mut harness, "Quick answer please");
    assert!(!fake.last_request().settings.thinking);
    let conversation = harness.state().current_conversation().unwrap();
    assert!(!conversation.settings.thinking);
}

#[test]
fn new_chats_use_the_loaded_models_recommended_sampling() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    send_message(&mut harness, "Hello SmolLM3");
    let request = fake.last_request();
    assert_eq!(
        (
            request.settings.sampling.temperature,
            request.settings.sampling.top_p
        ),
        (0.6, 0.95)
    );
    fake.finished(request.id, GenerationStats::default());
    harness.run_steps(3);

    // SmolLM2 (Llama architecture) recommends temperature 0.2 and top-p 0.9.
    load_model(&mut harness, &fake, &common::smollm2_path());
    harness.key_press_modifiers(Modifiers::COMMAND, Key::N);
    harness.run_steps(2);
    send_message(&mut harness, "Hello SmolLM2");
    let smollm2 = fake.last_request().settings.sampling;
    assert_eq!((smollm2.temperature, smollm2.top_p), (0.2, 0.9));
}

#[test]
fn regenerate_and_edit_replace_replies() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    send_message(&mut harness, "First question");
    let first = fake.last_request();
    fake.segment(first.id, SegmentKind::Answer, "First answer");
    fake.finished(first.id, GenerationStats::default());
    harness.run_steps(3);

    harness.get_by_label("Regenerate").click();
    harness.run_steps(2);
    let second = fake.last_request();
    assert_ne!(second.id, first.id);
    assert_eq!(second.messages.len(), 1);
    fake.segment(second.id, SegmentKind::Answer, "Second answer");
    fake.finished(second.id, GenerationStats::default());
    harness.run_steps(3);
    let messages = &harness.state().current_conversation().unwrap().messages;
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[1].content, "Second answer");

    harness.get_by_label("Edit").click();
    harness.run_steps(2);
    let editor = harness.get_by_label("Edit message");
    editor.focus();
    harness.step();
    harness.get_by_label("Edit message").type_text(" (edited)");
    harness.step();
    harness.get_by_label("Save & send").click();
    harness.run_steps(2);
    let third = fake.last_request();
    assert_eq!(third.messages.len(), 1);
    assert_eq!(third.messages[0].content, "First question (edited)");
}

#[test]
fn dropped_old_turns_are_announced() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    send_message(&mut harness, "Hi");
    let request = fake.last_request();
    fake.started(request.id, "prompt", 4);
    harness.run_steps(2);
    assert!(shows(&harness, "the 4 oldest messages were left out"));
    assert_eq!(harness.state().last_prompt().unwrap().dropped_messages, 4);
}

#[test]
fn conversations_survive_closing_and_reopening_the_app() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut storage = MemoryStorage::default();
    {
        let mut harness = loaded_app(&fake, &dirs);
        send_message(&mut harness, "Remember the word marmalade");
        let request = fake.last_request();
        fake.segment(request.id, SegmentKind::Thinking, "secret reasoning");
        fake.segment(
            request.id,
            SegmentKind::Answer,
            "I will remember marmalade.",
        );
        fake.finished(request.id, thinking_stats());
        harness.run_steps(3);
        eframe::App::save(harness.state_mut(), &mut storage);
    }
    let fake = Fake::default();
    let mut harness = harness(
        fake_options(&fake, dirs.data.path(), dirs.models.path()),
        Some(&storage),
    );
    harness.run_steps(2);
    let conversation = harness.state().current_conversation().unwrap().clone();
    assert_eq!(conversation.display_title(), "Remember the word marmalade");
    assert_eq!(conversation.messages.len(), 2);
    assert_eq!(
        conversation.messages[1].content,
        "I will remember marmalade."
    );
    assert_eq!(
        conversation.messages[1].thinking.as_deref(),
        Some("secret reasoning")
    );
    assert!(shows(&harness, "Remember the word marmalade"));
    assert!(shows(&harness, "I will remember marmalade."));
}

#[test]
fn deleting_a_conversation_can_be_undone() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    send_message(&mut harness, "Keep me");
    let request = fake.last_request();
    fake.finished(request.id, GenerationStats::default());
    fake.segment(request.id, SegmentKind::Answer, "ignored: after the end");
    harness.run_steps(3);
    let id = harness.state().current_conversation().unwrap().id.clone();
    let file = dirs
        .data
        .path()
        .join("conversations")
        .join(format!("{id}.json"));
    assert!(step_until(&mut harness, Duration::from_secs(5), |_| file.exists()));

    harness.get_by_label("Conversation menu").click();
    harness.run_steps(2);
    harness.get_by_label("Delete").click();
    harness.run_steps(2);
    assert!(!harness.state().conversations().contains(&id));
    assert!(shows(&harness, "Deleted “Keep me”"));
    assert!(step_until(&mut harness, Duration::from_secs(5), |_| !file.exists()));

    harness.get_by_label("Undo").click();
    harness.run_steps(2);
    assert_eq!(harness.state().current_conversation().unwrap().id, id);
    assert!(step_until(&mut harness, Duration::from_secs(5), |_| file.exists()));
}

#[test]
fn new_chat_rename_and_search() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    for text in ["Apples are red", "Bananas are yellow"] {
        send_message(&mut harness, text);
        let request = fake.last_request();
        fake.finished(request.id, GenerationStats::default());
        harness.run_steps(2);
        harness.key_press_modifiers(Modifiers::COMMAND, Key::N);
        harness.run_steps(2);
    }
    let with_messages = harness
        .state()
        .conversations()
        .loaded()
        .filter(|c| !c.messages.is_empty())
        .count();
    assert_eq!(with_messages, 2);

    harness.get_by_label("Search conversations").focus();
    harness.step();
    harness
        .get_by_label("Search conversations")
        .type_text("banana");
    harness.run_steps(2);
    assert!(shows(&harness, "Bananas are yellow"));
    assert!(!shows(&harness, "Apples are red"));
    harness.get_by_label("Clear search").click();
    harness.run_steps(2);

    harness.get_by_label("Apples are red").click();
    harness.run_steps(2);
    harness.get_by_label("Conversation menu").click();
    harness.run_steps(2);
    harness.get_by_label("Rename…").click();
    harness.run_steps(2);
    harness
        .get_by_label("Conversation title")
        .type_text(" (fruit)");
    harness.step();
    harness.key_press(Key::Enter);
    harness.run_steps(2);
    let current = harness.state().current_conversation().unwrap();
    assert_eq!(current.title, "Apples are red (fruit)");
}

#[test]
fn a_failed_save_is_shown_and_the_chat_goes_on() {
    let fake = Fake::default();
    let dirs = dirs();
    std::fs::write(dirs.data.path().join("conversations"), "not a folder").unwrap();
    let mut harness = loaded_app(&fake, &dirs);
    send_message(&mut harness, "Will this be saved?");
    assert!(step_until(&mut harness, Duration::from_secs(5), |app| {
        app.notice_texts()
            .iter()
            .any(|t| t.contains("Could not save the conversation"))
    }));
    let request = fake.last_request();
    fake.segment(request.id, SegmentKind::Answer, "Still answering.");
    fake.finished(request.id, GenerationStats::default());
    harness.run_steps(3);
    assert!(shows(&harness, "Still answering."));
}

#[test]
fn a_huge_paste_does_not_freeze_and_is_counted() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    harness.get_by_label("Message").focus();
    harness.step();
    let paste = "All work and no play makes Jack a dull boy. ".repeat(2300);
    assert!(paste.len() > 100_000);
    let start = std::time::Instant::now();
    harness.event(egui::Event::Paste(paste.clone()));
    harness.run_steps(3);
    let per_frame = start.elapsed() / 4;
    assert_eq!(harness.state().draft().len(), paste.len());
    assert!(
        per_frame < Duration::from_millis(500),
        "frames took {per_frame:?} with a 100k-character draft"
    );
    assert!(shows(&harness, "101,200 characters"));
    // The paste is far longer than the context: the meter says so and Send is disabled.
    assert!(step_until_shows(
        &mut harness,
        "This message is too long",
        Duration::from_secs(30)
    ));
    harness.key_press(Key::Enter);
    harness.run_steps(2);
    assert!(
        fake.requests().is_empty(),
        "a draft that cannot fit was sent"
    );
}

#[test]
fn the_layout_is_stable_from_frame_to_frame() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    send_message(
        &mut harness,
        "A message with a fairly long title to fill the sidebar row",
    );
    let request = fake.last_request();
    fake.finished(request.id, GenerationStats::default());
    harness.run_steps(3);
    let width = |h: &egui_kittest::Harness<'_, smoldesk::ui::App>| {
        h.get_by_label("Search conversations").rect().width()
    };
    let before = width(&harness);
    harness.run_steps(30);
    assert_eq!(
        width(&harness),
        before,
        "the sidebar changed width by itself"
    );
}

#[test]
fn requests_name_their_conversation_and_settings_show_saved_states() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    send_message(&mut harness, "Hello SmolLM3");
    let current = harness.state().current_conversation().unwrap().id.clone();
    assert_eq!(fake.last_request().conversation, Some(current));
    harness.get_by_label("⚙ Settings").click();
    harness.run_steps(2);
    assert!(shows(&harness, "Saved conversation states"));
    // The button exists (not clicked: the app's cache is shared with the real folder).
    harness.get_by_label("Clear saved states");
}
