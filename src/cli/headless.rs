//! `smoldesk headless-chat` (hidden): the app without a window, for tests of what the app saves
//! when it is killed or signalled mid-reply. It runs the real [`App`] (worker, events, saving,
//! signal handling), loads a model, sends one message and prints the reply's new text as JSON
//! lines while it streams: `{"loaded":…}`, `{"thinking":…}`/`{"answer":…}`, then
//! `{"exit":"finished"}` or `{"exit":"signal"}`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};

use crate::ui::app::ModelState;
use crate::ui::{Action, App, AppOptions};
use crate::worker::WorkerHandle;
use crate::worker::thread::FaultPoint;

/// Arguments of `smoldesk headless-chat`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The GGUF model.
    #[arg(short, long)]
    pub model: PathBuf,
    /// The message to send.
    #[arg(long)]
    pub message: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 2000)]
    pub max_tokens: usize,
    /// Let the model reason first.
    #[arg(long)]
    pub think: bool,
    /// Pause after every streamed piece of text (to make a small model as slow as a big one).
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// The data folder (default: as the app: `$SMOLDESK_DATA_DIR` or the user's).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// How often the loop runs the app's frame logic.
const TICK: Duration = Duration::from_millis(10);

/// Runs the app headless until the reply ends or a signal asks it to exit.
pub fn run(args: Args) -> Result<()> {
    let data_dir = args.data_dir.clone().unwrap_or_else(crate::paths::data_dir);
    let worker = if args.delay_ms > 0 {
        let delay = Duration::from_millis(args.delay_ms);
        WorkerHandle::spawn_with_faults(
            Arc::new(|| {}),
            Arc::new(move |point| {
                if point == FaultPoint::Segment {
                    std::thread::sleep(delay);
                }
            }),
        )
    } else {
        WorkerHandle::spawn(Arc::new(|| {}))
    };
    let mut app = App::headless(AppOptions {
        backend: Some(Box::new(worker)),
        restore_last_model: false,
        model_dirs: Some(Vec::new()),
        handle_signals: true,
        ..AppOptions::new(data_dir)
    });
    if app.is_read_only() {
        print_line("read_only", &true);
    }
    app.apply(Action::Load(std::path::absolute(&args.model)?));
    loop {
        if app.tick() {
            print_line("exit", "signal");
            return Ok(());
        }
        match app.model_state() {
            ModelState::Ready(_) => break,
            ModelState::Empty => bail!("the model did not load: {:?}", app.notice_texts()),
            ModelState::Loading { .. } => std::thread::sleep(TICK),
        }
    }
    print_line("loaded", &true);
    app.apply(Action::NewChat);
    app.apply(Action::SetThinking(args.think));
    if let Some(conversation) = app.current_conversation_mut() {
        conversation.settings.sampling.max_tokens = args.max_tokens;
    }
    app.set_draft(&args.message);
    app.apply(Action::Send);
    if let Some(conversation) = app.current_conversation() {
        print_line("conversation", &conversation.id);
    }
    stream(&mut app);
    Ok(())
}

/// Prints the live reply's new text until it ends or a signal comes.
fn stream(app: &mut App) {
    let mut printed = (0, 0);
    loop {
        let exit = app.tick();
        let reply = app.current_conversation().and_then(|c| c.messages.last());
        if let Some(reply) = reply {
            let thinking = reply.thinking.as_deref().unwrap_or("");
            print_new("thinking", thinking, &mut printed.0);
            print_new("answer", &reply.content, &mut printed.1);
        }
        if exit {
            print_line("exit", "signal");
            return;
        }
        if app.generation().is_none() {
            app.shutdown();
            print_line("exit", "finished");
            return;
        }
        std::thread::sleep(TICK);
    }
}

fn print_new(key: &str, text: &str, printed: &mut usize) {
    if let Some(new) = text.get(*printed..).filter(|t| !t.is_empty()) {
        print_line(key, new);
        *printed = text.len();
    }
}

fn print_line(key: &str, value: &(impl serde::Serialize + ?Sized)) {
    println!("{}", serde_json::json!({ key: value }));
}
