//! Row dequantization for embedding lookups, equal to llama.cpp's `get_rows` (which calls
//! `ggml-quants.c`'s `dequantize_row_*`; that file is built without FMA, so each value is a
//! plain multiply (and add), as here: Rust never fuses `a * b + c`).

use candle_core::quantized::GgmlDType;
use half::f16;

use super::blocks::{
    BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8_0, PodBlock, QK, QK_K,
    as_blocks,
};
use super::q4_0::q4_0_values;
use super::q4_1::{q4_1_values, q5_1_values};
use super::q6k::q6k_values;
use super::q8_0::q5_0_values;

/// Why a row could not be dequantized.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DequantError {
    /// A weight type without a row dequantizer here.
    #[error("no row dequantization for {0:?} weights")]
    Unsupported(GgmlDType),
    /// The bytes are not the blocks of exactly `out.len()` values.
    #[error("{bytes} bytes of {dtype:?} do not hold a row of {values} values")]
    Length {
        /// The weight type.
        dtype: GgmlDType,
        /// Bytes given.
        bytes: usize,
        /// Values asked for.
        values: usize,
    },
}

/// Dequantizes one row of `dtype` weights (`bytes`, GGUF layout) into `out`, rounding exactly
/// as llama.cpp's `get_rows` does.
pub fn dequantize_row(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) -> Result<(), DequantError> {
    let length_error = DequantError::Length {
        dtype,
        bytes: bytes.len(),
        values: out.len(),
    };
    let whole = match dtype {
        GgmlDType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            bytes.len() == 4 * out.len()
        }
        GgmlDType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
            bytes.len() == 2 * out.len()
        }
        GgmlDType::Q8_0 => blocks_into::<BlockQ8_0>(bytes, out, QK, dequantize_q8_0),
        GgmlDType::Q5_0 => blocks_into::<BlockQ5_0>(bytes, out, QK, dequantize_q5_0),
        GgmlDType::Q4_0 => blocks_into::<BlockQ4_0>(bytes, out, QK, dequantize_q4_0),
        GgmlDType::Q4_1 => blocks_into::<BlockQ4_1>(bytes, out, QK, dequantize_q4_1),
        GgmlDType::Q5_1 => blocks_into::<BlockQ5_1>(bytes, out, QK, dequantize_q5_1),
        GgmlDType::Q4K => blocks_into::<BlockQ4K>(bytes, out, QK_K, dequantize_q4k),
        GgmlDType::Q6K => blocks_into::<BlockQ6K>(bytes, out, QK_K, dequantize_q6k),
        other => return Err(DequantError::Unsupported(other)),
    };
    if whole { Ok(()) } else { Err(length_error) }
}

/// Reads `bytes` as blocks of `B` holding `per_block` values each and dequantizes each block
/// into its slice of `out`; false (writing nothing) when they do not fill `out` exactly.
fn blocks_into<B: PodBlock>(
    bytes: &[u8],
    out: &mut [f32],
    per_block: usize,
    dequantize: fn(&B, &mut [f32]),
) -> bool {
    let Some(blocks) = as_blocks::<B>(bytes) else {
        return false;
    };
    if blocks.len() * per_block != out.len() {
        return false;
    }
    for (block, values) in blocks.iter().zip(out.chunks_exact_mut(per_block)) {
        dequantize(block, values);
    }
    true
}

fn dequantize_q8_0(block: &BlockQ8_0, out: &mut [f32]) {
    let d = block.d.to_f32();
    for (o, &q) in out.iter_mut().zip(&block.qs) {
        *o = f32::from(q) * d;
    }
}

fn dequantize_q5_0(block: &BlockQ5_0, out: &mut [f32]) {
    let d = block.d.to_f32();
    for (o, q) in out.iter_mut().zip(q5_0_values(block)) {
        *o = f32::from(q) * d;
    }
}

fn dequantize_q4_0(block: &BlockQ4_0, out: &mut [f32]) {
    let d = block.d.to_f32();
    for (o, q) in out.iter_mut().zip(q4_0_values(block)) {
        *o = f32::from(q) * d;
    }
}

fn dequantize_q5_1(block: &BlockQ5_1, out: &mut [f32]) {
    let (d, m) = (block.d.to_f32(), block.m.to_f32());
    for (o, q) in out.iter_mut().zip(q5_1_values(block)) {
        *o = f32::from(q) * d + m;
    }
}

fn dequantize_q4_1(block: &BlockQ4_1, out: &mut [f32]) {
    let (d, m) = (block.d.to_f32(), block.m.to_f32());
    for (o, q) in out.iter_mut().zip(q4_1_values(block)) {
        *o = f32::from(q) * d + m;
    }
}

/// llama.cpp's `get_scale_min_k4`: the 6-bit scale and minimum of Q4_K sub-block `j`.
fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn dequantize_q4k(block: &BlockQ4K, out: &mut [f32]) {
    let (d, min) = (block.d.to_f32(), block.dmin.to_f32());
    for (pair, (values, q)) in out
        .chunks_exact_mut(64)
        .zip(block.qs.chunks_exact(32))
        .enumerate()
    {
        let (sc1, m1) = scale_min_k4(2 * pair, &block.scales);
        let (sc2, m2) = scale_min_k4(2 * pair + 1, &block.scales);
        let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
        let (low, high) = values.split_at_mut(32);
        for ((lo, hi), &byte) in low.iter_mut().zip(high.iter_mut()).zip(q) {
            *lo = d1 * f32::from(byte & 0x0F) - m1;
            *hi = d2 * f32::from(byte >> 4) - m2;
        }
    }
}

fn dequantize_q6k(block: &BlockQ6K, out: &mut [f32]) {
    let d = block.d.to_f32();
    for (e, (o, q)) in out.iter_mut().zip(q6k_values(block)).enumerate() {
        let scale = f32::from(block.scales[e / 16]);
        *o = d * scale * f32::from(i16::from(q) - 32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::lanes::test_data::Rng;
    use crate::engine::cpu::q8_0::tests::as_candle;
    use candle_core::quantized::k_quants::{self, GgmlType};

    /// Random blocks of `B` (as bytes) with every f16 scale set to a modest finite value.
    fn random_row<B: PodBlock>(rng: &mut Rng, blocks: usize, scale_offsets: &[usize]) -> Vec<u8> {
        let size = std::mem::size_of::<B>();
        let mut bytes = rng.bytes(blocks * size);
        for block in bytes.chunks_exact_mut(size) {
            for &offset in scale_offsets {
                let d = f16::from_f32(rng.uniform() * 0.05).to_le_bytes();
                block[offset..offset + 2].copy_from_slice(&d);
            }
        }
        bytes
    }

    /// candle's dequantization (`C`) of the same bytes (its scalar code follows ggml-quants.c).
    fn candle_row<B: PodBlock, C: GgmlType>(bytes: &[u8], values: usize) -> Vec<f32> {
        let mut out = vec![0f32; values];
        C::to_float(as_candle::<C, B>(as_blocks::<B>(bytes).unwrap()), &mut out);
        out
    }

    fn check<B: PodBlock, C: GgmlType>(dtype: GgmlDType, per_block: usize, scales: &[usize]) {
        let mut rng = Rng(30);
        let bytes = random_row::<B>(&mut rng, 3, scales);
        let mut out = vec![0f32; 3 * per_block];
        dequantize_row(dtype, &bytes, &mut out).unwrap();
        let want = candle_row::<B, C>(&bytes, out.len());
        for (i, (g, w)) in out.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * (1.0 + w.abs()),
                "{dtype:?} value {i}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn quantized_rows_match_candles_dequantization() {
        check::<BlockQ8_0, k_quants::BlockQ8_0>(GgmlDType::Q8_0, QK, &[0]);
        check::<BlockQ5_0, k_quants::BlockQ5_0>(GgmlDType::Q5_0, QK, &[0]);
        check::<BlockQ4_0, k_quants::BlockQ4_0>(GgmlDType::Q4_0, QK, &[0]);
        check::<BlockQ4_1, k_quants::BlockQ4_1>(GgmlDType::Q4_1, QK, &[0, 2]);
        check::<BlockQ5_1, k_quants::BlockQ5_1>(GgmlDType::Q5_1, QK, &[0, 2]);
        check::<BlockQ4K, k_quants::BlockQ4K>(GgmlDType::Q4K, QK_K, &[0, 2]);
        check::<BlockQ6K, k_quants::BlockQ6K>(GgmlDType::Q6K, QK_K, &[208]);
    }

    #[test]
    fn q6k_values_are_scale_times_signed_code() {
        let mut block = BlockQ6K {
            ql: [0; 128],
            qh: [0; 64],
            scales: [0; 16],
            d: f16::ONE,
        };
        block.ql[0] = 0x21; // value 0: low 1; value 64: low 2
        block.qh[0] = 0b11_00_00_10; // value 0: high 2; value 96: high 3
        block.scales[0] = -3;
        block.scales[4] = 5;
        block.scales[6] = 1;
        let mut out = [0f32; QK_K];
        dequantize_q6k(&block, &mut out);
        assert_eq!(out[0], -3.0 * ((1 | (2 << 4)) - 32) as f32);
        assert_eq!(out[64], 5.0 * (2 - 32) as f32);
        assert_eq!(out[96], 1.0 * ((3 << 4) - 32) as f32);
    }

    #[test]
    fn float_rows_and_errors() {
        let mut out = [0f32; 2];
        let bytes: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        dequantize_row(GgmlDType::F32, &bytes, &mut out).unwrap();
        assert_eq!(out, [1.5, -2.0]);
        let bytes: Vec<u8> = [0.25f32, 3.0]
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        dequantize_row(GgmlDType::F16, &bytes, &mut out).unwrap();
        assert_eq!(out, [0.25, 3.0]);
        assert!(matches!(
            dequantize_row(GgmlDType::F16, &bytes[..2], &mut out),
            Err(DequantError::Length {
                bytes: 2,
                values: 2,
                ..
            })
        ));
        assert_eq!(
            dequantize_row(GgmlDType::Q2K, &[], &mut []),
            Err(DequantError::Unsupported(GgmlDType::Q2K))
        );
        let mut long = [0f32; 64];
        assert!(dequantize_row(GgmlDType::Q8_0, &[0; 34], &mut long).is_err());
    }
}
