//! AVX2 attention kernels: the softmax, and the prompt (tiled) path. They round exactly as the
//! portable code of the parent module does. The prompt path sums (llama.cpp's tiled-sgemm order: 8 lanes per dot product, then its
//! horizontal sum), only faster:
//! - positions are taken in chunks whose widened keys (or transposed values) stay in L2, and
//!   each group of 4 query heads goes over a chunk with its accumulators in registers: 4 heads
//!   × 2 positions of scores, or 4 heads × 2 value indices of weighted sums. The portable loops
//!   go position by position over every head of the task, whose queries and accumulators do
//!   not fit in L1, so they wait on L2 for most loads;
//! - value rows are transposed in blocks of 8 positions, so the 8 lanes of one register are
//!   the 8 positions llama.cpp sums in lanes.
//!
//! This path is what makes a few new tokens after thousands of cached ones (continuing a long
//! conversation) cost little more than their matmuls.

use std::arch::x86_64::*;

use super::{
    AttentionShape, KvRows, KvValue, LANES, PREFETCH_AHEAD, Scratch, expf, first_head_seeing,
    prefetch, visible_to,
};
use crate::engine::cpu::pool::SharedMut;

/// Positions taken together: their widened keys or transposed values (`CHUNK × head size` f32,
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
    let (hd, n_kv) = (shape.head_dim, shape.n_kv);
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
            prefetch(&kv.k, (j + PREFETCH_AHEAD) * n_kv + g, hd);
            T::widen(&kv.k[(j * n_kv + g) * hd..][..hd], row);
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
        for b in 0..blocks {
            transpose_values(kv, shape, g, start + b * LANES, visible_max, scratch, b);
        }
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

/// Where value index `d` of block `b` of a chunk lies in `scratch.block`: the two indices of a
/// pair sit side by side, and a pair's blocks one after another, so a pass over the chunk for
/// one pair reads consecutive memory.
#[inline(always)]
fn block_at(d: usize, b: usize) -> usize {
    ((d / 2 * BLOCKS + b) * 2 + d % 2) * LANES
}

/// Value rows of positions `from..from + 8` (zero past `visible_max`), widened and transposed
/// into block `b` of `scratch.block` (see [`block_at`]).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn transpose_values<T: KvValue>(
    kv: &KvRows<T>,
    shape: AttentionShape,
    g: usize,
    from: usize,
    visible_max: usize,
    scratch: &mut Scratch,
    b: usize,
) {
    let (hd, n_kv) = (shape.head_dim, shape.n_kv);
    let rows = &mut scratch.row[..LANES * hd];
    for (l, row) in rows.chunks_exact_mut(hd).enumerate() {
        let j = from + l;
        if j < visible_max {
            prefetch(&kv.v, (j + PREFETCH_AHEAD) * n_kv + g, hd);
            T::widen(&kv.v[(j * n_kv + g) * hd..][..hd], row);
        } else {
            row.fill(0.0);
        }
    }
    let block = &mut scratch.block;
    for d in (0..hd).step_by(LANES) {
        let mut r = [_mm256_setzero_ps(); LANES];
        for (l, x) in r.iter_mut().enumerate() {
            // SAFETY: row `l` has `hd` values; `d + 8 <= hd`.
            *x = unsafe { _mm256_loadu_ps(rows.as_ptr().add(l * hd + d)) };
        }
        for (x, column) in transpose8(r).into_iter().enumerate() {
            let at = block_at(d + x, b);
            // SAFETY: `at + 8 <= CHUNK × hd`, the block buffer's size.
            unsafe { _mm256_storeu_ps(block[at..at + LANES].as_mut_ptr(), column) };
        }
    }
}

/// Transposes 8 registers of 8 lanes (row `l`, lane `x` becomes row `x`, lane `l`).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// Adds the chunk of positions from `start` (`blocks` blocks of 8, transposed in
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
