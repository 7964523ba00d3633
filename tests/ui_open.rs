//! Conversations are listed first and read when opened: the sidebar comes from summaries read
//! off the UI thread, a conversation's messages are read (also off the UI thread) when it is
//! opened, searched or acted on, and a file that became unreadable after the listing is
//! reported once while the app stays usable.

mod common;
mod ui_support;

use std::path::{Path, PathBuf};

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use smoldesk::chat::conversation::{ChatSettings, Conversation, Message, Role};
use smoldesk::chat::store::{ConversationStore, QUARANTINE_DIR, ReadKind};
use smoldesk::ui::{Action, App};
use ui_support::*;

/// The thread the app reads conversations on.
const READER_THREAD: &str = "smoldesk-conversations";

fn conversations_dir(data: &Path) -> PathBuf {
    data.join("conversations")
}

/// Saves a conversation titled `title` with one exchange, changed at `updated_ms`.
fn save(data: &Path, title: &str, question: &str, updated_ms: i64) -> Conversation {
    let mut conversation = Conversation::new(ChatSettings::default());
    conversation.title = title.to_string();
    conversation.updated_ms = updated_ms;
    conversation
        .messages
        .push(Message::new(Role::User, question));
    conversation.messages.push(Message::new(
        Role::Assistant,
        format!("Answer to: {question}"),
    ));
    ConversationStore::new(conversations_dir(data))
        .save(&conversation)
        .unwrap();
    conversation
}

fn open_app<'a>(fake: &Fake, dirs: &Dirs) -> Harness<'a, App> {
    harness(
        fake_options(fake, dirs.data.path(), dirs.models.path()),
        None,
    )
}

/// Parses per kind, over every thread; panics if any happened on another thread than the
/// reader's (the UI thread of a kittest harness is the test's own thread).
fn reads_off_the_ui_thread(app: &App, kind: ReadKind) -> usize {
    let counts = app.store_reads();
    for ((_, thread), n) in &counts {
        assert_eq!(thread, READER_THREAD, "{n} parses on {thread:?}");
    }
    counts
        .iter()
        .filter(|((k, _), _)| *k == kind)
        .map(|(_, n)| n)
        .sum()
}

#[test]
fn opening_a_conversation_from_the_list_shows_its_messages_after_the_background_read() {
    let fake = Fake::default();
    let dirs = dirs();
    let older = save(
        dirs.data.path(),
        "Ferns in winter",
        "Do ferns survive frost?",
        1_000,
    );
    let newer = save(
        dirs.data.path(),
        "Bread at home",
        "How long to knead?",
        2_000,
    );
    let mut harness = open_app(&fake, &dirs);
    assert_eq!(harness.state().current_conversation().unwrap().id, newer.id);
    assert!(harness.state().conversations().is_listed_only(&older.id));
    assert!(shows(&harness, "Answer to: How long to knead?"));

    harness.get_by_label("Ferns in winter").click();
    harness.step();
    assert!(
        shows(&harness, "Opening…"),
        "the frame that opens it says so"
    );
    assert!(step_until_shows(
        &mut harness,
        "Answer to: Do ferns survive frost?",
        BACKGROUND_WAIT
    ));
    let opened = harness.state().current_conversation().unwrap();
    assert_eq!(opened, &older);
    assert!(!shows(&harness, "Opening…"));
    assert_eq!(reads_off_the_ui_thread(harness.state(), ReadKind::Body), 2);
}

#[test]
fn a_conversation_unreadable_after_listing_is_reported_once_and_the_app_stays_usable() {
    let fake = Fake::default();
    let dirs = dirs();
    let broken = save(dirs.data.path(), "Soon broken", "Will this last?", 1_000);
    let kept = save(dirs.data.path(), "Still fine", "Is this fine?", 2_000);
    let mut harness = open_app(&fake, &dirs);
    let file = conversations_dir(dirs.data.path()).join(format!("{}.json", broken.id));
    std::fs::write(&file, "{ \"messages\": [ truncated").unwrap();

    harness.get_by_label("Soon broken").click();
    assert!(step_until_shows(
        &mut harness,
        "could not be read",
        BACKGROUND_WAIT
    ));
    harness.run_steps(5);
    let notices = harness.state().notice_texts();
    let about_it: Vec<_> = notices
        .iter()
        .filter(|t| t.contains("could not be read"))
        .collect();
    assert_eq!(about_it.len(), 1, "{notices:?}");
    assert!(about_it[0].contains(QUARANTINE_DIR), "{}", about_it[0]);
    assert!(!file.exists());
    let quarantined = conversations_dir(dirs.data.path())
        .join(QUARANTINE_DIR)
        .join(format!("{}.json", broken.id));
    assert_eq!(
        std::fs::read_to_string(quarantined).unwrap(),
        "{ \"messages\": [ truncated",
        "nothing is lost"
    );
    assert!(!harness.state().conversations().contains(&broken.id));
    assert!(!shows(&harness, "Soon broken"));

    assert!(!harness.state().is_opening());
    harness.get_by_label("Still fine").click();
    assert!(step_until_shows(
        &mut harness,
        "Answer to: Is this fine?",
        BACKGROUND_WAIT
    ));
    assert_eq!(harness.state().current_conversation().unwrap(), &kept);
}

#[test]
fn startup_with_200_conversations_reads_only_summaries_and_the_open_one_off_the_ui_thread() {
    let fake = Fake::default();
    let dirs = dirs();
    let saved: Vec<Conversation> = (0..200)
        .map(|i| {
            let topic = if i == 7 { "a rare word: quokka" } else { "tea" };
            save(
                dirs.data.path(),
                "",
                &format!("Chat {i} about {topic}"),
                10_000 + i,
            )
        })
        .collect();
    let mut harness = open_app(&fake, &dirs);
    harness.run_steps(3);
    let app = harness.state();
    assert_eq!(app.conversations().len(), 200);
    assert_eq!(app.current_conversation().unwrap(), &saved[199]);
    assert_eq!(reads_off_the_ui_thread(app, ReadKind::Summary), 200);
    assert_eq!(
        reads_off_the_ui_thread(app, ReadKind::Body),
        1,
        "only the open conversation's body is read"
    );
    assert_eq!(app.conversations().loaded().count(), 1);
    assert!(
        shows(&harness, "Chat 198 about tea"),
        "titles come from summaries"
    );

    // The rare word is only in an answer, so finding it needs the bodies (read off the UI
    // thread too).
    harness.get_by_label("Search conversations").focus();
    harness.step();
    harness
        .get_by_label("Search conversations")
        .type_text("Answer to: Chat 7 about a rare");
    assert!(step_until(&mut harness, BACKGROUND_WAIT, |app| {
        app.conversations().loaded().count() == 200
    }));
    harness.run_steps(2);
    assert!(shows(&harness, "Chat 7 about a rare word: quokka"));
    assert!(!shows(&harness, "Chat 8 about tea"));
    assert_eq!(
        reads_off_the_ui_thread(harness.state(), ReadKind::Body),
        200
    );
}

#[test]
fn deleting_a_conversation_not_read_yet_reads_it_first_so_undo_brings_it_back() {
    let fake = Fake::default();
    let dirs = dirs();
    let older = save(dirs.data.path(), "Old notes", "Remember the milk", 1_000);
    save(dirs.data.path(), "New notes", "Remember the eggs", 2_000);
    let mut harness = open_app(&fake, &dirs);
    assert!(harness.state().conversations().is_listed_only(&older.id));
    harness.state_mut().apply(Action::Delete(older.id.clone()));
    assert!(step_until(&mut harness, BACKGROUND_WAIT, |app| {
        !app.conversations().contains(&older.id)
    }));
    let file = conversations_dir(dirs.data.path()).join(format!("{}.json", older.id));
    assert!(step_until(&mut harness, BACKGROUND_WAIT, |_| !file.exists()));
    assert_eq!(harness.state().deleted_conversations().next(), Some(&older));
    harness.get_by_label("Undo").click();
    harness.run_steps(2);
    assert_eq!(harness.state().current_conversation(), Some(&older));
    assert!(step_until(&mut harness, BACKGROUND_WAIT, |_| file.exists()));
    assert_eq!(
        ConversationStore::new(conversations_dir(dirs.data.path()))
            .load(&older.id)
            .unwrap(),
        older
    );
}
