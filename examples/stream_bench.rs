//! How close the decode products come to the machine's read bandwidth, without the rest of a
//! forward pass: one input row through many distinct weight matrices of the 3B's FFN shape
//! (so they stream from memory, as in a real token), on the compute pool, Q4_K repacked as the
//! model's background repack does; next to it the plain read bandwidth of the same threads.
//! `cargo run --release --example stream_bench [-- THREADS [MATRICES]]`.
//!
//! Prints GB/s of weights read per type (Q4_K repacked, Q6_K) and the share of the bandwidth.

use half::f16;
use smoldesk::engine::cpu::blocks::{BlockQ4K, BlockQ6K, QK_K};
use smoldesk::engine::cpu::matmul::{Activations, Matrix, WeightBytes};
use smoldesk::engine::cpu::pool::Pool;
use std::time::Instant;

use candle_core::quantized::GgmlDType;

/// Deterministic pseudo-random bits (speed does not depend on the values).
fn hash(i: usize) -> u64 {
    (i as u64 ^ 0x5bd1_e995).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 24
}

fn bytes_of<T>(blocks: &[T]) -> &[u8] {
    // SAFETY: the block types are plain bytes and f16s, without padding.
    unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast(), std::mem::size_of_val(blocks)) }
}

/// A `rows × cols` matrix of `dtype` owning a copy of `bytes`.
fn matrix_of(dtype: GgmlDType, rows: usize, cols: usize, bytes: &[u8]) -> Matrix {
    Matrix::new(dtype, rows, cols, WeightBytes::owned(bytes)).expect("valid shape")
}

fn q4k_matrix(seed: usize, rows: usize, cols: usize) -> Matrix {
    let blocks: Vec<BlockQ4K> = (0..rows * cols / QK_K)
        .map(|b| BlockQ4K {
            d: f16::from_f32((hash(seed + b) % 100) as f32 * 1e-4),
            dmin: f16::from_f32((hash(seed + b + 1) % 100) as f32 * 1e-4),
            scales: std::array::from_fn(|i| hash(seed + 3 * b + i) as u8),
            qs: std::array::from_fn(|i| hash(seed + b * 128 + i) as u8),
        })
        .collect();
    matrix_of(GgmlDType::Q4K, rows, cols, bytes_of(&blocks))
}

fn q6k_matrix(seed: usize, rows: usize, cols: usize) -> Matrix {
    let blocks: Vec<BlockQ6K> = (0..rows * cols / QK_K)
        .map(|b| BlockQ6K {
            ql: std::array::from_fn(|i| hash(seed + b * 211 + i) as u8),
            qh: std::array::from_fn(|i| hash(seed + b * 211 + 128 + i) as u8),
            scales: std::array::from_fn(|i| hash(seed + b * 211 + 192 + i) as i8),
            d: f16::from_f32((hash(seed + b) % 1000) as f32 * 1e-5),
        })
        .collect();
    matrix_of(GgmlDType::Q6K, rows, cols, bytes_of(&blocks))
}

/// Best GB/s of weights over a few passes of one input row through every matrix.
fn stream_rate(pool: &Pool, matrices: &[Matrix]) -> f64 {
    let k = matrices[0].cols();
    let x: Vec<f32> = (0..k)
        .map(|i| (hash(i) % 200) as f32 * 0.01 - 1.0)
        .collect();
    let refs: Vec<&Matrix> = matrices.iter().collect();
    let mut act = Activations::new();
    act.quantize(pool, &x, 1, k, &refs);
    let mut out = vec![0f32; matrices.iter().map(Matrix::rows).max().unwrap_or(0)];
    let bytes: usize = matrices
        .iter()
        .map(|m| m.rows() * m.cols() / QK_K * m.dtype().type_size())
        .sum();
    let mut best = 0f64;
    for _ in 0..5 {
        let start = Instant::now();
        for m in matrices {
            m.matmul(pool, &act, &mut out);
        }
        best = best.max(bytes as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    best
}

fn main() {
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let count: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    let pool = Pool::new(threads);
    let q4k: Vec<Matrix> = (0..count)
        .map(|i| q4k_matrix(i << 24, 11008, 2048))
        .collect();
    let q6k: Vec<Matrix> = (0..count)
        .map(|i| q6k_matrix(i << 24, 2048, 11008))
        .collect();
    for m in &q4k {
        m.repack().expect("memory for the repacked weights");
    }
    let bandwidth = smoldesk::engine::cpu::bandwidth::read_bandwidth_gb_s(1 << 30, threads);
    println!("read bandwidth {bandwidth:.1} GB/s ({threads} threads)");
    for (name, set) in [("Q4_K 11008x2048", &q4k), ("Q6_K 2048x11008", &q6k)] {
        let rate = stream_rate(&pool, set);
        println!(
            "{name} x{count}: {rate:.1} GB/s of weights, {:.0}% of the bandwidth",
            100.0 * rate / bandwidth
        );
    }
}
