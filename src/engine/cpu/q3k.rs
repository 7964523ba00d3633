//! Dot products of Q3_K weight rows with Q8_K activations, as llama.cpp computes them on x86
//! (Q3_K is not repacked there).
//!
//! Batches: as for Q6_K ([`super::q6k`]), llama.cpp takes its AVX2 `ggml_vec_dot_q3_K_q8_K`
//! ([`dot_q3k_q8k`]: 8 lanes of sub-block-scaled sums of 4 products, fused-multiply-added with
//! `d_x · d_w` per block, then the horizontal sum) for 1 to 7 tokens, and its tiled K-quant
//! matmul ([`dot_q3k_q8k_tiled`], [`super::tiled_kquant`]) from 8 tokens on.
//!
//! Before these kernels, Q3_K went through candle's `vec_dot` one output at a time. SmolLM3-3B
//! requantized to Q3_K_M (Q3_K, Q4_K, Q5_K, Q6_K; Zen 3, 2 threads, `smoldesk bench
//! --prompt-tokens 64 --gen-tokens 32`): prompt 19.0–19.6 tok/s with candle's, 25.7–26.8 with
//! these (llama.cpp 28.0–28.9); generation 13.4–14.4 and 12.4–13.8 (llama.cpp 11.1–11.4).
//! With the activation blocks indexed in a plain loop and the scale widened by F16C (see
//! [`tiled_kquant::blocks_at`]), prompt 27.2–27.5 → 31.3–32.0 and generation 14.2–14.3 → 15.5
//! (llama.cpp 29.4 and 11.5 in the same run).

use super::SimdLevel;
use super::blocks::{BlockQ3K, BlockQ8K};
use super::lanes::{self, LANES};
use super::q2k::{low_bits, scaled_quad_lanes};
use super::tiled_kquant;

/// Dot product of a Q3_K weight row with Q8_K activations as llama.cpp's AVX2
/// `ggml_vec_dot_q3_K_q8_K` sums it (its path for batches of 1 to 7 tokens).
pub fn dot_q3k_q8k(level: SimdLevel, w: &[BlockQ3K], act: &[BlockQ8K]) -> f32 {
    debug_assert_eq!(w.len(), act.len());
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && lanes::avx2_available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        return unsafe { avx2::dot(w, act) };
    }
    let _ = level;
    let mut acc = [0f32; LANES];
    for (x, y) in w.iter().zip(act) {
        lanes::fma_lanes(&mut acc, y.d * x.d.to_f32(), &block_lanes(x, y));
    }
    lanes::hsum_float_8(&acc)
}

/// Dot product of one Q3_K weight row with Q8_K activations summed as llama.cpp's tiled matmul
/// sums it (its path for batches of 8 tokens or more).
pub fn dot_q3k_q8k_tiled(level: SimdLevel, w: &[BlockQ3K], act: &[BlockQ8K]) -> f32 {
    let [dot] = dot_q3k_q8k_tiled_tokens(level, w, [act]);
    dot
}

/// `out[i]` = [`dot_q3k_q8k_tiled`] of `w` with `acts[i]`, bit for bit, each weight block
/// unpacked once for all `T` activation rows.
pub fn dot_q3k_q8k_tiled_tokens<const T: usize>(
    level: SimdLevel,
    w: &[BlockQ3K],
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
            let sum = block_lanes(x, y).iter().sum();
            tiled_kquant::step(acc, x.d.to_f32(), sum, y.d)
        })
    })
}

/// The 16 sub-block scales of a Q3_K block (-32..32): 6 bits each, the low 4 of scales
/// `0..8` in the low nibbles of bytes 0-7 and of `8..16` in their high nibbles, the high 2 bits
/// in bytes 8-11 (scale `4k + i` in bits `2k` of byte `8 + i`).
pub fn q3k_scales(block: &BlockQ3K) -> [i8; 16] {
    let words = scale_words(&block.scales);
    std::array::from_fn(|s| (words[s / 4] >> (8 * (s % 4))) as u8 as i8 - 32)
}

/// The 16 scales plus 32, four to a little-endian word, unpacked with llama.cpp's word
/// operations: in registers, so the AVX2 kernels need no byte stores (a load of 16 bytes
/// just stored one at a time waits for the stores, which made generation 30% slower).
#[inline(always)]
fn scale_words(packed: &[u8; 12]) -> [u32; 4] {
    const LOW_NIBBLES: u32 = 0x0F0F_0F0F;
    const LOW_PAIRS: u32 = 0x0303_0303;
    let word = |i: usize| {
        u32::from_le_bytes([
            packed[4 * i],
            packed[4 * i + 1],
            packed[4 * i + 2],
            packed[4 * i + 3],
        ])
    };
    let (a0, a1, high) = (word(0), word(1), word(2));
    let high_bits = |k: u32| ((high >> (2 * k)) & LOW_PAIRS) << 4;
    [
        (a0 & LOW_NIBBLES) | high_bits(0),
        (a1 & LOW_NIBBLES) | high_bits(1),
        ((a0 >> 4) & LOW_NIBBLES) | high_bits(2),
        ((a1 >> 4) & LOW_NIBBLES) | high_bits(3),
    ]
}

/// The value (-4..4) of element `e` of a Q3_K block: its 2 low bits as Q2_K's, minus 4 where
/// its bit in `hmask` (bit `4h + c` of byte `p`, for `e = 128h + 32c + p`) is clear.
pub fn q3k_value(block: &BlockQ3K, e: usize) -> i8 {
    let (half, chunk, p) = (e / 128, (e / 32) % 4, e % 32);
    let high = (block.hmask[p] >> (4 * half + chunk)) & 1;
    (low_bits(&block.qs, e) | (high << 2)) as i8 - 4
}

/// For one block, the AVX2 kernel's 8 i32 lanes ([`scaled_quad_lanes`]), exact.
fn block_lanes(x: &BlockQ3K, y: &BlockQ8K) -> [i32; LANES] {
    let scales = q3k_scales(x).map(i32::from);
    scaled_quad_lanes(&scales, |e| i32::from(q3k_value(x, e)), y)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::blocks::{BlockQ3K, BlockQ8K};
    use super::super::lanes::avx2::{hsum_float_8, prefetch_ahead, widen_f16};
    use super::super::q2k::avx2::{half_scales, low_bits, q8_chunk, scale_of};
    use super::super::tiled_kquant::{avx2::accumulate_block, blocks_at};
    use super::scale_words;

    /// The unsigned 3-bit codes (value + 4, 0..8) of half `h` of a block, one register per
    /// chunk of 32: the low bits with 4 added where the chunk's bit of `hmask` is set.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn codes(x: &BlockQ3K, high_bits: __m256i, h: usize) -> [__m256i; 4] {
        let mut values = low_bits(&x.qs, h);
        for (c, v) in values.iter_mut().enumerate() {
            let mask = _mm256_set1_epi8(1 << (4 * h + c));
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(high_bits, mask), mask);
            *v = _mm256_or_si256(*v, _mm256_and_si256(set, _mm256_set1_epi8(4)));
        }
        values
    }

    /// A block's 16 sub-block scales as i16 (all, and those of each half in both 128-bit
    /// lanes).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn scales(x: &BlockQ3K) -> (__m256i, [__m256i; 2]) {
        let [w0, w1, w2, w3] = scale_words(&x.scales).map(|w| w as i32);
        let offset = _mm_sub_epi8(_mm_setr_epi32(w0, w1, w2, w3), _mm_set1_epi8(32));
        let wide = _mm256_cvtepi8_epi16(offset);
        (wide, half_scales(wide))
    }

    /// For each of `ys`: 8 lanes summing to the block's exact integer sum
    /// `Σ scale · Σ value · y`, the weight block unpacked once. The codes' products are summed
    /// and the offset of 4 taken off at once through the activations' sums of 16
    /// (`4 · Σ scale · bsum`), so the lanes are not the vec_dot's lanes; only their sum is.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn block_sums<const T: usize>(x: &BlockQ3K, ys: [&BlockQ8K; T]) -> [__m256i; T] {
        let (all_scales, halves) = scales(x);
        // SAFETY: reads exactly the 32 bytes of `hmask`.
        let high_bits = unsafe { _mm256_loadu_si256(x.hmask.as_ptr().cast()) };
        let mut lanes = [_mm256_setzero_si256(); T];
        for (lanes, y) in lanes.iter_mut().zip(ys) {
            // SAFETY: reads exactly the 32 bytes of `bsums`.
            let bsums = unsafe { _mm256_loadu_si256(y.bsums.as_ptr().cast()) };
            let offset = _mm256_madd_epi16(all_scales, bsums);
            *lanes = _mm256_sub_epi32(*lanes, _mm256_slli_epi32::<2>(offset));
        }
        for (h, half) in halves.into_iter().enumerate() {
            for (c, values) in codes(x, high_bits, h).into_iter().enumerate() {
                let scale = scale_of(half, c);
                for (lanes, y) in lanes.iter_mut().zip(&ys) {
                    let products = _mm256_maddubs_epi16(values, q8_chunk(y, 4 * h + c));
                    *lanes = _mm256_add_epi32(*lanes, _mm256_madd_epi16(scale, products));
                }
            }
        }
        lanes
    }

    /// `ggml_vec_dot_q3_K_q8_K`: per chunk the products of the codes less those of 4 (pairs of
    /// products exact in i16), scaled per sub-block, so the lanes are the vec_dot's.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn dot(w: &[BlockQ3K], act: &[BlockQ8K]) -> f32 {
        let four = _mm256_set1_epi8(4);
        let mut acc = _mm256_setzero_ps();
        for (x, y) in w.iter().zip(act) {
            prefetch_ahead(x);
            let (_, halves) = scales(x);
            // SAFETY: reads exactly the 32 bytes of `hmask`.
            let high_bits = unsafe { _mm256_loadu_si256(x.hmask.as_ptr().cast()) };
            let mut lanes = _mm256_setzero_si256();
            for (h, half) in halves.into_iter().enumerate() {
                for (c, values) in codes(x, high_bits, h).into_iter().enumerate() {
                    let q8 = q8_chunk(y, 4 * h + c);
                    let products = _mm256_sub_epi16(
                        _mm256_maddubs_epi16(values, q8),
                        _mm256_maddubs_epi16(four, q8),
                    );
                    let scaled = _mm256_madd_epi16(scale_of(half, c), products);
                    lanes = _mm256_add_epi32(lanes, scaled);
                }
            }
            let d = _mm256_set1_ps(y.d * widen_f16(x.d));
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes), acc);
        }
        hsum_float_8(acc)
    }

    /// [`super::dot_q3k_q8k_tiled_tokens`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn dot_tiled_tokens<const T: usize>(w: &[BlockQ3K], acts: [&[BlockQ8K]; T]) -> [f32; T] {
        let mut acc = [0f32; T];
        for (b, x) in w.iter().enumerate() {
            let lanes = block_sums(x, blocks_at(&acts, b));
            accumulate_block(&mut acc, lanes, widen_f16(x.d), &acts, b);
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::blocks::QK_K;
    use crate::engine::cpu::lanes::test_data::Rng;
    use crate::engine::cpu::tiled_kquant::test_support::{Kernels, check_random_rows};
    use half::f16;

    fn random_blocks(rng: &mut Rng, n: usize) -> Vec<BlockQ3K> {
        (0..n)
            .map(|_| BlockQ3K {
                hmask: std::array::from_fn(|_| rng.next_u64() as u8),
                qs: std::array::from_fn(|_| rng.next_u64() as u8),
                scales: std::array::from_fn(|_| rng.next_u64() as u8),
                d: f16::from_f32(rng.uniform() * 0.01),
            })
            .collect()
    }

    /// The plain sum `Σ d·scale·value·y` of a row in f64, and the sum of the terms' magnitudes.
    fn reference(w: &[BlockQ3K], act: &[BlockQ8K]) -> (f64, f64) {
        let (mut total, mut magnitude) = (0f64, 0f64);
        for (x, y) in w.iter().zip(act) {
            let scales = q3k_scales(x);
            for e in 0..QK_K {
                let weight = f64::from(x.d.to_f32())
                    * f64::from(scales[e / 16])
                    * f64::from(q3k_value(x, e));
                let term = weight * f64::from(y.d) * f64::from(y.qs[e]);
                total += term;
                magnitude += term.abs();
            }
        }
        (total, magnitude)
    }

    #[test]
    fn portable_and_avx2_agree_to_the_bit_in_both_orders() {
        let kernels = Kernels {
            dot: dot_q3k_q8k,
            tiled: dot_q3k_q8k_tiled,
            three: dot_q3k_q8k_tiled_tokens::<3>,
            four: dot_q3k_q8k_tiled_tokens::<4>,
            eight: dot_q3k_q8k_tiled_tokens::<8>,
        };
        check_random_rows(
            &kernels,
            &mut Rng(73),
            &[1, 2, 6, 43],
            random_blocks,
            Some(reference),
        );
    }

    #[test]
    fn scales_and_values_unpack_as_llama_cpp_packs_them() {
        let mut block = random_blocks(&mut Rng(2), 1)[0];
        // Scale 13: low nibble in the high nibble of byte 5, high bits in bits 6-7 of byte 9.
        block.scales = [0; 12];
        block.scales[5] = 0xA0;
        block.scales[9] = 0b1100_0000;
        let scales = q3k_scales(&block);
        assert_eq!(scales[13], (0x0A | 0x30) - 32);
        assert_eq!(scales[5], -32);
        // Element 128 + 64 + 7: low bits at bits 4-5 of byte 39, third bit at bit 6 of byte 7.
        block.qs = [0; 64];
        block.hmask = [0; 32];
        block.qs[39] = 0b0010_0000;
        assert_eq!(q3k_value(&block, 199), 2 - 4);
        block.hmask[7] = 1 << 6;
        assert_eq!(q3k_value(&block, 199), 2);
        assert_eq!(q3k_value(&block, 7), -4);
    }
}
