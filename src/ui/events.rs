//! Applying the worker's events to the app state (never blocks: events are drained with
//! `try_recv` at the start of each frame). Every event names its request: events of requests
//! the app has moved past (a replaced load, a reply it stopped waiting for) are ignored, and an
//! error ends exactly the request it names, whatever stage it was at.

use std::sync::Arc;
use std::time::Instant;

use super::actions::file_name;
use super::app::{App, LoadedModel, ModelState, Phase, PromptReport};
use super::token_meter::CountingModel;
use crate::chat::conversation::GenerationStats;
use crate::chat::template::PromptFormatter;
use crate::engine::ModelInfo;
use crate::engine::tokenizer::GgufTokenizer;
use crate::worker::Event;
use crate::worker::messages::{RequestId, SegmentKind, WorkerError};

/// Most events applied per frame, so a flood of segments cannot stall one frame.
const MAX_EVENTS_PER_FRAME: usize = 4096;

impl App {
    /// Applies every pending worker event.
    pub(crate) fn drain_events(&mut self) {
        for _ in 0..MAX_EVENTS_PER_FRAME {
            let Some(event) = self.backend.try_recv() else {
                return;
            };
            self.handle_event(event);
        }
        self.chat.more_events_pending = true;
    }

    /// Applies one worker event.
    pub fn handle_event(&mut self, event: Event) {
        match event {
            Event::LoadProgress { id, fraction, .. } => self.on_load_progress(id, fraction),
            Event::Loaded {
                id,
                info,
                tokenizer,
                load_secs,
                compute_threads,
            } => {
                if self.is_loading(id) {
                    self.on_loaded(info, tokenizer, load_secs, compute_threads);
                }
            }
            Event::LoadFailed { id, path, error } => {
                if self.is_loading(id) {
                    self.on_load_failed(&path, &error);
                }
            }
            // The app forgets the model when it asks for the unload.
            Event::Unloaded { .. } => {}
            Event::TemplateSet { id } => {
                self.template_request.take_if(|pending| *pending == id);
            }
            Event::Started {
                id,
                prompt_tokens,
                prompt_text,
                dropped_messages,
                template_fallback,
            } => {
                if let Some(reason) = template_fallback {
                    self.notices.info_once(format!(
                        "The model's chat template could not be used ({reason}); the standard \
                         ChatML format is used instead."
                    ));
                }
                self.on_started(id, prompt_tokens, prompt_text, dropped_messages);
            }
            Event::Segment { id, kind, text } => self.on_segment(id, kind, &text),
            Event::Finished { id, stats } => self.on_finished(id, stats),
            Event::Error { id, error } => self.on_error(id, error),
        }
    }

    /// Whether `id` is the load in progress.
    fn is_loading(&self, id: RequestId) -> bool {
        matches!(self.model, ModelState::Loading { id: loading, .. } if loading == id)
    }

    fn on_load_progress(&mut self, id: RequestId, new_fraction: f32) {
        if let ModelState::Loading {
            id: loading,
            fraction,
            ..
        } = &mut self.model
            && *loading == id
        {
            *fraction = new_fraction.clamp(0.0, 1.0);
        }
    }

    fn on_loaded(
        &mut self,
        info: Box<ModelInfo>,
        tokenizer: Arc<GgufTokenizer>,
        load_secs: f64,
        compute_threads: usize,
    ) {
        let options = self.prefs.load_options.clone();
        self.prefs.remember_model(&info.path);
        let counting = Arc::new(CountingModel {
            formatter: PromptFormatter::new(
                info.chat_template.as_deref(),
                self.template_override_source().as_deref(),
            ),
            tokenizer: tokenizer.clone(),
            context_length: options
                .context_length
                .min(info.hparams.context_length)
                .max(1),
        });
        if !info.can_think
            && let Some(conversation) = self.current_mut()
            && conversation.messages.is_empty()
        {
            conversation.settings.thinking = false;
        }
        self.model = ModelState::Ready(Box::new(LoadedModel {
            info,
            tokenizer,
            load_secs,
            options,
            compute_threads,
            counting,
        }));
        self.windows.model = false;
        self.meter.reset();
        self.composer.focus_requested = true;
    }

    fn on_load_failed(&mut self, path: &std::path::Path, error: &WorkerError) {
        self.model = ModelState::Empty;
        if *error == WorkerError::LoadCancelled {
            self.notices.info("Loading was cancelled.");
            return;
        }
        if *error == WorkerError::ModelMissing {
            let message = if self.prefs.last_model.as_deref() == Some(path) {
                format!(
                    "The last model, {}, is no longer there. Open another model to continue.",
                    path.display()
                )
            } else {
                format!("There is no model file at {}.", path.display())
            };
            self.notices.error(message);
            self.prefs.forget_model(path);
            return;
        }
        self.notices
            .error(format!("Could not open {}: {error}", file_name(path)));
        if self.prefs.last_model.as_deref() == Some(path) {
            self.prefs.last_model = None;
        }
    }

    fn on_started(
        &mut self,
        id: RequestId,
        prompt_tokens: usize,
        prompt_text: String,
        dropped_messages: usize,
    ) {
        let Some(generation) = self.generation.as_mut().filter(|g| g.id == id) else {
            return;
        };
        generation.phase = Phase::Prefill;
        generation.prompt_tokens = Some(prompt_tokens);
        self.last_prompt = Some(PromptReport {
            id,
            text: prompt_text,
            tokens: prompt_tokens,
            dropped_messages,
        });
        if dropped_messages > 0 {
            let noun = if dropped_messages == 1 {
                "message"
            } else {
                "messages"
            };
            self.notices.info(format!(
                "The conversation is longer than the context: the {dropped_messages} oldest \
                 {noun} were left out of this reply."
            ));
        }
    }

    fn on_segment(&mut self, id: RequestId, kind: SegmentKind, text: &str) {
        let Some(generation) = self.generation.as_mut().filter(|g| g.id == id) else {
            return;
        };
        let now = Instant::now();
        generation.unsaved = true;
        let key = (generation.conversation_id.clone(), generation.message_index);
        match kind {
            SegmentKind::Thinking => {
                if generation.phase != Phase::Thinking {
                    self.chat.thinking_open.insert(key.clone(), true);
                }
                generation.phase = Phase::Thinking;
                generation.thinking_since.get_or_insert(now);
            }
            SegmentKind::Answer => {
                if generation.phase == Phase::Thinking {
                    self.chat.thinking_open.insert(key.clone(), false);
                }
                generation.phase = Phase::Answering;
            }
        }
        let (conversation_id, index) = key;
        let Some(message) = self
            .conversation_mut(&conversation_id)
            .and_then(|c| c.messages.get_mut(index))
        else {
            return;
        };
        match kind {
            SegmentKind::Thinking => message
                .thinking
                .get_or_insert_with(String::new)
                .push_str(text),
            SegmentKind::Answer => message.content.push_str(text),
        }
        self.revision += 1;
    }

    fn on_finished(&mut self, id: RequestId, stats: GenerationStats) {
        let Some(generation) = self.generation.take_if(|g| g.id == id) else {
            return;
        };
        let key = (generation.conversation_id.clone(), generation.message_index);
        self.chat.thinking_open.insert(key, false);
        self.end_reply(&generation, Some(stats), None);
    }

    fn on_error(&mut self, id: RequestId, error: WorkerError) {
        if let Some(generation) = self.generation.take_if(|g| g.id == id) {
            self.end_reply(&generation, None, Some(error.to_string()));
            return;
        }
        if let ModelState::Loading {
            id: loading, path, ..
        } = &self.model
            && *loading == id
        {
            let path = path.clone();
            self.on_load_failed(&path, &error);
            return;
        }
        if self
            .template_request
            .take_if(|pending| *pending == id)
            .is_some()
        {
            self.notices.error(format!(
                "The chat template cannot be used: {error}. The model's own template stays in use."
            ));
            return;
        }
        log::info!("ignored the error of request {id}, which the app no longer waits for: {error}");
    }
}
