//! Dot products of Q5_K weight rows with Q8_K activations, as llama.cpp computes them on x86
//! (Q5_K is not repacked there).
//!
//! Batches: like Q6_K ([`super::q6k`]), llama.cpp takes its AVX2 `ggml_vec_dot_q5_K_q8_K`
//! ([`dot_q5k_q8k`]: 8 lanes of sub-block-scaled sums of 4 products, fused-multiply-added with
//! `d_x · d_w` per block, then the horizontal sum plus the minimums' term) for 1 to 7 tokens, and
//! its tiled K-quant matmul (`ggml-cpu/tiled/`) from 8 tokens on ([`dot_q5k_q8k_tiled`]: per
//! block the exact integer sum `s` and minimums' sum `m`, then `r = d_w · s`,
//! `r = fnmadd(dmin_w, m, r)`, `acc = fma(r, d_x, acc)`, blocks in order).
//!
//! Before these kernels, Q5_K went through candle's `vec_dot` one output at a time. SmolLM3-3B
//! requantized to Q5_K_M (Q5_K and Q6_K; Zen 3, 2 threads, `smoldesk bench --prompt-tokens 64
//! --gen-tokens 32`): prompt 13.3–13.9 tok/s with candle's, 25.6–27.8 with these (eight tokens
//! per pass); generation 10.2–10.7 and 11.3–11.9; llama.cpp 27.6 and 9.7. A prompt now takes
//! sixteen tokens per pass, each block unpacked once for all of them: 27.5–27.9 → 31.9–33.0
//! tok/s (llama.cpp 31.6 in the same run).

use super::SimdLevel;
use super::blocks::{BlockQ5K, BlockQ8K, QK_K};
use super::lanes::{self, LANES};
use super::q4k::decode_scale_mins;
use super::tiled_kquant;

/// Dot product of a Q5_K weight row with Q8_K activations as llama.cpp's AVX2
/// `ggml_vec_dot_q5_K_q8_K` sums it (its path for batches of 1 to 7 tokens).
pub fn dot_q5k_q8k(level: SimdLevel, w: &[BlockQ5K], act: &[BlockQ8K]) -> f32 {
    debug_assert_eq!(w.len(), act.len());
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && lanes::avx2_available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        return unsafe { avx2::dot(w, act) };
    }
    let _ = level;
    let mut acc = [0f32; LANES];
    let mut mins = 0f32;
    for (x, y) in w.iter().zip(act) {
        // llama.cpp's `summs += dmin * sum`, which GCC contracts into one FMA.
        let (lanes, min_sum) = block_sums(x, y);
        mins = (-y.d * x.dmin.to_f32()).mul_add(min_sum as f32, mins);
        lanes::fma_lanes(&mut acc, y.d * x.d.to_f32(), &lanes);
    }
    lanes::hsum_float_8(&acc) + mins
}

/// Dot product of one Q5_K weight row with Q8_K activations summed as llama.cpp's tiled matmul
/// sums it (its path for batches of 8 tokens or more).
pub fn dot_q5k_q8k_tiled(level: SimdLevel, w: &[BlockQ5K], act: &[BlockQ8K]) -> f32 {
    let [dot] = dot_q5k_q8k_tiled_tokens(level, w, [act]);
    dot
}

/// `out[i]` = [`dot_q5k_q8k_tiled`] of `w` with `acts[i]`, bit for bit, each weight block
/// unpacked once for all `T` activation rows.
pub fn dot_q5k_q8k_tiled_tokens<const T: usize>(
    level: SimdLevel,
    w: &[BlockQ5K],
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
            let (lanes, min_sum) = block_sums(x, y);
            let (d, dmin) = (x.d.to_f32(), x.dmin.to_f32());
            tiled_kquant::step_with_min(acc, d, dmin, lanes.iter().sum(), min_sum, y.d)
        })
    })
}

/// The 256 values (0..32) of a Q5_K block: for each 64 values, the low nibbles of 32 bytes of
/// `qs` then their high nibbles, the fifth bit from `qh` (bit `2j` then `2j + 1` of byte `i`).
pub fn q5k_values(block: &BlockQ5K) -> [u8; QK_K] {
    std::array::from_fn(|v| {
        let (j, half, i) = (v / 64, (v / 32) % 2, v % 32);
        let byte = block.qs[32 * j + i];
        let nibble = if half == 0 { byte & 0x0F } else { byte >> 4 };
        let fifth = (block.qh[i] >> (2 * j + half)) & 1;
        nibble | (fifth << 4)
    })
}

/// For one block, the AVX2 kernel's 8 i32 lanes (lane `l` is the sum over the 8 sub-blocks of
/// the sub-block's scale times its products `4l .. 4l + 4`) and the minimums' sum
/// `Σ min_j · (bsums[2j] + bsums[2j + 1])`, all exact.
fn block_sums(x: &BlockQ5K, y: &BlockQ8K) -> ([i32; LANES], i32) {
    let values = q5k_values(x);
    let decoded = decode_scale_mins(&x.scales);
    let (scales, mins) = decoded.split_at(8);
    let mut sumi = [0i32; LANES];
    for (sub, &scale) in scales.iter().enumerate() {
        let u: &[u8; 32] = values[32 * sub..][..32].try_into().unwrap_or(&[0; 32]);
        let s: &[i8; 32] = y.qs[32 * sub..][..32].try_into().unwrap_or(&[0; 32]);
        for (sum, quad) in sumi.iter_mut().zip(lanes::maddubs_quads(u, s)) {
            *sum += i32::from(scale) * quad;
        }
    }
    let min_sum = mins
        .iter()
        .zip(y.bsums.chunks_exact(2))
        .map(|(&m, pair)| i32::from(m) * (i32::from(pair[0]) + i32::from(pair[1])))
        .sum();
    (sumi, min_sum)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::blocks::{BlockQ5K, BlockQ8K};
    use super::super::lanes::avx2::{hsum_float_8, prefetch_ahead, widen_f16_pair};
    use super::super::lanes::avx2::{hsum_i32_4, hsum_i32_8, hsum_i32_8x4};
    use super::super::q4k::decode_scale_mins;
    use super::super::tiled_kquant::blocks_at;

    /// A block's sub-block scales (i16, in both halves) and minimums (i16), decoded once.
    struct Scales {
        scales: __m256i,
        mins: __m128i,
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn scales(x: &BlockQ5K) -> Scales {
        let decoded = decode_scale_mins(&x.scales);
        // SAFETY: reads exactly the 16 decoded bytes.
        let wide = _mm256_cvtepu8_epi16(unsafe { _mm_loadu_si128(decoded.as_ptr().cast()) });
        Scales {
            scales: _mm256_permute2x128_si256::<0x00>(wide, wide),
            mins: _mm256_extracti128_si256::<1>(wide),
        }
    }

    /// Sub-block `s`'s scale in every i16 lane (llama.cpp's `get_scale_shuffle_k4`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn scale_of(scales: &Scales, s: usize) -> __m256i {
        let pick = (2 * s as i16) | ((2 * s as i16 + 1) << 8);
        _mm256_shuffle_epi8(scales.scales, _mm256_set1_epi16(pick))
    }

    /// The values of sub-blocks `2j` and `2j + 1`: `qs` nibbles with the fifth bit from `qh`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn sub_block_pair(x: &BlockQ5K, high_bits: __m256i, j: usize) -> [__m256i; 2] {
        let low_nibble = _mm256_set1_epi8(0x0F);
        let chunk: &[u8] = &x.qs[32 * j..][..32];
        // SAFETY: reads exactly the 32 bytes of `chunk`.
        let q = unsafe { _mm256_loadu_si256(chunk.as_ptr().cast()) };
        let fifth = |bit: usize| {
            let mask = _mm256_set1_epi8(1 << bit);
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(high_bits, mask), mask);
            _mm256_and_si256(set, _mm256_set1_epi8(0x10))
        };
        [
            _mm256_or_si256(_mm256_and_si256(q, low_nibble), fifth(2 * j)),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(q), low_nibble),
                fifth(2 * j + 1),
            ),
        ]
    }

    /// For each of `ys`: the 8 lanes and the minimums' sum (in 4 lanes, to be added up) of
    /// [`super::block_sums`], the weight block unpacked once.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn block_sums<const T: usize>(
        x: &BlockQ5K,
        ys: [&BlockQ8K; T],
    ) -> ([__m256i; T], [__m128i; T]) {
        unpacked_sums(&unpack(x), ys)
    }

    /// `ggml_vec_dot_q5_K_q8_K`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn dot(w: &[BlockQ5K], act: &[BlockQ8K]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        for (x, y) in w.iter().zip(act) {
            prefetch_ahead(x);
            let ([lanes], [min_lanes]) = block_sums(x, [y]);
            let min_sum = hsum_i32_4(min_lanes);
            let (d, dmin) = widen_f16_pair(x.d, x.dmin);
            // llama.cpp's `summs += dmin * sum`, which GCC contracts into one FMA.
            mins = (-y.d * dmin).mul_add(min_sum as f32, mins);
            let d = _mm256_set1_ps(y.d * d);
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes), acc);
        }
        hsum_float_8(acc) + mins
    }

    /// A block unpacked once for many activation rows: each chunk's 32 values, its
    /// sub-block's scale in every i16 lane, and the minimums.
    struct Unpacked {
        values: [__m256i; 8],
        scales: [__m256i; 8],
        mins: __m128i,
    }

    /// Unpacks a block's values and scales ([`Unpacked`]).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn unpack(x: &BlockQ5K) -> Unpacked {
        let decoded = scales(x);
        // SAFETY: reads exactly the 32 bytes of `qh`.
        let high_bits = unsafe { _mm256_loadu_si256(x.qh.as_ptr().cast()) };
        let mut values = [_mm256_setzero_si256(); 8];
        let mut scales = [_mm256_setzero_si256(); 8];
        for j in 0..4 {
            let [low, high] = sub_block_pair(x, high_bits, j);
            values[2 * j] = low;
            values[2 * j + 1] = high;
            scales[2 * j] = scale_of(&decoded, 2 * j);
            scales[2 * j + 1] = scale_of(&decoded, 2 * j + 1);
        }
        Unpacked {
            values,
            scales,
            mins: decoded.mins,
        }
    }

    /// [`block_sums`] of an unpacked block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn unpacked_sums<const T: usize>(
        u: &Unpacked,
        ys: [&BlockQ8K; T],
    ) -> ([__m256i; T], [__m128i; T]) {
        let mut lanes = [_mm256_setzero_si256(); T];
        for c in 0..8 {
            let (values, scale) = (u.values[c], u.scales[c]);
            for (lanes, y) in lanes.iter_mut().zip(&ys) {
                // SAFETY: reads 32 of the 256 values (32 c < 256).
                let q8 = unsafe { _mm256_loadu_si256(y.qs[32 * c..].as_ptr().cast()) };
                let products = _mm256_maddubs_epi16(values, q8);
                *lanes = _mm256_add_epi32(*lanes, _mm256_madd_epi16(scale, products));
            }
        }
        let mut mins = [_mm_setzero_si128(); T];
        for (mins, y) in mins.iter_mut().zip(&ys) {
            // SAFETY: reads exactly the 32 bytes of `bsums`.
            let bsums = unsafe { _mm256_loadu_si256(y.bsums.as_ptr().cast()) };
            let pairs = _mm_hadd_epi16(
                _mm256_castsi256_si128(bsums),
                _mm256_extracti128_si256::<1>(bsums),
            );
            *mins = _mm_madd_epi16(u.mins, pairs);
        }
        (lanes, mins)
    }

    /// [`super::dot_q5k_q8k_tiled_tokens`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn dot_tiled_tokens<const T: usize>(w: &[BlockQ5K], acts: [&[BlockQ8K]; T]) -> [f32; T] {
        match T {
            4 => return dot_tiled_groups::<T, 4>(w, acts),
            8 | 16 => return dot_tiled_groups::<T, 8>(w, acts),
            _ => {}
        }
        let mut acc = [0f32; T];
        for (b, x) in w.iter().enumerate() {
            let (lanes, mins) = block_sums(x, blocks_at(&acts, b));
            for ((acc, act), (lanes, mins)) in acc.iter_mut().zip(&acts).zip(lanes.iter().zip(mins))
            {
                let sum = hsum_i32_8(*lanes);
                *acc = super::tiled_kquant::step_with_min(
                    *acc,
                    x.d.to_f32(),
                    x.dmin.to_f32(),
                    sum,
                    hsum_i32_4(mins),
                    act[b].d,
                );
            }
        }
        acc
    }

    /// [`dot_tiled_tokens`] of `T` activation rows in groups of `G` (4 or 8), each block
    /// unpacked once for all of them, the float steps of each four rows as the lanes of one
    /// register (each lane rounding as [`tiled_kquant::step_with_min`] does). One row at a
    /// time, the reductions and scalar steps were 40% of the prompt's Q5_K time; unpacking
    /// once for 16 rows instead of 8 made the prompt 1.12x as fast (Zen 3).
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_tiled_groups<const T: usize, const G: usize>(
        w: &[BlockQ5K],
        acts: [&[BlockQ8K]; T],
    ) -> [f32; T] {
        assert!(
            G.is_multiple_of(4) && T.is_multiple_of(G) && T <= 16,
            "whole groups"
        );
        let mut acc = [_mm_setzero_ps(); 4];
        for (b, x) in w.iter().enumerate() {
            let u = unpack(x);
            let (d, dmin) = widen_f16_pair(x.d, x.dmin);
            let (d, dmin) = (_mm_set1_ps(d), _mm_set1_ps(dmin));
            for (e, acc) in acc.chunks_exact_mut(G / 4).enumerate().take(T / G) {
                let ys: [&BlockQ8K; G] = std::array::from_fn(|i| &acts[G * e + i][b]);
                let (lanes, mins) = unpacked_sums(&u, ys);
                for (g, acc) in acc.iter_mut().enumerate() {
                    let sums = hsum_i32_8x4([
                        lanes[4 * g],
                        lanes[4 * g + 1],
                        lanes[4 * g + 2],
                        lanes[4 * g + 3],
                    ]);
                    let mins = _mm_hadd_epi32(
                        _mm_hadd_epi32(mins[4 * g], mins[4 * g + 1]),
                        _mm_hadd_epi32(mins[4 * g + 2], mins[4 * g + 3]),
                    );
                    let scaled = _mm_mul_ps(d, _mm_cvtepi32_ps(sums));
                    let scaled = _mm_fnmadd_ps(dmin, _mm_cvtepi32_ps(mins), scaled);
                    let dx = _mm_setr_ps(
                        ys[4 * g].d,
                        ys[4 * g + 1].d,
                        ys[4 * g + 2].d,
                        ys[4 * g + 3].d,
                    );
                    *acc = _mm_fmadd_ps(scaled, dx, *acc);
                }
            }
        }
        let mut out = [0f32; T];
        for (lanes, acc) in out.chunks_exact_mut(4).zip(acc) {
            // SAFETY: writes exactly 4 floats of `out`.
            unsafe { _mm_storeu_ps(lanes.as_mut_ptr(), acc) };
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::lanes::test_data::Rng;
    use crate::engine::cpu::tiled_kquant::test_support::{Kernels, check_random_rows};
    use half::f16;

    fn random_blocks(rng: &mut Rng, n: usize) -> Vec<BlockQ5K> {
        (0..n)
            .map(|_| BlockQ5K {
                d: f16::from_f32(rng.uniform() * 0.01),
                dmin: f16::from_f32(rng.uniform() * 0.01),
                scales: std::array::from_fn(|_| rng.next_u64() as u8),
                qh: std::array::from_fn(|_| rng.next_u64() as u8),
                qs: std::array::from_fn(|_| rng.next_u64() as u8),
            })
            .collect()
    }

    #[test]
    fn portable_and_avx2_agree_to_the_bit_in_both_orders() {
        let kernels = Kernels {
            dot: dot_q5k_q8k,
            tiled: dot_q5k_q8k_tiled,
            three: dot_q5k_q8k_tiled_tokens::<3>,
            four: dot_q5k_q8k_tiled_tokens::<4>,
            eight: dot_q5k_q8k_tiled_tokens::<8>,
        };
        check_random_rows(&kernels, &mut Rng(53), &[1, 2, 8, 43], random_blocks, None);
    }

    #[test]
    fn values_take_the_fifth_bit_from_qh() {
        let mut block = random_blocks(&mut Rng(1), 1)[0];
        block.qs = [0; QK_K / 2];
        block.qh = [0; 32];
        block.qs[33] = 0x7A; // values 64 + 1 (low nibble) and 96 + 1 (high nibble)
        block.qh[1] = 0b0000_1000; // fifth bit of chunk 3 (values 96..128)
        let v = q5k_values(&block);
        assert_eq!((v[65], v[97], v[1]), (0x0A, 0x07 | 0x10, 0));
    }
}
