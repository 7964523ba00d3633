//! The quantized transformer forward pass (SmolLM3 and Llama) with its KV cache.
//!
//! Weights stay in their GGUF quantization: matrices run through candle's quantized matmul
//! kernels, the token embedding is looked up row by row from the quantized table, and with tied
//! embeddings the same table serves as the output head.

use std::fs::File;
use std::sync::Arc;

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ6K};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use half::f16;

use super::attention::{AttentionShape, KvRows, SumOrder, attend, swiglu};
use super::error::{EngineError, Result};
use super::gguf::{GgufFile, TensorInfo};
use super::kernels;
use super::model_info::{HParams, ModelInfo, expected_tensors};

/// Most tokens computed in one forward call (llama.cpp's default batch); longer inputs are split
/// so activations stay small.
pub const PREFILL_CHUNK: usize = 512;

/// One transformer block's weights.
struct Block {
    attn_norm: Vec<f32>,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Vec<f32>,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
    uses_rope: bool,
}

/// Keys and values of one layer for the tokens seen so far.
enum LayerCache {
    /// f16 entries, as llama.cpp's default cache (half the memory).
    F16(KvRows<f16>),
    /// f32 entries, for exact comparisons.
    F32(KvRows<f32>),
}

impl LayerCache {
    fn new(f32_entries: bool) -> Self {
        if f32_entries {
            Self::F32(KvRows::default())
        } else {
            Self::F16(KvRows::default())
        }
    }
}

/// RoPE rotations for positions `0..capacity`, `(cos, sin)` per position and pair, computed as
/// llama.cpp does (angles stepped by repeated f32 multiplication).
struct RopeTables {
    pairs: usize,
    cos_sin: Vec<(f32, f32)>,
}

/// A loaded SmolLM3 or Llama model with its KV cache.
pub struct Model {
    hparams: HParams,
    embedding: Arc<QTensor>,
    output: Linear,
    output_norm: Vec<f32>,
    blocks: Vec<Block>,
    rope: RopeTables,
    cache: Vec<LayerCache>,
    cache_len: usize,
    max_context: usize,
    attention_order: SumOrder,
}

impl Model {
    /// Loads every weight of a validated model file.
    ///
    /// `max_context` is the KV cache limit in tokens (clamped to the trained context).
    /// `progress` receives the fraction of bytes read so far and returns `false` to cancel.
    pub fn load(
        gguf: &GgufFile,
        info: &ModelInfo,
        max_context: usize,
        progress: &mut dyn FnMut(f32) -> bool,
    ) -> Result<Self> {
        let h = info.hparams.clone();
        let mut file = File::open(&gguf.path).map_err(|source| EngineError::Io {
            path: gguf.path.clone(),
            source,
        })?;
        let mut loader = TensorLoader::new(gguf, info, &mut file, progress);

        let embedding = Arc::new(loader.qtensor("token_embd.weight")?);
        let mut blocks = Vec::with_capacity(h.n_layer);
        for i in 0..h.n_layer {
            let name = |n: &str| format!("blk.{i}.{n}.weight");
            blocks.push(Block {
                attn_norm: loader.dense(&name("attn_norm"))?.to_vec1()?,
                wq: loader.matmul(&name("attn_q"))?,
                wk: loader.matmul(&name("attn_k"))?,
                wv: loader.matmul(&name("attn_v"))?,
                wo: loader.matmul(&name("attn_output"))?,
                ffn_norm: loader.dense(&name("ffn_norm"))?.to_vec1()?,
                w_gate: loader.matmul(&name("ffn_gate"))?,
                w_up: loader.matmul(&name("ffn_up"))?,
                w_down: loader.matmul(&name("ffn_down"))?,
                uses_rope: h.layer_uses_rope(i),
            });
        }
        let output_norm = loader.dense("output_norm.weight")?.to_vec1()?;
        let output = if info.tied_embeddings {
            Linear::new(embedding.clone())?
        } else {
            loader.matmul("output.weight")?
        };
        let freq_factors = match gguf.tensor_info("rope_freqs.weight") {
            Some(_) => Some(loader.dense("rope_freqs.weight")?.to_vec1::<f32>()?),
            None => None,
        };
        drop(loader);

        let max_context = max_context.clamp(1, h.context_length);
        let rope = RopeTables::new(&h, max_context, freq_factors.as_deref());
        Ok(Self {
            cache: (0..h.n_layer).map(|_| LayerCache::new(false)).collect(),
            hparams: h,
            embedding,
            output,
            output_norm,
            blocks,
            rope,
            cache_len: 0,
            max_context,
            attention_order: SumOrder::default(),
        })
    }

    /// The hyper-parameters.
    pub fn hparams(&self) -> &HParams {
        &self.hparams
    }

    /// Tokens currently held in the KV cache.
    pub fn cache_len(&self) -> usize {
        self.cache_len
    }

    /// Most tokens the KV cache can hold.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Forgets every cached position from `len` on (keeps a prefix for reuse).
    pub fn truncate_cache(&mut self, len: usize) {
        self.cache_len = self.cache_len.min(len);
    }

    /// Chooses the KV cache's precision: f16 by default (as llama.cpp), or f32 for exact
    /// comparisons. Clears the cache.
    pub fn set_kv_cache_f32(&mut self, f32_cache: bool) {
        self.clear_cache();
        for layer in &mut self.cache {
            *layer = LayerCache::new(f32_cache);
        }
    }

    /// Chooses how attention sums (llama.cpp's order by default; see [`SumOrder`]).
    pub fn set_attention_order(&mut self, order: SumOrder) {
        self.attention_order = order;
    }

    /// Forgets the whole cache and frees its memory.
    pub fn clear_cache(&mut self) {
        self.cache_len = 0;
        let f32_cache = matches!(self.cache.first(), Some(LayerCache::F32(_)));
        for layer in &mut self.cache {
            *layer = LayerCache::new(f32_cache);
        }
    }

    /// Runs `tokens` after the cached positions and returns logits: one row per token when
    /// `all_positions`, otherwise only the last token's row. Inputs longer than
    /// [`PREFILL_CHUNK`] are computed in chunks.
    pub fn forward(&mut self, tokens: &[u32], all_positions: bool) -> Result<Vec<Vec<f32>>> {
        let needed = self.cache_len + tokens.len();
        if needed > self.max_context {
            return Err(EngineError::ContextFull {
                tokens: needed,
                context: self.max_context,
            });
        }
        if let Some(&bad) = tokens
            .iter()
            .find(|&&t| t as usize >= self.hparams.vocab_size)
        {
            return Err(EngineError::Tokenizer(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.hparams.vocab_size
            )));
        }
        let mut rows = Vec::new();
        let n_chunks = tokens.len().div_ceil(PREFILL_CHUNK);
        for (i, chunk) in tokens.chunks(PREFILL_CHUNK).enumerate() {
            let want_rows = all_positions || i + 1 == n_chunks;
            let logits = self.forward_chunk(chunk, all_positions, want_rows)?;
            if let Some(logits) = logits {
                rows.extend(logits.to_vec2::<f32>()?);
            }
        }
        Ok(rows)
    }

    fn forward_chunk(
        &mut self,
        tokens: &[u32],
        all_positions: bool,
        want_logits: bool,
    ) -> Result<Option<Tensor>> {
        let seq = tokens.len();
        let offset = self.cache_len;
        let eps = self.hparams.rms_eps as f32;
        let ids = Tensor::new(tokens, &Device::Cpu)?;
        let mut x = self.embedding.embedding(&ids)?;
        for (block, cache) in self.blocks.iter().zip(self.cache.iter_mut()) {
            let attn_in = kernels::rms_norm(&x, &block.attn_norm, eps)?;
            let attn = attention(
                block,
                cache,
                &self.hparams,
                &self.rope,
                self.attention_order,
                &attn_in,
                offset,
            )?;
            x = (x + attn)?;
            let ffn_in = kernels::rms_norm(&x, &block.ffn_norm, eps)?;
            let gate = block
                .w_gate
                .forward(&ffn_in)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let up = block
                .w_up
                .forward(&ffn_in)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let hidden =
                Tensor::from_vec(swiglu(&gate, &up), (seq, gate.len() / seq), &Device::Cpu)?;
            x = (x + block.w_down.forward(&hidden)?)?;
        }
        self.cache_len = offset + seq;
        if !want_logits {
            return Ok(None);
        }
        if !all_positions {
            x = x.narrow(0, seq - 1, 1)?;
        }
        let x = kernels::rms_norm(&x, &self.output_norm, eps)?;
        Ok(Some(self.output.forward(&x)?))
    }

    /// The keys and values of `layer` for positions `0..len` (at most the cached ones) as
    /// little-endian bytes of the cache's element type, for saving a KV state.
    pub fn kv_layer_bytes(&self, layer: usize, len: usize) -> super::kv_state::KvLayerBytes {
        use super::kv_state::KvLayerBytes;
        let n = len.min(self.cache_len) * self.hparams.n_head_kv * self.hparams.head_dim;
        match self.cache.get(layer) {
            Some(LayerCache::F16(kv)) => {
                KvLayerBytes::encode(&kv.k[..n.min(kv.k.len())], &kv.v[..n.min(kv.v.len())])
            }
            Some(LayerCache::F32(kv)) => {
                KvLayerBytes::encode(&kv.k[..n.min(kv.k.len())], &kv.v[..n.min(kv.v.len())])
            }
            None => KvLayerBytes::default(),
        }
    }

    /// Replaces the whole KV cache with `layers` (one per layer, as [`Model::kv_layer_bytes`]
    /// gives them) holding positions `0..len`. Checks the layer count, element type and sizes
    /// first: on a mismatch the cache is left unchanged.
    pub fn set_kv_bytes(
        &mut self,
        layers: &[super::kv_state::KvLayerBytes],
        len: usize,
    ) -> Result<(), super::kv_state::KvStateError> {
        use super::kv_state::KvStateError;
        if layers.len() != self.cache.len() || len > self.max_context {
            return Err(KvStateError::Mismatch(format!(
                "{} layers of {len} positions for a model of {} layers and {} positions",
                layers.len(),
                self.cache.len(),
                self.max_context
            )));
        }
        let values = len * self.hparams.n_head_kv * self.hparams.head_dim;
        let f32_cache = matches!(self.cache.first(), Some(LayerCache::F32(_)));
        let mut cache = Vec::with_capacity(layers.len());
        for bytes in layers {
            cache.push(if f32_cache {
                let (k, v) = bytes.decode(values)?;
                LayerCache::F32(KvRows { k, v })
            } else {
                let (k, v) = bytes.decode(values)?;
                LayerCache::F16(KvRows { k, v })
            });
        }
        self.cache = cache;
        self.cache_len = len;
        Ok(())
    }
}

/// A weight matrix applied to `(tokens, in)` activations (see [`kernels`] for why some types
/// bypass candle's `QMatMul`).
enum Linear {
    /// Candle's quantized matmul (Q4_0, Q8_0 and others; plain matmul for float weights).
    Candle(QMatMul),
    /// Q4_1 weights `(n_out, n_in)` with llama.cpp's Q8_1 rounding.
    Q4_1(Arc<QTensor>),
    /// Q4_K weights `(n_out, n_in)` through the generic kernel.
    Q4K(Arc<QTensor>),
    /// Q6_K weights `(n_out, n_in)` through the generic kernel.
    Q6K(Arc<QTensor>),
}

impl Linear {
    fn new(weight: Arc<QTensor>) -> Result<Self> {
        Ok(match weight.dtype() {
            GgmlDType::Q4K if !repacked_q4k() => Self::Q4K(weight),
            GgmlDType::Q6K => Self::Q6K(weight),
            GgmlDType::Q4_1 => Self::Q4_1(weight),
            _ => Self::Candle(QMatMul::from_arc(weight)?),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(m) => Ok(m.forward(x)?),
            Self::Q4_1(w) => kernels::q4_1_matmul(w, x),
            Self::Q4K(w) => kernels::generic_matmul::<BlockQ4K>(w, x),
            Self::Q6K(w) => kernels::generic_matmul::<BlockQ6K>(w, x),
        }
    }
}

/// Whether Q4_K weights use candle's repacked x86 kernel (`SMOLDESK_Q4K_REPACK=1`, for
/// benchmarks) instead of the generic one.
fn repacked_q4k() -> bool {
    std::env::var_os("SMOLDESK_Q4K_REPACK").is_some_and(|v| v == "1")
}

/// Self-attention of one block for `x` (`seq × n_embd`) at positions `offset..`, appending
/// keys and values to `cache`.
fn attention(
    block: &Block,
    cache: &mut LayerCache,
    h: &HParams,
    rope: &RopeTables,
    order: SumOrder,
    x: &Tensor,
    offset: usize,
) -> Result<Tensor> {
    let seq = x.dim(0)?;
    let project = |w: &Linear| -> Result<Vec<f32>> { Ok(w.forward(x)?.flatten_all()?.to_vec1()?) };
    let mut q = project(&block.wq)?;
    let mut k = project(&block.wk)?;
    let v = project(&block.wv)?;
    if block.uses_rope {
        rope.apply(&mut q, offset, seq, h.head_dim);
        rope.apply(&mut k, offset, seq, h.head_dim);
    }
    let shape = AttentionShape {
        n_head: h.n_head,
        n_kv: h.n_head_kv,
        head_dim: h.head_dim,
        offset,
        seq,
        order,
    };
    let row = h.n_head_kv * h.head_dim;
    let out = match cache {
        LayerCache::F16(kv) => {
            kv.append(offset, row, &k, &v);
            attend(&q, kv, shape)
        }
        LayerCache::F32(kv) => {
            kv.append(offset, row, &k, &v);
            attend(&q, kv, shape)
        }
    };
    let out = Tensor::from_vec(out, (seq, h.n_head * h.head_dim), &Device::Cpu)?;
    block.wo.forward(&out)
}

impl RopeTables {
    fn new(h: &HParams, positions: usize, freq_factors: Option<&[f32]>) -> Self {
        let pairs = h.head_dim / 2;
        let theta_scale = (h.rope_theta as f32).powf(-2.0 / h.head_dim as f32);
        let mut cos_sin = Vec::with_capacity(positions * pairs);
        for p in 0..positions {
            let mut theta = p as f32;
            for i in 0..pairs {
                let factor = freq_factors.and_then(|f| f.get(i)).copied().unwrap_or(1.0);
                let angle = theta / factor;
                cos_sin.push((angle.cos(), angle.sin()));
                theta *= theta_scale;
            }
        }
        Self { pairs, cos_sin }
    }

    /// Rotates adjacent pairs of every head of `x` (`seq × heads × head_dim`) for positions
    /// `offset..`.
    fn apply(&self, x: &mut [f32], offset: usize, seq: usize, head_dim: usize) {
        for (t, row) in x.chunks_mut(x.len() / seq).enumerate() {
            let table = &self.cos_sin[(offset + t) * self.pairs..][..self.pairs];
            for head in row.chunks_mut(head_dim) {
                for (pair, &(cos, sin)) in head.chunks_exact_mut(2).zip(table) {
                    let (x0, x1) = (pair[0], pair[1]);
                    // llama.cpp's compiled `x0*cos - x1*sin` fuses the first product.
                    pair[0] = x0.mul_add(cos, -(x1 * sin));
                    pair[1] = x0.mul_add(sin, x1 * cos);
                }
            }
        }
    }
}

/// Reads the tensors of one file in turn, reporting progress by bytes read.
struct TensorLoader<'a> {
    gguf: &'a GgufFile,
    file: &'a mut File,
    progress: &'a mut dyn FnMut(f32) -> bool,
    scratch: Vec<u64>,
    bytes_done: u64,
    bytes_total: u64,
}

impl<'a> TensorLoader<'a> {
    fn new(
        gguf: &'a GgufFile,
        info: &ModelInfo,
        file: &'a mut File,
        progress: &'a mut dyn FnMut(f32) -> bool,
    ) -> Self {
        let bytes_total = expected_tensors(&info.hparams, info.tied_embeddings)
            .iter()
            .filter_map(|(name, _)| gguf.tensor_info(name))
            .map(|t| t.n_bytes)
            .sum::<u64>()
            .max(1);
        Self {
            gguf,
            file,
            progress,
            scratch: Vec::new(),
            bytes_done: 0,
            bytes_total,
        }
    }

    fn info(&self, name: &str) -> Result<&'a TensorInfo> {
        self.gguf
            .tensor_info(name)
            .ok_or_else(|| EngineError::MissingTensor(name.to_string()))
    }

    fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        let info = self.info(name)?;
        let tensor = self.gguf.load_qtensor(self.file, info, &mut self.scratch)?;
        self.bytes_done += info.n_bytes;
        let fraction = (self.bytes_done as f64 / self.bytes_total as f64).min(1.0) as f32;
        if !(self.progress)(fraction) {
            return Err(EngineError::Cancelled);
        }
        Ok(tensor)
    }

    fn matmul(&mut self, name: &str) -> Result<Linear> {
        Linear::new(Arc::new(self.qtensor(name)?))
    }

    /// A small tensor (norm weights) as plain f32.
    fn dense(&mut self, name: &str) -> Result<Tensor> {
        let t = self.qtensor(name)?;
        let t = t.dequantize(&Device::Cpu)?;
        Ok(if t.dtype() == DType::F32 {
            t
        } else {
            t.to_dtype(DType::F32)?
        })
    }
}

/// Index of the largest logit (ties go to the lowest id).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}
