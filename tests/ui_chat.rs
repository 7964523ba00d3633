//! The chat view and its settings through the widgets, with a scripted backend: line breaks
//! in replies, the seed of each reply, the thinking budget, the overflow notice, search while a
//! reply streams, and exports written off the UI thread.

mod common;
mod ui_support;

use std::time::Duration;

use egui_kittest::kittest::{NodeT, Queryable};
use smoldesk::chat::conversation::GenerationStats;
use smoldesk::ui::Action;
use smoldesk::worker::messages::SegmentKind;
use ui_support::*;

/// Sends `question` and lets the fake worker answer `answer` with `stats`.
fn exchange(
    harness: &mut egui_kittest::Harness<'_, smoldesk::ui::App>,
    fake: &Fake,
    question: &str,
    answer: &str,
    stats: GenerationStats,
) {
    send_message(harness, question);
    let id = fake.last_request().id;
    fake.started(id, "prompt", stats.dropped_messages);
    fake.segment(id, SegmentKind::Answer, answer);
    fake.finished(id, stats);
    harness.run_steps(4);
    assert!(harness.state().generation().is_none());
}

#[test]
fn a_poem_keeps_its_line_breaks_and_copy_keeps_the_text() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    let poem = "Waves roll in slow,\nthe gulls cry high,\nthe sea sleeps below.";
    exchange(
        &mut harness,
        &fake,
        "Write a short poem about the sea",
        poem,
        GenerationStats::default(),
    );
    let first = harness.get_by_label("Waves roll in slow,").rect();
    let second = harness.get_by_label("the gulls cry high,").rect();
    let third = harness.get_by_label("the sea sleeps below.").rect();
    assert!(second.top() >= first.bottom() - 1.0, "{first:?} {second:?}");
    assert!(third.top() >= second.bottom() - 1.0, "{second:?} {third:?}");
    assert!(
        (second.left() - first.left()).abs() < 1.0,
        "lines start alike"
    );

    let reply = &harness.state().current_conversation().unwrap().messages[1];
    assert_eq!(reply.content, poem, "the stored text is the model's own");
    harness
        .get_all_by_label("Copy")
        .last()
        .expect("a Copy button under the reply")
        .click();
    harness.run_steps(2);
    let copied = harness
        .output()
        .platform_output
        .commands
        .iter()
        .find_map(|c| match c {
            egui::OutputCommand::CopyText(text) => Some(text.clone()),
            _ => None,
        });
    assert_eq!(copied.as_deref(), Some(poem));
}

#[test]
fn each_reply_shows_the_seed_it_was_sampled_with() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    let stats = GenerationStats {
        seed: 1_234_567,
        generated_tokens: 3,
        ..GenerationStats::default()
    };
    exchange(&mut harness, &fake, "Hi", "Hello!", stats);
    let request = fake.last_request();
    assert!(
        !request.settings.fixed_seed,
        "new chats draw a seed per reply"
    );
    harness.get_by_label_contains("to first token").hover();
    harness.run_steps(60);
    assert!(
        shows(&harness, "Seed: 1234567"),
        "the tooltip names the seed"
    );
}

#[test]
fn regenerate_asks_for_a_fresh_seed_unless_one_is_fixed() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    exchange(
        &mut harness,
        &fake,
        "Hi",
        "Hello!",
        GenerationStats::default(),
    );
    harness.state_mut().apply(Action::Regenerate);
    harness.run_steps(2);
    assert!(!fake.last_request().settings.fixed_seed);
}

#[test]
fn a_fixed_seed_is_set_in_settings_and_sent_with_the_request() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::Comma);
    harness.run_steps(2);
    harness.get_by_label("Fixed seed").focus();
    harness.step();
    harness.key_press(egui::Key::Space);
    harness.run_steps(2);
    let settings = &harness.state().current_conversation().unwrap().settings;
    assert!(settings.fixed_seed);
    send_message(&mut harness, "Same again");
    assert!(fake.last_request().settings.fixed_seed);
}

#[test]
fn the_thinking_budget_is_chosen_in_settings_and_sent_with_the_request() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::Comma);
    harness.run_steps(2);
    assert!(shows(&harness, "Thinking budget"));
    harness.get_by_label("Thinking budget").click();
    harness.run_steps(2);
    harness.get_by_label("256 tokens").click();
    harness.run_steps(2);
    let settings = &harness.state().current_conversation().unwrap().settings;
    assert_eq!(settings.thinking_budget, Some(256));

    send_message(&mut harness, "Think, but briefly");
    let request = fake.last_request();
    assert_eq!(request.settings.thinking_budget, Some(256));
    fake.started(request.id, "prompt", 0);
    fake.segment(request.id, SegmentKind::Thinking, "Let me see.");
    fake.segment(request.id, SegmentKind::Answer, "Done.");
    fake.finished(
        request.id,
        GenerationStats {
            thinking_tokens: 256,
            thinking_secs: 3.0,
            thinking_budget_reached: true,
            ..GenerationStats::default()
        },
    );
    harness.run_steps(4);
    assert!(shows(
        &harness,
        "Thought for 3.0 s · 256 tokens (budget reached)"
    ));
}

#[test]
fn the_overflow_notice_marks_where_the_models_view_begins() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    exchange(
        &mut harness,
        &fake,
        "First",
        "One.",
        GenerationStats::default(),
    );
    exchange(
        &mut harness,
        &fake,
        "Second",
        "Two.",
        GenerationStats::default(),
    );
    assert!(!shows(&harness, "no longer fit the context"));
    let dropped = GenerationStats {
        dropped_messages: 2,
        ..GenerationStats::default()
    };
    exchange(&mut harness, &fake, "Third", "Three.", dropped);
    let notice = harness.get_by_label_contains("The 2 earlier messages above no longer fit");
    let second = harness.get_by_label("Second");
    assert!(notice.rect().bottom() <= second.rect().top() + 1.0);
    assert!(notice.rect().top() >= harness.get_by_label("One.").rect().bottom() - 1.0);
}

#[test]
fn search_runs_on_edits_not_on_every_streamed_token() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    exchange(
        &mut harness,
        &fake,
        "About whales",
        "Big.",
        GenerationStats::default(),
    );
    harness.get_by_label("Search conversations").focus();
    harness
        .get_by_label("Search conversations")
        .type_text("whale");
    harness.run_steps(2);
    let before = harness.state().search_runs();
    send_message(&mut harness, "More about whales");
    let id = fake.last_request().id;
    fake.started(id, "prompt", 0);
    harness.run_steps(1);
    let streaming = harness.state().search_runs();
    for _ in 0..20 {
        fake.segment(id, SegmentKind::Answer, "whale ");
        harness.step();
    }
    assert_eq!(
        harness.state().search_runs(),
        streaming,
        "tokens rerun the search"
    );
    fake.finished(id, GenerationStats::default());
    harness.run_steps(2);
    assert!(harness.state().search_runs() > before);
    harness.get_by_label("Search conversations").type_text("s");
    harness.run_steps(2);
    assert!(shows(&harness, "whales"));
}

#[test]
fn export_is_written_in_the_background_and_announced() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    exchange(
        &mut harness,
        &fake,
        "Line\nbreaks",
        "A\nB",
        GenerationStats::default(),
    );
    let id = harness.state().current_conversation().unwrap().id.clone();
    harness.state_mut().apply(Action::Export(id));
    let announced = step_until(&mut harness, Duration::from_secs(20), |app| {
        app.notice_texts()
            .iter()
            .any(|t| t.starts_with("Exported to"))
    });
    assert!(announced, "{:?}", harness.state().notice_texts());
    let exports = dirs.data.path().join("exports");
    let file = std::fs::read_dir(&exports)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let text = std::fs::read_to_string(file.path()).unwrap();
    assert!(
        text.contains("A\nB"),
        "the export keeps the original text: {text}"
    );
}

/// A conversation of `count` exchanges whose replies have thinking.
fn thoughtful_conversation(count: usize) -> Vec<smoldesk::chat::conversation::Message> {
    use smoldesk::chat::conversation::{Message, Role};
    (0..count)
        .flat_map(|i| {
            let question = Message::new(Role::User, format!("Question number {i}"));
            let mut answer = Message::new(
                Role::Assistant,
                format!("Answer number {i}.\n\nIt has a second paragraph."),
            );
            answer.thinking = Some(format!("Thinking about question {i}."));
            answer.stats = Some(GenerationStats {
                thinking_tokens: 12,
                thinking_secs: 1.0,
                ..GenerationStats::default()
            });
            [question, answer]
        })
        .collect()
}

/// Which "Answer number …" is highest in the chat view, and the top of its text.
fn first_answer_in_view(harness: &egui_kittest::Harness<'_, smoldesk::ui::App>) -> (usize, f32) {
    (0..60)
        .filter_map(|i| {
            let label = format!("Answer number {i}.");
            let top = harness
                .query_all_by_label_contains(&label)
                .map(|node| node.rect().top())
                .find(|top| *top > 60.0)?;
            Some((i, top))
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("an answer is in view")
}

#[test]
fn toggling_show_thinking_keeps_the_message_at_the_top_of_the_view_in_place() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    harness
        .state_mut()
        .current_conversation_mut()
        .unwrap()
        .messages = thoughtful_conversation(60);
    harness.run_steps(3);
    for _ in 0..30 {
        harness.event(egui::Event::PointerMoved(egui::pos2(700.0, 400.0)));
        harness.event(egui::Event::MouseWheel {
            unit: egui::MouseWheelUnit::Point,
            delta: egui::vec2(0.0, 200.0),
            phase: egui::TouchPhase::Move,
            source: egui::MouseWheelSource::Wheel,
            modifiers: egui::Modifiers::NONE,
        });
        harness.step();
    }
    harness.run_steps(60);
    let before = first_answer_in_view(&harness);
    assert!(
        before.0 < 55,
        "scrolled up, away from the newest message: {before:?}"
    );
    assert!(shows(&harness, "Thought for"));
    for shown in [false, true] {
        harness.state_mut().apply(Action::ToggleShowThinking);
        harness.run_steps(20);
        assert_eq!(harness.state().preferences().show_thinking, shown);
        assert_eq!(shows(&harness, "Thought for"), shown);
        let after = first_answer_in_view(&harness);
        assert_eq!(after.0, before.0, "the same message stays at the top");
        assert!(
            (after.1 - before.1).abs() < 40.0,
            "it moved from {} to {}",
            before.1,
            after.1
        );
    }
}

#[test]
fn a_new_chat_is_listed_while_its_first_reply_streams() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    harness.run_steps(2);
    assert!(shows(&harness, "No conversations yet"));
    send_message(&mut harness, "Tell me about whales");
    let id = fake.last_request().id;
    fake.started(id, "prompt", 0);
    for _ in 0..5 {
        fake.segment(id, SegmentKind::Answer, "Whales are big. ");
        harness.step();
    }
    assert!(harness.state().generation().is_some());
    assert!(!shows(&harness, "No conversations yet"));
    // The user's bubble and the conversation's row in the list.
    assert_eq!(
        harness.query_all_by_label("Tell me about whales").count(),
        2
    );
    fake.finished(id, GenerationStats::default());
    harness.run_steps(2);
    assert_eq!(
        harness.query_all_by_label("Tell me about whales").count(),
        2
    );
}

#[test]
fn after_an_overflow_the_meter_counts_the_prompt_the_model_will_see() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    let context = harness.state().loaded_model().unwrap().context_length();
    for turn in 0..6 {
        let answer = format!("Answer {turn}: ") + &"many words here ".repeat(context / 12);
        exchange(
            &mut harness,
            &fake,
            &format!("Question {turn}"),
            &answer,
            GenerationStats::default(),
        );
    }
    assert!(step_until_shows(
        &mut harness,
        "left out of the next reply",
        Duration::from_secs(60)
    ));
    let label = harness
        .query_all_by_label_contains("Context: ")
        .next()
        .unwrap()
        .accesskit_node()
        .value()
        .unwrap();
    let used: usize = label["Context: ".len()..]
        .split(" / ")
        .next()
        .unwrap()
        .replace(',', "")
        .parse()
        .unwrap();
    assert!(used > 0 && used <= context, "{label}");
}
