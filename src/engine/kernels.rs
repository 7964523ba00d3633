//! Quantized matrix products that read GGUF blocks in place, rounding the way llama.cpp does.
//!
//! Candle's own kernels serve most weight types. Two cases are routed here instead:
//! - k-quants (Q4_K, Q6_K) through candle's generic kernel: no second, repacked copy of the
//!   weights in memory, and every row computed the same way whether decoded alone or prefilled
//!   with others (candle's repacked Q6_K tiles round differently for one row and for many).
//! - Q4_1 with our own Q8_1 activations: candle rounds the Q8_1 block sum `s` as
//!   `f16(sum) * f16(d)`, llama.cpp as `f16(d * sum)`. The difference (about 5e-4 relative on
//!   every product) was enough to flip a near-tie in SmolLM2-135M's greedy replies.

use candle_core::quantized::k_quants::{self, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;
use rayon::prelude::*;

use super::attention::hsum;
use super::error::Result;

/// Values per Q4_1 / Q8_1 block.
const QK: usize = 32;
/// Bytes of one Q4_1 block: f16 scale, f16 minimum, 16 bytes of nibbles.
const Q4_1_BLOCK_BYTES: usize = 20;
/// Output rows each parallel task computes.
const ROWS_PER_TASK: usize = 16;

/// `x (m, k) × wᵀ` for a k-quant `w (n, k)` of block type `B` with candle's generic kernel.
pub fn generic_matmul<B: GgmlType>(w: &QTensor, x: &Tensor) -> Result<Tensor> {
    let (m, n, k) = check_shapes(w, B::DTYPE, x)?;
    let lhs = x.flatten_all()?.to_vec1::<f32>()?;
    let data = w.data()?;
    let block_bytes = std::mem::size_of::<B>();
    let n_blocks = data.len() / block_bytes;
    if n_blocks * block_bytes != data.len()
        || data.as_ptr().align_offset(std::mem::align_of::<B>()) != 0
    {
        return Err(candle_core::Error::Msg("misaligned quantized storage".into()).into());
    }
    // SAFETY: the storage is candle's own Vec<B> for this dtype (checked above, with length and
    // alignment), and k-quant blocks are plain repr(C) structs of integers and f16s.
    let blocks: &[B] = unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<B>(), n_blocks) };
    let mut dst = vec![0f32; m * n];
    k_quants::matmul::<B>((m, k, n), &lhs, blocks, &mut dst)?;
    Ok(Tensor::from_vec(dst, (m, n), &Device::Cpu)?)
}

/// `x (m, k) × wᵀ` for a Q4_1 `w (n, k)`, with activations quantized to Q8_1 as llama.cpp does.
/// Runs on the current rayon pool.
pub fn q4_1_matmul(w: &QTensor, x: &Tensor) -> Result<Tensor> {
    let (m, n, k) = check_shapes(w, GgmlDType::Q4_1, x)?;
    let data = w.data()?;
    let row_bytes = k / QK * Q4_1_BLOCK_BYTES;
    if k % QK != 0 || data.len() != n * row_bytes {
        return Err(candle_core::Error::Msg(format!(
            "Q4_1 storage of {} bytes does not hold ({n}, {k})",
            data.len()
        ))
        .into());
    }
    let lhs = x.flatten_all()?.to_vec1::<f32>()?;
    let activations: Vec<Vec<Q8_1>> = lhs.chunks_exact(k).map(quantize_q8_1).collect();
    // dst is (m, n); tasks own disjoint column ranges, so they write (n, m) and we transpose.
    let mut dst_t = vec![0f32; n * m];
    dst_t
        .par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, out)| {
            let first_row = task * ROWS_PER_TASK;
            for (i, out_row) in out.chunks_exact_mut(m).enumerate() {
                let start = (first_row + i) * row_bytes;
                let weights = &data[start..start + row_bytes];
                for (value, act) in out_row.iter_mut().zip(&activations) {
                    *value = dot_q4_1_q8_1(weights, act);
                }
            }
        });
    let dst_t = Tensor::from_vec(dst_t, (n, m), &Device::Cpu)?;
    Ok(dst_t.t()?.contiguous()?)
}

/// RMS normalization of each row of `x (m, k)` times `weight (k)`, rounded like llama.cpp's
/// `rms_norm` followed by `mul`: the sum of squares in f64, then `x · (1 / √(mean + ε)) · w` in
/// f32. Inputs of quantized matmuls are rounded to 8 bits next, so a last-bit difference here
/// can move a value across a rounding boundary.
pub fn rms_norm(x: &Tensor, weight: &[f32], eps: f32) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    if weight.len() != k {
        return Err(candle_core::Error::Msg(format!(
            "rms_norm weight of {} for rows of {k}",
            weight.len()
        ))
        .into());
    }
    let mut data = x.flatten_all()?.to_vec1::<f32>()?;
    for row in data.chunks_exact_mut(k) {
        let sum: f64 = row.iter().map(|&v| f64::from(v * v)).sum();
        let mean = (sum / k as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for (v, &w) in row.iter_mut().zip(weight) {
            *v = (*v * scale) * w;
        }
    }
    Ok(Tensor::from_vec(data, (m, k), &Device::Cpu)?)
}

/// The `(m, n, k)` of `x (m, k) × wᵀ`, after checking `w` is `(n, k)` of `dtype`.
fn check_shapes(w: &QTensor, dtype: GgmlDType, x: &Tensor) -> Result<(usize, usize, usize)> {
    let (n, k) = w.shape().dims2()?;
    let (m, xk) = x.dims2()?;
    if xk != k || w.dtype() != dtype {
        return Err(candle_core::Error::Msg(format!(
            "matmul mismatch: {:?} weight ({n}, {k}) for input ({m}, {xk}), expected {dtype:?}",
            w.dtype()
        ))
        .into());
    }
    Ok((m, n, k))
}

/// 32 activations as llama.cpp's `block_q8_1`: scale `d`, `s = d · Σq` (both through f16),
/// and the quantized values.
#[derive(Debug, Clone, Copy)]
struct Q8_1 {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

/// Quantizes one row (a multiple of 32 values) like llama.cpp's `quantize_row_q8_1`.
fn quantize_q8_1(row: &[f32]) -> Vec<Q8_1> {
    row.chunks_exact(QK)
        .map(|block| {
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
        })
        .collect()
}

/// Dot product of one Q4_1 weight row (raw GGUF bytes) with Q8_1 activations, summed in the
/// order of llama.cpp's AVX2 `ggml_vec_dot_q4_1_q8_1`: 8 lanes of 4 products each, scaled and
/// fused-multiply-added per block, then the minimums' term added last.
fn dot_q4_1_q8_1(weights: &[u8], activations: &[Q8_1]) -> f32 {
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
    use candle_core::quantized::QTensor;

    /// A float reference of `x × wᵀ` on the dequantized weights.
    fn reference(w: &QTensor, x: &Tensor) -> Vec<Vec<f32>> {
        let w = w.dequantize(&Device::Cpu).unwrap();
        x.matmul(&w.t().unwrap()).unwrap().to_vec2().unwrap()
    }

    fn test_inputs(m: usize, n: usize, k: usize) -> (QTensor, Tensor) {
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
            .collect();
        let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap();
        (QTensor::quantize(&w, GgmlDType::Q4_1).unwrap(), x)
    }

    #[test]
    fn q4_1_matmul_matches_the_dequantized_product() {
        let (w, x) = test_inputs(3, 40, 96);
        let got = q4_1_matmul(&w, &x).unwrap().to_vec2::<f32>().unwrap();
        let want = reference(&w, &x);
        for (g, r) in got.iter().flatten().zip(want.iter().flatten()) {
            // Q8 activations carry up to 1/254 of each block's largest value as error.
            assert!((g - r).abs() < 0.05 * (1.0 + r.abs()), "{g} vs {r}");
        }
    }

    #[test]
    fn q4_1_rows_do_not_depend_on_the_batch() {
        let (w, x) = test_inputs(5, 33, 64);
        let all = q4_1_matmul(&w, &x).unwrap().to_vec2::<f32>().unwrap();
        let last = q4_1_matmul(&w, &x.narrow(0, 4, 1).unwrap()).unwrap();
        assert_eq!(last.to_vec2::<f32>().unwrap()[0], all[4]);
    }

    #[test]
    fn simd_and_portable_dot_products_agree_to_the_bit() {
        let (w, x) = test_inputs(2, 7, 256);
        let data = w.data().unwrap();
        let row_bytes = 256 / QK * Q4_1_BLOCK_BYTES;
        for x_row in x.to_vec2::<f32>().unwrap() {
            let act = quantize_q8_1(&x_row);
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
        let block = quantize_q8_1(&row)[0];
        assert!(block.qs.iter().all(|&q| q == 127));
        let d = 0.3f32 / 127.0;
        assert_eq!(block.s, f16::from_f32(d * 4064.0).to_f32());
        assert_eq!(block.d, f16::from_f32(d).to_f32());
    }

    #[test]
    fn rms_norm_scales_rows_to_unit_rms_times_the_weight() {
        let x = Tensor::new(&[[3f32, -4.0], [0.5, 0.5]], &Device::Cpu).unwrap();
        let y = rms_norm(&x, &[1.0, 2.0], 0.0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let rms = (12.5f32).sqrt();
        assert!((y[0][0] - 3.0 / rms).abs() < 1e-6);
        assert!((y[0][1] - 2.0 * -4.0 / rms).abs() < 1e-6);
        assert!((y[1][0] - 1.0).abs() < 1e-6 && (y[1][1] - 2.0).abs() < 1e-6);
        assert!(rms_norm(&x, &[1.0], 0.0).is_err());
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let (w, _) = test_inputs(1, 8, 64);
        let x = Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(q4_1_matmul(&w, &x).is_err());
    }
}
