//! The data folder as the app sees it: one running copy owns it (a second opens read-only and
//! says so), unreadable conversation files are quarantined, stale temporary files are removed,
//! and Undo brings back every deletion of the session.

mod common;
mod ui_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use smoldesk::chat::conversation::GenerationStats;
use smoldesk::chat::store::ConversationStore;
use smoldesk::ui::{Action, App};
use smoldesk::worker::messages::SegmentKind;
use ui_support::*;

const WAIT: Duration = Duration::from_secs(10);

fn conversations(data: &Path) -> PathBuf {
    data.join("conversations")
}

fn open_app<'a>(fake: &Fake, data: &Path, models: &Path) -> Harness<'a, App> {
    let mut harness = harness(fake_options(fake, data, models), None);
    harness.run_steps(2);
    harness
}

/// The app with the tiny model (copied into `models`) "loaded" by the fake worker.
fn app_with_model<'a>(fake: &Fake, data: &Path, models: &Path) -> Harness<'a, App> {
    let model = models.join("tiny.gguf");
    std::fs::copy(common::fixture("tiny-smollm3-q4_k_m.gguf"), &model).unwrap();
    let mut harness = open_app(fake, data, models);
    load_model(&mut harness, fake, &model);
    harness
}

/// Sends a message and lets the fake worker answer it.
fn chat(harness: &mut Harness<'_, App>, fake: &Fake, text: &str) -> String {
    send_message(harness, text);
    let request = fake.last_request();
    fake.segment(request.id, SegmentKind::Answer, "Noted.");
    fake.finished(request.id, GenerationStats::default());
    harness.run_steps(3);
    harness.state().current_conversation().unwrap().id.clone()
}

fn saved_ids(data: &Path) -> Vec<String> {
    let mut ids: Vec<_> = ConversationStore::new(conversations(data))
        .load_all()
        .conversations
        .into_iter()
        .map(|c| c.id)
        .collect();
    ids.sort();
    ids
}

#[test]
fn a_second_copy_on_the_same_folder_is_told_and_changes_nothing() {
    let (models, data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first_fake = Fake::default();
    let mut first = app_with_model(&first_fake, data.path(), models.path());
    let id = chat(&mut first, &first_fake, "Mine, from the first copy");
    assert!(!first.state().is_read_only());
    assert!(step_until(&mut first, WAIT, |_| saved_ids(data.path()) == [id.clone()]));
    let file = conversations(data.path()).join(format!("{id}.json"));
    // The last write of the finished reply (the one with its statistics) is on disk.
    assert!(step_until(&mut first, WAIT, |_| {
        std::fs::read_to_string(&file)
            .is_ok_and(|t| t.contains("Noted.") && t.contains("stop_reason"))
    }));
    let before = std::fs::read(&file).unwrap();

    let second_fake = Fake::default();
    let mut second = open_app(&second_fake, data.path(), models.path());
    assert!(second.state().is_read_only());
    assert!(shows(
        &second,
        "Another copy of SmolDesk is already running"
    ));
    assert!(shows(&second, "Read-only"));
    // The second copy sees the chat, but deleting or renaming it there writes nothing.
    assert_eq!(second.state().conversations().len(), 1);
    second.state_mut().apply(Action::Rename {
        id: id.clone(),
        title: "Renamed by the second copy".into(),
    });
    second.state_mut().apply(Action::Delete(id.clone()));
    second.run_steps(3);
    second.state_mut().shutdown();
    drop(second);
    assert_eq!(
        std::fs::read(&file).unwrap(),
        before,
        "nothing was overwritten"
    );

    // The first copy goes on saving.
    chat(&mut first, &first_fake, "More from the first copy");
    first.state_mut().shutdown();
    drop(first);
    let saved = ConversationStore::new(conversations(data.path()))
        .load(&id)
        .unwrap();
    assert_eq!(saved.messages.len(), 4);

    // Once the first copy is gone, a new one owns the folder again.
    let third_fake = Fake::default();
    let third = open_app(&third_fake, data.path(), models.path());
    assert!(!third.state().is_read_only());
}

#[test]
fn an_unreadable_conversation_is_quarantined_and_named_once() {
    let data = tempfile::tempdir().unwrap();
    let models = tempfile::tempdir().unwrap();
    let folder = conversations(data.path());
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("123-broken.json"), "{ \"messages\": [ oops").unwrap();
    let quarantined = folder.join("quarantine").join("123-broken.json");
    {
        let fake = Fake::default();
        let harness = open_app(&fake, data.path(), models.path());
        let notices = harness.state().notice_texts();
        assert!(
            notices.iter().any(|n| n.contains("could not be read")
                && n.contains(&quarantined.display().to_string())),
            "{notices:?}"
        );
    }
    assert!(!folder.join("123-broken.json").exists());
    assert_eq!(
        std::fs::read_to_string(&quarantined).unwrap(),
        "{ \"messages\": [ oops",
        "the file is kept as it was"
    );
    let fake = Fake::default();
    let harness = open_app(&fake, data.path(), models.path());
    assert!(
        harness.state().notice_texts().is_empty(),
        "the notice comes once: {:?}",
        harness.state().notice_texts()
    );
}

#[test]
fn stale_temporary_files_are_removed_at_start() {
    let data = tempfile::tempdir().unwrap();
    let models = tempfile::tempdir().unwrap();
    let folder = conversations(data.path());
    std::fs::create_dir_all(&folder).unwrap();
    let stale = folder.join("1-2-3.json.4242.tmp");
    std::fs::write(&stale, "half a conversation").unwrap();
    let fake = Fake::default();
    let _harness = open_app(&fake, data.path(), models.path());
    assert!(!stale.exists());
}

#[test]
fn undo_after_ten_deletions_restores_each_one() {
    let (models, data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let fake = Fake::default();
    let mut harness = app_with_model(&fake, data.path(), models.path());
    let mut ids = Vec::new();
    for n in 0..10 {
        harness.state_mut().apply(Action::NewChat);
        harness.run_steps(1);
        ids.push(chat(&mut harness, &fake, &format!("Chat number {n}")));
    }
    ids.sort();
    assert!(step_until(&mut harness, WAIT, |_| saved_ids(data.path()) == ids));

    for _ in 0..10 {
        harness.get_by_label("Conversation menu").click();
        harness.run_steps(2);
        harness.get_by_label("Delete").click();
        harness.run_steps(2);
    }
    assert!(
        harness
            .state()
            .conversations()
            .loaded()
            .all(|c| c.messages.is_empty())
    );
    assert!(step_until(&mut harness, WAIT, |_| saved_ids(data.path()).is_empty()));
    assert_eq!(harness.state().deleted_conversations().count(), 10);

    for _ in 0..10 {
        harness.get_by_label("Undo").click();
        harness.run_steps(2);
    }
    let mut restored: Vec<_> = harness
        .state()
        .conversations()
        .loaded()
        .filter(|c| !c.messages.is_empty())
        .map(|c| c.id.clone())
        .collect();
    restored.sort();
    assert_eq!(restored, ids, "every deleted chat is back");
    assert!(step_until(&mut harness, WAIT, |_| saved_ids(data.path()) == ids));
}

#[test]
fn a_template_file_that_is_a_folder_or_too_large_is_refused_and_not_remembered() {
    let fake = Fake::default();
    let dirs = dirs();
    let mut harness = loaded_app(&fake, &dirs);
    let big = dirs.data.path().join("big.jinja");
    std::fs::write(&big, "x".repeat(2 << 20)).unwrap();
    let cases = [
        (dirs.models.path().to_path_buf(), "not a regular file"),
        (big, "more than the 1048576 allowed"),
    ];
    for (path, expected) in cases {
        harness
            .state_mut()
            .apply(Action::SetTemplateOverride(Some(path.clone())));
        let told = step_until(&mut harness, WAIT, |app| {
            app.notice_texts()
                .iter()
                .any(|n| n.contains("Cannot read the chat template") && n.contains(expected))
        });
        assert!(
            told,
            "{}: {:?}",
            path.display(),
            harness.state().notice_texts()
        );
        assert_eq!(harness.state().preferences().template_override, None);
    }
}
