//! Scalar kernels of the forward pass that round the way llama.cpp does: RMSNorm, and Q4_1
//! weights with llama.cpp's Q8_1 activations (candle rounds the Q8_1 block sum `s` as
//! `f16(sum) * f16(d)`, llama.cpp as `f16(d * sum)`; the difference, about 5e-4 relative on
//! every product, was enough to flip a near-tie in SmolLM2-135M's greedy replies).

use half::f16;

use super::attention::hsum;

/// Values per Q4_1 / Q8_1 block.
const QK: usize = 32;
/// Bytes of one Q4_1 block: f16 scale, f16 minimum, 16 bytes of nibbles.
const Q4_1_BLOCK_BYTES: usize = 20;
/// RMS normalization of `row` times `weight`, in place, rounded like llama.cpp's `rms_norm`
/// followed by `mul`: the sum of squares in f64, then `x · (1 / √(mean + ε)) · w` in f32.
/// Inputs of quantized matmuls are rounded to 8 bits next, so a last-bit difference here can
/// move a value across a rounding boundary.
pub fn rms_norm_row(row: &mut [f32], weight: &[f32], eps: f32) {
    let sum: f64 = row.iter().map(|&v| f64::from(v * v)).sum();
    let mean = (sum / row.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for (v, &w) in row.iter_mut().zip(weight) {
        *v = (*v * scale) * w;
    }
}

/// 32 activations as llama.cpp's `block_q8_1`: scale `d`, `s = d · Σq` (both through f16),
/// and the quantized values.
#[derive(Debug, Clone, Copy, Default)]
pub struct Q8_1 {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

/// Quantizes one row (a multiple of 32 values) into `out` like llama.cpp's `quantize_row_q8_1`.
pub fn quantize_q8_1(row: &[f32], out: &mut [Q8_1]) {
    for (dst, block) in out.iter_mut().zip(row.chunks_exact(QK)) {
        *dst = {
            let amax = block.iter().fold(0f32, |acc, v| acc.max(v.abs()));
            let d = amax / 127.0;
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let mut qs = [0i8; QK];
            let mut sum = 0i32;
            for (q, &v) in qs.iter_mut().zip(block) {
                *q = (v * id).round_ties_even() as i8;
                sum += i32::from(*q);
            }
            Q8_1 {
                d: f16::from_f32(d).to_f32(),
                s: f16::from_f32(d * sum as f32).to_f32(),
                qs,
            }
        };
    }
}

/// Dot product of one Q4_1 weight row (raw GGUF bytes) with Q8_1 activations, summed in the
/// order of llama.cpp's AVX2 `ggml_vec_dot_q4_1_q8_1`: 8 lanes of 4 products each, scaled and
/// fused-multiply-added per block, then the minimums' term added last.
pub fn dot_q4_1_q8_1(weights: &[u8], activations: &[Q8_1]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { dot_q4_1_q8_1_avx2(weights, activations) };
    }
    dot_q4_1_q8_1_portable(weights, activations)
}

/// [`dot_q4_1_q8_1`] with llama.cpp's AVX2 instructions (same lanes, same rounding).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_q4_1_q8_1_avx2(weights: &[u8], activations: &[Q8_1]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0f32;
    let low_mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    for (block, act) in weights.chunks_exact(Q4_1_BLOCK_BYTES).zip(activations) {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
        mins += m * act.s;
        let scale = _mm256_set1_ps(d * act.d);
        let nibbles: &[u8; 16] = block[4..Q4_1_BLOCK_BYTES].try_into().unwrap_or(&[0; 16]);
        // SAFETY: both loads read exactly the 16 and 32 bytes of the arrays they point into.
        let (packed, y) = unsafe {
            (
                _mm_loadu_si128(nibbles.as_ptr().cast()),
                _mm256_loadu_si256(act.qs.as_ptr().cast()),
            )
        };
        let both = _mm256_insertf128_si256::<1>(
            _mm256_castsi128_si256(packed),
            _mm_srli_epi16::<4>(packed),
        );
        let x = _mm256_and_si256(low_mask, both);
        let pairs = _mm256_maddubs_epi16(x, y);
        let quads = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, pairs));
        acc = _mm256_fmadd_ps(scale, quads, acc);
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds exactly 8 f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    hsum(&lanes) + mins
}

/// The same sums without SIMD (CPUs without AVX2 and FMA).
fn dot_q4_1_q8_1_portable(weights: &[u8], activations: &[Q8_1]) -> f32 {
    let mut acc = [0f32; 8];
    let mut mins = 0f32;
    for (block, act) in weights.chunks_exact(Q4_1_BLOCK_BYTES).zip(activations) {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
        mins += m * act.s;
        let scale = d * act.d;
        let nibbles = &block[4..Q4_1_BLOCK_BYTES];
        let mut values = [0i32; QK];
        for (i, &byte) in nibbles.iter().enumerate() {
            values[i] = i32::from(byte & 0x0F);
            values[i + QK / 2] = i32::from(byte >> 4);
        }
        for (lane, acc) in acc.iter_mut().enumerate() {
            let sum: i32 = (4 * lane..4 * lane + 4)
                .map(|i| values[i] * i32::from(act.qs[i]))
                .sum();
            *acc = scale.mul_add(sum as f32, *acc);
        }
    }
    hsum(&acc) + mins
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quantize(row: &[f32]) -> Vec<Q8_1> {
        let mut out = vec![Q8_1::default(); row.len() / QK];
        quantize_q8_1(row, &mut out);
        out
    }

    #[test]
    fn simd_and_portable_dot_products_agree_to_the_bit() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        let w: Vec<f32> = (0..7 * 256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let w = Tensor::from_vec(w, (7, 256), &Device::Cpu).unwrap();
        let w = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let data = w.data().unwrap();
        let row_bytes = 256 / QK * Q4_1_BLOCK_BYTES;
        for seed in 0..2 {
            let x: Vec<f32> = (0..256)
                .map(|i| (((i + seed * 7) * 13 % 29) as f32 - 14.0) / 7.0)
                .collect();
            let act = quantize(&x);
            for row in data.chunks_exact(row_bytes) {
                let portable = dot_q4_1_q8_1_portable(row, &act);
                assert_eq!(dot_q4_1_q8_1(row, &act).to_bits(), portable.to_bits());
            }
        }
    }

    #[test]
    fn q8_1_block_sum_is_rounded_once_like_llama_cpp() {
        // 32 values whose quantized sum (32 * 127 = 4064) is not exact in f16 arithmetic
        // when multiplied after rounding both factors.
        let row = vec![0.3f32; QK];
        let block = quantize(&row)[0];
        assert!(block.qs.iter().all(|&q| q == 127));
        let d = 0.3f32 / 127.0;
        assert_eq!(block.s, f16::from_f32(d * 4064.0).to_f32());
        assert_eq!(block.d, f16::from_f32(d).to_f32());
    }

    #[test]
    fn rms_norm_scales_rows_to_unit_rms_times_the_weight() {
        let mut a = [3f32, -4.0];
        rms_norm_row(&mut a, &[1.0, 2.0], 0.0);
        let rms = (12.5f32).sqrt();
        assert!((a[0] - 3.0 / rms).abs() < 1e-6);
        assert!((a[1] - 2.0 * -4.0 / rms).abs() < 1e-6);
        let mut b = [0.5f32, 0.5];
        rms_norm_row(&mut b, &[1.0, 2.0], 0.0);
        assert!((b[0] - 1.0).abs() < 1e-6 && (b[1] - 2.0).abs() < 1e-6);
    }
}
