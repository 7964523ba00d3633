//! Dot products of Q2_K weight rows with Q8_K activations, as llama.cpp computes them on x86
//! without AVX-512 (it repacks Q2_K only on AVX-512 machines).
//!
//! Batches: as for Q6_K ([`super::q6k`]), llama.cpp takes its AVX2 `ggml_vec_dot_q2_K_q8_K`
//! ([`dot_q2k_q8k`]) for 1 to 7 tokens: per block, 8 lanes of the minimums' products
//! fused-multiply-added with `−d_x · dmin_w`, then 8 lanes of sub-block-scaled sums of 4
//! products with `d_x · d_w`, and the horizontal sum at the end. From 8 tokens on it takes its
//! tiled K-quant matmul ([`dot_q2k_q8k_tiled`], [`super::tiled_kquant`]).
//!
//! Before these kernels, Q2_K went through candle's `vec_dot` one output at a time. SmolLM3-3B
//! requantized to Q2_K (Q2_K, Q3_K, Q4_K, Q6_K; Zen 3, 2 threads, `smoldesk bench
//! --prompt-tokens 64 --gen-tokens 32`): prompt 16.6–17.7 tok/s with candle's, 21.7 with these
//! (llama.cpp 24.7–28.8); generation about as with candle's (11.5–14.5), llama.cpp 12.3–13.6.
//! With the activation blocks indexed in a plain loop and the scales widened by F16C (see
//! [`tiled_kquant::blocks_at`]), prompt 21.0–21.6 → 33.9 and generation 14.8–15.0 → 16.9–17.0
//! (llama.cpp 29.5 and 13.9 in the same run).

use super::SimdLevel;
use super::blocks::{BlockQ2K, BlockQ8K, QK_K};
use super::lanes::{self, LANES};
use super::tiled_kquant;

/// Dot product of a Q2_K weight row with Q8_K activations as llama.cpp's AVX2
/// `ggml_vec_dot_q2_K_q8_K` sums it (its path for batches of 1 to 7 tokens).
pub fn dot_q2k_q8k(level: SimdLevel, w: &[BlockQ2K], act: &[BlockQ8K]) -> f32 {
    debug_assert_eq!(w.len(), act.len());
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && lanes::avx2_available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        return unsafe { avx2::dot(w, act) };
    }
    let _ = level;
    let mut acc = [0f32; LANES];
    for (x, y) in w.iter().zip(act) {
        let (lanes, min_lanes) = block_sums(x, y);
        lanes::fma_lanes(&mut acc, -y.d * x.dmin.to_f32(), &min_lanes);
        lanes::fma_lanes(&mut acc, y.d * x.d.to_f32(), &lanes);
    }
    lanes::hsum_float_8(&acc)
}

/// Dot product of one Q2_K weight row with Q8_K activations summed as llama.cpp's tiled matmul
/// sums it (its path for batches of 8 tokens or more).
pub fn dot_q2k_q8k_tiled(level: SimdLevel, w: &[BlockQ2K], act: &[BlockQ8K]) -> f32 {
    let [dot] = dot_q2k_q8k_tiled_tokens(level, w, [act]);
    dot
}

/// `out[i]` = [`dot_q2k_q8k_tiled`] of `w` with `acts[i]`, bit for bit, each weight block
/// unpacked once for all `T` activation rows.
pub fn dot_q2k_q8k_tiled_tokens<const T: usize>(
    level: SimdLevel,
    w: &[BlockQ2K],
    acts: [&[BlockQ8K]; T],
) -> [f32; T] {
    debug_assert!(acts.iter().all(|a| a.len() == w.len()));
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && lanes::avx2_available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        return unsafe { avx2::dot_tiled_tokens(w, acts) };
    }
    let _ = level;
    acts.map(|act| {
        w.iter().zip(act).fold(0f32, |acc, (x, y)| {
            let (lanes, min_lanes) = block_sums(x, y);
            let (sum, mins) = (lanes.iter().sum(), min_lanes.iter().sum());
            let (d, dmin) = (x.d.to_f32(), x.dmin.to_f32());
            tiled_kquant::step_with_min(acc, d, dmin, sum, mins, y.d)
        })
    })
}

/// The 2-bit value of element `e` of a block's `qs` (Q2_K's layout, and Q3_K's low bits):
/// bits `2c` of byte `32h + p` for `e = 128h + 32c + p`.
pub fn low_bits(qs: &[u8; QK_K / 4], e: usize) -> u8 {
    let (half, chunk, p) = (e / 128, (e / 32) % 4, e % 32);
    (qs[32 * half + p] >> (2 * chunk)) & 3
}

/// The AVX2 kernels' lanes for one block: lane `l` is the sum over the 8 chunks of 32 values
/// of the sub-block scale times the products `4l .. 4l + 4` of the chunk (sub-block `2k` for
/// lanes 0-3 of chunk `k`, `2k + 1` for lanes 4-7), given each value's factor; all exact.
pub fn scaled_quad_lanes(
    scales: &[i32; 16],
    value: impl Fn(usize) -> i32,
    y: &BlockQ8K,
) -> [i32; LANES] {
    let mut sums = [0i32; LANES];
    for chunk in 0..QK_K / 32 {
        for (lane, sum) in sums.iter_mut().enumerate() {
            let scale = scales[2 * chunk + lane / 4];
            let quad: i32 = (0..4)
                .map(|i| 32 * chunk + 4 * lane + i)
                .map(|e| value(e) * i32::from(y.qs[e]))
                .sum();
            *sum += scale * quad;
        }
    }
    sums
}

/// For one block, the AVX2 kernel's 8 lanes of scaled sums ([`scaled_quad_lanes`]) and its 8
/// lanes of minimums' products (`min[2l] · bsums[2l] + min[2l + 1] · bsums[2l + 1]`).
fn block_sums(x: &BlockQ2K, y: &BlockQ8K) -> ([i32; LANES], [i32; LANES]) {
    let scales = x.scales.map(|s| i32::from(s & 0x0F));
    let lanes = scaled_quad_lanes(&scales, |e| i32::from(low_bits(&x.qs, e)), y);
    let mins: [i32; LANES] = std::array::from_fn(|l| {
        let min = |s: usize| i32::from(x.scales[s] >> 4) * i32::from(y.bsums[s]);
        min(2 * l) + min(2 * l + 1)
    });
    (lanes, mins)
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use std::arch::x86_64::*;

    use super::super::blocks::{BlockQ2K, BlockQ8K, QK_K};
    use super::super::lanes::avx2::{hsum_float_8, prefetch_ahead, widen_f16_pair};
    use super::super::tiled_kquant::{avx2::accumulate_block_with_min, blocks_at};

    /// The 16 sub-block scales as i16, those of half `h` (sub-blocks `8h .. 8h + 8`) in both
    /// 128-bit lanes of element `h`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn half_scales(scales: __m256i) -> [__m256i; 2] {
        [
            _mm256_permute2x128_si256::<0x00>(scales, scales),
            _mm256_permute2x128_si256::<0x11>(scales, scales),
        ]
    }

    /// For chunk `c` (32 values) of a half: sub-block `2c`'s scale in the i16 lanes of the low
    /// 128 bits, `2c + 1`'s in the high ones (llama.cpp's `get_scale_shuffle_q3k`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn scale_of(half: __m256i, c: usize) -> __m256i {
        let pick = |s: usize| _mm_set1_epi16((2 * s as i16) | ((2 * s as i16 + 1) << 8));
        _mm256_shuffle_epi8(half, _mm256_setr_m128i(pick(2 * c), pick(2 * c + 1)))
    }

    /// The 2-bit values of half `h` (128 values) of `qs`, one register per chunk of 32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn low_bits(qs: &[u8; QK_K / 4], h: usize) -> [__m256i; 4] {
        let three = _mm256_set1_epi8(3);
        let chunk: &[u8] = &qs[32 * h..][..32];
        // SAFETY: reads exactly the 32 bytes of `chunk`.
        let bits = unsafe { _mm256_loadu_si256(chunk.as_ptr().cast()) };
        [
            _mm256_and_si256(bits, three),
            _mm256_and_si256(_mm256_srli_epi16::<2>(bits), three),
            _mm256_and_si256(_mm256_srli_epi16::<4>(bits), three),
            _mm256_and_si256(_mm256_srli_epi16::<6>(bits), three),
        ]
    }

    /// Activation values `32k .. 32k + 32` of `y`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn q8_chunk(y: &BlockQ8K, k: usize) -> __m256i {
        let chunk: &[i8] = &y.qs[32 * k..][..32];
        // SAFETY: reads exactly the 32 bytes of `chunk`.
        unsafe { _mm256_loadu_si256(chunk.as_ptr().cast()) }
    }

    /// The sub-block scales and minimums of a block, as i16.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn scales_and_mins(x: &BlockQ2K) -> ([__m256i; 2], __m256i) {
        // SAFETY: reads exactly the 16 bytes of `scales`.
        let packed = unsafe { _mm_loadu_si128(x.scales.as_ptr().cast()) };
        let nibble = _mm_set1_epi8(0x0F);
        let scales = _mm256_cvtepu8_epi16(_mm_and_si128(packed, nibble));
        let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(packed), nibble));
        (half_scales(scales), mins)
    }

    /// For each of `ys`: [`super::block_sums`]'s 8 lanes of scaled sums and of minimums'
    /// products, the weight block unpacked once.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn block_sums<const T: usize>(
        x: &BlockQ2K,
        ys: [&BlockQ8K; T],
    ) -> ([__m256i; T], [__m256i; T]) {
        let (scales, mins) = scales_and_mins(x);
        let mut lanes = [_mm256_setzero_si256(); T];
        for (h, half) in scales.into_iter().enumerate() {
            let values = low_bits(&x.qs, h);
            for (c, values) in values.into_iter().enumerate() {
                let scale = scale_of(half, c);
                for (lanes, y) in lanes.iter_mut().zip(&ys) {
                    let products = _mm256_maddubs_epi16(values, q8_chunk(y, 4 * h + c));
                    *lanes = _mm256_add_epi32(*lanes, _mm256_madd_epi16(scale, products));
                }
            }
        }
        let mut min_lanes = [_mm256_setzero_si256(); T];
        for (min_lanes, y) in min_lanes.iter_mut().zip(ys) {
            // SAFETY: reads exactly the 32 bytes of `bsums`.
            let bsums = unsafe { _mm256_loadu_si256(y.bsums.as_ptr().cast()) };
            *min_lanes = _mm256_madd_epi16(mins, bsums);
        }
        (lanes, min_lanes)
    }

    /// `ggml_vec_dot_q2_K_q8_K`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn dot(w: &[BlockQ2K], act: &[BlockQ8K]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (x, y) in w.iter().zip(act) {
            prefetch_ahead(x);
            let ([lanes], [min_lanes]) = block_sums(x, [y]);
            let (d, dmin) = widen_f16_pair(x.d, x.dmin);
            let dmin = _mm256_set1_ps(-y.d * dmin);
            acc = _mm256_fmadd_ps(dmin, _mm256_cvtepi32_ps(min_lanes), acc);
            let d = _mm256_set1_ps(y.d * d);
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes), acc);
        }
        hsum_float_8(acc)
    }

    /// [`super::dot_q2k_q8k_tiled_tokens`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn dot_tiled_tokens<const T: usize>(w: &[BlockQ2K], acts: [&[BlockQ8K]; T]) -> [f32; T] {
        let mut acc = [0f32; T];
        for (b, x) in w.iter().enumerate() {
            let (lanes, min_lanes) = block_sums(x, blocks_at(&acts, b));
            let mut mins = [_mm_setzero_si128(); T];
            for (four, v) in mins.iter_mut().zip(min_lanes) {
                *four = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
            }
            let scales = widen_f16_pair(x.d, x.dmin);
            accumulate_block_with_min(&mut acc, lanes, mins, scales, &acts, b);
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::lanes::test_data::Rng;
    use crate::engine::cpu::tiled_kquant::test_support::{Kernels, check_random_rows};
    use half::f16;

    fn random_blocks(rng: &mut Rng, n: usize) -> Vec<BlockQ2K> {
        (0..n)
            .map(|_| BlockQ2K {
                scales: std::array::from_fn(|_| rng.next_u64() as u8),
                qs: std::array::from_fn(|_| rng.next_u64() as u8),
                d: f16::from_f32(rng.uniform() * 0.01),
                dmin: f16::from_f32(rng.uniform() * 0.01),
            })
            .collect()
    }

    /// The plain sum `Σ (d·scale·q − dmin·min)·y` of a row, in f64, and the sum of the terms'
    /// magnitudes (the scale of the rounding error).
    fn reference(w: &[BlockQ2K], act: &[BlockQ8K]) -> (f64, f64) {
        let (mut total, mut magnitude) = (0f64, 0f64);
        for (x, y) in w.iter().zip(act) {
            let (d, dmin) = (f64::from(x.d.to_f32()), f64::from(x.dmin.to_f32()));
            for e in 0..QK_K {
                let sub = x.scales[e / 16];
                let q = f64::from(low_bits(&x.qs, e));
                let value = d * f64::from(sub & 0x0F) * q - dmin * f64::from(sub >> 4);
                let term = value * f64::from(y.d) * f64::from(y.qs[e]);
                total += term;
                magnitude += term.abs();
            }
        }
        (total, magnitude)
    }

    #[test]
    fn portable_and_avx2_agree_to_the_bit_in_both_orders() {
        let kernels = Kernels {
            dot: dot_q2k_q8k,
            tiled: dot_q2k_q8k_tiled,
            three: dot_q2k_q8k_tiled_tokens::<3>,
            four: dot_q2k_q8k_tiled_tokens::<4>,
            eight: dot_q2k_q8k_tiled_tokens::<8>,
        };
        check_random_rows(
            &kernels,
            &mut Rng(71),
            &[1, 2, 6, 43],
            random_blocks,
            Some(reference),
        );
    }

    #[test]
    fn low_bits_follow_the_chunk_layout() {
        let mut qs = [0u8; QK_K / 4];
        qs[33] = 0b10_01_11_00; // half 1, position 1: chunks 0..4 hold 0, 3, 1, 2
        let got: Vec<u8> = (0..4).map(|c| low_bits(&qs, 128 + 32 * c + 1)).collect();
        assert_eq!(got, [0, 3, 1, 2]);
        assert_eq!(low_bits(&qs, 1), 0);
    }
}
