//! Q8_0 activations and the dot products of Q8_0 and Q5_0 weight rows with them, as llama.cpp
//! computes them on x86 (`arch/x86/quants.c`: `quantize_row_q8_0`, `ggml_vec_dot_q8_0_q8_0`,
//! `ggml_vec_dot_q5_0_q8_0`, AVX2 branches).
//!
//! Batches: llama.cpp runs one token (m = 1) through these `vec_dot`s and m ≥ 2 through
//! llamafile's `tinyBLAS_Q0_AVX`. On AVX2+FMA+F16C, tinyBLAS computes every output exactly as
//! `vec_dot` does (per block `fma(d_w · d_x, i32 lanes of 4 products, acc)` into 8 lanes, then
//! the same horizontal sum; its tiles only change which outputs are computed together), so these
//! functions give llama.cpp's result for every batch size.

use half::f16;

use super::SimdLevel;
use super::blocks::{BlockQ5_0, BlockQ8_0, QK};
use super::lanes::{self, LANES};

/// Quantizes `x` (a multiple of 32 values) to Q8_0 like llama.cpp's AVX2 `quantize_row_q8_0`
/// (round half to even, unlike the generic C reference).
pub fn quantize_row_q8_0(level: SimdLevel, x: &[f32], out: &mut [BlockQ8_0]) {
    debug_assert_eq!(x.len(), out.len() * QK);
    for (block, values) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let values: &[f32; QK] = values.try_into().unwrap_or(&[0.0; QK]);
        let (d, _) = quantize_block(level, values, &mut block.qs);
        block.d = f16::from_f32(d);
    }
}

/// [`quantize_row_q8_0`] into a new vector of blocks.
pub fn quantize_q8_0(level: SimdLevel, x: &[f32]) -> Vec<BlockQ8_0> {
    let empty = BlockQ8_0 {
        d: f16::ZERO,
        qs: [0; QK],
    };
    let mut out = vec![empty; x.len() / QK];
    quantize_row_q8_0(level, x, &mut out);
    out
}

/// Quantizes 32 values into `qs`; returns the scale `max|x| / 127` (before rounding to f16)
/// and the sum of the quantized values before they were saturated to i8.
#[inline]
pub(super) fn quantize_block(level: SimdLevel, x: &[f32; QK], qs: &mut [i8; QK]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && lanes::avx2_available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        return unsafe { avx2::quantize_block(x, qs) };
    }
    let _ = level;
    quantize_block_portable(x, qs)
}

fn quantize_block_portable(x: &[f32; QK], qs: &mut [i8; QK]) -> (f32, i32) {
    let max = x.iter().fold(0f32, |acc, v| acc.max(v.abs()));
    let d = max / 127.0;
    let id = if max != 0.0 { 127.0 / max } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(x) {
        let i = lanes::cvtps_epi32((v * id).round_ties_even());
        sum = sum.wrapping_add(i);
        *q = lanes::saturate_i8(i);
    }
    (d, sum)
}

/// Dot product of a Q8_0 weight row with Q8_0 activations (llama.cpp's
/// `ggml_vec_dot_q8_0_q8_0`, and its tinyBLAS for batches).
pub fn dot_q8_0_q8_0(level: SimdLevel, w: &[BlockQ8_0], act: &[BlockQ8_0]) -> f32 {
    debug_assert_eq!(w.len(), act.len());
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && lanes::avx2_available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        return unsafe { avx2::dot_q8_0_q8_0(w, act) };
    }
    let _ = level;
    dot_portable(w, act, |b| b.qs, |b| b.d)
}

/// Dot product of a Q5_0 weight row with Q8_0 activations (llama.cpp's
/// `ggml_vec_dot_q5_0_q8_0`, and its tinyBLAS for batches).
pub fn dot_q5_0_q8_0(level: SimdLevel, w: &[BlockQ5_0], act: &[BlockQ8_0]) -> f32 {
    debug_assert_eq!(w.len(), act.len());
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && lanes::avx2_available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        return unsafe { avx2::dot_q5_0_q8_0(w, act) };
    }
    let _ = level;
    dot_portable(w, act, q5_0_values, |b| b.d)
}

/// The 32 signed values of a Q5_0 block: `(nibble | fifth bit << 4) - 16`, low nibbles first.
pub fn q5_0_values(block: &BlockQ5_0) -> [i8; QK] {
    let high = u32::from_le_bytes(block.qh);
    std::array::from_fn(|i| {
        let byte = block.qs[i % (QK / 2)];
        let nibble = if i < QK / 2 { byte & 0x0F } else { byte >> 4 };
        let fifth = ((high >> i) & 1) as u8;
        ((nibble | (fifth << 4)) as i8).wrapping_sub(16)
    })
}

/// The portable sum shared by Q8_0 and Q5_0 weights: per block, 8 lanes of 4 products each,
/// fused-multiply-added with the product of the two scales, then [`lanes::hsum_float_8`].
fn dot_portable<W>(
    w: &[W],
    act: &[BlockQ8_0],
    values: impl Fn(&W) -> [i8; QK],
    scale: impl Fn(&W) -> f16,
) -> f32 {
    let mut acc = [0f32; LANES];
    for (wb, ab) in w.iter().zip(act) {
        let d = scale(wb).to_f32() * ab.d.to_f32();
        lanes::fma_lanes(&mut acc, d, &lanes::signed_quads(&values(wb), &ab.qs));
    }
    lanes::hsum_float_8(&acc)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::blocks::{BlockQ5_0, BlockQ8_0, QK};
    use super::super::lanes::avx2::*;

    /// The AVX2 body of `quantize_row_q8_0` / `quantize_row_q8_1` for one block.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn quantize_block(x: &[f32; QK], qs: &mut [i8; QK]) -> (f32, i32) {
        // SAFETY: the loads read x[0..32] and the store writes qs[0..32], both in bounds.
        unsafe {
            let p = x.as_ptr();
            let mut v0 = _mm256_loadu_ps(p);
            let mut v1 = _mm256_loadu_ps(p.add(8));
            let mut v2 = _mm256_loadu_ps(p.add(16));
            let mut v3 = _mm256_loadu_ps(p.add(24));

            let sign_bit = _mm256_set1_ps(-0.0);
            let mut max_abs = _mm256_andnot_ps(sign_bit, v0);
            max_abs = _mm256_max_ps(max_abs, _mm256_andnot_ps(sign_bit, v1));
            max_abs = _mm256_max_ps(max_abs, _mm256_andnot_ps(sign_bit, v2));
            max_abs = _mm256_max_ps(max_abs, _mm256_andnot_ps(sign_bit, v3));
            let mut max4 = _mm_max_ps(
                _mm256_extractf128_ps::<1>(max_abs),
                _mm256_castps256_ps128(max_abs),
            );
            max4 = _mm_max_ps(max4, _mm_movehl_ps(max4, max4));
            max4 = _mm_max_ss(max4, _mm_movehdup_ps(max4));
            let max_scalar = _mm_cvtss_f32(max4);

            let d = max_scalar / 127.0;
            let id = if max_scalar != 0.0 {
                127.0 / max_scalar
            } else {
                0.0
            };
            let mul = _mm256_set1_ps(id);
            v0 = _mm256_round_ps::<_MM_FROUND_TO_NEAREST_INT>(_mm256_mul_ps(v0, mul));
            v1 = _mm256_round_ps::<_MM_FROUND_TO_NEAREST_INT>(_mm256_mul_ps(v1, mul));
            v2 = _mm256_round_ps::<_MM_FROUND_TO_NEAREST_INT>(_mm256_mul_ps(v2, mul));
            v3 = _mm256_round_ps::<_MM_FROUND_TO_NEAREST_INT>(_mm256_mul_ps(v3, mul));
            let mut i0 = _mm256_cvtps_epi32(v0);
            let i1 = _mm256_cvtps_epi32(v1);
            let mut i2 = _mm256_cvtps_epi32(v2);
            let i3 = _mm256_cvtps_epi32(v3);

            let sum = hsum_i32_8(_mm256_add_epi32(
                _mm256_add_epi32(i0, i1),
                _mm256_add_epi32(i2, i3),
            ));

            i0 = _mm256_packs_epi32(i0, i1);
            i2 = _mm256_packs_epi32(i2, i3);
            i0 = _mm256_packs_epi16(i0, i2);
            let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            i0 = _mm256_permutevar8x32_epi32(i0, perm);
            _mm256_storeu_si256(qs.as_mut_ptr().cast(), i0);
            (d, sum)
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn dot_q8_0_q8_0(w: &[BlockQ8_0], act: &[BlockQ8_0]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (x, y) in w.iter().zip(act) {
            let (dx, dy) = widen_f16_pair(x.d, y.d);
            let d = _mm256_set1_ps(dx * dy);
            let q = mul_sum_i8_pairs_float(load_i8(&x.qs), load_i8(&y.qs));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
        hsum_float_8(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn dot_q5_0_q8_0(w: &[BlockQ5_0], act: &[BlockQ8_0]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (x, y) in w.iter().zip(act) {
            let (dx, dy) = widen_f16_pair(x.d, y.d);
            let d = _mm256_set1_ps(dx * dy);
            let q = mul_sum_i8_pairs_float(q5_0_values(&x.qs, &x.qh), load_i8(&y.qs));
            acc = _mm256_fmadd_ps(d, q, acc);
        }
        hsum_float_8(acc)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::engine::cpu::lanes::test_data::Rng;
    use candle_core::quantized::k_quants::{self, GgmlType};

    const LEVELS: [SimdLevel; 2] = [SimdLevel::Portable, SimdLevel::Avx2];

    fn random_q8_0(rng: &mut Rng, n: usize) -> Vec<BlockQ8_0> {
        (0..n)
            .map(|i| BlockQ8_0 {
                d: f16::from_f32(if i % 7 == 3 {
                    0.0
                } else {
                    rng.uniform() * 0.05
                }),
                qs: std::array::from_fn(|_| rng.next_u64() as i8),
            })
            .collect()
    }

    fn random_q5_0(rng: &mut Rng, n: usize) -> Vec<BlockQ5_0> {
        (0..n)
            .map(|_| BlockQ5_0 {
                d: f16::from_f32(rng.uniform() * 0.05),
                qh: std::array::from_fn(|_| rng.next_u64() as u8),
                qs: std::array::from_fn(|_| rng.next_u64() as u8),
            })
            .collect()
    }

    fn bits(blocks: &[BlockQ8_0]) -> Vec<(u16, [i8; QK])> {
        blocks.iter().map(|b| (b.d.to_bits(), b.qs)).collect()
    }

    #[test]
    fn quantize_q8_0_portable_and_avx2_agree_to_the_bit() {
        let mut rng = Rng(1);
        for blocks in [1, 3, 16, 72] {
            let mut x = rng.activations(blocks * QK);
            // Exact rounding ties of 127 / max and huge / tiny magnitudes.
            x[0] = 1.0;
            x[1] = 0.5 / 127.0;
            x[2] = -1.5 / 127.0;
            if blocks > 2 {
                x[QK..2 * QK].iter_mut().for_each(|v| *v *= 1e30);
                x[2 * QK..3 * QK].iter_mut().for_each(|v| *v *= 1e-30);
            }
            let want = bits(&quantize_q8_0(SimdLevel::Portable, &x));
            assert_eq!(bits(&quantize_q8_0(SimdLevel::Avx2, &x)), want);
        }
    }

    #[test]
    fn quantize_q8_0_rounds_half_to_even_and_keeps_zero_blocks_zero() {
        let mut x = vec![0f32; 2 * QK];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = 3.5;
        x[3] = -2.5;
        for level in LEVELS {
            let q = quantize_q8_0(level, &x);
            assert_eq!(&q[0].qs[..4], &[127, 2, 4, -2]);
            assert_eq!(q[0].d.to_f32(), 1.0);
            assert_eq!(q[1].d.to_bits(), 0);
            assert!(q[1].qs.iter().all(|&v| v == 0));
        }
    }

    #[test]
    fn q8_0_and_q5_0_dots_portable_and_avx2_agree_to_the_bit() {
        let mut rng = Rng(2);
        for blocks in [1, 2, 5, 18, 64] {
            let act = quantize_q8_0(SimdLevel::Avx2, &rng.activations(blocks * QK));
            let mut w8 = random_q8_0(&mut rng, blocks);
            w8[0].qs = [-128; QK];
            let w5 = random_q5_0(&mut rng, blocks);
            let p = dot_q8_0_q8_0(SimdLevel::Portable, &w8, &act);
            assert_eq!(
                dot_q8_0_q8_0(SimdLevel::Avx2, &w8, &act).to_bits(),
                p.to_bits()
            );
            let p = dot_q5_0_q8_0(SimdLevel::Portable, &w5, &act);
            assert_eq!(
                dot_q5_0_q8_0(SimdLevel::Avx2, &w5, &act).to_bits(),
                p.to_bits()
            );
        }
    }

    /// `Σ w · x` in f64 on candle's dequantization of the weights and the unquantized `x`,
    /// and a bound on the error Q8 activations may add: half a quantization step of each
    /// quantization group's (`group` values) largest value per weight, plus f16 rounding of the scales.
    pub(crate) fn float_reference<B: GgmlType>(w: &[B], x: &[f32], group: usize) -> (f64, f64) {
        let mut wf = vec![0f32; x.len()];
        B::to_float(w, &mut wf);
        let mut sum = 0f64;
        let mut bound = 1e-4;
        for (wb, xb) in wf.chunks(group).zip(x.chunks(group)) {
            let step = f64::from(xb.iter().fold(0f32, |m, v| m.max(v.abs()))) / 127.0;
            for (&a, &b) in wb.iter().zip(xb) {
                sum += f64::from(a) * f64::from(b);
                bound += f64::from(a.abs()) * (0.5 * step + 1e-3 * f64::from(b.abs()));
            }
        }
        (sum, bound)
    }

    pub(crate) fn as_candle<B: GgmlType, T>(blocks: &[T]) -> &[B] {
        assert_eq!(std::mem::size_of::<B>(), std::mem::size_of::<T>());
        // SAFETY: both are the same repr(C) GGUF block layout (sizes checked), plain integers
        // and f16s.
        unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast(), blocks.len()) }
    }

    #[test]
    fn dots_match_a_float_reference_on_dequantized_weights() {
        let mut rng = Rng(3);
        let blocks = 24;
        let x: Vec<f32> = (0..blocks * QK).map(|_| rng.uniform()).collect();
        let w8 = random_q8_0(&mut rng, blocks);
        let w5 = random_q5_0(&mut rng, blocks);
        for level in LEVELS {
            let act = quantize_q8_0(level, &x);
            let got = f64::from(dot_q8_0_q8_0(level, &w8, &act));
            let (want, bound) = float_reference::<k_quants::BlockQ8_0>(as_candle(&w8), &x, QK);
            assert!((got - want).abs() <= bound, "{got} vs {want} ± {bound}");
            let got = f64::from(dot_q5_0_q8_0(level, &w5, &act));
            let (want, bound) = float_reference::<k_quants::BlockQ5_0>(as_candle(&w5), &x, QK);
            assert!((got - want).abs() <= bound, "{got} vs {want} ± {bound}");
        }
    }
}
