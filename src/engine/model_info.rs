//! A typed description of a model file: architecture, hyper-parameters, tensor types, template.
//!
//! Built from a parsed [`GgufFile`] before any weights are read, so the UI can show a model card
//! and every structural problem is reported before loading starts.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::error::{EngineError, Result};
use super::gguf::{GgufFile, dtype_name};

/// Model architectures this engine can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Architecture {
    /// SmolLM3: Llama-like with NoPE on every fourth layer and tied embeddings.
    SmolLm3,
    /// Llama 2/3 and derivatives such as SmolLM2.
    Llama,
}

impl Architecture {
    /// All architecture names (as GGUF spells them) this build supports.
    pub const SUPPORTED: [&'static str; 2] = ["smollm3", "llama"];

    /// Parses the `general.architecture` value.
    pub fn from_gguf_name(name: &str) -> Result<Self> {
        match name {
            "smollm3" => Ok(Self::SmolLm3),
            "llama" => Ok(Self::Llama),
            other => Err(EngineError::UnsupportedArchitecture {
                found: other.to_string(),
                supported: Self::SUPPORTED.iter().map(|s| s.to_string()).collect(),
            }),
        }
    }

    /// The GGUF name, which also prefixes the hyper-parameter keys.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::SmolLm3 => "smollm3",
            Self::Llama => "llama",
        }
    }
}

/// Transformer hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HParams {
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Feed-forward inner size.
    pub n_ff: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (grouped-query attention).
    pub n_head_kv: usize,
    /// Size of one attention head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Context length the model was trained for.
    pub context_length: usize,
    /// Vocabulary size (rows of the embedding table).
    pub vocab_size: usize,
    /// Every `n`th layer (1-based) skips RoPE; 0 means all layers use RoPE.
    pub no_rope_layer_interval: usize,
}

impl HParams {
    /// Whether layer `i` (0-based) applies rotary position embeddings.
    pub fn layer_uses_rope(&self, i: usize) -> bool {
        self.no_rope_layer_interval == 0 || !(i + 1).is_multiple_of(self.no_rope_layer_interval)
    }
}

/// Everything known about a model file before its weights are loaded.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// Path of the file.
    pub path: PathBuf,
    /// The architecture.
    pub architecture: Architecture,
    /// `general.name`, if the file has one.
    pub name: Option<String>,
    /// Hyper-parameters.
    pub hparams: HParams,
    /// Size of the file in bytes.
    pub file_size: u64,
    /// Total number of weights.
    pub n_params: u64,
    /// Bytes of tensor data (what the weights take in memory).
    pub weight_bytes: u64,
    /// Number of tensors of each quantization type, e.g. `{"Q4_K": 217, "Q6_K": 37, "F32": 73}`.
    pub tensor_types: BTreeMap<String, usize>,
    /// Whether the output head is the token embedding (no `output.weight`).
    pub tied_embeddings: bool,
    /// The chat template embedded in the file.
    pub chat_template: Option<String>,
    /// Whether the model can produce `<think>` reasoning spans.
    pub can_think: bool,
}

impl ModelInfo {
    /// Reads and validates the description: metadata and, when the file has tensors, every
    /// tensor's presence and shape. Vocabulary-only files (no tensors) skip the tensor checks.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let arch_name = gguf.get_str("general.architecture")?;
        let architecture = Architecture::from_gguf_name(arch_name)?;
        let hparams = read_hparams(gguf, architecture)?;
        let tied_embeddings = gguf.tensor_info("output.weight").is_none();
        if !gguf.tensors.is_empty() {
            validate_tensors(gguf, &hparams, tied_embeddings)?;
        }
        let mut tensor_types = BTreeMap::new();
        for t in &gguf.tensors {
            *tensor_types
                .entry(dtype_name(t.dtype).to_string())
                .or_insert(0) += 1;
        }
        let chat_template = gguf
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let has_think_token = gguf
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .is_some_and(|toks| toks.iter().any(|t| t.as_str() == Some("<think>")));
        let template_thinks = chat_template
            .as_deref()
            .is_some_and(|t| t.contains("enable_thinking") || t.contains("<think>"));
        Ok(Self {
            path: gguf.path.clone(),
            architecture,
            name: gguf
                .get("general.name")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            hparams,
            file_size: gguf.file_size,
            n_params: gguf.tensors.iter().map(|t| t.elem_count()).sum(),
            weight_bytes: gguf.tensors.iter().map(|t| t.n_bytes).sum(),
            tensor_types,
            tied_embeddings,
            chat_template,
            can_think: has_think_token && template_thinks,
        })
    }

    /// The most common quantization among the matrices, e.g. "Q4_K" (F32 norms are ignored).
    pub fn main_quantization(&self) -> Option<&str> {
        self.tensor_types
            .iter()
            .filter(|(name, _)| name.as_str() != "F32")
            .max_by_key(|(_, count)| **count)
            .map(|(name, _)| name.as_str())
    }

    /// Bytes the KV cache takes at a given context length (f32 keys and values).
    pub fn kv_cache_bytes(&self, context: usize) -> u64 {
        let h = &self.hparams;
        (2 * h.n_layer * h.n_head_kv * h.head_dim * context * std::mem::size_of::<f32>()) as u64
    }

    /// Estimated memory to run the model at a given context length: weights plus KV cache plus
    /// working buffers.
    pub fn ram_estimate_bytes(&self, context: usize) -> u64 {
        let scratch = (self.hparams.vocab_size * 4 * 2 + self.hparams.n_ff * 4 * 512) as u64;
        self.weight_bytes + self.kv_cache_bytes(context) + scratch
    }
}

/// Reads a hyper-parameter, checking it lies in a sane range.
fn bounded(gguf: &GgufFile, key: &str, max: u64) -> Result<usize> {
    let v = gguf.get_u64(key)?;
    if v == 0 || v > max {
        return Err(EngineError::InvalidMetadata {
            key: key.to_string(),
            reason: format!("{v} is outside 1..={max}"),
        });
    }
    Ok(v as usize)
}

fn read_hparams(gguf: &GgufFile, arch: Architecture) -> Result<HParams> {
    let p = arch.gguf_name();
    let key = |k: &str| format!("{p}.{k}");
    let n_layer = bounded(gguf, &key("block_count"), 1024)?;
    let n_embd = bounded(gguf, &key("embedding_length"), 1 << 17)?;
    let n_ff = bounded(gguf, &key("feed_forward_length"), 1 << 20)?;
    let n_head = bounded(gguf, &key("attention.head_count"), 1024)?;
    let n_head_kv = match gguf.get(&key("attention.head_count_kv")) {
        Some(_) => bounded(gguf, &key("attention.head_count_kv"), 1024)?,
        None => n_head,
    };
    if !n_head.is_multiple_of(n_head_kv) {
        return Err(EngineError::InvalidMetadata {
            key: key("attention.head_count_kv"),
            reason: format!("{n_head} query heads are not a multiple of {n_head_kv} KV heads"),
        });
    }
    let head_dim = match gguf.get(&key("attention.key_length")) {
        Some(_) => bounded(gguf, &key("attention.key_length"), 4096)?,
        None => n_embd / n_head,
    };
    let rms_eps = gguf.get_f64(&key("attention.layer_norm_rms_epsilon"))?;
    let rope_theta = match gguf.get(&key("rope.freq_base")) {
        Some(_) => gguf.get_f64(&key("rope.freq_base"))?,
        None => 10_000.0,
    };
    let context_length = bounded(gguf, &key("context_length"), 1 << 24)?;
    let vocab_size = match gguf.tensor_info("token_embd.weight") {
        Some(t) if t.dims.len() == 2 => t.dims[1] as usize,
        _ => match gguf.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
            Some(tokens) => tokens.len(),
            None => bounded(gguf, &key("vocab_size"), 1 << 24)?,
        },
    };
    if !(rms_eps.is_finite() && rms_eps > 0.0 && rope_theta.is_finite() && rope_theta > 0.0) {
        return Err(EngineError::InvalidMetadata {
            key: key("attention.layer_norm_rms_epsilon"),
            reason: format!("epsilon {rms_eps} or RoPE base {rope_theta} is not positive"),
        });
    }
    Ok(HParams {
        n_layer,
        n_embd,
        n_ff,
        n_head,
        n_head_kv,
        head_dim,
        rms_eps,
        rope_theta,
        context_length,
        vocab_size,
        no_rope_layer_interval: match arch {
            Architecture::SmolLm3 => 4,
            Architecture::Llama => 0,
        },
    })
}

/// The tensors an architecture needs, with their GGUF-order shapes.
pub fn expected_tensors(h: &HParams, tied_embeddings: bool) -> Vec<(String, Vec<u64>)> {
    let e = h.n_embd as u64;
    let q = (h.n_head * h.head_dim) as u64;
    let kv = (h.n_head_kv * h.head_dim) as u64;
    let ff = h.n_ff as u64;
    let v = h.vocab_size as u64;
    let mut out = vec![
        ("token_embd.weight".to_string(), vec![e, v]),
        ("output_norm.weight".to_string(), vec![e]),
    ];
    if !tied_embeddings {
        out.push(("output.weight".to_string(), vec![e, v]));
    }
    for i in 0..h.n_layer {
        let b = |n: &str| format!("blk.{i}.{n}.weight");
        out.extend([
            (b("attn_norm"), vec![e]),
            (b("attn_q"), vec![e, q]),
            (b("attn_k"), vec![e, kv]),
            (b("attn_v"), vec![e, kv]),
            (b("attn_output"), vec![q, e]),
            (b("ffn_norm"), vec![e]),
            (b("ffn_gate"), vec![e, ff]),
            (b("ffn_up"), vec![e, ff]),
            (b("ffn_down"), vec![ff, e]),
        ]);
    }
    out
}

fn validate_tensors(gguf: &GgufFile, h: &HParams, tied_embeddings: bool) -> Result<()> {
    for (name, expected) in expected_tensors(h, tied_embeddings) {
        let info = gguf
            .tensor_info(&name)
            .ok_or_else(|| EngineError::MissingTensor(name.clone()))?;
        if info.dims != expected {
            return Err(EngineError::WrongShape {
                name,
                expected,
                found: info.dims.clone(),
            });
        }
    }
    Ok(())
}
