//! [`Engine`]: a loaded model with its tokenizer, reusing the KV cache across prompts that share
//! a prefix.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::error::{EngineError, Result};
use super::gguf::GgufFile;
use super::model::{Model, PREFILL_CHUNK};
use super::model_info::ModelInfo;
use super::tokenizer::GgufTokenizer;

/// Options for loading a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadOptions {
    /// KV cache capacity in tokens (clamped to the model's trained context).
    pub context_length: usize,
    /// Compute threads; 0 = one per physical core.
    pub threads: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            context_length: 8192,
            threads: 0,
        }
    }
}

/// What a prefill did.
#[derive(Debug, Clone)]
pub struct Prefill {
    /// Logits after the last prompt token.
    pub logits: Vec<f32>,
    /// Prompt tokens whose keys and values were reused from the cache.
    pub reused: usize,
    /// Prompt tokens computed now.
    pub computed: usize,
}

/// A loaded model ready to generate.
pub struct Engine {
    info: ModelInfo,
    tokenizer: Arc<GgufTokenizer>,
    pub(super) model: Model,
    /// The tokens whose keys and values the model's cache holds, in order.
    pub(super) cached: Vec<u32>,
}

impl Engine {
    /// Opens, validates and loads a model file. `progress` gets the fraction loaded and returns
    /// `false` to cancel.
    pub fn load(
        path: &Path,
        options: &LoadOptions,
        progress: &mut dyn FnMut(f32) -> bool,
    ) -> Result<Self> {
        let gguf = GgufFile::open(path)?;
        let info = ModelInfo::from_gguf(&gguf)?;
        if gguf.tensors.is_empty() {
            return Err(EngineError::MissingTensor(
                "token_embd.weight (the file has no weights; is it a vocabulary-only file?)".into(),
            ));
        }
        // The tokenizer (a few hundred ms for a 128k vocabulary) is built while the weights
        // load: that part of loading waits mostly on memory, not on the cores.
        let (tokenizer, model) = std::thread::scope(|scope| {
            let tokenizer = scope.spawn(|| {
                let start = std::time::Instant::now();
                let tokenizer = GgufTokenizer::from_gguf(&gguf);
                log::debug!("tokenizer built in {:.2} s", start.elapsed().as_secs_f64());
                tokenizer
            });
            let start = std::time::Instant::now();
            let model = Model::load_with_threads(
                &gguf,
                &info,
                options.context_length,
                options.threads,
                progress,
            );
            log::debug!("weights loaded in {:.2} s", start.elapsed().as_secs_f64());
            let tokenizer = tokenizer
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (tokenizer, model)
        });
        let (tokenizer, model) = (Arc::new(tokenizer?), model?);
        Ok(Self {
            info,
            tokenizer,
            model,
            cached: Vec::new(),
        })
    }

    /// The model's description.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Blocks until the model's weights are in their fastest layout ([`Model::wait_for_repack`]).
    pub fn wait_for_repack(&mut self) {
        self.model.wait_for_repack();
    }

    /// Threads of the compute pool the model runs on.
    pub fn threads(&self) -> usize {
        self.model.threads()
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Arc<GgufTokenizer> {
        &self.tokenizer
    }

    /// Most tokens the context (KV cache) holds.
    pub fn context_length(&self) -> usize {
        self.model.max_context()
    }

    /// The tokens currently in the KV cache.
    pub fn cached_tokens(&self) -> &[u32] {
        &self.cached
    }

    /// Forgets the KV cache.
    pub fn reset(&mut self) {
        self.model.clear_cache();
        self.cached.clear();
    }

    /// Feeds a whole prompt, reusing the longest cached prefix it shares with what the cache
    /// holds, and returns the logits after its last token.
    pub fn prefill(&mut self, prompt: &[u32]) -> Result<Prefill> {
        self.prefill_cancellable(prompt, &|| false)
    }

    /// Like [`Engine::prefill`], asking `cancelled` before every layer. A cancelled prefill
    /// keeps the chunks of [`PREFILL_CHUNK`] tokens it completed in the cache for the next
    /// attempt.
    pub fn prefill_cancellable(
        &mut self,
        prompt: &[u32],
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Prefill> {
        if prompt.is_empty() {
            return Err(EngineError::Tokenizer("the prompt is empty".into()));
        }
        if prompt.len() > self.context_length() {
            return Err(EngineError::ContextFull {
                tokens: prompt.len(),
                context: self.context_length(),
            });
        }
        let shared = common_prefix(&self.cached, prompt);
        // At least one token must run to produce logits.
        let reused = shared.min(prompt.len() - 1);
        self.model.truncate_cache(reused);
        self.cached.truncate(reused);
        let mut logits = Vec::new();
        for chunk in prompt[reused..].chunks(PREFILL_CHUNK) {
            let rows = self.model.forward_cancellable(chunk, false, cancelled);
            logits = self.after_forward(rows, chunk)?.pop().unwrap_or_default();
        }
        Ok(Prefill {
            logits,
            reused,
            computed: prompt.len() - reused,
        })
    }

    /// Feeds one generated token and returns the logits for the next.
    pub fn decode(&mut self, token: u32) -> Result<Vec<f32>> {
        let rows = self.model.forward(&[token], false);
        let rows = self.after_forward(rows, &[token])?;
        Ok(rows.into_iter().last().unwrap_or_default())
    }

    /// Logits at every position of `tokens`, computed from an empty cache.
    pub fn logits_all(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        self.reset();
        let rows = self.model.forward(tokens, true);
        self.after_forward(rows, tokens)
    }

    /// Keeps `cached` in step with the model's cache; a cancelled forward keeps what was
    /// complete before it, any other failure leaves the cache empty so the next call recomputes
    /// from scratch.
    fn after_forward(&mut self, rows: Result<Vec<Vec<f32>>>, fed: &[u32]) -> Result<Vec<Vec<f32>>> {
        match rows {
            Ok(rows) => {
                self.cached.extend_from_slice(fed);
                Ok(rows)
            }
            Err(err) => {
                match err {
                    EngineError::ContextFull { .. } => {}
                    EngineError::Cancelled => self.cached.truncate(self.model.cache_len()),
                    _ => self.reset(),
                }
                Err(err)
            }
        }
    }
}

/// Length of the longest common prefix of two token sequences.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
