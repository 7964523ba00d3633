//! Causal self-attention over a KV cache, rounded the way llama.cpp's CPU backend rounds it.
//!
//! A 3B model's greedy choice can hinge on logits 0.01 apart, and 8-bit activation rounding in
//! the next matmul turns any last-bit difference into a visible one. So this follows llama.cpp
//! (non-flash attention, f16 cache) operation by operation: queries and probabilities rounded to
//! the cache precision, dot products summed in the same lane order (its tiled `sgemm` for
//! prompts, `ggml_vec_dot_f16` for single tokens), its `expf` polynomial, its softmax sums.
//! Products of two f16 values are exact in f32, so a plain multiply-add equals its fused one.

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::cpu::pool::{Pool, SharedMut};
use super::cpu::{SimdLevel, simd_level};

#[cfg(target_arch = "x86_64")]
mod avx2;
mod cache;

pub use cache::{BLOCK, KvRows, stored_positions};

/// Lanes of one AVX register of f32, the unit of llama.cpp's summation order.
const LANES: usize = 8;
/// Accumulators of `ggml_vec_dot_f16` (32 values per step).
const DOT_ACCUMULATORS: usize = 4;

/// A value type the KV cache can hold: f16 (llama.cpp's default) or f32.
pub trait KvValue: Copy + Send + Sync + 'static {
    /// Whether the product of two values of this type is exact in f32 (so a fused
    /// multiply-add rounds as a multiply then an add).
    const EXACT_PRODUCTS: bool;
    /// Whether this is f16 (loaded with F16C's conversion).
    const HALF: bool;
    /// Rounds an f32 to this type.
    fn from_f32(value: f32) -> Self;
    /// Widens to f32 (exact).
    fn to_f32(self) -> f32;
    /// Widens a slice into `dst` (same length).
    fn widen(src: &[Self], dst: &mut [f32]);
    /// Rounds a slice into `dst` (same length), as [`KvValue::from_f32`] does value by value.
    fn narrow(src: &[f32], dst: &mut [Self]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = Self::from_f32(s);
        }
    }
    /// Rounds every value to this type and back, in place.
    fn round_in_place(values: &mut [f32]) {
        for v in values {
            *v = Self::from_f32(*v).to_f32();
        }
    }
    /// Appends the little-endian bytes.
    fn write_le(self, out: &mut Vec<u8>);
    /// Reads from little-endian bytes (exactly the type's size).
    fn from_le(bytes: &[u8]) -> Self;
}

impl KvValue for f16 {
    const EXACT_PRODUCTS: bool = true;
    const HALF: bool = true;
    fn from_f32(value: f32) -> Self {
        f16::from_f32(value)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if simd_level() >= SimdLevel::Avx2 {
            // SAFETY: the AVX2 level includes F16C.
            return unsafe { widen_f16c(src, dst) };
        }
        src.convert_to_f32_slice(dst);
    }
    /// With F16C 8 values at a time where the CPU has it (`half`'s slice conversion).
    fn narrow(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
    #[inline(always)]
    fn round_in_place(values: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if simd_level() >= SimdLevel::Avx2 {
            // SAFETY: the AVX2 level includes F16C.
            return unsafe { round_f16c(values) };
        }
        for v in values {
            *v = f16::from_f32(*v).to_f32();
        }
    }
    fn write_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn from_le(bytes: &[u8]) -> Self {
        f16::from_le_bytes([bytes[0], bytes[1]])
    }
}

/// f16 to f32 with F16C, inlined into the attention loops: `half`'s slice conversion is an
/// out-of-line call per 8 values there, and was most of the decode attention time under perf.
///
/// # Safety
/// The CPU must support F16C.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn widen_f16c(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::{_mm_loadu_si128, _mm256_cvtph_ps, _mm256_storeu_ps};
    assert_eq!(
        src.len(),
        dst.len(),
        "widening between slices of one length"
    );
    let whole = src.len() / LANES * LANES;
    for i in (0..whole).step_by(LANES) {
        // SAFETY: `i + 8 <= len` for both slices; unaligned loads and stores.
        unsafe {
            let halves = _mm_loadu_si128(src.as_ptr().add(i).cast());
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(halves));
        }
    }
    for (d, s) in dst[whole..].iter_mut().zip(&src[whole..]) {
        *d = s.to_f32();
    }
}

/// Rounds values to f16 and back with F16C (round to nearest even, as `half` does).
///
/// # Safety
/// The CPU must support F16C.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn round_f16c(values: &mut [f32]) {
    use std::arch::x86_64::{
        _MM_FROUND_TO_NEAREST_INT, _mm256_cvtph_ps, _mm256_cvtps_ph, _mm256_loadu_ps,
        _mm256_storeu_ps,
    };
    let whole = values.len() / LANES * LANES;
    for i in (0..whole).step_by(LANES) {
        // SAFETY: `i + 8 <= len`; unaligned load and store.
        unsafe {
            let p = values.as_mut_ptr().add(i);
            let halves = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(p));
            _mm256_storeu_ps(p, _mm256_cvtph_ps(halves));
        }
    }
    for v in &mut values[whole..] {
        *v = f16::from_f32(*v).to_f32();
    }
}

impl KvValue for f32 {
    const EXACT_PRODUCTS: bool = false;
    const HALF: bool = false;
    fn from_f32(value: f32) -> Self {
        value
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn narrow(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
    fn write_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn from_le(bytes: &[u8]) -> Self {
        f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
    }
}

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (grouped-query attention shares each among `n_head / n_kv` queries).
    pub n_kv: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Cached positions before this chunk.
    pub offset: usize,
    /// Query positions in this chunk.
    pub seq: usize,
    /// How dot products are summed.
    pub order: SumOrder,
}

/// The order attention sums its dot products in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SumOrder {
    /// As llama.cpp: its tiled sgemm order for a chunk of several tokens, `ggml_vec_dot_f16`'s
    /// for a single token. Logits then equal llama.cpp's to the last bit, but a token decoded
    /// alone can round differently from the same token inside a prompt (so does llama.cpp).
    #[default]
    LlamaCpp,
    /// One order for every row, so decoding token by token reproduces a prefill exactly.
    SameForEveryRow,
}

/// Query tokens one parallel task handles: each key and value row of the task's KV head is
/// widened to f32 once per task and used for all of them and all their query heads.
const TOKENS_PER_TASK: usize = 16;

/// Attention of `q` (`seq × n_head × head_dim`, after RoPE) over the cached keys and values of
/// positions `0..offset + seq`, causal, into `out` (`seq × n_head × head_dim`). Runs on `pool`,
/// one task per (KV head, block of query tokens); each task serves every query head of its KV
/// head and reads the cache in place.
pub fn attend_into<T: KvValue>(
    pool: &Pool,
    q: &[f32],
    kv: &KvRows<T>,
    shape: AttentionShape,
    out: &mut [f32],
) {
    let blocks = shape.seq.div_ceil(TOKENS_PER_TASK);
    let out = SharedMut::new(&mut out[..shape.seq * shape.n_head * shape.head_dim]);
    pool.for_each_chunk(shape.n_kv * blocks, 1, |tasks| {
        for task in tasks {
            let (g, block) = (task / blocks, task % blocks);
            SCRATCH.with(|scratch| {
                let scratch = &mut scratch.borrow_mut();
                attend_group_dispatch(q, kv, shape, g, block, scratch, out);
            });
        }
    });
}

/// [`attend_into`] on a one-thread pool, returning the output.
pub fn attend<T: KvValue>(q: &[f32], kv: &KvRows<T>, shape: AttentionShape) -> Vec<f32> {
    let mut out = vec![0f32; shape.seq * shape.n_head * shape.head_dim];
    attend_into(&Pool::new(1), q, kv, shape, &mut out);
    out
}

/// Positions ahead of the one being read whose key is prefetched.
const PREFETCH_AHEAD: usize = 8;

/// Asks the CPU to bring `values` into cache, if there are any.
#[inline(always)]
fn prefetch<T>(values: Option<&[T]>) {
    #[cfg(target_arch = "x86_64")]
    if let Some(values) = values {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let bytes = std::mem::size_of_val(values);
        let start = values.as_ptr().cast::<i8>();
        for line in (0..bytes).step_by(64) {
            // SAFETY: the address lies inside `values`; a prefetch never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.add(line)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = values;
}

/// Per-thread buffers of one attention task, reused across calls.
#[derive(Default)]
struct Scratch {
    /// The task's queries rounded to the cache precision, `tokens × n_rep × head_dim`.
    queries: Vec<f32>,
    /// Scores, then probabilities, `tokens × n_rep × visible`.
    weights: Vec<f32>,
    /// One key or value row widened to f32.
    row: Vec<f32>,
    /// Weighted-sum accumulators, `tokens × n_rep × N × head_dim`.
    acc: Vec<f32>,
    /// A chunk's values widened to f32, in blocks of 8 positions (the AVX2 prompt path).
    block: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// [`attend_group`], compiled for AVX2 and FMA when the CPU has them.
fn attend_group_dispatch<T: KvValue>(
    q: &[f32],
    kv: &KvRows<T>,
    shape: AttentionShape,
    g: usize,
    block: usize,
    scratch: &mut Scratch,
    out: SharedMut<'_, f32>,
) {
    #[cfg(target_arch = "x86_64")]
    if simd_level() >= SimdLevel::Avx2 {
        // SAFETY: the CPU supports AVX2, FMA and F16C (the SIMD level says so).
        return unsafe { attend_group_avx2(q, kv, shape, g, block, scratch, out) };
    }
    attend_group(q, kv, shape, g, block, scratch, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn attend_group_avx2<T: KvValue>(
    q: &[f32],
    kv: &KvRows<T>,
    shape: AttentionShape,
    g: usize,
    block: usize,
    scratch: &mut Scratch,
    out: SharedMut<'_, f32>,
) {
    attend_group(q, kv, shape, g, block, scratch, out)
}

/// Outputs of the query heads sharing KV head `g`, for the query tokens of `block`, written to
/// their places in `out`.
#[inline(always)]
fn attend_group<T: KvValue>(
    q: &[f32],
    kv: &KvRows<T>,
    shape: AttentionShape,
    g: usize,
    block: usize,
    scratch: &mut Scratch,
    out: SharedMut<'_, f32>,
) {
    let AttentionShape {
        n_head,
        n_kv,
        head_dim: hd,
        offset,
        seq,
        ..
    } = shape;
    let n_rep = n_head / n_kv;
    // llama.cpp takes its tiled sgemm for two or more query rows, vec_dot for one.
    let single = match shape.order {
        SumOrder::LlamaCpp => seq == 1,
        SumOrder::SameForEveryRow => false,
    };
    let first = block * TOKENS_PER_TASK;
    let last = (first + TOKENS_PER_TASK).min(seq);
    let tokens = last - first;
    let visible_max = offset + last;
    let heads = tokens * n_rep;

    scratch.queries.clear();
    for t in first..last {
        for r in 0..n_rep {
            let h = g * n_rep + r;
            let query = &q[(t * n_head + h) * hd..][..hd];
            scratch.queries.extend_from_slice(query);
        }
    }
    T::round_in_place(&mut scratch.queries);
    // Rows padded to whole blocks of 8 positions; weights a head does not see stay zero.
    let stride = visible_max.next_multiple_of(LANES);
    scratch.weights.clear();
    scratch.weights.resize(heads * stride, 0.0);
    #[cfg(target_arch = "x86_64")]
    let tiled_avx2 = !single && hd.is_multiple_of(LANES) && simd_level() >= SimdLevel::Avx2;
    #[cfg(not(target_arch = "x86_64"))]
    let tiled_avx2 = false;
    #[cfg(target_arch = "x86_64")]
    let single_avx2 =
        single && hd.is_multiple_of(LANES * DOT_ACCUMULATORS) && simd_level() >= SimdLevel::Avx2;
    #[cfg(not(target_arch = "x86_64"))]
    let single_avx2 = false;
    if tiled_avx2 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2, FMA and F16C; the head size is a multiple of 8; the
        // queries and weights are sized above.
        unsafe {
            avx2::scores(kv, shape, g, first, scratch, stride)
        };
    } else if single_avx2 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2, FMA and F16C; one query token; the head size is a
        // multiple of 32; the queries and weights are sized above.
        unsafe {
            avx2::scores_vec(kv, shape, g, scratch, stride)
        };
    } else {
        scores(kv, shape, g, first, single, scratch, stride);
    }
    for (i, weights) in scratch.weights.chunks_exact_mut(stride).enumerate() {
        let visible = visible_to(i, shape, first);
        let (weights, unseen) = weights.split_at_mut(visible);
        softmax(weights);
        T::round_in_place(weights);
        unseen.fill(0.0);
    }
    if tiled_avx2 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; the weights now hold the probabilities, zero where unseen.
        unsafe {
            avx2::weighted_sums(kv, shape, g, first, scratch, stride, out)
        };
        return;
    }
    if single_avx2 {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; the weights now hold the probabilities, zero where unseen.
        unsafe {
            avx2::weighted_sums_vec(kv, shape, g, scratch, stride, out)
        };
        return;
    }
    if single {
        weighted_sums::<T, { LANES * DOT_ACCUMULATORS }>(kv, shape, g, first, scratch, stride);
    } else {
        weighted_sums::<T, LANES>(kv, shape, g, first, scratch, stride);
    }
    for (i, acc) in scratch
        .acc
        .chunks_exact(scratch.acc.len() / heads)
        .enumerate()
    {
        let (t, r) = (first + i / n_rep, i % n_rep);
        let h = g * n_rep + r;
        // SAFETY: each (token, head) output belongs to exactly one task.
        let head_out = unsafe { out.range_mut((t * n_head + h) * hd..(t * n_head + h + 1) * hd) };
        let n = acc.len() / hd;
        debug_assert!(n == LANES || n == LANES * DOT_ACCUMULATORS);
        for (d, o) in head_out.iter_mut().enumerate() {
            *o = if n == LANES {
                hsum(&std::array::from_fn(|a| acc[a * hd + d]))
            } else {
                reduce_accumulators(&std::array::from_fn(|a| acc[a * hd + d]))
            };
        }
    }
}

/// The first query head (of a task's `tokens × n_rep`) that sees position `j`.
#[inline(always)]
fn first_head_seeing(j: usize, shape: AttentionShape, first: usize) -> usize {
    let n_rep = shape.n_head / shape.n_kv;
    (j.saturating_sub(shape.offset).max(first) - first) * n_rep
}

/// Positions that head `i` of the task sees (`0..visible`).
#[inline(always)]
fn visible_to(i: usize, shape: AttentionShape, first: usize) -> usize {
    shape.offset + first + i / (shape.n_head / shape.n_kv) + 1
}

/// Scaled scores `scratch.weights[i * stride + j]` of every (head `i` of the task, position
/// `j`) pair where the head sees the position, in `ggml_vec_dot_f16`'s order for a single
/// token, the tiled sgemm's otherwise.
#[inline(always)]
fn scores<T: KvValue>(
    kv: &KvRows<T>,
    shape: AttentionShape,
    g: usize,
    first: usize,
    single: bool,
    scratch: &mut Scratch,
    stride: usize,
) {
    let hd = shape.head_dim;
    let heads = scratch.queries.len() / hd;
    let visible_max = visible_to(heads - 1, shape, first);
    let scale = 1.0f32 / (hd as f32).sqrt();
    scratch.row.resize(hd, 0.0);
    for j in 0..visible_max {
        prefetch(kv.key_if_stored(j + PREFETCH_AHEAD, g));
        T::widen(kv.key(j, g), &mut scratch.row);
        for i in first_head_seeing(j, shape, first)..heads {
            let query = &scratch.queries[i * hd..][..hd];
            let s = if single {
                dot_vec(&scratch.row, query)
            } else {
                dot_tiled(&scratch.row, query)
            };
            scratch.weights[i * stride + j] = s * scale;
        }
    }
}

/// `Σ_j weights[j] · values[j]` for every (token, head) of a task, position `j` summed into
/// accumulator `j % N`, each value row widened once. Leaves `tokens × n_rep × N × head_dim`
/// accumulators in `scratch.acc` (combined like llama.cpp's tiled sgemm for `N = 8`, like
/// `ggml_vec_dot_f16` for `N = 32`).
#[inline(always)]
fn weighted_sums<T: KvValue, const N: usize>(
    kv: &KvRows<T>,
    shape: AttentionShape,
    g: usize,
    first: usize,
    scratch: &mut Scratch,
    stride: usize,
) {
    let hd = shape.head_dim;
    let heads = scratch.queries.len() / hd;
    let visible_max = visible_to(heads - 1, shape, first);
    scratch.row.resize(hd, 0.0);
    scratch.acc.clear();
    scratch.acc.resize(heads * N * hd, 0.0);
    for j in 0..visible_max {
        kv.widen_value(j, g, &mut scratch.row);
        for i in first_head_seeing(j, shape, first)..heads {
            let w = scratch.weights[i * stride + j];
            let acc = &mut scratch.acc[(i * N + j % N) * hd..][..hd];
            for (a, &v) in acc.iter_mut().zip(&scratch.row) {
                *a += w * v;
            }
        }
    }
}

/// llama.cpp's horizontal sum of 8 lanes: high half plus low half, then pairs.
#[inline(always)]
pub(crate) fn hsum(lanes: &[f32; LANES]) -> f32 {
    let a: [f32; 4] = std::array::from_fn(|i| lanes[i + 4] + lanes[i]);
    (a[0] + a[2]) + (a[1] + a[3])
}

/// `ggml_vec_dot_f16`'s reduction of its 4 accumulators of 8 lanes (stored as 32 values).
#[inline(always)]
fn reduce_accumulators(acc: &[f32; LANES * DOT_ACCUMULATORS]) -> f32 {
    let a01: [f32; LANES] = std::array::from_fn(|l| {
        (acc[l] + acc[2 * LANES + l]) + (acc[LANES + l] + acc[3 * LANES + l])
    });
    let t0: [f32; 4] = std::array::from_fn(|i| a01[i] + a01[i + 4]);
    (t0[0] + t0[1]) + (t0[2] + t0[3])
}

/// A dot product in the order of llama.cpp's tiled sgemm (8 lanes, then [`hsum`]). That
/// sgemm takes only lengths that are multiples of 8; llama.cpp computes other head sizes (a
/// head of 92, say) with `ggml_vec_dot_f16`, and so does this function: no element is dropped.
#[inline(always)]
fn dot_tiled(x: &[f32], y: &[f32]) -> f32 {
    if !x.len().is_multiple_of(LANES) {
        return dot_vec(x, y);
    }
    let mut lanes = [0f32; LANES];
    for (xs, ys) in x.chunks_exact(LANES).zip(y.chunks_exact(LANES)) {
        for l in 0..LANES {
            lanes[l] += xs[l] * ys[l];
        }
    }
    hsum(&lanes)
}

/// A dot product in the order of `ggml_vec_dot_f16` (4 × 8 lanes over steps of 32; the rest in
/// f64).
#[inline(always)]
fn dot_vec(x: &[f32], y: &[f32]) -> f32 {
    const STEP: usize = LANES * DOT_ACCUMULATORS;
    #[cfg(target_arch = "x86_64")]
    if x.len().is_multiple_of(STEP) && simd_level() >= SimdLevel::Avx2 {
        // SAFETY: the AVX2 level includes FMA.
        return unsafe { dot_vec_avx2(x, y) };
    }
    dot_vec_portable(x, y)
}

/// [`dot_vec`] in portable code.
#[inline(always)]
fn dot_vec_portable(x: &[f32], y: &[f32]) -> f32 {
    const STEP: usize = LANES * DOT_ACCUMULATORS;
    let full = x.len() / STEP * STEP;
    let mut acc = [0f32; STEP];
    for (xs, ys) in x[..full]
        .chunks_exact(STEP)
        .zip(y[..full].chunks_exact(STEP))
    {
        for i in 0..STEP {
            acc[i] += xs[i] * ys[i];
        }
    }
    let mut sum = f64::from(reduce_accumulators(&acc));
    for (a, b) in x[full..].iter().zip(&y[full..]) {
        sum += f64::from(a * b);
    }
    sum as f32
}

/// [`dot_vec`] for lengths that are multiples of 32, in AVX2 registers: the same lanes, the
/// same reduction (`GGML_F32x8_REDUCE`). A fused multiply-add equals the separate one here:
/// both factors are f16 values, whose product is exact in f32. Written out because the
/// compiler's version of the portable loop used 128-bit shuffles, most of the decode
/// attention time after the f16 widening was fixed.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x.len() == y.len()`, a multiple of 32.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_vec_avx2(x: &[f32], y: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    assert!(x.len() == y.len() && x.len().is_multiple_of(LANES * DOT_ACCUMULATORS));
    // SAFETY: every load reads 8 values inside both slices (lengths checked above).
    unsafe {
        let mut acc = [_mm256_setzero_ps(); DOT_ACCUMULATORS];
        for step in (0..x.len()).step_by(LANES * DOT_ACCUMULATORS) {
            for (k, a) in acc.iter_mut().enumerate() {
                let at = step + k * LANES;
                let xs = _mm256_loadu_ps(x.as_ptr().add(at));
                let ys = _mm256_loadu_ps(y.as_ptr().add(at));
                *a = _mm256_fmadd_ps(xs, ys, *a);
            }
        }
        let a01 = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
        let t0 = _mm_add_ps(_mm256_castps256_ps128(a01), _mm256_extractf128_ps::<1>(a01));
        let t1 = _mm_hadd_ps(t0, t0);
        _mm_cvtss_f32(_mm_hadd_ps(t1, t1))
    }
}

/// In-place softmax as llama.cpp's `soft_max` computes it: [`expf`] of `x - max` in chunks of
/// 8 summed with [`hsum`] into an f64 total, then a multiply by `1 / total`.
#[inline(always)]
fn softmax(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd_level() >= SimdLevel::Avx2 {
        // SAFETY: the CPU has AVX2 and FMA (the SIMD level says so).
        return unsafe { avx2::softmax(x) };
    }
    softmax_portable(x)
}

/// [`softmax`] in portable code.
#[inline(always)]
fn softmax_portable(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for chunk in x.chunks_mut(LANES) {
        let mut lanes = [0f32; LANES];
        for (lane, v) in lanes.iter_mut().zip(chunk.iter_mut()) {
            *v = expf(*v - max);
            *lane = *v;
        }
        sum += f64::from(hsum(&lanes));
    }
    let inv = (1.0 / sum) as f32;
    for v in x {
        *v *= inv;
    }
}

/// `e^x` with llama.cpp's AVX2 `ggml_v_expf` polynomial (one lane of it).
#[inline(always)]
pub fn expf(x: f32) -> f32 {
    let r = f32::from_bits(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3fb8_aa3b), r); // log2(e)
    let n = z - r;
    let b = (-n).mul_add(
        f32::from_bits(0x35bf_be8e),                  // 0x1.7f7d1cp-20
        (-n).mul_add(f32::from_bits(0x3f31_7200), x), // 0x1.62e4p-1
    );
    let e = z.to_bits() << 23;
    let k = f32::from_bits(e.wrapping_add(1f32.to_bits()));
    let u = b * b;
    let j = f32::from_bits(0x3c07_2010) // 0x1.0e4020p-7
        .mul_add(b, f32::from_bits(0x3d2b_9f17)) // 0x1.573e2ep-5
        .mul_add(
            u,
            f32::from_bits(0x3e2a_af33).mul_add(b, f32::from_bits(0x3eff_fedb)), // 0x1.555e66p-3, 0x1.fffdb6p-2
        )
        .mul_add(u, f32::from_bits(0x3f7f_fff6) * b); // 0x1.ffffecp-1
    // Comparisons written as AVX's ordered ones, so NaN takes the same branch.
    let out_of_range = n.abs() > 126.0;
    if !out_of_range {
        return j.mul_add(k, k);
    }
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = f32::from_bits(g.wrapping_add(0x7f00_0000));
    let s2 = f32::from_bits(e.wrapping_sub(g));
    if n.abs() > 192.0 {
        s1 * s1
    } else {
        s2.mul_add(j, s2) * s1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expf_is_close_to_exp_over_the_whole_range() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.05;
            let (got, want) = (expf(x), x.exp());
            if want.is_infinite() {
                assert_eq!(got, want, "expf({x})");
                continue;
            }
            let tolerance = want * 4e-7 + f32::MIN_POSITIVE;
            assert!(
                (got - want).abs() <= tolerance,
                "expf({x}) = {got}, exp = {want}"
            );
        }
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(-200.0), 0.0);
    }

    #[test]
    fn softmax_sums_to_one_and_ignores_masked_positions() {
        let mut x = vec![
            1.0,
            2.0,
            3.0,
            f32::NEG_INFINITY,
            0.5,
            -1.0,
            4.0,
            2.5,
            0.0,
            1.5,
        ];
        softmax(&mut x);
        assert_eq!(x[3], 0.0);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[6] > x[2] && x[2] > x[1]);
    }

    #[test]
    fn dot_orders_agree_with_a_plain_sum() {
        let x: Vec<f32> = (0..128).map(|i| (i as f32 - 60.0) / 16.0).collect();
        let y: Vec<f32> = (0..128)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
            .collect();
        let plain: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        assert!((dot_tiled(&x, &y) - plain).abs() < 1e-3);
        assert!((dot_vec(&x, &y) - plain).abs() < 1e-3);
        assert_eq!(dot_vec_portable(&x, &y), dot_vec(&x, &y));
        assert!((dot_vec(&x[..40], &y[..40]) - dot_tiled(&x[..40], &y[..40])).abs() < 1e-3);
    }

    #[test]
    fn f16_rounding_in_place_equals_half_one_value_at_a_time() {
        // Every f16 value, the midpoints between neighbours (ties) and points near them.
        let mut values: Vec<f32> = (0..=u16::MAX)
            .map(|b| f16::from_bits(b).to_f32())
            .filter(|v| v.is_finite())
            .flat_map(|v| {
                [
                    v,
                    v * (1.0 + 1.0 / 2048.0),
                    v * (1.0 + 1.0 / 4096.0),
                    v * 0.999_9,
                ]
            })
            .collect();
        values.push(1e-9);
        values.push(70_000.0);
        let expected: Vec<u32> = values
            .iter()
            .map(|&v| f16::from_f32(v).to_f32().to_bits())
            .collect();
        f16::round_in_place(&mut values);
        let got: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn the_simd_softmax_rounds_as_the_portable_one() {
        if simd_level() < SimdLevel::Avx2 {
            return;
        }
        for len in 1..80 {
            // Spreads of up to ±150 put some lanes outside `ggml_v_expf`'s fast range.
            let spread = [3.0, 40.0, 150.0][len % 3];
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 37 + len * 11) % 101) as f32 / 101.0 * 2.0 * spread - spread)
                .collect();
            let mut portable = row.clone();
            softmax_portable(&mut portable);
            let mut simd = row;
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            unsafe { avx2::softmax(&mut simd) };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&simd),
                bits(&portable),
                "length {len}, spread {spread}"
            );
        }
    }

    #[test]
    fn the_simd_dot_rounds_as_the_portable_one_on_f16_values() {
        let value = |i: usize| {
            let bits = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
            let x = (bits as f32 / (1u64 << 24) as f32 - 0.5) * 2f32.powi((i % 9) as i32 - 4);
            f16::from_f32(x).to_f32()
        };
        let mut order_mattered = false;
        for case in 0..200 {
            let x: Vec<f32> = (0..128).map(|i| value(case * 1000 + i)).collect();
            let y: Vec<f32> = (0..128).map(|i| value(case * 1000 + 500 + i)).collect();
            assert_eq!(
                dot_vec(&x, &y).to_bits(),
                dot_vec_portable(&x, &y).to_bits(),
                "case {case}"
            );
            order_mattered |= dot_vec(&x, &y) != dot_tiled(&x, &y);
        }
        assert!(
            order_mattered,
            "the inputs are ones where summation order shows"
        );
    }

    /// The previous implementation (widening the whole prefix per task), the bit-exact
    /// reference for [`attend`].
    fn attend_widening<T: KvValue>(q: &[f32], kv: &KvRows<T>, shape: AttentionShape) -> Vec<f32> {
        let AttentionShape {
            n_head,
            n_kv,
            head_dim: hd,
            offset,
            seq,
            ..
        } = shape;
        let n_rep = n_head / n_kv;
        let scale = 1.0f32 / (hd as f32).sqrt();
        let single = match shape.order {
            SumOrder::LlamaCpp => seq == 1,
            SumOrder::SameForEveryRow => false,
        };
        let visible_max = offset + seq;
        let mut out = vec![0f32; seq * n_head * hd];
        for g in 0..n_kv {
            let mut keys = vec![0f32; visible_max * hd];
            let mut values = vec![0f32; visible_max * hd];
            for (j, (key, value)) in keys
                .chunks_exact_mut(hd)
                .zip(values.chunks_exact_mut(hd))
                .enumerate()
            {
                T::widen(kv.key(j, g), key);
                kv.widen_value(j, g, value);
            }
            let mut query = vec![0f32; hd];
            for t in 0..seq {
                let visible = offset + t + 1;
                for r in 0..n_rep {
                    let h = g * n_rep + r;
                    for (dst, &x) in query.iter_mut().zip(&q[(t * n_head + h) * hd..][..hd]) {
                        *dst = T::from_f32(x).to_f32();
                    }
                    let mut weights: Vec<f32> = keys[..visible * hd]
                        .chunks_exact(hd)
                        .map(|key| {
                            let s = if single {
                                dot_vec(key, &query)
                            } else {
                                dot_tiled(key, &query)
                            };
                            s * scale
                        })
                        .collect();
                    softmax(&mut weights);
                    for w in &mut weights {
                        *w = T::from_f32(*w).to_f32();
                    }
                    let head_out = &mut out[(t * n_head + h) * hd..][..hd];
                    if single {
                        weighted_sum_vec(&weights, &values, head_out);
                    } else {
                        weighted_sum_tiled(&weights, &values, head_out);
                    }
                }
            }
        }
        out
    }

    /// `out[d] = Σ_j weights[j] · values[j][d]` summed like llama.cpp's tiled sgemm over `j`.
    fn weighted_sum_tiled(weights: &[f32], values: &[f32], out: &mut [f32]) {
        weighted_sum::<LANES>(weights, values, out, hsum);
    }

    /// `out[d] = Σ_j weights[j] · values[j][d]` summed like `ggml_vec_dot_f16` over `j`. The KV
    /// length llama.cpp sums over is padded to 256 with zero weights, so no tail is left over.
    fn weighted_sum_vec(weights: &[f32], values: &[f32], out: &mut [f32]) {
        weighted_sum::<{ LANES * DOT_ACCUMULATORS }>(weights, values, out, reduce_accumulators);
    }

    /// `Σ_j weights[j] · values[j]` with position `j` summed into accumulator `j % N`, the `N`
    /// accumulators of each output then combined by `reduce`.
    fn weighted_sum<const N: usize>(
        weights: &[f32],
        values: &[f32],
        out: &mut [f32],
        reduce: impl Fn(&[f32; N]) -> f32,
    ) {
        let hd = out.len();
        let mut acc = vec![0f32; N * hd];
        for (j, (&w, value)) in weights.iter().zip(values.chunks_exact(hd)).enumerate() {
            let row = &mut acc[(j % N) * hd..][..hd];
            for (a, &v) in row.iter_mut().zip(value) {
                *a += w * v;
            }
        }
        for (d, o) in out.iter_mut().enumerate() {
            *o = reduce(&std::array::from_fn(|i| acc[i * hd + d]));
        }
    }

    #[test]
    fn attention_on_the_cache_equals_the_widening_implementation_to_the_bit() {
        // Within one chunk of positions of the AVX2 prompt path, and over several.
        // 3 query heads per KV head (odd, as SmolLM2), and 4 (as SmolLM3).
        for total in [45, 300, 600] {
            attention_equals_the_widening_implementation(total, (6, 2, 64));
        }
        attention_equals_the_widening_implementation(300, (8, 2, 32));
        // SmolLM3's head size: four steps of 32 per dot product.
        attention_equals_the_widening_implementation(300, (8, 2, 128));
    }

    fn attention_equals_the_widening_implementation(
        total: usize,
        (n_head, n_kv, hd): (usize, usize, usize),
    ) {
        let row = n_kv * hd;
        let k: Vec<f32> = (0..total * row)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) / 9.0)
            .collect();
        let v: Vec<f32> = (0..total * row)
            .map(|i| ((i * 11 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let q: Vec<f32> = (0..total * n_head * hd)
            .map(|i| ((i * 5 % 19) as f32 - 9.0) / 5.0)
            .collect();
        let mut kv16 = KvRows::<f16>::default();
        kv16.append(0, n_kv, hd, &k, &v);
        let mut kv32 = KvRows::<f32>::default();
        kv32.append(0, n_kv, hd, &k, &v);
        let pool = Pool::new(2);
        for order in [SumOrder::LlamaCpp, SumOrder::SameForEveryRow] {
            for (offset, seq) in [
                (0, total),
                (total - 1, 1),
                (3, 20),
                (10, 35),
                (total - 18, 18),
            ] {
                let shape = AttentionShape {
                    n_head,
                    n_kv,
                    head_dim: hd,
                    offset,
                    seq,
                    order,
                };
                let q = &q[offset * n_head * hd..(offset + seq) * n_head * hd];
                let mut got = vec![0f32; seq * n_head * hd];
                attend_into(&pool, q, &kv16, shape, &mut got);
                assert_eq!(
                    got,
                    attend_widening(q, &kv16, shape),
                    "f16 {order:?} {offset}+{seq}"
                );
                attend_into(&pool, q, &kv32, shape, &mut got);
                assert_eq!(
                    got,
                    attend_widening(q, &kv32, shape),
                    "f32 {order:?} {offset}+{seq}"
                );
            }
        }
    }

    /// Attention computed naively in f64 on the same (f16-rounded) inputs.
    fn naive(q: &[f32], kv: &KvRows<f16>, s: AttentionShape) -> Vec<f32> {
        let hd = s.head_dim;
        let mut out = vec![0f32; s.seq * s.n_head * hd];
        for t in 0..s.seq {
            for h in 0..s.n_head {
                let g = h / (s.n_head / s.n_kv);
                let qv = &q[(t * s.n_head + h) * hd..][..hd];
                let n = s.offset + t + 1;
                let scores: Vec<f64> = (0..n)
                    .map(|j| {
                        let k = kv.key(j, g);
                        k.iter()
                            .zip(qv)
                            .map(|(a, b)| f64::from(a.to_f32()) * f64::from(*b))
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for d in 0..hd {
                    let v: f64 = (0..n)
                        .map(|j| {
                            (scores[j] - max).exp() / total * f64::from(kv.value(j, g, d).to_f32())
                        })
                        .sum();
                    out[(t * s.n_head + h) * hd + d] = v as f32;
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_a_naive_computation_for_prompts_and_single_tokens() {
        // Head sizes that are not multiples of 8 (12, 6, 92) take the portable paths, whose
        // dot products must not drop the last elements.
        for hd in [16, 12, 6, 92] {
            attention_matches_a_naive_computation(hd);
        }
    }

    fn attention_matches_a_naive_computation(hd: usize) {
        let (n_head, n_kv, total) = (4, 2, 21);
        let row = n_kv * hd;
        let k: Vec<f32> = (0..total * row)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) / 9.0)
            .collect();
        let v: Vec<f32> = (0..total * row)
            .map(|i| ((i * 11 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let q: Vec<f32> = (0..total * n_head * hd)
            .map(|i| ((i * 5 % 19) as f32 - 9.0) / 5.0)
            .collect();
        let mut kv = KvRows::<f16>::default();
        kv.append(0, n_kv, hd, &k, &v);
        for (offset, seq) in [(0, total), (total - 1, 1)] {
            let shape = AttentionShape {
                n_head,
                n_kv,
                head_dim: hd,
                offset,
                seq,
                order: SumOrder::LlamaCpp,
            };
            let q = &q[offset * n_head * hd..(offset + seq) * n_head * hd];
            let got = attend(q, &kv, shape);
            let want = naive(q, &kv, shape);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() < 2e-2,
                    "head size {hd}, offset {offset}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn append_truncates_back_to_a_prefix() {
        let mut kv = KvRows::<f32>::default();
        kv.append(0, 1, 2, &[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0, 7.0, 8.0]);
        kv.append(1, 1, 2, &[9.0, 10.0], &[11.0, 12.0]);
        assert_eq!(kv.keys_position_major(9), vec![1.0, 2.0, 9.0, 10.0]);
        assert_eq!(kv.values_position_major(9), vec![5.0, 6.0, 11.0, 12.0]);
    }
}
