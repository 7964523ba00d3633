//! The quantized transformer forward pass (SmolLM3 and Llama) with its KV cache.
//!
//! Weights stay in their GGUF quantization: matrices run through candle's quantized matmul
//! kernels, the token embedding is looked up row by row from the quantized table, and with tied
//! embeddings the same table serves as the output head.

use std::fs::File;
use std::sync::Arc;

use candle_core::quantized::k_quants::{self, BlockQ6K};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::error::{EngineError, Result};
use super::gguf::{GgufFile, TensorInfo};
use super::model_info::{HParams, ModelInfo, expected_tensors};

/// Most tokens computed in one forward call; longer inputs are split so attention scores stay
/// small (n_head × chunk × context floats).
pub const PREFILL_CHUNK: usize = 512;

/// One transformer block's weights.
struct Block {
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Tensor,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
    uses_rope: bool,
}

/// Keys and values of one layer for the tokens seen so far, in a buffer that grows on demand.
struct LayerCache {
    /// Element type of the cache: F16 (llama.cpp's default, half the memory) or F32.
    dtype: DType,
    /// `(n_head_kv, capacity, head_dim)` keys; only the first `len` positions are valid.
    k: Option<Tensor>,
    v: Option<Tensor>,
}

/// Precomputed RoPE rotation tables for positions `0..capacity`.
struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

/// A loaded SmolLM3 or Llama model with its KV cache.
pub struct Model {
    hparams: HParams,
    embedding: Arc<QTensor>,
    output: Linear,
    output_norm: Tensor,
    blocks: Vec<Block>,
    rope: RopeTables,
    cache: Vec<LayerCache>,
    cache_len: usize,
    max_context: usize,
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
                attn_norm: loader.dense(&name("attn_norm"))?,
                wq: loader.matmul(&name("attn_q"))?,
                wk: loader.matmul(&name("attn_k"))?,
                wv: loader.matmul(&name("attn_v"))?,
                wo: loader.matmul(&name("attn_output"))?,
                ffn_norm: loader.dense(&name("ffn_norm"))?,
                w_gate: loader.matmul(&name("ffn_gate"))?,
                w_up: loader.matmul(&name("ffn_up"))?,
                w_down: loader.matmul(&name("ffn_down"))?,
                uses_rope: h.layer_uses_rope(i),
            });
        }
        let output_norm = loader.dense("output_norm.weight")?;
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
        let rope = RopeTables::new(&h, max_context, freq_factors.as_deref())?;
        Ok(Self {
            cache: (0..h.n_layer)
                .map(|_| LayerCache {
                    dtype: DType::F16,
                    k: None,
                    v: None,
                })
                .collect(),
            hparams: h,
            embedding,
            output,
            output_norm,
            blocks,
            rope,
            cache_len: 0,
            max_context,
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
        let dtype = if f32_cache { DType::F32 } else { DType::F16 };
        for layer in &mut self.cache {
            layer.dtype = dtype;
        }
    }

    /// Forgets the whole cache and frees its memory.
    pub fn clear_cache(&mut self) {
        self.cache_len = 0;
        for layer in &mut self.cache {
            layer.k = None;
            layer.v = None;
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
        let ids = Tensor::new(tokens, &Device::Cpu)?;
        let mut x = self.embedding.embedding(&ids)?;
        let mask = causal_mask(seq, offset)?;
        let (cos, sin) = self.rope.window(offset, seq)?;
        for (block, cache) in self.blocks.iter().zip(self.cache.iter_mut()) {
            let attn_in =
                candle_nn::ops::rms_norm(&x, &block.attn_norm, self.hparams.rms_eps as f32)?;
            let attn = attention(
                block,
                cache,
                &self.hparams,
                &attn_in,
                offset,
                mask.as_ref(),
                &cos,
                &sin,
            )?;
            x = (x + attn)?;
            let ffn_in =
                candle_nn::ops::rms_norm(&x, &block.ffn_norm, self.hparams.rms_eps as f32)?;
            let gate = candle_nn::ops::silu(&block.w_gate.forward(&ffn_in)?)?;
            let up = block.w_up.forward(&ffn_in)?;
            x = (x + block.w_down.forward(&(gate * up)?)?)?;
        }
        self.cache_len = offset + seq;
        if !want_logits {
            return Ok(None);
        }
        if !all_positions {
            x = x.narrow(0, seq - 1, 1)?;
        }
        let x = candle_nn::ops::rms_norm(&x, &self.output_norm, self.hparams.rms_eps as f32)?;
        Ok(Some(self.output.forward(&x)?))
    }
}

/// A weight matrix applied to `(tokens, in)` activations.
///
/// Q6_K weights bypass candle's repacked kernel, whose multi-row tiles round differently from its
/// single-row path: through the generic kernel every row is computed the same way whether it is
/// decoded alone or prefilled with others, so incremental decoding reproduces a prefill's logits.
enum Linear {
    /// Candle's quantized matmul (Q4_K and others; plain f32 matmul for float weights).
    Candle(QMatMul),
    /// Q6_K weights `(n_out, n_in)` through the row-independent generic kernel.
    Q6K(Arc<QTensor>),
}

impl Linear {
    fn new(weight: Arc<QTensor>) -> Result<Self> {
        Ok(if weight.dtype() == GgmlDType::Q6K {
            Self::Q6K(weight)
        } else {
            Self::Candle(QMatMul::from_arc(weight)?)
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(m) => Ok(m.forward(x)?),
            Self::Q6K(w) => q6k_matmul(w, x),
        }
    }
}

/// `x (m, k) × wᵀ` for a Q6_K `w (n, k)` with candle's generic k-quant kernel.
fn q6k_matmul(w: &QTensor, x: &Tensor) -> Result<Tensor> {
    let (n, k) = w.shape().dims2()?;
    let (m, xk) = x.dims2()?;
    if xk != k {
        return Err(candle_core::Error::Msg(format!("matmul shape mismatch: {k} vs {xk}")).into());
    }
    let lhs = x.flatten_all()?.to_vec1::<f32>()?;
    let data = w.data()?;
    let block_bytes = std::mem::size_of::<BlockQ6K>();
    let n_blocks = data.len() / block_bytes;
    if n_blocks * block_bytes != data.len()
        || data.as_ptr().align_offset(std::mem::align_of::<BlockQ6K>()) != 0
    {
        return Err(candle_core::Error::Msg("misaligned Q6_K storage".into()).into());
    }
    // SAFETY: the storage is candle's own Vec<BlockQ6K> (length and alignment checked above),
    // and BlockQ6K is a plain repr(C) struct of integers and an f16.
    let blocks: &[BlockQ6K] =
        unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<BlockQ6K>(), n_blocks) };
    let mut dst = vec![0f32; m * n];
    k_quants::matmul::<BlockQ6K>((m, k, n), &lhs, blocks, &mut dst)?;
    Ok(Tensor::from_vec(dst, (m, n), &Device::Cpu)?)
}

/// Self-attention of one block for `x` (`seq × n_embd`), appending keys and values to `cache`.
#[allow(clippy::too_many_arguments)]
fn attention(
    block: &Block,
    cache: &mut LayerCache,
    h: &HParams,
    x: &Tensor,
    offset: usize,
    mask: Option<&Tensor>,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let seq = x.dim(0)?;
    let (n_head, n_kv, hd) = (h.n_head, h.n_head_kv, h.head_dim);
    let heads = |t: Tensor, n: usize| -> Result<Tensor> {
        Ok(t.reshape((seq, n, hd))?.transpose(0, 1)?.contiguous()?)
    };
    let mut q = heads(block.wq.forward(x)?, n_head)?;
    let mut k = heads(block.wk.forward(x)?, n_kv)?;
    let v = heads(block.wv.forward(x)?, n_kv)?;
    if block.uses_rope {
        q = rope(&q, cos, sin)?;
        k = rope(&k, cos, sin)?;
    }
    let (k_all, v_all) = cache.append(&k, &v, offset)?;
    let total = offset + seq;
    let kv_dtype = k_all.dtype();

    // Query heads sharing a KV head are stacked so one batched matmul serves the group.
    let n_rep = n_head / n_kv;
    let q = q.reshape((n_kv, n_rep * seq, hd))?.to_dtype(kv_dtype)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let scores = (q.matmul(&k_all.t()?)?.to_dtype(DType::F32)? * scale)?;
    let scores = match mask {
        Some(mask) => scores
            .reshape((n_kv, n_rep, seq, total))?
            .broadcast_add(mask)?
            .reshape((n_kv, n_rep * seq, total))?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(kv_dtype)?;
    let out = probs.matmul(&v_all)?.to_dtype(DType::F32)?;
    let out = out
        .reshape((n_head, seq, hd))?
        .transpose(0, 1)?
        .reshape((seq, n_head * hd))?;
    block.wo.forward(&out)
}

/// Applies interleaved (adjacent-pair) RoPE to `(heads, seq, head_dim)`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x = x.unsqueeze(0)?;
    Ok(candle_nn::rotary_emb::rope_i(&x, cos, sin)?.squeeze(0)?)
}

/// `-inf` above the diagonal for a chunk of `seq` queries starting at position `offset`;
/// `None` for a single query, which may see everything.
fn causal_mask(seq: usize, offset: usize) -> Result<Option<Tensor>> {
    if seq <= 1 {
        return Ok(None);
    }
    let total = offset + seq;
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Some(Tensor::from_vec(mask, (seq, total), &Device::Cpu)?))
}

impl LayerCache {
    /// Stores `k`/`v` (`(n_kv, seq, head_dim)`) at `offset` and returns views of all
    /// `offset + seq` cached positions.
    fn append(&mut self, k: &Tensor, v: &Tensor, offset: usize) -> Result<(Tensor, Tensor)> {
        let (n_kv, seq, hd) = k.dims3()?;
        let total = offset + seq;
        let capacity = self.k.as_ref().map_or(0, |t| t.dim(1).unwrap_or(0));
        if total > capacity {
            let new_capacity = total.max(capacity * 2).max(256).next_multiple_of(256);
            let shape = (n_kv, new_capacity, hd);
            self.k = Some(grow(self.k.take(), offset, shape, self.dtype)?);
            self.v = Some(grow(self.v.take(), offset, shape, self.dtype)?);
        }
        let (Some(k_buf), Some(v_buf)) = (&self.k, &self.v) else {
            return Err(EngineError::Candle(candle_core::Error::Msg(
                "KV cache buffer missing".into(),
            )));
        };
        k_buf.slice_set(&k.to_dtype(self.dtype)?, 1, offset)?;
        v_buf.slice_set(&v.to_dtype(self.dtype)?, 1, offset)?;
        Ok((k_buf.narrow(1, 0, total)?, v_buf.narrow(1, 0, total)?))
    }
}

/// A zeroed buffer of `shape` holding the first `keep` positions of `old`.
fn grow(
    old: Option<Tensor>,
    keep: usize,
    shape: (usize, usize, usize),
    dtype: DType,
) -> Result<Tensor> {
    let buf = Tensor::zeros(shape, dtype, &Device::Cpu)?;
    if let Some(old) = old
        && keep > 0
    {
        buf.slice_set(&old.narrow(1, 0, keep)?.contiguous()?, 1, 0)?;
    }
    Ok(buf)
}

impl RopeTables {
    fn new(h: &HParams, positions: usize, freq_factors: Option<&[f32]>) -> Result<Self> {
        let half = h.head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                let base = h.rope_theta.powf(-2.0 * i as f64 / h.head_dim as f64);
                let factor = freq_factors
                    .and_then(|f| f.get(i))
                    .map_or(1.0, |&f| f as f64);
                base / factor
            })
            .collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in &inv_freq {
                let angle = p as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (positions, half), &Device::Cpu)?,
            sin: Tensor::from_vec(sin, (positions, half), &Device::Cpu)?,
        })
    }

    /// The rows for positions `offset..offset + seq`.
    fn window(&self, offset: usize, seq: usize) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.narrow(0, offset, seq)?.contiguous()?,
            self.sin.narrow(0, offset, seq)?.contiguous()?,
        ))
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
