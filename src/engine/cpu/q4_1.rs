//! Q8_1 activations and the dot products of Q4_1 and Q5_1 weight rows with them, as llama.cpp
//! computes them on x86 (`arch/x86/quants.c`: `quantize_row_q8_1`, `ggml_vec_dot_q4_1_q8_1`,
//! `ggml_vec_dot_q5_1_q8_1`, AVX2 branches, which sum alike). llamafile's tinyBLAS has neither
//! type, so this is llama.cpp's path for every batch size.
//!
//! The block sum `s` is rounded once, `f16(d · Σq)`, as llama.cpp does (candle rounds
//! `f16(Σq) · f16(d)`, about 5e-4 relative off, enough to flip near-ties in greedy decoding).

use half::f16;

use super::SimdLevel;
use super::blocks::{BlockQ4_1, BlockQ5_1, BlockQ8_1, QK};
use super::lanes::{self, LANES};
use super::q8_0::quantize_block;

/// Quantizes `x` (a multiple of 32 values) to Q8_1 like llama.cpp's AVX2 `quantize_row_q8_1`.
pub fn quantize_row_q8_1(level: SimdLevel, x: &[f32], out: &mut [BlockQ8_1]) {
    debug_assert_eq!(x.len(), out.len() * QK);
    for (block, values) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let values: &[f32; QK] = values.try_into().unwrap_or(&[0.0; QK]);
        let (d, sum) = quantize_block(level, values, &mut block.qs);
        block.d = f16::from_f32(d);
        block.s = f16::from_f32(d * sum as f32);
    }
}

/// [`quantize_row_q8_1`] into a new vector of blocks.
pub fn quantize_q8_1(level: SimdLevel, x: &[f32]) -> Vec<BlockQ8_1> {
    let empty = BlockQ8_1 {
        d: f16::ZERO,
        s: f16::ZERO,
        qs: [0; QK],
    };
    let mut out = vec![empty; x.len() / QK];
    quantize_row_q8_1(level, x, &mut out);
    out
}

/// A 32-value weight block of unsigned values with a scale and a minimum (Q4_1, Q5_1).
pub trait WithMin: Copy {
    /// The scale.
    fn d(&self) -> f16;
    /// The minimum.
    fn m(&self) -> f16;
    /// The 32 unsigned values, in order.
    fn values(&self) -> [u8; QK];
}

impl WithMin for BlockQ4_1 {
    fn d(&self) -> f16 {
        self.d
    }
    fn m(&self) -> f16 {
        self.m
    }
    fn values(&self) -> [u8; QK] {
        q4_1_values(self)
    }
}

impl WithMin for BlockQ5_1 {
    fn d(&self) -> f16 {
        self.d
    }
    fn m(&self) -> f16 {
        self.m
    }
    fn values(&self) -> [u8; QK] {
        q5_1_values(self)
    }
}

/// Dot product of a Q4_1 weight row with Q8_1 activations: 8 lanes of 4 products each,
/// fused-multiply-added with `d_w · d_x` per block, then the minimums' term `Σ m · s` added
/// after the horizontal sum.
pub fn dot_q4_1_q8_1(level: SimdLevel, w: &[BlockQ4_1], act: &[BlockQ8_1]) -> f32 {
    debug_assert_eq!(w.len(), act.len());
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && lanes::avx2_available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above); the closure, which calls
        // an AVX2 function, runs only inside `dot_with_min`.
        return unsafe { avx2::dot_with_min(w, act, |x| bytes_from_nibbles_32(&x.qs)) };
    }
    let _ = level;
    dot_portable(w, act)
}

/// [`dot_q4_1_q8_1`] for Q5_1 weights (the same sum of 5-bit values).
pub fn dot_q5_1_q8_1(level: SimdLevel, w: &[BlockQ5_1], act: &[BlockQ8_1]) -> f32 {
    debug_assert_eq!(w.len(), act.len());
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && lanes::avx2_available() {
        // SAFETY: as in `dot_q4_1_q8_1`.
        return unsafe { avx2::dot_with_min(w, act, |x| q5_1_values_avx2(&x.qs, &x.qh)) };
    }
    let _ = level;
    dot_portable(w, act)
}

#[cfg(target_arch = "x86_64")]
use lanes::avx2::{bytes_from_nibbles_32, q5_1_values as q5_1_values_avx2};

/// The 32 values (0..16) of a Q4_1 block, low nibbles first.
pub fn q4_1_values(block: &BlockQ4_1) -> [u8; QK] {
    std::array::from_fn(|i| {
        let byte = block.qs[i % (QK / 2)];
        if i < QK / 2 { byte & 0x0F } else { byte >> 4 }
    })
}

/// The 32 values (0..32) of a Q5_1 block: the nibbles, low first, with the fifth bit `i` of
/// `qh` on top.
pub fn q5_1_values(block: &BlockQ5_1) -> [u8; QK] {
    let high = u32::from_le_bytes(block.qh);
    std::array::from_fn(|i| {
        let byte = block.qs[i % (QK / 2)];
        let nibble = if i < QK / 2 { byte & 0x0F } else { byte >> 4 };
        nibble | ((((high >> i) & 1) as u8) << 4)
    })
}

fn dot_portable<W: WithMin>(w: &[W], act: &[BlockQ8_1]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut mins = 0f32;
    for (x, y) in w.iter().zip(act) {
        mins += x.m().to_f32() * y.s.to_f32();
        let d = x.d().to_f32() * y.d.to_f32();
        lanes::fma_lanes(&mut acc, d, &lanes::maddubs_quads(&x.values(), &y.qs));
    }
    lanes::hsum_float_8(&acc) + mins
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::blocks::BlockQ8_1;
    use super::super::lanes::avx2::*;
    use super::WithMin;

    /// The AVX2 sum of [`super::dot_q4_1_q8_1`], the weight values unpacked by `values`.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_with_min<W: WithMin>(
        w: &[W],
        act: &[BlockQ8_1],
        values: impl Fn(&W) -> __m256i,
    ) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut summs = 0f32;
        for (x, y) in w.iter().zip(act) {
            let (d0, d1) = widen_f16_pair(x.d(), y.d);
            let (m, s) = widen_f16_pair(x.m(), y.s);
            // The product of two f16s is exact in f32, so this rounds once whether or not the
            // compiler fuses it, as GCC does llama.cpp's line.
            summs += m * s;
            let d0d1 = _mm256_mul_ps(_mm256_set1_ps(d0), _mm256_set1_ps(d1));
            let xy = mul_sum_us8_pairs_float(values(x), load_i8(&y.qs));
            acc = _mm256_fmadd_ps(d0d1, xy, acc);
        }
        hsum_float_8(acc) + summs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::lanes::test_data::Rng;
    use crate::engine::cpu::q8_0::tests::{as_candle, float_reference};
    use candle_core::quantized::k_quants;

    const LEVELS: [SimdLevel; 2] = [SimdLevel::Portable, SimdLevel::Avx2];

    fn random_q4_1(rng: &mut Rng, n: usize) -> Vec<BlockQ4_1> {
        (0..n)
            .map(|_| BlockQ4_1 {
                d: f16::from_f32(rng.uniform() * 0.05),
                m: f16::from_f32(rng.uniform() * 0.3),
                qs: std::array::from_fn(|_| rng.next_u64() as u8),
            })
            .collect()
    }

    #[test]
    fn quantize_q8_1_portable_and_avx2_agree_to_the_bit() {
        let mut rng = Rng(20);
        for blocks in [1, 4, 40] {
            let x = rng.activations(blocks * QK);
            let key = |q: Vec<BlockQ8_1>| -> Vec<(u16, u16, [i8; QK])> {
                q.iter()
                    .map(|b| (b.d.to_bits(), b.s.to_bits(), b.qs))
                    .collect()
            };
            assert_eq!(
                key(quantize_q8_1(SimdLevel::Avx2, &x)),
                key(quantize_q8_1(SimdLevel::Portable, &x))
            );
        }
    }

    #[test]
    fn q8_1_block_sum_is_rounded_once_like_llama_cpp() {
        // 32 equal values: Σq = 32 · 127 = 4064, and f16(d · 4064) ≠ f16(4064) · f16(d).
        let row = vec![0.3f32; QK];
        for level in LEVELS {
            let block = quantize_q8_1(level, &row)[0];
            assert!(block.qs.iter().all(|&q| q == 127));
            let d = 0.3f32 / 127.0;
            assert_eq!(block.s, f16::from_f32(d * 4064.0));
            assert_eq!(block.d, f16::from_f32(d));
        }
    }

    #[test]
    fn q4_1_portable_and_avx2_agree_to_the_bit() {
        let mut rng = Rng(21);
        for blocks in [1, 3, 8, 24] {
            let act = quantize_q8_1(SimdLevel::Avx2, &rng.activations(blocks * QK));
            let w = random_q4_1(&mut rng, blocks);
            let p = dot_q4_1_q8_1(SimdLevel::Portable, &w, &act);
            assert_eq!(
                dot_q4_1_q8_1(SimdLevel::Avx2, &w, &act).to_bits(),
                p.to_bits()
            );
        }
    }

    #[test]
    fn q4_1_matches_a_float_reference_on_dequantized_weights() {
        let mut rng = Rng(22);
        let blocks = 16;
        let x: Vec<f32> = (0..blocks * QK).map(|_| rng.uniform()).collect();
        let w = random_q4_1(&mut rng, blocks);
        let (want, bound) = float_reference::<k_quants::BlockQ4_1>(as_candle(&w), &x, QK);
        for level in LEVELS {
            let got = f64::from(dot_q4_1_q8_1(level, &w, &quantize_q8_1(level, &x)));
            // The minimums' term adds f16 rounding of s on top of the per-value bound.
            let slack = bound + 1e-3 * blocks as f64;
            assert!((got - want).abs() <= slack, "{got} vs {want} ± {slack}");
        }
    }
}
