//! The inference thread and the handle the UI holds to talk to it.
//!
//! One thread owns the [`Engine`]. The UI sends [`Command`]s over a channel and drains
//! [`Event`]s without blocking; after each event the worker calls the waker so the UI repaints.
//! Stopping uses epochs: every stop (or a new load) bumps a counter, and work that started under
//! an older value ends at the next token.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};

use super::messages::{Command, Event, GenerateRequest};
use crate::chat::conversation::{GenerationStats, StopReason};
use crate::chat::generate::{GenerateError, GenerationContext, GenerationEvent, generate_reply};
use crate::chat::state_cache::{ConversationResume, StateCache};
use crate::chat::template::PromptFormatter;
use crate::engine::EngineError;
use crate::engine::session::{Engine, LoadOptions};

/// Called by the worker after it sends events, to wake the UI (e.g. `ctx.request_repaint()`).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// Counters the UI bumps to stop work in progress.
#[derive(Default)]
struct Epochs {
    generation: AtomicU64,
    load: AtomicU64,
}

/// A command together with the epochs current when it was sent.
struct Envelope {
    command: Command,
    generation_epoch: u64,
    load_epoch: u64,
}

/// The UI's handle on the inference thread. Nothing here blocks on the model.
pub struct WorkerHandle {
    commands: Sender<Envelope>,
    events: Receiver<Event>,
    epochs: Arc<Epochs>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Starts the inference thread, keeping conversations' KV states in the app's cache.
    pub fn spawn(waker: Waker) -> Self {
        Self::spawn_with_state_cache(waker, StateCache::app())
    }

    /// Starts the inference thread with its own KV state cache (tests point it at a folder).
    pub fn spawn_with_state_cache(waker: Waker, states: Arc<StateCache>) -> Self {
        let (commands, command_rx) = unbounded();
        let (event_tx, events) = unbounded();
        let epochs = Arc::new(Epochs::default());
        let worker = Worker {
            events: event_tx,
            waker,
            epochs: epochs.clone(),
            engine: None,
            formatter: PromptFormatter::new(None, None),
            template_override: None,
            resume: ConversationResume::new(states),
        };
        let thread = std::thread::Builder::new()
            .name("smoldesk-inference".into())
            .spawn(move || worker.run(command_rx));
        let thread = match thread {
            Ok(t) => Some(t),
            Err(err) => {
                log::error!("cannot start the inference thread: {err}");
                None
            }
        };
        Self {
            commands,
            events,
            epochs,
            thread,
        }
    }

    /// Sends a command; never blocks. Loading or unloading a model first stops the current
    /// generation and any load in progress.
    pub fn send(&self, command: Command) {
        if matches!(
            command,
            Command::LoadModel { .. } | Command::Unload | Command::Shutdown
        ) {
            self.stop_generation();
            self.cancel_load();
        }
        let envelope = Envelope {
            command,
            generation_epoch: self.epochs.generation.load(Ordering::SeqCst),
            load_epoch: self.epochs.load.load(Ordering::SeqCst),
        };
        if self.commands.send(envelope).is_err() {
            log::error!("the inference thread has ended; command dropped");
        }
    }

    /// Stops the reply being generated (and any queued ones); takes effect within one token.
    pub fn stop_generation(&self) {
        self.epochs.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Cancels a model load in progress.
    pub fn cancel_load(&self) {
        self.epochs.load.fetch_add(1, Ordering::SeqCst);
    }

    /// The next pending event, if any (never blocks).
    pub fn try_recv(&self) -> Option<Event> {
        self.events.try_recv().ok()
    }

    /// Waits up to `timeout` for the next event (for tests and the CLI; the UI uses `try_recv`).
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Event> {
        self.events.recv_timeout(timeout).ok()
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// State owned by the inference thread.
struct Worker {
    events: Sender<Event>,
    waker: Waker,
    epochs: Arc<Epochs>,
    engine: Option<Engine>,
    formatter: PromptFormatter,
    /// Source of the user's chat template file, used instead of the model's own.
    template_override: Option<String>,
    /// Restores and saves conversations' KV states.
    resume: ConversationResume,
}

impl Worker {
    fn run(mut self, commands: Receiver<Envelope>) {
        while let Ok(envelope) = commands.recv() {
            if matches!(envelope.command, Command::Shutdown) {
                self.resume.flush();
                break;
            }
            let outcome = catch_unwind(AssertUnwindSafe(|| self.handle(envelope)));
            if let Err(panic) = outcome {
                let message = panic_message(&panic);
                log::error!("inference thread panicked: {message}");
                if let Some(engine) = &mut self.engine {
                    engine.reset();
                }
                self.send(Event::Error {
                    id: None,
                    message: format!("internal error in the inference engine: {message}"),
                });
            }
        }
    }

    fn send(&self, event: Event) {
        let _ = self.events.send(event);
        (self.waker)();
    }

    fn handle(&mut self, envelope: Envelope) {
        match envelope.command {
            Command::LoadModel { path, options } => self.load(&path, &options, envelope.load_epoch),
            Command::Generate(request) => self.generate(request, envelope.generation_epoch),
            Command::SetTemplateOverride(path) => self.set_template_override(path),
            Command::Unload => {
                self.engine = None;
                self.resume.engine_changed();
                self.send(Event::Unloaded);
            }
            Command::Shutdown => {}
            Command::TestPanic => panic!("test panic requested"),
        }
    }

    fn load(&mut self, path: &Path, options: &LoadOptions, epoch: u64) {
        // Free the old weights before reading the new ones.
        self.engine = None;
        self.resume.engine_changed();
        let start = Instant::now();
        let mut last_sent = -1.0f32;
        let epochs = self.epochs.clone();
        let events = self.events.clone();
        let waker = self.waker.clone();
        let mut progress = |fraction: f32| {
            if fraction - last_sent >= 0.01 || fraction >= 1.0 {
                last_sent = fraction;
                let _ = events.send(Event::LoadProgress {
                    path: path.to_path_buf(),
                    fraction,
                });
                waker();
            }
            epochs.load.load(Ordering::SeqCst) == epoch
        };
        match Engine::load(path, options, &mut progress) {
            Ok(engine) => {
                self.formatter = self.make_formatter(engine.info().chat_template.as_deref());
                let info = Box::new(engine.info().clone());
                let tokenizer = engine.tokenizer().clone();
                self.engine = Some(engine);
                self.send(Event::Loaded {
                    info,
                    tokenizer,
                    load_secs: start.elapsed().as_secs_f64(),
                });
            }
            Err(err) => {
                let message = match err {
                    EngineError::Cancelled => "loading was cancelled".to_string(),
                    other => other.to_string(),
                };
                self.send(Event::LoadFailed {
                    path: path.to_path_buf(),
                    message,
                });
            }
        }
    }

    fn make_formatter(&self, embedded: Option<&str>) -> PromptFormatter {
        let override_source = self.template_override.as_deref();
        PromptFormatter::new(embedded, override_source)
    }

    fn set_template_override(&mut self, path: Option<PathBuf>) {
        self.template_override = match path {
            None => None,
            Some(path) => match std::fs::read_to_string(&path) {
                Ok(source) => Some(source),
                Err(err) => {
                    self.send(Event::Error {
                        id: None,
                        message: format!("cannot read chat template {}: {err}", path.display()),
                    });
                    return;
                }
            },
        };
        let embedded = self
            .engine
            .as_ref()
            .and_then(|e| e.info().chat_template.clone());
        self.formatter = self.make_formatter(embedded.as_deref());
    }

    fn generate(&mut self, request: GenerateRequest, epoch: u64) {
        let id = request.id;
        let epochs = self.epochs.clone();
        let cancelled = move || epochs.generation.load(Ordering::SeqCst) != epoch;
        let Some(engine) = self.engine.as_mut() else {
            self.send(Event::Error {
                id: Some(id),
                message: "no model is loaded: open a model first".into(),
            });
            return;
        };
        let ctx = GenerationContext {
            formatter: &self.formatter,
            date: chrono::Local::now().date_naive(),
            cancelled: &cancelled,
        };
        let events = &self.events;
        let waker = &self.waker;
        let mut on_event = |event: GenerationEvent| {
            let event = match event {
                GenerationEvent::Started {
                    prompt_tokens,
                    prompt_text,
                    dropped_messages,
                    template_fallback,
                } => Event::Started {
                    id,
                    prompt_tokens,
                    prompt_text,
                    template_fallback,
                    dropped_messages,
                },
                GenerationEvent::Segment(segment) => Event::Segment {
                    id,
                    kind: segment.kind,
                    text: segment.text,
                },
            };
            let _ = events.send(event);
            waker();
        };
        let conversation = request.conversation.as_deref();
        self.resume.before_reply(engine, conversation);
        let result = generate_reply(
            engine,
            &ctx,
            &request.messages,
            &request.settings,
            &mut on_event,
        );
        let event = match result {
            Ok(reply) => Event::Finished {
                id,
                stats: reply.stats,
            },
            Err(GenerateError::Engine(EngineError::Cancelled)) => Event::Finished {
                id,
                stats: GenerationStats {
                    stop_reason: StopReason::Cancelled,
                    ..GenerationStats::default()
                },
            },
            Err(err) => Event::Error {
                id: Some(id),
                message: err.to_string(),
            },
        };
        self.send(event);
        if let Some(engine) = &self.engine {
            self.resume.after_reply(engine, conversation);
        }
    }
}

/// The text of a panic payload.
fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}
