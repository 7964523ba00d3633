//! Bit-exactness of the Q6_K, Q5_K, Q3_K, Q2_K, Q8_0, Q5_0, Q4_1, Q5_1 and Q4_0 kernels and of the Q8_0 / Q8_1 activation
//! quantizers against llama.cpp's own outputs (golden vectors in tests/fixtures/kernels/).

mod common;

use common::golden::{Matmul, read_matmul, read_quantized};
use smoldesk::engine::cpu::SimdLevel;
use smoldesk::engine::cpu::blocks::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0,
    BlockQ8K, QK, QK_K, as_blocks,
};
use smoldesk::engine::cpu::lanes::avx2_available;
use smoldesk::engine::cpu::q2k::{dot_q2k_q8k, dot_q2k_q8k_tiled};
use smoldesk::engine::cpu::q3k::{dot_q3k_q8k, dot_q3k_q8k_tiled};
use smoldesk::engine::cpu::q4_0::dot_q4_0_q8_0;
use smoldesk::engine::cpu::q4_1::{dot_q4_1_q8_1, dot_q5_1_q8_1, quantize_q8_1};
use smoldesk::engine::cpu::q5k::{dot_q5k_q8k, dot_q5k_q8k_tiled};
use smoldesk::engine::cpu::q6k::{dot_q6k_q8k, dot_q6k_q8k_tiled};
use smoldesk::engine::cpu::q8_0::{dot_q5_0_q8_0, dot_q8_0_q8_0, quantize_q8_0};
use smoldesk::engine::cpu::q8k;

/// The levels to check: portable always, AVX2 where the CPU has it.
fn levels() -> Vec<SimdLevel> {
    let mut levels = vec![SimdLevel::Portable];
    if avx2_available() {
        levels.push(SimdLevel::Avx2);
    }
    levels
}

/// llama.cpp's `quantize_row_q8_K`, as the engine quantizes Q8_K activations.
fn q8k_blocks(x: &[f32]) -> Vec<BlockQ8K> {
    let mut out = q8k::zeroed_q8k(x.len() / QK_K);
    q8k::quantize_row_q8k(x, &mut out);
    out
}

/// Checks every batch size `m` of `case` whose outputs `bit_exact(m)` says llama.cpp computes
/// like our kernel; `dot(level, weight row, activation row)` is one output.
fn check_matmul<W: smoldesk::engine::cpu::blocks::PodBlock, A>(
    case: &Matmul,
    quantize: impl Fn(SimdLevel, &[f32]) -> Vec<A>,
    dot: impl Fn(SimdLevel, &[W], &[A]) -> f32,
    bit_exact: impl Fn(usize) -> bool,
) -> usize {
    // The file holds the weights in the GGUF layout even where llama.cpp repacked them.
    let w: &[W] = as_blocks(&case.w).unwrap();
    let rows: Vec<&[W]> = w.chunks_exact(w.len() / case.n).collect();
    let mut checked = 0;
    for level in levels() {
        let acts: Vec<Vec<A>> = case
            .x
            .chunks_exact(case.k)
            .map(|x| quantize(level, x))
            .collect();
        for (m, y) in case.outputs.iter().filter(|(m, _)| bit_exact(*m)) {
            for (j, y_row) in y.chunks_exact(case.n).enumerate() {
                for (i, (&want, row)) in y_row.iter().zip(&rows).enumerate() {
                    let got = dot(level, row, &acts[j]);
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{level:?} m={m} token {j} row {i}: {got} vs {want}"
                    );
                }
            }
            checked += 1;
        }
    }
    checked
}

#[test]
fn q8_0_matmul_matches_llama_cpp_at_every_batch_size() {
    // m = 1: vec_dot; m ≥ 2: tinyBLAS_Q0_AVX, which sums each output the same way.
    let case = read_matmul("mm-q8_0-n64-k576.bin");
    assert_eq!(case.wtype, 8);
    let checked = check_matmul::<BlockQ8_0, _>(&case, quantize_q8_0, dot_q8_0_q8_0, |_| true);
    assert_eq!(checked, case.outputs.len() * levels().len());
}

#[test]
fn q5_0_matmul_matches_llama_cpp_at_every_batch_size() {
    let case = read_matmul("mm-q5_0-n64-k576.bin");
    assert_eq!(case.wtype, 6);
    let checked = check_matmul::<BlockQ5_0, _>(&case, quantize_q8_0, dot_q5_0_q8_0, |_| true);
    assert_eq!(checked, case.outputs.len() * levels().len());
}

#[test]
fn q4_1_matmul_matches_llama_cpp_at_every_batch_size() {
    let case = read_matmul("mm-q4_1-n64-k576.bin");
    assert_eq!(case.wtype, 3);
    let checked = check_matmul::<BlockQ4_1, _>(&case, quantize_q8_1, dot_q4_1_q8_1, |_| true);
    assert_eq!(checked, case.outputs.len() * levels().len());
}

#[test]
fn q4_0_matmul_matches_llama_cpp_repacked_kernels_at_every_batch_size() {
    // llama.cpp repacks Q4_0 on AVX2 and sums each output as its repacked gemv/gemm do.
    let case = read_matmul("mm-q4_0-n64-k576.bin");
    assert_eq!(case.wtype, 2);
    assert!(case.repacked, "llama.cpp took its repacked Q4_0 path");
    let checked = check_matmul::<BlockQ4_0, _>(&case, quantize_q8_0, dot_q4_0_q8_0, |_| true);
    assert_eq!(checked, case.outputs.len() * levels().len());
}

#[test]
fn q5_1_matmul_matches_llama_cpp_at_every_batch_size() {
    let case = read_matmul("mm-q5_1-n64-k576.bin");
    assert_eq!(case.wtype, 7);
    assert!(!case.repacked);
    let checked = check_matmul::<BlockQ5_1, _>(&case, quantize_q8_1, dot_q5_1_q8_1, |_| true);
    assert_eq!(checked, case.outputs.len() * levels().len());
}

#[test]
fn q6k_matmul_matches_llama_cpp_at_every_batch_size() {
    // llama.cpp takes vec_dot for m < 8 and its tiled K-quant path from m = 8 on.
    for name in ["mm-q6_K-n64-k512.bin", "mm-q6_K-n40-k512.bin"] {
        let case = read_matmul(name);
        assert_eq!(case.wtype, 14);
        let q8k = |_: SimdLevel, x: &[f32]| q8k_blocks(x);
        let small = check_matmul::<BlockQ6K, _>(&case, q8k, dot_q6k_q8k, |m| m < 8);
        let large = check_matmul::<BlockQ6K, _>(&case, q8k, dot_q6k_q8k_tiled, |m| m >= 8);
        assert_eq!(small + large, case.outputs.len() * levels().len(), "{name}");
        assert!(small > 0 && large > 0, "{name}");
    }
}

#[test]
fn q5k_matmul_matches_llama_cpp_at_every_batch_size() {
    // As Q6_K: vec_dot for m < 8, the tiled K-quant path from m = 8 on.
    for name in ["mm-q5_K-n64-k512.bin", "mm-q5_K-n40-k1536.bin"] {
        let case = read_matmul(name);
        assert_eq!(case.wtype, 13);
        assert!(!case.repacked, "llama.cpp does not repack Q5_K on x86");
        let q8k = |_: SimdLevel, x: &[f32]| q8k_blocks(x);
        let small = check_matmul::<BlockQ5K, _>(&case, q8k, dot_q5k_q8k, |m| m < 8);
        let large = check_matmul::<BlockQ5K, _>(&case, q8k, dot_q5k_q8k_tiled, |m| m >= 8);
        assert_eq!(small + large, case.outputs.len() * levels().len(), "{name}");
        assert!(small > 0 && large > 0, "{name}");
    }
}

#[test]
fn q3k_matmul_matches_llama_cpp_at_every_batch_size() {
    // As Q6_K: vec_dot for m < 8, the tiled K-quant path from m = 8 on.
    for name in ["mm-q3_K-n64-k512.bin", "mm-q3_K-n40-k1536.bin"] {
        let case = read_matmul(name);
        assert_eq!(case.wtype, 11);
        assert!(!case.repacked, "llama.cpp does not repack Q3_K on x86");
        let q8k = |_: SimdLevel, x: &[f32]| q8k_blocks(x);
        let small = check_matmul::<BlockQ3K, _>(&case, q8k, dot_q3k_q8k, |m| m < 8);
        let large = check_matmul::<BlockQ3K, _>(&case, q8k, dot_q3k_q8k_tiled, |m| m >= 8);
        assert_eq!(small + large, case.outputs.len() * levels().len(), "{name}");
        assert!(small > 0 && large > 0, "{name}");
    }
}

#[test]
fn q2k_matmul_matches_llama_cpp_at_every_batch_size() {
    // As Q6_K; llama.cpp repacks Q2_K only on AVX-512 machines, and these vectors come from
    // its AVX2 build.
    for name in ["mm-q2_K-n64-k512.bin", "mm-q2_K-n40-k1536.bin"] {
        let case = read_matmul(name);
        assert_eq!(case.wtype, 10);
        assert!(
            !case.repacked,
            "the vectors come from llama.cpp's unrepacked Q2_K path"
        );
        let q8k = |_: SimdLevel, x: &[f32]| q8k_blocks(x);
        let small = check_matmul::<BlockQ2K, _>(&case, q8k, dot_q2k_q8k, |m| m < 8);
        let large = check_matmul::<BlockQ2K, _>(&case, q8k, dot_q2k_q8k_tiled, |m| m >= 8);
        assert_eq!(small + large, case.outputs.len() * levels().len(), "{name}");
        assert!(small > 0 && large > 0, "{name}");
    }
}

fn check_quantizer<B: smoldesk::engine::cpu::blocks::PodBlock>(
    name: &str,
    qtype: usize,
    quantize: impl Fn(SimdLevel, &[f32]) -> Vec<B>,
) {
    let file = read_quantized(name);
    assert_eq!(file.qtype, qtype);
    assert!(file.k.is_multiple_of(QK) && !file.rows.is_empty());
    for level in levels() {
        for (r, (x, want)) in file.rows.iter().enumerate() {
            let blocks = quantize(level, x);
            let size = std::mem::size_of::<B>();
            // SAFETY: the block types are plain repr(C) data without padding.
            let got = unsafe {
                std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), blocks.len() * size)
            };
            assert_eq!(got, &want[..], "{name} {level:?} row {r}");
        }
    }
}

#[test]
fn quantize_row_q8_0_matches_llama_cpp_bit_for_bit() {
    check_quantizer("q-q8_0.bin", 8, quantize_q8_0);
}

#[test]
fn quantize_row_q8_1_matches_llama_cpp_bit_for_bit() {
    check_quantizer("q-q8_1.bin", 9, quantize_q8_1);
}
