//! A typed description of a model file: architecture, hyper-parameters, tensor types, template.
//!
//! Built from a parsed [`GgufFile`] before any weights are read, so the UI can show a model card
//! and every structural problem is reported before loading starts.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::error::{EngineError, Result};
use super::gguf::{GgufFile, dtype_name, file_type_name};
use super::kv_state::ModelFileIdentity;

/// Tokens a prompt is processed in at once, assumed by the memory estimate.
const PREFILL_CHUNK: usize = 512;

/// Bytes of one key or value element in the KV cache: f16, the engine's default (as
/// llama.cpp's); an f32 cache is only used for exact comparisons in tests.
pub const KV_CACHE_ELEMENT_BYTES: usize = std::mem::size_of::<half::f16>();

/// Model architectures this engine can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
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

    /// Number of layers that apply rotary position embeddings.
    pub fn rope_layer_count(&self) -> usize {
        (0..self.n_layer)
            .filter(|&i| self.layer_uses_rope(i))
            .count()
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
    /// Number of tensors of each quantization type, e.g. `{"Q4_K": 216, "Q6_K": 37, "F32": 73}`.
    pub tensor_types: BTreeMap<String, usize>,
    /// The quantization recipe named by `general.file_type`, e.g. `Q4_K_M`.
    pub file_type: Option<String>,
    /// Whether the output head is the token embedding (no `output.weight`).
    pub tied_embeddings: bool,
    /// The chat template embedded in the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// Whether the model can produce `<think>` reasoning spans.
    pub can_think: bool,
    /// The file's identity (size, modification time, header hash), which saved KV states
    /// must match.
    #[serde(skip)]
    pub file_identity: ModelFileIdentity,
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
        let chat_template = gguf
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let can_think = can_think(gguf, chat_template.as_deref());
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
            tensor_types: count_tensor_types(gguf),
            file_type: gguf
                .get("general.file_type")
                .and_then(|v| v.as_u64())
                .and_then(file_type_name)
                .map(str::to_string),
            tied_embeddings,
            chat_template,
            can_think,
            file_identity: ModelFileIdentity::of_file(&gguf.path, gguf.data_offset)?,
        })
    }

    /// The most common quantization among the matrices, e.g. "Q4_K" (F32 norms are ignored).
    pub fn main_quantization(&self) -> Option<&str> {
        self.tensor_types
            .iter()
            .filter(|(name, _)| name.as_str() != "F32")
            .max_by_key(|(_, count)| **count)
            .or_else(|| self.tensor_types.iter().next())
            .map(|(name, _)| name.as_str())
    }

    /// The quantization a person knows the file by: the recipe `general.file_type` names (e.g.
    /// "Q4_K_M", as in the file's name), else the most common matrix type. A small model's
    /// Q4_K_M file can hold mostly Q5_0 matrices (rows that are not whole k-quant blocks fall
    /// back), and is still a Q4_K_M file to the person who chose it.
    pub fn quantization_label(&self) -> Option<&str> {
        self.file_type
            .as_deref()
            .or_else(|| self.main_quantization())
    }

    /// Bytes the KV cache takes at a given context length, keys and values stored as
    /// [`KV_CACHE_ELEMENT_BYTES`]-byte elements (the engine's default f16 cache).
    pub fn kv_cache_bytes(&self, context: usize) -> u64 {
        kv_cache_bytes_of(&self.hparams, context)
    }

    /// Estimated memory to run the model at a given context length: weights, the KV cache, and
    /// the working buffers of a 512-token prompt chunk (attention scores, feed-forward
    /// activations, logits).
    pub fn ram_estimate_bytes(&self, context: usize) -> u64 {
        let h = &self.hparams;
        let f32_size = std::mem::size_of::<f32>() as u64;
        let chunk = PREFILL_CHUNK.min(context.max(1)) as u64;
        let scores = h.n_head as u64 * chunk * context as u64 * f32_size;
        let ffn = 3 * h.n_ff as u64 * chunk * f32_size;
        let logits = 2 * h.vocab_size as u64 * f32_size;
        self.weight_bytes + self.kv_cache_bytes(context) + scores + ffn + logits
    }
}

/// Bytes of the KV cache of a model with these hyper-parameters at a context length.
fn kv_cache_bytes_of(h: &HParams, context: usize) -> u64 {
    let per_token = 2 * h.n_layer * h.n_head_kv * h.head_dim * KV_CACHE_ELEMENT_BYTES;
    per_token as u64 * context as u64
}

fn count_tensor_types(gguf: &GgufFile) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for t in &gguf.tensors {
        *counts.entry(dtype_name(t.dtype).to_string()).or_insert(0) += 1;
    }
    counts
}

/// A model can think when its vocabulary has `<think>` and its template knows about thinking.
fn can_think(gguf: &GgufFile, chat_template: Option<&str>) -> bool {
    let has_think_token = gguf
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array())
        .is_some_and(|toks| toks.iter().any(|t| t.as_str() == Some("<think>")));
    let template_thinks =
        chat_template.is_some_and(|t| t.contains("enable_thinking") || t.contains("<think>"));
    has_think_token && template_thinks
}

/// Reads a hyper-parameter, checking it lies in `1..=max`.
fn bounded(gguf: &GgufFile, key: &str, max: u64) -> Result<usize> {
    let v = gguf.get_u64(key)?;
    if v == 0 || v > max {
        return Err(EngineError::InvalidMetadata {
            key: key.to_string(),
            reason: format!("{v} is outside the range 1 to {max}"),
        });
    }
    usize::try_from(v).map_err(|_| EngineError::InvalidMetadata {
        key: key.to_string(),
        reason: format!("{v} is too large for this computer"),
    })
}

/// Reads an optional hyper-parameter, checking it lies in `1..=max`.
fn bounded_or(gguf: &GgufFile, key: &str, max: u64, default: usize) -> Result<usize> {
    match gguf.get(key) {
        Some(_) => bounded(gguf, key, max),
        None => Ok(default),
    }
}

/// Reads a float hyper-parameter that must be finite and positive.
fn positive(gguf: &GgufFile, key: &str, default: Option<f64>) -> Result<f64> {
    let v = match (gguf.get(key), default) {
        (None, Some(default)) => default,
        _ => gguf.get_f64(key)?,
    };
    if !(v.is_finite() && v > 0.0) {
        return Err(EngineError::InvalidMetadata {
            key: key.to_string(),
            reason: format!("{v} is not a positive number"),
        });
    }
    Ok(v)
}

fn read_hparams(gguf: &GgufFile, arch: Architecture) -> Result<HParams> {
    let p = arch.gguf_name();
    let key = |k: &str| format!("{p}.{k}");
    reject_unsupported_features(gguf, &key)?;
    let n_layer = bounded(gguf, &key("block_count"), 1024)?;
    let n_embd = bounded(gguf, &key("embedding_length"), 1 << 17)?;
    let n_ff = bounded(gguf, &key("feed_forward_length"), 1 << 20)?;
    let n_head = bounded(gguf, &key("attention.head_count"), 1024)?;
    let n_head_kv = bounded_or(gguf, &key("attention.head_count_kv"), 1024, n_head)?;
    if !n_head.is_multiple_of(n_head_kv) {
        return Err(EngineError::InvalidMetadata {
            key: key("attention.head_count_kv"),
            reason: format!("{n_head} query heads are not a multiple of {n_head_kv} KV heads"),
        });
    }
    let head_dim = read_head_dim(gguf, &key, n_embd, n_head)?;
    Ok(HParams {
        n_layer,
        n_embd,
        n_ff,
        n_head,
        n_head_kv,
        head_dim,
        rms_eps: positive(gguf, &key("attention.layer_norm_rms_epsilon"), None)?,
        rope_theta: positive(gguf, &key("rope.freq_base"), Some(10_000.0))?,
        context_length: bounded(gguf, &key("context_length"), 1 << 24)?,
        vocab_size: read_vocab_size(gguf, &key)?,
        no_rope_layer_interval: match arch {
            Architecture::SmolLm3 => 4,
            Architecture::Llama => 0,
        },
    })
}

/// Fails for variants of a supported architecture that the model code does not implement.
fn reject_unsupported_features(gguf: &GgufFile, key: &dyn Fn(&str) -> String) -> Result<()> {
    let experts = gguf
        .get(&key("expert_count"))
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    if experts > 0 {
        return Err(EngineError::UnsupportedModel(format!(
            "a mixture of {experts} experts"
        )));
    }
    Ok(())
}

/// The attention head size, checked against the key, value and RoPE sizes the file declares.
fn read_head_dim(
    gguf: &GgufFile,
    key: &dyn Fn(&str) -> String,
    n_embd: usize,
    n_head: usize,
) -> Result<usize> {
    if gguf.get(&key("attention.key_length")).is_none() && !n_embd.is_multiple_of(n_head) {
        return Err(EngineError::InvalidMetadata {
            key: key("attention.head_count"),
            reason: format!("the hidden size {n_embd} is not a multiple of {n_head} heads"),
        });
    }
    let head_dim = bounded_or(gguf, &key("attention.key_length"), 4096, n_embd / n_head)?;
    if !head_dim.is_multiple_of(2) {
        return Err(EngineError::InvalidMetadata {
            key: key("attention.key_length"),
            reason: format!("the head size {head_dim} is odd"),
        });
    }
    let value_dim = bounded_or(gguf, &key("attention.value_length"), 4096, head_dim)?;
    if value_dim != head_dim {
        return Err(EngineError::UnsupportedModel(format!(
            "attention heads with keys of size {head_dim} but values of size {value_dim}"
        )));
    }
    let rope_dim = bounded_or(gguf, &key("rope.dimension_count"), 4096, head_dim)?;
    if rope_dim != head_dim {
        return Err(EngineError::UnsupportedModel(format!(
            "rotary embeddings on {rope_dim} of the {head_dim} dimensions of each head"
        )));
    }
    Ok(head_dim)
}

/// The vocabulary size: the tokenizer's token count, else the embedding rows, else the
/// `vocab_size` key. The embedding's shape is checked against it later.
fn read_vocab_size(gguf: &GgufFile, key: &dyn Fn(&str) -> String) -> Result<usize> {
    if let Some(tokens) = gguf.get("tokenizer.ggml.tokens") {
        let tokens = tokens
            .as_array()
            .ok_or_else(|| EngineError::InvalidMetadata {
                key: "tokenizer.ggml.tokens".into(),
                reason: format!("expected an array, found {}", tokens.type_name()),
            })?;
        if tokens.is_empty() {
            return Err(EngineError::InvalidMetadata {
                key: "tokenizer.ggml.tokens".into(),
                reason: "the vocabulary is empty".into(),
            });
        }
        return Ok(tokens.len());
    }
    match gguf
        .tensor_info("token_embd.weight")
        .map(|t| t.dims.as_slice())
    {
        Some(&[_, rows]) => usize::try_from(rows).map_err(|_| EngineError::BadTensor {
            name: "token_embd.weight".into(),
            reason: format!("its {rows} rows are too many for this computer"),
        }),
        _ => bounded(gguf, &key("vocab_size"), 1 << 24),
    }
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
    let mut expected = expected_tensors(h, tied_embeddings);
    if gguf.tensor_info("rope_freqs.weight").is_some() {
        expected.push(("rope_freqs.weight".into(), vec![(h.head_dim / 2) as u64]));
    }
    for (name, expected) in expected {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hparams(n_layer: usize, interval: usize) -> HParams {
        HParams {
            n_layer,
            n_embd: 64,
            n_ff: 128,
            n_head: 4,
            n_head_kv: 2,
            head_dim: 16,
            rms_eps: 1e-6,
            rope_theta: 1e4,
            context_length: 1024,
            vocab_size: 100,
            no_rope_layer_interval: interval,
        }
    }

    #[test]
    fn the_kv_cache_is_counted_in_f16() {
        // SmolLM3-3B's shape: 36 layers, 4 KV heads of 128 values, at 8k tokens.
        let h = HParams {
            n_layer: 36,
            n_head_kv: 4,
            head_dim: 128,
            ..hparams(36, 4)
        };
        assert_eq!(kv_cache_bytes_of(&h, 8192), 2 * 36 * 4 * 128 * 2 * 8192);
        assert_eq!(kv_cache_bytes_of(&h, 8192), 603_979_776);
    }

    #[test]
    fn every_fourth_layer_skips_rope_in_smollm3() {
        let h = hparams(8, 4);
        let uses: Vec<bool> = (0..8).map(|i| h.layer_uses_rope(i)).collect();
        assert_eq!(uses, [true, true, true, false, true, true, true, false]);
        assert_eq!(h.rope_layer_count(), 6);
        assert_eq!(hparams(8, 0).rope_layer_count(), 8);
    }

    #[test]
    fn expected_tensors_follow_the_hyper_parameters() {
        let h = hparams(2, 4);
        let tied = expected_tensors(&h, true);
        assert_eq!(tied.len(), 2 + 2 * 9);
        assert!(tied.iter().all(|(name, _)| name != "output.weight"));
        let untied = expected_tensors(&h, false);
        assert_eq!(untied.len(), tied.len() + 1);
        let shape = |name: &str| {
            tied.iter()
                .find(|(n, _)| n == name)
                .map(|(_, dims)| dims.clone())
        };
        assert_eq!(shape("blk.1.attn_k.weight"), Some(vec![64, 32]));
        assert_eq!(shape("blk.0.ffn_down.weight"), Some(vec![128, 64]));
        assert_eq!(shape("token_embd.weight"), Some(vec![64, 100]));
    }
}
