//! The inference thread and the handle the UI holds to talk to it.
//!
//! One thread owns the [`Engine`]. The UI sends [`Command`]s over a channel and drains
//! [`Event`]s without blocking; after each event the worker calls the waker so the UI repaints.
//! Stopping uses epochs: every stop (or a new load) bumps a counter, and work that started under
//! an older value ends at the next token (or prefill step). A panic while handling a request is
//! caught and reported as that request's [`WorkerError::Panic`]; the worker then goes on.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};

use super::messages::{Command, Event, GenerateRequest, RequestId, WorkerError};
use crate::chat::conversation::{GenerationStats, StopReason};
use crate::chat::generate::{GenerateError, GenerationContext, GenerationEvent, generate_reply};
use crate::chat::state_cache::{ConversationResume, StateCache};
use crate::chat::template::PromptFormatter;
use crate::engine::EngineError;
use crate::engine::session::{Engine, LoadOptions};

/// Called by the worker after it sends events, to wake the UI (e.g. `ctx.request_repaint()`).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// Longest time dropping the handle waits for the thread to end; after that the thread is left
/// to finish its current step on its own (the process may exit under it).
pub const SHUTDOWN_WAIT: Duration = Duration::from_millis(300);

/// A point inside the worker where a test can make it fail or slow down
/// (see [`WorkerHandle::spawn_with_faults`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FaultPoint {
    /// Loading reached this fraction.
    Load {
        /// Share of the weights read.
        fraction: f32,
    },
    /// A reply's prompt is about to be computed (its `Started` event was sent).
    Prefill,
    /// A reply's text segment was sent.
    Segment,
}

/// A test's hook, called at every [`FaultPoint`]; it may panic or sleep.
#[doc(hidden)]
pub type FaultHook = Arc<dyn Fn(FaultPoint) + Send + Sync>;

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

/// The UI's handle on the inference thread. Nothing here blocks on the model, dropping it
/// included (it waits at most [`SHUTDOWN_WAIT`]).
pub struct WorkerHandle {
    commands: Sender<Envelope>,
    events: Receiver<Event>,
    /// Answers requests itself when the thread is not running.
    own_events: Sender<Event>,
    epochs: Arc<Epochs>,
    /// Disconnects when the thread ends.
    ended: Option<Receiver<()>>,
}

impl WorkerHandle {
    /// Starts the inference thread, keeping conversations' KV states in the app's cache.
    pub fn spawn(waker: Waker) -> Self {
        Self::spawn_with_state_cache(waker, StateCache::app())
    }

    /// Starts the inference thread with its own KV state cache (tests point it at a folder).
    pub fn spawn_with_state_cache(waker: Waker, states: Arc<StateCache>) -> Self {
        Self::start(waker, states, None)
    }

    /// Starts the inference thread with a fault-injection hook (for tests only).
    #[doc(hidden)]
    pub fn spawn_with_faults(waker: Waker, faults: FaultHook) -> Self {
        Self::start(waker, StateCache::app(), Some(faults))
    }

    fn start(waker: Waker, states: Arc<StateCache>, faults: Option<FaultHook>) -> Self {
        let (commands, command_rx) = unbounded();
        let (event_tx, events) = unbounded();
        let (ended_tx, ended) = crossbeam_channel::bounded::<()>(0);
        let epochs = Arc::new(Epochs::default());
        let worker = Worker {
            events: event_tx.clone(),
            waker,
            epochs: epochs.clone(),
            engine: None,
            formatter: PromptFormatter::new(None, None),
            template_override: None,
            resume: ConversationResume::new(states),
            faults,
        };
        let spawned = std::thread::Builder::new()
            .name("smoldesk-inference".into())
            .spawn(move || {
                let _ended = ended_tx;
                worker.run(command_rx);
            });
        let ended = match spawned {
            Ok(_) => Some(ended),
            Err(err) => {
                log::error!("cannot start the inference thread: {err}");
                None
            }
        };
        Self {
            commands,
            events,
            own_events: event_tx,
            epochs,
            ended,
        }
    }

    /// Sends a command; never blocks. Loading or unloading a model first stops the current
    /// generation and any load in progress. When the thread is not running, the request is
    /// answered at once with [`WorkerError::WorkerGone`].
    pub fn send(&self, command: Command) {
        if matches!(
            command,
            Command::LoadModel { .. } | Command::Unload { .. } | Command::Shutdown
        ) {
            self.stop_generation();
            self.cancel_load();
        }
        let id = command.request_id();
        let envelope = Envelope {
            command,
            generation_epoch: self.epochs.generation.load(Ordering::SeqCst),
            load_epoch: self.epochs.load.load(Ordering::SeqCst),
        };
        if self.ended.is_none() || self.commands.send(envelope).is_err() {
            log::error!("the inference thread is not running; command dropped");
            if let Some(id) = id {
                let _ = self.own_events.send(Event::Error {
                    id,
                    error: WorkerError::WorkerGone,
                });
            }
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
        if let Some(ended) = self.ended.take() {
            // Returns when the thread ends (the channel disconnects) or at the timeout.
            let _ = ended.recv_timeout(SHUTDOWN_WAIT);
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
    faults: Option<FaultHook>,
}

impl Worker {
    fn run(mut self, commands: Receiver<Envelope>) {
        while let Ok(envelope) = commands.recv() {
            if matches!(envelope.command, Command::Shutdown) {
                self.resume.flush();
                break;
            }
            let id = envelope.command.request_id();
            let outcome = catch_unwind(AssertUnwindSafe(|| self.handle(envelope)));
            if let Err(panic) = outcome {
                let message = panic_message(panic.as_ref());
                log::error!("inference thread panicked: {message}");
                if let Some(engine) = &mut self.engine {
                    engine.reset();
                }
                if let Some(id) = id {
                    self.send(Event::Error {
                        id,
                        error: WorkerError::Panic(message),
                    });
                }
            }
        }
    }

    fn send(&self, event: Event) {
        let _ = self.events.send(event);
        (self.waker)();
    }

    fn handle(&mut self, envelope: Envelope) {
        match envelope.command {
            Command::LoadModel { id, path, options } => {
                self.load(id, &path, &options, envelope.load_epoch)
            }
            Command::Generate(request) => self.generate(request, envelope.generation_epoch),
            Command::SetTemplateOverride { id, path } => self.set_template_override(id, path),
            Command::Unload { id } => {
                self.engine = None;
                self.resume.engine_changed();
                self.send(Event::Unloaded { id });
            }
            Command::Shutdown => {}
        }
    }

    fn load(&mut self, id: RequestId, path: &Path, options: &LoadOptions, epoch: u64) {
        // Free the old weights before reading the new ones.
        self.engine = None;
        self.resume.engine_changed();
        if !path.is_file() {
            self.send(Event::LoadFailed {
                id,
                path: path.to_path_buf(),
                error: WorkerError::ModelMissing,
            });
            return;
        }
        let start = Instant::now();
        let mut last_sent = -1.0f32;
        let epochs = self.epochs.clone();
        let events = self.events.clone();
        let waker = self.waker.clone();
        let faults = self.faults.clone();
        let mut progress = |fraction: f32| {
            if fraction - last_sent >= 0.01 || fraction >= 1.0 {
                last_sent = fraction;
                let _ = events.send(Event::LoadProgress {
                    id,
                    path: path.to_path_buf(),
                    fraction,
                });
                waker();
            }
            if let Some(hook) = &faults {
                hook(FaultPoint::Load { fraction });
            }
            epochs.load.load(Ordering::SeqCst) == epoch
        };
        let loaded = if progress(0.0) {
            Engine::load(path, options, &mut progress)
        } else {
            Err(EngineError::Cancelled)
        };
        match loaded {
            Ok(engine) => {
                self.formatter = self.make_formatter(engine.info().chat_template.as_deref());
                let info = Box::new(engine.info().clone());
                let tokenizer = engine.tokenizer().clone();
                let compute_threads = engine.threads();
                self.engine = Some(engine);
                self.send(Event::Loaded {
                    id,
                    info,
                    tokenizer,
                    load_secs: start.elapsed().as_secs_f64(),
                    compute_threads,
                });
            }
            Err(err) => {
                let error = match err {
                    EngineError::Cancelled => WorkerError::LoadCancelled,
                    other => WorkerError::Load(other.to_string()),
                };
                self.send(Event::LoadFailed {
                    id,
                    path: path.to_path_buf(),
                    error,
                });
            }
        }
    }

    fn make_formatter(&self, embedded: Option<&str>) -> PromptFormatter {
        let override_source = self.template_override.as_deref();
        PromptFormatter::new(embedded, override_source)
    }

    fn set_template_override(&mut self, id: RequestId, path: Option<PathBuf>) {
        self.template_override = match path {
            None => None,
            Some(path) => match crate::chat::template::read_template_file(&path) {
                Ok(source) => Some(source),
                Err(err) => {
                    self.send(Event::Error {
                        id,
                        error: WorkerError::TemplateFile {
                            path,
                            message: err.reason(),
                        },
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
        self.send(Event::TemplateSet { id });
    }

    fn generate(&mut self, request: GenerateRequest, epoch: u64) {
        let id = request.id;
        let epochs = self.epochs.clone();
        let cancelled = move || epochs.generation.load(Ordering::SeqCst) != epoch;
        let Some(engine) = self.engine.as_mut() else {
            self.send(Event::Error {
                id,
                error: WorkerError::NoModel,
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
        let faults = &self.faults;
        let mut on_event = |event: GenerationEvent| {
            let (event, point) = match event {
                GenerationEvent::Started {
                    prompt_tokens,
                    prompt_text,
                    dropped_messages,
                    template_fallback,
                } => (
                    Event::Started {
                        id,
                        prompt_tokens,
                        prompt_text,
                        template_fallback,
                        dropped_messages,
                    },
                    FaultPoint::Prefill,
                ),
                GenerationEvent::Segment(segment) => (
                    Event::Segment {
                        id,
                        kind: segment.kind,
                        text: segment.text,
                    },
                    FaultPoint::Segment,
                ),
            };
            let _ = events.send(event);
            waker();
            if let Some(hook) = faults {
                hook(point);
            }
        };
        let conversation = request.conversation.as_deref();
        self.resume.before_reply(engine, conversation);
        let result = if request.resume {
            crate::chat::resume::resume_reply(
                engine,
                &ctx,
                &request.messages,
                &request.settings,
                &mut on_event,
            )
        } else {
            generate_reply(
                engine,
                &ctx,
                &request.messages,
                &request.settings,
                &mut on_event,
            )
        };
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
            Err(GenerateError::Context(err)) => Event::Error {
                id,
                error: WorkerError::Context(err.to_string()),
            },
            Err(err) => Event::Error {
                id,
                error: WorkerError::Engine(err.to_string()),
            },
        };
        self.send(event);
        if let Some(engine) = &self.engine {
            self.resume.after_reply(engine, conversation);
        }
    }
}

/// The text of a caught panic's payload.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}
