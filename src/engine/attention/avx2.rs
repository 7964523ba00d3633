//! AVX2 attention kernels: the softmax, the prompt (tiled) path and the single-token path. They
//! round exactly as the portable code of the parent module does. The prompt path sums
//! (llama.cpp's tiled-sgemm order: 8 lanes per dot product, then its horizontal sum), only
//! faster:
//! - positions are taken in chunks whose widened keys (or values) stay in L2, and
//!   each group of 4 query heads goes over a chunk with its accumulators in registers: 4 heads
//!   × 2 positions of scores, or 4 heads × 2 value indices of weighted sums. The portable loops
//!   go position by position over every head of the task, whose queries and accumulators do
//!   not fit in L1, so they wait on L2 for most loads;
//! - the cache holds each value element's positions side by side, so the 8 lanes of one
//!   register are the 8 positions llama.cpp sums in lanes.
//!
//! This path is what makes a few new tokens after thousands of cached ones (continuing a long
//! conversation) cost little more than their matmuls.

use std::arch::x86_64::*;

use super::{
    AttentionShape, BLOCK, KvRows, KvValue, LANES, PREFETCH_AHEAD, Scratch, expf,
    first_head_seeing, prefetch, visible_to,
};
use crate::engine::cpu::pool::SharedMut;

/// Positions taken together: their widened keys or values (`CHUNK × head size` f32,
/// 64 KB for SmolLM3) stay in L2 while every head of the task goes over them.
const CHUNK: usize = 128;
/// Blocks of 8 positions in a chunk.
const BLOCKS: usize = CHUNK / LANES;
/// Query heads whose accumulators are held in registers together.
const HEADS: usize = 4;

/// `a · b + c` as the portable loop rounds it: fused when a product of two cache values is
/// exact in f32 (f16), separately otherwise.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn madd<T: KvValue>(a: __m256, b: __m256, c: __m256) -> __m256 {
    if T::EXACT_PRODUCTS {
        _mm256_fmadd_ps(a, b, c)
    } else {
        _mm256_add_ps(_mm256_mul_ps(a, b), c)
    }
}

/// llama.cpp's horizontal sum of 8 lanes, as [`super::hsum`]: high half plus low half, then
/// `(l0 + l2) + (l1 + l3)`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let a = _mm_add_ps(_mm256_extractf128_ps::<1>(v), _mm256_castps256_ps128(v));
    let t = _mm_add_ps(a, _mm_movehl_ps(a, a));
    _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)))
}

/// Scaled scores `scratch.weights[i * stride + j]` of every (head `i` of the task, position `j`)
/// pair where the head sees the position. Positions past a head's view inside its last group
/// may get a score too: the caller zeroes each row past its view after the softmax.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `shape.head_dim` is a multiple of 8;
/// `scratch.queries` holds the task's queries and `scratch.weights` `heads × stride` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn scores<T: KvValue>(
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
    assert!(hd.is_multiple_of(LANES) && stride >= visible_max);
    assert!(scratch.weights.len() >= heads * stride);
    let scale = 1.0f32 / (hd as f32).sqrt();
    scratch.row.resize(CHUNK * hd, 0.0);
    for start in (0..visible_max).step_by(CHUNK) {
        let len = (visible_max - start).min(CHUNK);
        for (l, row) in scratch.row[..len * hd].chunks_exact_mut(hd).enumerate() {
            let j = start + l;
            prefetch(kv.key_if_stored(j + PREFETCH_AHEAD, g));
            T::widen(kv.key(j, g), row);
        }
        let mut i = first_head_seeing(start, shape, first);
        while i < heads {
            let r = (heads - i).min(HEADS);
            let end = visible_to(i + r - 1, shape, first).min(start + len);
            let mut j = start;
            while j < end {
                let p = (end - j).min(2);
                // SAFETY: heads `i..i + r` and positions `j..j + p` (widened at `j - start`)
                // exist; their weights lie inside `heads × stride`.
                unsafe {
                    match (r, p) {
                        (4, 2) => score_block::<T, 4, 2>(scratch, hd, i, j, start, stride, scale),
                        (4, _) => score_block::<T, 4, 1>(scratch, hd, i, j, start, stride, scale),
                        (2 | 3, 2) => {
                            score_block::<T, 2, 2>(scratch, hd, i, j, start, stride, scale);
                            if r == 3 {
                                score_block::<T, 1, 2>(scratch, hd, i + 2, j, start, stride, scale);
                            }
                        }
                        (2 | 3, _) => {
                            score_block::<T, 2, 1>(scratch, hd, i, j, start, stride, scale);
                            if r == 3 {
                                score_block::<T, 1, 1>(scratch, hd, i + 2, j, start, stride, scale);
                            }
                        }
                        (_, 2) => score_block::<T, 1, 2>(scratch, hd, i, j, start, stride, scale),
                        _ => score_block::<T, 1, 1>(scratch, hd, i, j, start, stride, scale),
                    }
                }
                j += p;
            }
            i += r;
        }
    }
}

/// The scores of heads `i..i + R` against the keys of positions `j..j + P` (widened in
/// `scratch.row` from position `start`).
///
/// # Safety
/// AVX2 and FMA; the heads and positions exist (see [`scores`]).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn score_block<T: KvValue, const R: usize, const P: usize>(
    scratch: &mut Scratch,
    hd: usize,
    i: usize,
    j: usize,
    start: usize,
    stride: usize,
    scale: f32,
) {
    let keys = scratch.row[(j - start) * hd..(j - start + P) * hd].as_ptr();
    let queries = scratch.queries[i * hd..(i + R) * hd].as_ptr();
    let mut acc = [[_mm256_setzero_ps(); P]; R];
    for c in (0..hd).step_by(LANES) {
        // SAFETY: every load reads 8 values inside the P key rows or the R query rows.
        unsafe {
            let mut k = [_mm256_setzero_ps(); P];
            for (p, k) in k.iter_mut().enumerate() {
                *k = _mm256_loadu_ps(keys.add(p * hd + c));
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let q = _mm256_loadu_ps(queries.add(r * hd + c));
                for (a, &k) in a.iter_mut().zip(&k) {
                    *a = madd::<T>(k, q, *a);
                }
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (p, &a) in a.iter().enumerate() {
            scratch.weights[(i + r) * stride + j + p] = hsum(a) * scale;
        }
    }
}

/// The output of every head of the task, `Σ_j weights[i][j] · value_j`, written to its place in
/// `out`. Weights of positions a head does not see must be zero (as must the padding up to
/// `stride`): blocks of 8 positions are summed whole, and adding `0 · v` to an accumulator
/// that started at +0 changes none of its bits.
///
/// # Safety
/// As [`scores`], after the weights hold probabilities.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn weighted_sums<T: KvValue>(
    kv: &KvRows<T>,
    shape: AttentionShape,
    g: usize,
    first: usize,
    scratch: &mut Scratch,
    stride: usize,
    out: SharedMut<'_, f32>,
) {
    let (hd, n_kv, n_head) = (shape.head_dim, shape.n_kv, shape.n_head);
    let n_rep = n_head / n_kv;
    let heads = scratch.queries.len() / hd;
    let visible_max = visible_to(heads - 1, shape, first);
    assert!(hd.is_multiple_of(LANES) && stride >= visible_max.next_multiple_of(LANES));
    assert!(scratch.weights.len() >= heads * stride);
    // One register of 8 lanes (8 positions) per (head, value index).
    scratch.acc.clear();
    scratch.acc.resize(heads * hd * LANES, 0.0);
    scratch.row.resize(LANES * hd, 0.0);
    scratch.block.resize(CHUNK * hd, 0.0);
    for start in (0..visible_max).step_by(CHUNK) {
        let blocks = (visible_max - start).min(CHUNK).div_ceil(LANES);
        // SAFETY: AVX2; the chunk's blocks of 8 positions lie in the cache's stored blocks.
        unsafe { widen_values(kv, hd, g, start, blocks, scratch) };
        let mut i = first_head_seeing(start, shape, first);
        while i < heads {
            let r = (heads - i).min(HEADS);
            // SAFETY: heads `i..i + r` exist; the asserts above bound every access.
            unsafe {
                match r {
                    4 => sum_heads::<T, 4>(scratch, hd, i, start, blocks, stride),
                    3 => sum_heads::<T, 3>(scratch, hd, i, start, blocks, stride),
                    2 => sum_heads::<T, 2>(scratch, hd, i, start, blocks, stride),
                    _ => sum_heads::<T, 1>(scratch, hd, i, start, blocks, stride),
                }
            }
            i += r;
        }
    }
    for (i, acc) in scratch.acc.chunks_exact(hd * LANES).enumerate() {
        let (t, r) = (first + i / n_rep, i % n_rep);
        let h = g * n_rep + r;
        // SAFETY: each (token, head) output belongs to exactly one task.
        let head_out = unsafe { out.range_mut((t * n_head + h) * hd..(t * n_head + h + 1) * hd) };
        for (o, lanes) in head_out.iter_mut().zip(acc.chunks_exact(LANES)) {
            // SAFETY: `lanes` holds 8 values.
            *o = hsum(unsafe { _mm256_loadu_ps(lanes.as_ptr()) });
        }
    }
}

/// [`weighted_sums`] for a single query token, in `ggml_vec_dot_f16`'s order: position `j`
/// goes to accumulator `j % 32` (register `j / 8 % 4`, lane `j % 8` of the cache's value lanes),
/// and the 4 registers of each output are combined as `GGML_F32x8_REDUCE` does. Decode
/// attention after thousands of tokens spent most of its time in the portable version, whose
/// 32 accumulators per output (64 KB per task) live in L2 and are loaded and stored for every
/// position.
///
/// # Safety
/// As [`scores`], after the weights hold probabilities; the task has one query token and
/// `shape.head_dim` is a multiple of 8.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn weighted_sums_vec<T: KvValue>(
    kv: &KvRows<T>,
    shape: AttentionShape,
    g: usize,
    scratch: &mut Scratch,
    stride: usize,
    out: SharedMut<'_, f32>,
) {
    let (hd, n_head) = (shape.head_dim, shape.n_head);
    let heads = scratch.queries.len() / hd;
    let visible = visible_to(heads - 1, shape, 0);
    assert!(hd.is_multiple_of(LANES) && stride >= visible.next_multiple_of(LANES));
    assert!(scratch.weights.len() >= heads * stride && heads == n_head / shape.n_kv);
    // Accumulators go through memory only between blocks of the cache: a context of one block
    // keeps them in registers from the first position to the output.
    if visible > BLOCK {
        scratch.acc.clear();
        scratch.acc.resize(heads * hd * VEC_LANES, 0.0);
    }
    // A block of the cache at a time: each value element's positions are one contiguous run.
    for start in (0..visible).step_by(BLOCK) {
        let blocks = (visible - start).min(BLOCK).div_ceil(LANES);
        let span = Span {
            start,
            blocks,
            first: start == 0,
            last: start + BLOCK >= visible,
        };
        let mut i = 0;
        while i < heads {
            // Three heads' accumulators fill 12 registers; four would spill.
            let r = if heads - i == 4 {
                2
            } else {
                (heads - i).min(3)
            };
            // SAFETY: heads `i..i + r` exist; the asserts above bound every access; the
            // blocks of 8 positions lie in the cache's stored blocks; the accumulators were
            // sized above when there is more than one block.
            unsafe {
                match r {
                    3 => sum_heads_vec::<T, 3>(kv, scratch, hd, g, i, span, stride, out),
                    2 => sum_heads_vec::<T, 2>(kv, scratch, hd, g, i, span, stride, out),
                    _ => sum_heads_vec::<T, 1>(kv, scratch, hd, g, i, span, stride, out),
                }
            }
            i += r;
        }
    }
}

/// The positions [`sum_heads_vec`] adds: `blocks` blocks of 8 from `start`, inside one block of
/// the cache, and whether that cache block is the first and the last one the heads see.
#[derive(Clone, Copy)]
struct Span {
    start: usize,
    blocks: usize,
    first: bool,
    last: bool,
}

/// Accumulators of one output in the single-token order: 4 registers of 8 lanes.
const VEC_LANES: usize = 4 * LANES;

/// `GGML_F32x8_REDUCE`: `(r0 + r2) + (r1 + r3)`, then the high half plus the low half, then
/// two horizontal adds (as [`super::reduce_accumulators`]).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn reduce_registers([r0, r1, r2, r3]: [__m256; 4]) -> f32 {
    reduce_folded(_mm256_add_ps(_mm256_add_ps(r0, r2), _mm256_add_ps(r1, r3)))
}

/// [`reduce_registers`] after its first step, `a01 = (r0 + r2) + (r1 + r3)`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn reduce_folded(a01: __m256) -> f32 {
    let t0 = _mm_add_ps(_mm256_castps256_ps128(a01), _mm256_extractf128_ps::<1>(a01));
    let t1 = _mm_hadd_ps(t0, t0);
    _mm_cvtss_f32(_mm_hadd_ps(t1, t1))
}

/// Scaled scores of a single query token's heads (the task's `scratch.queries`) against every
/// key they see, into `scratch.weights[i * stride + j]`, each a dot product in
/// `ggml_vec_dot_f16`'s order (as [`super::dot_vec`]: 4 accumulators of 8 lanes over steps of
/// 32, fused multiply-adds). Two heads go over each key together, their 8 accumulators in
/// registers; the portable loop widened each key to memory and reduced one head at a time.
///
/// # Safety
/// AVX2, FMA and F16C; `shape.head_dim` is a multiple of 32; `scratch.queries` holds the
/// task's queries (one token) and `scratch.weights` `heads × stride` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn scores_vec<T: KvValue>(
    kv: &KvRows<T>,
    shape: AttentionShape,
    g: usize,
    scratch: &mut Scratch,
    stride: usize,
) {
    let hd = shape.head_dim;
    let heads = scratch.queries.len() / hd;
    let visible = visible_to(heads - 1, shape, 0);
    assert!(hd.is_multiple_of(VEC_LANES) && stride >= visible);
    assert!(scratch.weights.len() >= heads * stride && heads == shape.n_head / shape.n_kv);
    let scale = 1.0f32 / (hd as f32).sqrt();
    let queries = scratch.queries.as_ptr();
    let weights = scratch.weights.as_mut_ptr();
    for j in 0..visible {
        prefetch(kv.key_if_stored(j + PREFETCH_AHEAD, g));
        let key = kv.key(j, g).as_ptr();
        if heads == 4 {
            // SAFETY: the key has `hd` values, the 4 heads `hd` query values each, and their
            // weights of position `j` lie inside `heads × stride`.
            unsafe { score_vec4::<T>(key, queries, hd, weights.add(j), stride, scale) };
            continue;
        }
        let mut i = 0;
        while i < heads {
            let r = (heads - i).min(2);
            // SAFETY: the key has `hd` values, heads `i..i + r` have `hd` query values each,
            // and their weights of position `j` lie inside `heads × stride`.
            unsafe {
                let (q, w) = (queries.add(i * hd), weights.add(i * stride + j));
                if r == 2 {
                    score_vec::<T, 2>(key, q, hd, w, stride, scale);
                } else {
                    score_vec::<T, 1>(key, q, hd, w, stride, scale);
                }
            }
            i += r;
        }
    }
}

/// The scaled dot products of one key (`hd` values at `key`) with `R` queries (`hd` values
/// each from `queries`), written `stride` apart from `out`.
///
/// # Safety
/// AVX2, FMA and F16C; the pointers cover what is read and written; `hd` a multiple of 32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn score_vec<T: KvValue, const R: usize>(
    key: *const T,
    queries: *const f32,
    hd: usize,
    out: *mut f32,
    stride: usize,
    scale: f32,
) {
    let mut acc = [[_mm256_setzero_ps(); 4]; R];
    for step in (0..hd).step_by(VEC_LANES) {
        // SAFETY: `step + 32 <= hd` for the key and every query.
        unsafe {
            let k: [__m256; 4] = std::array::from_fn(|a| load8::<T>(key.add(step + a * LANES)));
            for (r, acc) in acc.iter_mut().enumerate() {
                for (a, acc) in acc.iter_mut().enumerate() {
                    let q = _mm256_loadu_ps(queries.add(r * hd + step + a * LANES));
                    *acc = _mm256_fmadd_ps(k[a], q, *acc);
                }
            }
        }
    }
    for (r, &acc) in acc.iter().enumerate() {
        // SAFETY: the caller gives room for `R` outputs `stride` apart.
        unsafe { *out.add(r * stride) = reduce_registers(acc) * scale };
    }
}

/// [`score_vec`] for 4 queries (SmolLM3's heads per KV head), each key value widened once for
/// all of them: two heads at a time widened each key twice (5% of the decode attention's time
/// at 2,048 positions). Their 16 accumulators would not fit in 16 registers, so one
/// accumulator index (`a` of `ggml_vec_dot_f16`'s 4) is summed at a time for the 4 heads, in
/// the order `reduce_registers` combines them: `(r0 + r2) + (r1 + r3)`.
///
/// # Safety
/// As [`score_vec`], with 4 queries.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn score_vec4<T: KvValue>(
    key: *const T,
    queries: *const f32,
    hd: usize,
    out: *mut f32,
    stride: usize,
    scale: f32,
) {
    // SAFETY: the caller's contract, with `a < 4`.
    let (r0, r2) = unsafe {
        (
            accumulator_of_4(key, queries, hd, 0),
            accumulator_of_4(key, queries, hd, 2),
        )
    };
    let r02: [__m256; 4] = std::array::from_fn(|h| _mm256_add_ps(r0[h], r2[h]));
    // SAFETY: as above.
    let (r1, r3) = unsafe {
        (
            accumulator_of_4(key, queries, hd, 1),
            accumulator_of_4(key, queries, hd, 3),
        )
    };
    for h in 0..4 {
        let folded = _mm256_add_ps(r02[h], _mm256_add_ps(r1[h], r3[h]));
        // SAFETY: the caller gives room for 4 outputs `stride` apart.
        unsafe { *out.add(h * stride) = reduce_folded(folded) * scale };
    }
}

/// Accumulator `a` of `ggml_vec_dot_f16` (lanes `8 a .. 8 a + 8` of every step of 32) for one
/// key (`hd` values at `key`) and each of 4 queries (`hd` values each from `queries`).
///
/// # Safety
/// AVX2, FMA and F16C; `key` points to `hd` values and `queries` to `4 × hd`; `hd` a multiple
/// of 32 and `a < 4`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn accumulator_of_4<T: KvValue>(
    key: *const T,
    queries: *const f32,
    hd: usize,
    a: usize,
) -> [__m256; 4] {
    let mut acc = [_mm256_setzero_ps(); 4];
    for step in (0..hd).step_by(VEC_LANES) {
        let at = step + a * LANES;
        // SAFETY: `at + 8 <= hd` for the key and the 4 queries (the caller's contract).
        unsafe {
            let k = load8::<T>(key.add(at));
            for (h, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(k, _mm256_loadu_ps(queries.add(h * hd + at)), *acc);
            }
        }
    }
    acc
}

/// Adds the positions of `span` (`start` a multiple of 32) into the single-token accumulators
/// of heads `i..i + R` of KV head `g`, block `b` into register `b % 4`, one value element at a
/// time. The accumulators start at zero on the first cache block and are loaded from
/// `scratch.acc` otherwise; after the last block they are reduced into the heads' outputs in
/// `out`, otherwise stored back.
///
/// # Safety
/// AVX2 and FMA; heads `i..i + R` exist; the blocks are stored; their weights lie inside each
/// head's `stride`; `scratch.acc` holds `heads × hd × 32` values unless the span is both first
/// and last.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn sum_heads_vec<T: KvValue, const R: usize>(
    kv: &KvRows<T>,
    scratch: &mut Scratch,
    hd: usize,
    g: usize,
    i: usize,
    span: Span,
    stride: usize,
    out: SharedMut<'_, f32>,
) {
    let Span {
        start,
        blocks,
        first,
        last,
    } = span;
    let heads = scratch.queries.len() / hd;
    debug_assert!(start.is_multiple_of(VEC_LANES));
    let weights = scratch.weights.as_ptr();
    let acc = scratch.acc.as_mut_ptr();
    for d in 0..hd {
        // The element's values of the `blocks` blocks of 8, one after another.
        let column = kv.value_lanes(start, g, d, blocks * LANES).as_ptr();
        // SAFETY: accumulators (i + r, d) lie inside `heads × hd × 32` when they are used;
        // weights `start + 8b .. + 8` inside each head's row (stride is padded to 8); the
        // element's values of the blocks inside the cache block that holds `start`.
        unsafe {
            let at = |r: usize| acc.add(((i + r) * hd + d) * VEC_LANES);
            let mut sums: [[__m256; 4]; R] = std::array::from_fn(|r| {
                std::array::from_fn(|k| {
                    if first {
                        _mm256_setzero_ps()
                    } else {
                        _mm256_loadu_ps(at(r).add(k * LANES))
                    }
                })
            });
            for b in (0..blocks).step_by(4) {
                // Unrolled by 4 so that each block's register is known at compile time.
                for k in 0..4 {
                    if b + k < blocks {
                        let v = load8::<T>(column.add((b + k) * LANES));
                        for (r, s) in sums.iter_mut().enumerate() {
                            let w = weights.add((i + r) * stride + start + (b + k) * LANES);
                            s[k] = madd::<T>(_mm256_loadu_ps(w), v, s[k]);
                        }
                    }
                }
            }
            for (r, &s) in sums.iter().enumerate() {
                if last {
                    // Each head's output belongs to exactly one task.
                    let h = g * heads + i + r;
                    out.range_mut(h * hd + d..h * hd + d + 1)[0] = reduce_registers(s);
                } else {
                    for (k, &s) in s.iter().enumerate() {
                        _mm256_storeu_ps(at(r).add(k * LANES), s);
                    }
                }
            }
        }
    }
}

/// 8 cache values at `p`, widened to f32.
///
/// # Safety
/// AVX2 and F16C; `p` points to 8 values.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8<T: KvValue>(p: *const T) -> __m256 {
    // SAFETY: the caller gives 8 values of `T` (2 or 4 bytes each, as `T::HALF` says).
    unsafe {
        if T::HALF {
            _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
        } else {
            _mm256_loadu_ps(p.cast())
        }
    }
}

/// Where value index `d` of block `b` of a chunk lies in `scratch.block`: the two indices of a
/// pair sit side by side, and a pair's blocks one after another, so a pass over the chunk for
/// one pair reads consecutive memory.
#[inline(always)]
fn block_at(d: usize, b: usize) -> usize {
    ((d / 2 * BLOCKS + b) * 2 + d % 2) * LANES
}

/// The values of head `g` at the `blocks` blocks of 8 positions from `start` (a multiple of 8,
/// inside one block of the cache, whose element-major layout has them side by side already),
/// widened into `scratch.block` (see [`block_at`]).
///
/// # Safety
/// AVX2 and F16C; the blocks are stored in the cache; `scratch.block` holds a chunk.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn widen_values<T: KvValue>(
    kv: &KvRows<T>,
    hd: usize,
    g: usize,
    start: usize,
    blocks: usize,
    scratch: &mut Scratch,
) {
    assert!(blocks <= BLOCKS && scratch.block.len() >= CHUNK * hd);
    let block = scratch.block.as_mut_ptr();
    for d in 0..hd {
        let column = kv.value_lanes(start, g, d, blocks * LANES).as_ptr();
        for b in 0..blocks {
            // SAFETY: the element's values of block `b` lie inside the cache block that
            // holds `start`; `block_at(d, b) + 8 <= CHUNK × hd`.
            unsafe {
                _mm256_storeu_ps(block.add(block_at(d, b)), load8::<T>(column.add(b * LANES)))
            };
        }
    }
}

/// Adds the chunk of positions from `start` (`blocks` blocks of 8, widened into
/// `scratch.block`) into the accumulators of heads `i..i + R`, two value indices at a time in
/// registers.
///
/// # Safety
/// AVX2 and FMA; heads `i..i + R` exist; the chunk's weights lie inside each head's `stride`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn sum_heads<T: KvValue, const R: usize>(
    scratch: &mut Scratch,
    hd: usize,
    i: usize,
    start: usize,
    blocks: usize,
    stride: usize,
) {
    let weights = scratch.weights.as_ptr();
    let block = scratch.block.as_ptr();
    let acc = scratch.acc.as_mut_ptr();
    for d in (0..hd).step_by(2) {
        // SAFETY: accumulators (i + r, d..d + 2) lie inside `heads × hd × 8`; weights
        // `start + 8b .. + 8` inside each head's row (stride is padded to 8); the pair's
        // blocks inside the chunk.
        unsafe {
            let mut sums = [[_mm256_setzero_ps(); 2]; R];
            for (r, s) in sums.iter_mut().enumerate() {
                let at = acc.add(((i + r) * hd + d) * LANES);
                *s = [_mm256_loadu_ps(at), _mm256_loadu_ps(at.add(LANES))];
            }
            let pair = block.add(block_at(d, 0));
            for b in 0..blocks {
                let v0 = _mm256_loadu_ps(pair.add(b * 2 * LANES));
                let v1 = _mm256_loadu_ps(pair.add((b * 2 + 1) * LANES));
                for (r, s) in sums.iter_mut().enumerate() {
                    let w = _mm256_loadu_ps(weights.add((i + r) * stride + start + b * LANES));
                    s[0] = madd::<T>(w, v0, s[0]);
                    s[1] = madd::<T>(w, v1, s[1]);
                }
            }
            for (r, s) in sums.iter().enumerate() {
                let at = acc.add(((i + r) * hd + d) * LANES);
                _mm256_storeu_ps(at, s[0]);
                _mm256_storeu_ps(at.add(LANES), s[1]);
            }
        }
    }
}

/// [`super::softmax`] in AVX2 registers: the same maximum, the same [`expf`] lanes
/// (`ggml_v_expf`, which the scalar one is one lane of), the same f64 sum of [`hsum`]s. The
/// compiler's version of the portable loop kept the sums and the maximum in scalar registers:
/// a fifth of prompt attention's time.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn softmax(x: &mut [f32]) {
    let whole = x.len() / LANES * LANES;
    let (body, tail) = x.split_at_mut(whole);
    // `max_ps(v, m)` returns `m` where `v` is NaN, as `f32::max` ignores NaN.
    let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
    for chunk in body.chunks_exact(LANES) {
        // SAFETY: the chunk holds 8 values.
        m = _mm256_max_ps(unsafe { _mm256_loadu_ps(chunk.as_ptr()) }, m);
    }
    let mut lanes = [0f32; LANES];
    // SAFETY: `lanes` holds 8 values.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
    let max = lanes
        .iter()
        .chain(tail.iter())
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    let maxv = _mm256_set1_ps(max);
    for chunk in body.chunks_exact_mut(LANES) {
        // SAFETY: the chunk holds 8 values.
        unsafe {
            let e = exp_lanes(_mm256_sub_ps(_mm256_loadu_ps(chunk.as_ptr()), maxv));
            _mm256_storeu_ps(chunk.as_mut_ptr(), e);
            sum += f64::from(hsum(e));
        }
    }
    if !tail.is_empty() {
        let mut lanes = [0f32; LANES];
        for (lane, v) in lanes.iter_mut().zip(tail.iter_mut()) {
            *v = expf(*v - max);
            *lane = *v;
        }
        // SAFETY: `lanes` holds 8 values.
        sum += f64::from(hsum(unsafe { _mm256_loadu_ps(lanes.as_ptr()) }));
    }
    let inv = _mm256_set1_ps((1.0 / sum) as f32);
    for chunk in body.chunks_exact_mut(LANES) {
        // SAFETY: the chunk holds 8 values.
        unsafe {
            _mm256_storeu_ps(
                chunk.as_mut_ptr(),
                _mm256_mul_ps(_mm256_loadu_ps(chunk.as_ptr()), inv),
            )
        };
    }
    let inv = (1.0 / sum) as f32;
    for v in tail {
        *v *= inv;
    }
}

/// [`expf`] of 8 lanes: llama.cpp's `ggml_v_expf` fast path, each lane through the scalar
/// function when any is out of its range (the scalar one is that function's lane).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn exp_lanes(x: __m256) -> __m256 {
    let c = |bits: u32| _mm256_set1_ps(f32::from_bits(bits));
    let r = c(0x4b40_0000);
    let z = _mm256_fmadd_ps(x, c(0x3fb8_aa3b), r);
    let n = _mm256_sub_ps(z, r);
    let b = _mm256_fnmadd_ps(n, c(0x35bf_be8e), _mm256_fnmadd_ps(n, c(0x3f31_7200), x));
    let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(z));
    let k = _mm256_castsi256_ps(_mm256_add_epi32(e, _mm256_set1_epi32(0x3f80_0000)));
    let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
    let out_of_range = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(126.0));
    if _mm256_movemask_ps(out_of_range) != 0 {
        let mut lanes = [0f32; LANES];
        // SAFETY: `lanes` holds 8 values.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), x) };
        for v in &mut lanes {
            *v = expf(*v);
        }
        // SAFETY: as above.
        return unsafe { _mm256_loadu_ps(lanes.as_ptr()) };
    }
    let u = _mm256_mul_ps(b, b);
    let j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(
            _mm256_fmadd_ps(c(0x3c07_2010), b, c(0x3d2b_9f17)),
            u,
            _mm256_fmadd_ps(c(0x3e2a_af33), b, c(0x3eff_fedb)),
        ),
        u,
        _mm256_mul_ps(c(0x3f7f_fff6), b),
    );
    _mm256_fmadd_ps(j, k, k)
}
