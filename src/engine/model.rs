//! The quantized transformer forward pass (SmolLM3 and Llama) with its KV cache.
//!
//! The model file is mapped, not read: weights stay in their GGUF quantization where the file
//! has them (see [`Matrix`]). The forward pass works on preallocated f32 buffers and runs every
//! heavy operation on the model's one compute [`Pool`]. The token embedding is looked up row by
//! row from the quantized table, and with tied embeddings the same table is the output head.

use std::ops::Range;
use std::sync::Arc;

use half::f16;

use super::attention::{AttentionShape, KvRows, SumOrder, attend_into, expf, stored_positions};
use super::cpu::matmul::{Activations, Matrix, Store, WeightBytes};
use super::cpu::pool::{Pool, SharedMut};
use super::error::{EngineError, Result};
use super::gguf::{GgufFile, TensorInfo};
use super::kernels;
use super::model_info::{HParams, ModelInfo, expected_tensors};

/// Most tokens computed in one forward call (llama.cpp's default batch); longer inputs are split
/// so activations stay small.
pub const PREFILL_CHUNK: usize = 512;

/// Largest RoPE table accepted, in bytes: SmolLM3-3B's at 131,072 tokens is 64 MiB.
pub const MAX_ROPE_TABLE_BYTES: u64 = 1 << 30;

/// Rows of element-wise work (norms, RoPE) one pool task takes.
const ROWS_PER_TASK: usize = 8;
/// Values of element-wise work (SwiGLU, residual adds) one pool task takes.
const VALUES_PER_TASK: usize = 4096;

/// One transformer block's weights.
struct Block {
    attn_norm: Vec<f32>,
    wq: Matrix,
    wk: Matrix,
    wv: Matrix,
    wo: Matrix,
    ffn_norm: Vec<f32>,
    w_gate: Matrix,
    w_up: Matrix,
    w_down: Matrix,
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

/// The forward pass's working memory, grown to the largest chunk and reused.
#[derive(Default)]
struct Buffers {
    /// The residual stream, `seq × n_embd`.
    x: Vec<f32>,
    /// A normalized copy of `x`.
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output, `seq × n_head × head_dim`.
    attn: Vec<f32>,
    /// Gate projection, then the SwiGLU product.
    gate: Vec<f32>,
    up: Vec<f32>,
    /// Output of the attention and down projections, `seq × n_embd`.
    proj: Vec<f32>,
    logits: Vec<f32>,
    act: Activations,
}

/// A loaded SmolLM3 or Llama model with its KV cache.
pub struct Model {
    hparams: HParams,
    pool: Pool,
    embedding: Matrix,
    output: Matrix,
    output_norm: Vec<f32>,
    blocks: Vec<Block>,
    rope: RopeTables,
    cache: Vec<LayerCache>,
    cache_len: usize,
    max_context: usize,
    attention_order: SumOrder,
    buffers: Buffers,
    repack: BackgroundRepack,
}

/// Repacks a model's Q4_K matrices (and moves its Q6_K ones to huge pages) on a thread of its
/// own after load ([`Matrix::repack`]): the model answers at once from the file's pages, with
/// the same bits, and its products get faster matrix by matrix. Repacking 1.35 GB at load
/// instead took most of a 2-3 s load, mostly the kernel providing fresh pages.
struct BackgroundRepack {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundRepack {
    /// Starts repacking `matrices` in order (those without Q4_K or Q6_K work are skipped),
    /// unless `SMOLDESK_REPACK=off` keeps every product on the file's layout (to test that
    /// path).
    fn start(matrices: Vec<Matrix>) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let matrices: Vec<Matrix> = matrices.into_iter().filter(Matrix::needs_repack).collect();
        let off = std::env::var("SMOLDESK_REPACK").is_ok_and(|v| v == "off");
        if matrices.is_empty() || off {
            return Self { stop, thread: None };
        }
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("smoldesk-repack".into())
            .spawn(move || {
                let start = std::time::Instant::now();
                for matrix in &matrices {
                    if stopped.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    if let Err(err) = matrix.repack() {
                        log::warn!("weights stay in the file's pages: {err}");
                        return;
                    }
                }
                log::debug!(
                    "{} Q4_K and Q6_K matrices repacked in {:.2} s",
                    matrices.len(),
                    start.elapsed().as_secs_f64()
                );
            });
        match thread {
            Ok(thread) => Self {
                stop,
                thread: Some(thread),
            },
            Err(err) => {
                log::warn!("no thread to repack Q4_K weights: {err}");
                Self { stop, thread: None }
            }
        }
    }

    /// Waits until every matrix is repacked (or the job gave up).
    fn wait(&mut self) {
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::warn!("repacking Q4_K weights panicked; they stay in the file's layout");
        }
    }
}

impl Drop for BackgroundRepack {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.wait();
    }
}

impl Model {
    /// Loads every weight of a validated model file, computing on one thread per physical core.
    ///
    /// `max_context` is the KV cache limit in tokens (clamped to the trained context).
    /// `progress` receives the fraction of bytes loaded so far and returns `false` to cancel.
    pub fn load(
        gguf: &GgufFile,
        info: &ModelInfo,
        max_context: usize,
        progress: &mut dyn FnMut(f32) -> bool,
    ) -> Result<Self> {
        Self::load_with_threads(gguf, info, max_context, 0, progress)
    }

    /// [`Model::load`] with a compute pool of `threads` threads (0 = one per physical core).
    pub fn load_with_threads(
        gguf: &GgufFile,
        info: &ModelInfo,
        max_context: usize,
        threads: usize,
        progress: &mut dyn FnMut(f32) -> bool,
    ) -> Result<Self> {
        let h = info.hparams.clone();
        let max_context = max_context.clamp(1, h.context_length);
        check_rope_table(&h, max_context)?;
        let pool = Pool::new(threads);
        let names = tensor_names(&h, info.tied_embeddings, gguf);
        let weights = load_weights(gguf, &names, &pool, progress)?;

        let embedding = weights.matrix("token_embd.weight")?;
        let mut blocks = Vec::with_capacity(h.n_layer);
        for i in 0..h.n_layer {
            let name = |n: &str| format!("blk.{i}.{n}.weight");
            blocks.push(Block {
                attn_norm: weights.vector(&name("attn_norm"))?,
                wq: weights.matrix(&name("attn_q"))?,
                wk: weights.matrix(&name("attn_k"))?,
                wv: weights.matrix(&name("attn_v"))?,
                wo: weights.matrix(&name("attn_output"))?,
                ffn_norm: weights.vector(&name("ffn_norm"))?,
                w_gate: weights.matrix(&name("ffn_gate"))?,
                w_up: weights.matrix(&name("ffn_up"))?,
                w_down: weights.matrix(&name("ffn_down"))?,
                uses_rope: h.layer_uses_rope(i),
            });
        }
        let output_norm = weights.vector("output_norm.weight")?;
        let output = if info.tied_embeddings {
            embedding.clone()
        } else {
            weights.matrix("output.weight")?
        };
        let freq_factors = match gguf.tensor_info("rope_freqs.weight") {
            Some(_) => Some(weights.vector("rope_freqs.weight")?),
            None => None,
        };

        let rope = RopeTables::new(&h, max_context, freq_factors.as_deref());
        let matrices = blocks.iter().flat_map(|b| {
            [&b.wq, &b.wk, &b.wv, &b.wo, &b.w_gate, &b.w_up, &b.w_down].map(Matrix::clone)
        });
        let repack = BackgroundRepack::start(
            matrices
                .chain([embedding.clone(), output.clone()])
                .collect(),
        );
        Ok(Self {
            cache: (0..h.n_layer).map(|_| LayerCache::new(false)).collect(),
            hparams: h,
            pool,
            embedding,
            output,
            output_norm,
            blocks,
            rope,
            cache_len: 0,
            max_context,
            attention_order: SumOrder::default(),
            buffers: Buffers::default(),
            repack,
        })
    }

    /// Blocks until the Q4_K and Q6_K matrices are repacked for the fastest kernels (they are
    /// repacked in the background after load; results are the same before and after). For
    /// benchmarks of steady speed.
    pub fn wait_for_repack(&mut self) {
        self.repack.wait();
    }

    /// The hyper-parameters.
    pub fn hparams(&self) -> &HParams {
        &self.hparams
    }

    /// Threads of the compute pool every kernel of this model runs on.
    pub fn threads(&self) -> usize {
        self.pool.n_threads()
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
    /// [`SumOrder::SameForEveryRow`] also multiplies every row with the single-token kernels.
    pub fn set_attention_order(&mut self, order: SumOrder) {
        self.attention_order = order;
        self.buffers
            .act
            .set_row_invariant(order == SumOrder::SameForEveryRow);
    }

    /// Forgets the whole cache and frees its memory.
    pub fn clear_cache(&mut self) {
        self.cache_len = 0;
        let f32_cache = self.kv_cache_is_f32();
        for layer in &mut self.cache {
            *layer = LayerCache::new(f32_cache);
        }
    }

    /// Whether the KV cache holds f32 (otherwise f16) values.
    pub fn kv_cache_is_f32(&self) -> bool {
        matches!(self.cache.first(), Some(LayerCache::F32(_)))
    }

    /// Runs `tokens` after the cached positions and returns logits: one row per token when
    /// `all_positions`, otherwise only the last token's row. Inputs longer than
    /// [`PREFILL_CHUNK`] are computed in chunks.
    pub fn forward(&mut self, tokens: &[u32], all_positions: bool) -> Result<Vec<Vec<f32>>> {
        self.forward_cancellable(tokens, all_positions, &|| false)
    }

    /// [`Model::forward`], asking `cancelled` before every layer and between its matrix products. A cancelled call returns
    /// [`EngineError::Cancelled`] and keeps the chunks it completed in the cache.
    pub fn forward_cancellable(
        &mut self,
        tokens: &[u32],
        all_positions: bool,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Vec<Vec<f32>>> {
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
            let wanted = if all_positions {
                0..chunk.len()
            } else if i + 1 == n_chunks {
                chunk.len() - 1..chunk.len()
            } else {
                0..0
            };
            self.forward_chunk(chunk, wanted.clone(), cancelled)?;
            let vocab = self.hparams.vocab_size;
            rows.extend(
                self.buffers.logits[..wanted.len() * vocab]
                    .chunks_exact(vocab)
                    .map(<[f32]>::to_vec),
            );
        }
        Ok(rows)
    }

    /// Runs one chunk, leaving the logits of the rows `wanted` in `buffers.logits`.
    fn forward_chunk(
        &mut self,
        tokens: &[u32],
        wanted: Range<usize>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<()> {
        let seq = tokens.len();
        let offset = self.cache_len;
        let h = &self.hparams;
        let (e, eps) = (h.n_embd, h.rms_eps as f32);
        let pool = &self.pool;
        let b = &mut self.buffers;
        b.resize(h, seq);
        {
            let embedding = &self.embedding;
            for_rows(pool, &mut b.x, e, |t, row| {
                embedding.dequantize_row(tokens[t] as usize, row)
            });
        }
        for (block, cache) in self.blocks.iter().zip(self.cache.iter_mut()) {
            if cancelled() {
                return Err(EngineError::Cancelled);
            }
            normalize(pool, &b.x, &mut b.xn, &block.attn_norm, e, eps);
            let x = Layer {
                block,
                h,
                pool,
                rope: &self.rope,
                order: self.attention_order,
                offset,
                seq,
                cancelled,
            };
            x.attention(b, cache)?;
            add(pool, &mut b.x, &b.proj);
            normalize(pool, &b.x, &mut b.xn, &block.ffn_norm, e, eps);
            x.feed_forward(b)?;
            add(pool, &mut b.x, &b.proj);
        }
        self.cache_len = offset + seq;
        if wanted.is_empty() {
            return Ok(());
        }
        let rows = wanted.len();
        let last = &b.x[wanted.start * e..wanted.end * e];
        normalize(pool, last, &mut b.xn, &self.output_norm, e, eps);
        b.act.quantize(pool, &b.xn, rows, e, &[&self.output]);
        b.logits.resize(rows * h.vocab_size, 0.0);
        self.output.matmul(pool, &b.act, &mut b.logits);
        Ok(())
    }

    /// The keys and values of `layer` for positions `0..len` (at most the cached ones) as
    /// little-endian bytes of the cache's element type, for saving a KV state.
    pub fn kv_layer_bytes(&self, layer: usize, len: usize) -> super::kv_state::KvLayerBytes {
        use super::kv_state::KvLayerBytes;
        let len = len.min(self.cache_len);
        match self.cache.get(layer) {
            Some(LayerCache::F16(kv)) => {
                KvLayerBytes::encode(kv.stored_keys(len), kv.stored_values_of(len))
            }
            Some(LayerCache::F32(kv)) => {
                KvLayerBytes::encode(kv.stored_keys(len), kv.stored_values_of(len))
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
        let (n_kv, hd) = (self.hparams.n_head_kv, self.hparams.head_dim);
        let stored = stored_positions(len) * n_kv * hd;
        // Room for the next tokens, as appending would reserve it.
        let capacity = stored_positions(len + 1) * n_kv * hd;
        let f32_cache = matches!(self.cache.first(), Some(LayerCache::F32(_)));
        let decode = |bytes: &super::kv_state::KvLayerBytes| -> Result<LayerCache, KvStateError> {
            Ok(if f32_cache {
                let (k, v) = bytes.decode(stored, capacity)?;
                LayerCache::F32(KvRows::from_stored(n_kv, hd, len, k, v))
            } else {
                let (k, v) = bytes.decode(stored, capacity)?;
                LayerCache::F16(KvRows::from_stored(n_kv, hd, len, k, v))
            })
        };
        // Layers are decoded on the pool: most of the time goes to faulting in the new
        // cache's pages, which both cores can do at once.
        let mut decoded: Vec<Option<Result<LayerCache, KvStateError>>> =
            (0..layers.len()).map(|_| None).collect();
        let slots = SharedMut::new(&mut decoded);
        self.pool.for_each_chunk(layers.len(), 1, |range| {
            for l in range {
                // SAFETY: each layer's slot is written by the one task that owns index `l`.
                unsafe { slots.range_mut(l..l + 1)[0] = Some(decode(&layers[l])) };
            }
        });
        let mut cache = Vec::with_capacity(layers.len());
        for slot in decoded {
            match slot {
                Some(layer) => cache.push(layer?),
                None => {
                    return Err(KvStateError::Mismatch(
                        "a layer was not decoded".to_string(),
                    ));
                }
            }
        }
        self.cache = cache;
        self.cache_len = len;
        Ok(())
    }
}

/// One layer's computation for a chunk.
struct Layer<'a> {
    block: &'a Block,
    h: &'a HParams,
    pool: &'a Pool,
    rope: &'a RopeTables,
    order: SumOrder,
    offset: usize,
    seq: usize,
    /// Asked between the layer's matrix products, so a Stop during a long prefill chunk takes
    /// effect within one product (about 0.2 s for a 512-token chunk of the 3B).
    cancelled: &'a dyn Fn() -> bool,
}

impl Layer<'_> {
    /// [`EngineError::Cancelled`] once `cancelled` says so. Stopping mid-layer is safe: the
    /// chunk's keys and values are rewritten from its first position by the next call.
    fn check(&self) -> Result<()> {
        if (self.cancelled)() {
            Err(EngineError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Self-attention of `b.xn` at positions `offset..`, appending keys and values to `cache`;
    /// the output projection lands in `b.proj`.
    fn attention(&self, b: &mut Buffers, cache: &mut LayerCache) -> Result<()> {
        let (block, h, pool, seq) = (self.block, self.h, self.pool, self.seq);
        b.act.quantize(
            pool,
            &b.xn,
            seq,
            h.n_embd,
            &[&block.wq, &block.wk, &block.wv],
        );
        block.wq.matmul(pool, &b.act, &mut b.q);
        block.wk.matmul(pool, &b.act, &mut b.k);
        block.wv.matmul(pool, &b.act, &mut b.v);
        self.check()?;
        if block.uses_rope {
            let (rope, offset, hd) = (self.rope, self.offset, h.head_dim);
            for q_or_k in [&mut b.q, &mut b.k] {
                let width = q_or_k.len() / seq;
                for_rows(pool, q_or_k, width, |t, row| {
                    rope.apply(row, offset + t, hd)
                });
            }
        }
        let shape = AttentionShape {
            n_head: h.n_head,
            n_kv: h.n_head_kv,
            head_dim: h.head_dim,
            offset: self.offset,
            seq,
            order: self.order,
        };
        let (n_kv, hd) = (h.n_head_kv, h.head_dim);
        match cache {
            LayerCache::F16(kv) => {
                kv.append(self.offset, n_kv, hd, &b.k, &b.v);
                attend_into(pool, &b.q, kv, shape, &mut b.attn);
            }
            LayerCache::F32(kv) => {
                kv.append(self.offset, n_kv, hd, &b.k, &b.v);
                attend_into(pool, &b.q, kv, shape, &mut b.attn);
            }
        }
        self.check()?;
        let width = h.n_head * h.head_dim;
        b.act.quantize(pool, &b.attn, seq, width, &[&block.wo]);
        block.wo.matmul(pool, &b.act, &mut b.proj);
        Ok(())
    }

    /// The SwiGLU feed-forward of `b.xn` into `b.proj`.
    fn feed_forward(&self, b: &mut Buffers) -> Result<()> {
        let (block, h, pool, seq) = (self.block, self.h, self.pool, self.seq);
        b.act
            .quantize(pool, &b.xn, seq, h.n_embd, &[&block.w_gate, &block.w_up]);
        self.check()?;
        block.w_gate.matmul(pool, &b.act, &mut b.gate);
        self.check()?;
        block.w_up.matmul(pool, &b.act, &mut b.up);
        self.check()?;
        let up = &b.up;
        b.act.quantize_prepared(
            pool,
            &mut b.gate,
            seq,
            h.n_ff,
            &[&block.w_down],
            |start, part| swiglu_part(part, &up[start..]),
        );
        block.w_down.matmul(pool, &b.act, &mut b.proj);
        Ok(())
    }
}

impl Buffers {
    /// Sizes every buffer for a chunk of `seq` tokens (allocating only to grow).
    fn resize(&mut self, h: &HParams, seq: usize) {
        let sizes = [
            (&mut self.x, h.n_embd),
            (&mut self.xn, h.n_embd),
            (&mut self.q, h.n_head * h.head_dim),
            (&mut self.k, h.n_head_kv * h.head_dim),
            (&mut self.v, h.n_head_kv * h.head_dim),
            (&mut self.attn, h.n_head * h.head_dim),
            (&mut self.gate, h.n_ff),
            (&mut self.up, h.n_ff),
            (&mut self.proj, h.n_embd),
        ];
        for (buf, width) in sizes {
            buf.resize(seq * width, 0.0);
        }
    }
}

/// Calls `f(row index, row)` for each row of `width` values of `data`, rows spread over the
/// pool.
fn for_rows(pool: &Pool, data: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = data.len() / width;
    let shared = SharedMut::new(data);
    pool.for_each_chunk(rows, ROWS_PER_TASK, |range| {
        for t in range {
            // SAFETY: each row goes to exactly one task.
            f(t, unsafe { shared.range_mut(t * width..(t + 1) * width) });
        }
    });
}

/// Calls `f(offset, values)` for consecutive parts of `data`, spread over the pool.
fn for_values(pool: &Pool, data: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
    let shared = SharedMut::new(data);
    pool.for_each_chunk(shared.len(), VALUES_PER_TASK, |range| {
        let start = range.start;
        // SAFETY: each range goes to exactly one task.
        f(start, unsafe { shared.range_mut(range) });
    });
}

/// `out = rms_norm(x) · weight`, row by row.
fn normalize(pool: &Pool, x: &[f32], out: &mut Vec<f32>, weight: &[f32], width: usize, eps: f32) {
    out.resize(x.len(), 0.0);
    out.copy_from_slice(x);
    for_rows(pool, out, width, |_, row| {
        kernels::rms_norm_row(row, weight, eps)
    });
}

/// `x += y`.
fn add(pool: &Pool, x: &mut [f32], y: &[f32]) {
    for_values(pool, x, |start, part| {
        for (a, &b) in part.iter_mut().zip(&y[start..]) {
            *a += b;
        }
    });
}

/// `gate = silu(gate) · up` element-wise, as llama.cpp's `swiglu`: [`swiglu_portable`] compiled
/// with FMA where the CPU has it (for [`expf`]'s multiply-adds), and at the AVX-512 level for
/// 16 values per instruction (each value takes the same operations either way, so the bits are
/// the same).
fn swiglu_part(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::simd_level() >= super::cpu::SimdLevel::Avx512 {
        // SAFETY: the level is never above what the CPU has, and AVX-512 implies FMA.
        return unsafe { swiglu_avx512(gate, up) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports FMA (checked just above).
        return unsafe { swiglu_fma(gate, up) };
    }
    swiglu_portable(gate, up)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
fn swiglu_fma(gate: &mut [f32], up: &[f32]) {
    swiglu_portable(gate, up)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx512f")]
fn swiglu_avx512(gate: &mut [f32], up: &[f32]) {
    swiglu_portable(gate, up)
}

/// `x / (1 + e^-x) · u` with llama.cpp's [`expf`].
#[inline(always)]
fn swiglu_portable(gate: &mut [f32], up: &[f32]) {
    for (x, &u) in gate.iter_mut().zip(up) {
        *x = *x / (1.0 + expf(-*x)) * u;
    }
}

/// Bytes of the RoPE table of `positions` positions for heads of `head_dim` (`None` past
/// `u64`).
fn rope_table_bytes(head_dim: usize, positions: usize) -> Option<u64> {
    let entry = std::mem::size_of::<(f32, f32)>() as u64;
    (positions as u64)
        .checked_mul((head_dim / 2) as u64)?
        .checked_mul(entry)
}

/// Fails when the RoPE table for a context of `positions` tokens would be larger than
/// [`MAX_ROPE_TABLE_BYTES`] (a hostile or absurd context length and head size).
fn check_rope_table(h: &HParams, positions: usize) -> Result<()> {
    match rope_table_bytes(h.head_dim, positions) {
        Some(bytes) if bytes <= MAX_ROPE_TABLE_BYTES => Ok(()),
        bytes => Err(EngineError::ContextTooLarge {
            context: positions,
            head_dim: h.head_dim,
            bytes: bytes.unwrap_or(u64::MAX),
            limit: MAX_ROPE_TABLE_BYTES,
        }),
    }
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

    /// Rotates adjacent pairs of every head of one token's `row` (`heads × head_dim`) for
    /// position `position`: [`Self::apply_portable`] compiled with FMA where the CPU has it.
    /// Without it each `mul_add` is a call to a software fused multiply-add, several times
    /// slower (a generated token of the 3B spent 4-9 us more per layer).
    fn apply(&self, row: &mut [f32], position: usize, head_dim: usize) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports FMA (checked just above).
            return unsafe { self.apply_fma(row, position, head_dim) };
        }
        self.apply_portable(row, position, head_dim)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "fma")]
    fn apply_fma(&self, row: &mut [f32], position: usize, head_dim: usize) {
        self.apply_portable(row, position, head_dim)
    }

    #[inline(always)]
    fn apply_portable(&self, row: &mut [f32], position: usize, head_dim: usize) {
        let table = &self.cos_sin[position * self.pairs..][..self.pairs];
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

/// The tensors a model of these hyper-parameters reads, in file order where present.
fn tensor_names<'g>(h: &HParams, tied: bool, gguf: &'g GgufFile) -> Vec<&'g TensorInfo> {
    let wanted: std::collections::HashSet<String> = expected_tensors(h, tied)
        .into_iter()
        .map(|(name, _)| name)
        .chain(std::iter::once("rope_freqs.weight".to_string()))
        .collect();
    gguf.tensors
        .iter()
        .filter(|t| wanted.contains(&t.name))
        .collect()
}

/// Maps the file and touches every page of the tensors the model reads, reporting progress by
/// bytes and stopping when `progress` returns `false`.
///
/// Every tensor is used in place from a shared read-only mapping of the file, with no copy: Q4_K
/// and Q6_K are moved to memory of their own afterwards, in the background
/// ([`BackgroundRepack`]). When the file is in the page cache, loading only maps those pages;
/// touching them now means the first token does not pay for it.
fn load_weights<'g>(
    gguf: &'g GgufFile,
    tensors: &[&TensorInfo],
    pool: &Pool,
    progress: &mut dyn FnMut(f32) -> bool,
) -> Result<Weights<'g>> {
    let map = gguf.map_shared()?;
    let total = tensors.iter().map(|t| t.n_bytes).sum::<u64>().max(1);
    let mut done = 0u64;
    for info in tensors {
        let range = gguf.mapped_range(info, map.len())?;
        touch_pages(pool, &map[range]);
        done += info.n_bytes;
        if !progress((done as f64 / total as f64).min(1.0) as f32) {
            return Err(EngineError::Cancelled);
        }
    }
    Ok(Weights {
        gguf,
        file: Arc::new(Store::Mapped(map)),
    })
}

/// Reads every page of `bytes` once, spread over the pool.
fn touch_pages(pool: &Pool, bytes: &[u8]) {
    const PAGE: usize = 4096;
    let touched = std::sync::atomic::AtomicU64::new(0);
    pool.for_each_chunk(bytes.len().div_ceil(PAGE), 256, |pages| {
        let mut sum = 0u64;
        for p in pages {
            sum = sum.wrapping_add(u64::from(bytes[p * PAGE]));
        }
        touched.fetch_add(sum, std::sync::atomic::Ordering::Relaxed);
    });
    std::hint::black_box(touched.into_inner());
}

/// Builds matrices and vectors from the loaded weights.
struct Weights<'a> {
    gguf: &'a GgufFile,
    /// The file, mapped shared and read-only.
    file: Arc<Store>,
}

impl Weights<'_> {
    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.gguf
            .tensor_info(name)
            .ok_or_else(|| EngineError::MissingTensor(name.to_string()))
    }

    /// A 2-D tensor as a weight matrix (`dims[0]` inputs, `dims[1]` outputs); data misaligned
    /// in the file is copied.
    fn matrix(&self, name: &str) -> Result<Matrix> {
        let info = self.info(name)?;
        let (cols, rows) = match info.dims.as_slice() {
            [cols] => (*cols, 1),
            [cols, rows] => (*cols, *rows),
            _ => {
                return Err(EngineError::BadTensor {
                    name: name.into(),
                    reason: format!("expected a matrix, found dimensions {:?}", info.dims),
                });
            }
        };
        let (rows, cols) = (rows as usize, cols as usize);
        let range = self.gguf.mapped_range(info, self.store_len())?;
        let bad = |err: super::cpu::matmul::MatmulError| EngineError::BadTensor {
            name: name.into(),
            reason: err.to_string(),
        };
        let mapped = WeightBytes::new(self.file.clone(), range.start, range.len());
        match Matrix::new(info.dtype, rows, cols, mapped.clone()) {
            Err(super::cpu::matmul::MatmulError::Misaligned(_)) => {
                Matrix::new(info.dtype, rows, cols, WeightBytes::owned(mapped.bytes())).map_err(bad)
            }
            other => other.map_err(bad),
        }
    }

    /// A 1-D tensor (norm weights, RoPE factors) as f32.
    fn vector(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.info(name)?;
        let n = info.elem_count() as usize;
        let range = self.gguf.mapped_range(info, self.store_len())?;
        let bytes = WeightBytes::owned(&self.store_bytes()[range]);
        let matrix =
            Matrix::new(info.dtype, 1, n, bytes).map_err(|err| EngineError::BadTensor {
                name: name.into(),
                reason: err.to_string(),
            })?;
        let mut out = vec![0f32; n];
        matrix.dequantize_row(0, &mut out);
        Ok(out)
    }

    fn store_bytes(&self) -> &[u8] {
        self.file.bytes()
    }

    fn store_len(&self) -> usize {
        self.store_bytes().len()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Gate values over `expf`'s whole range and its edges (out of range, subnormal, infinite,
    /// NaN), and up values of both signs; an odd count, so the vector loops have a tail.
    fn swiglu_inputs() -> (Vec<f32>, Vec<f32>) {
        let edges = [
            0.0,
            -0.0,
            1e-40,
            -1e-40,
            88.7,
            -88.7,
            126.5,
            -126.5,
            150.0,
            -150.0,
            200.0,
            -200.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        let gate: Vec<f32> = (0..4099)
            .map(|i| match edges.get(i) {
                Some(&edge) => edge,
                None => ((i as f32) * 0.618_034).sin() * 40.0,
            })
            .collect();
        let up = (0..gate.len())
            .map(|i| ((i as f32) * 0.414_213).cos() * 3.0)
            .collect();
        (gate, up)
    }

    /// Both values are NaN, or they have the same bits.
    fn same(a: f32, b: f32) -> bool {
        (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits()
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_compiled_form_of_swiglu_gives_the_portable_bits() {
        let (gate, up) = swiglu_inputs();
        let mut expected = gate.clone();
        swiglu_portable(&mut expected, &up);
        type Swiglu = fn(&mut [f32], &[f32]);
        let mut forms: Vec<(&str, Swiglu)> = vec![("dispatched", swiglu_part)];
        if std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has FMA (checked just above).
            forms.push(("fma", |g, u| unsafe { swiglu_fma(g, u) }));
        }
        if crate::engine::cpu::avx512_available() {
            // SAFETY: the CPU has AVX-512 F and FMA (checked just above).
            forms.push(("avx512", |g, u| unsafe { swiglu_avx512(g, u) }));
        }
        for (name, form) in forms {
            let mut got = gate.clone();
            form(&mut got, &up);
            for (i, (&g, &e)) in got.iter().zip(&expected).enumerate() {
                assert!(
                    same(g, e),
                    "{name}: value {i} (gate {}): {g} != {e}",
                    gate[i]
                );
            }
        }
    }

    fn hparams(head_dim: usize, context_length: usize) -> HParams {
        HParams {
            n_layer: 1,
            n_embd: head_dim,
            n_ff: 8,
            n_head: 1,
            n_head_kv: 1,
            head_dim,
            rms_eps: 1e-6,
            rope_theta: 1e4,
            context_length,
            vocab_size: 8,
            no_rope_layer_interval: 0,
        }
    }

    #[test]
    fn rope_tables_of_real_models_fit_and_absurd_ones_are_refused() {
        // SmolLM3-3B (heads of 128) at the longest context the settings offer: 64 MiB.
        assert_eq!(rope_table_bytes(128, 131_072), Some(64 << 20));
        assert!(check_rope_table(&hparams(128, 131_072), 131_072).is_ok());
        // SmolLM2 (heads of 64) at its 8,192 tokens.
        assert!(check_rope_table(&hparams(64, 8192), 8192).is_ok());
        // The longest context a file may declare with the largest head size: 256 GiB.
        let h = hparams(4096, 1 << 24);
        match check_rope_table(&h, 1 << 24) {
            Err(EngineError::ContextTooLarge {
                context,
                head_dim,
                bytes,
                limit,
            }) => {
                assert_eq!((context, head_dim), (1 << 24, 4096));
                assert_eq!((bytes, limit), (256 << 30, MAX_ROPE_TABLE_BYTES));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(rope_table_bytes(4096, usize::MAX), None);
        assert!(check_rope_table(&h, usize::MAX).is_err());
    }
}
