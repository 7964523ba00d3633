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
    /// Compute threads; 0 = all cores.
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
    /// Threads the model's kernels run on.
    pool: rayon::ThreadPool,
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
        let tokenizer = Arc::new(GgufTokenizer::from_gguf(&gguf)?);
        let model = Model::load(&gguf, &info, options.context_length, progress)?;
        let mut pool =
            rayon::ThreadPoolBuilder::new().thread_name(|i| format!("smoldesk-compute-{i}"));
        if options.threads > 0 {
            pool = pool.num_threads(options.threads);
        } else {
            pool = pool.num_threads(candle_core::utils::get_num_threads());
        }
        let pool = pool
            .build()
            .map_err(|e| EngineError::Candle(candle_core::Error::Msg(e.to_string())))?;
        Ok(Self {
            info,
            tokenizer,
            model,
            pool,
            cached: Vec::new(),
        })
    }

    /// The model's description.
    pub fn info(&self) -> &ModelInfo {
        &self.info
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

    /// Like [`Engine::prefill`], asking `cancelled` between chunks of [`PREFILL_CHUNK`] tokens.
    /// A cancelled prefill keeps what it computed in the cache for the next attempt.
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
            if cancelled() {
                return Err(EngineError::Cancelled);
            }
            let rows = self.run(chunk, false);
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
        let rows = self.run(&[token], false);
        let rows = self.after_forward(rows, &[token])?;
        Ok(rows.into_iter().last().unwrap_or_default())
    }

    /// Logits at every position of `tokens`, computed from an empty cache.
    pub fn logits_all(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        self.reset();
        let rows = self.run(tokens, true);
        self.after_forward(rows, tokens)
    }

    /// Runs the model on the engine's own thread pool.
    fn run(&mut self, tokens: &[u32], all_positions: bool) -> Result<Vec<Vec<f32>>> {
        let model = &mut self.model;
        self.pool.install(|| model.forward(tokens, all_positions))
    }

    /// Keeps `cached` in step with the model's cache; a failed forward leaves the cache empty
    /// so the next call recomputes from scratch.
    fn after_forward(&mut self, rows: Result<Vec<Vec<f32>>>, fed: &[u32]) -> Result<Vec<Vec<f32>>> {
        match rows {
            Ok(rows) => {
                self.cached.extend_from_slice(fed);
                Ok(rows)
            }
            Err(err) => {
                if !matches!(err, EngineError::ContextFull { .. }) {
                    self.reset();
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
