//! Single-threaded timing of the Q4_K kernels (llama.cpp's `q4_K_8x8` numerics), on the GGUF
//! layout the model uses and on llama.cpp's repacked layout for comparison:
//! `cargo run --release --example kernel_bench [-- portable|avx2]`.
//!
//! Prints gemv speed as GB/s of weights read and gemm speed as GFLOP/s (2·m·n·k per product),
//! plus the Q8_K activation quantizers. Numbers are rough on a shared machine.

use half::f16;
use smoldesk::engine::cpu::blocks::{BlockQ4K, BlockQ4Kx8, QK_K};
use smoldesk::engine::cpu::q4k::{gemm_q4k, gemm_q4k_x8, gemv_q4k, gemv_q4k_x8, interleave};
use smoldesk::engine::cpu::q8k::{
    quantize_row_q8k, quantize_rows_q8k_x4, zeroed_q8k, zeroed_q8k_x4,
};
use smoldesk::engine::cpu::{SimdLevel, simd_level};
use std::time::{Duration, Instant};

/// Deterministic pseudo-random bits (speed does not depend on the values).
fn hash(i: usize) -> u64 {
    (i as u64 ^ 0x5bd1_e995).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 24
}

/// Pseudo-random in [-1, 1).
fn uniform(i: usize) -> f32 {
    (hash(i) & 0xff_ffff) as f32 / (1u32 << 23) as f32 - 1.0
}

/// `n` × `k` random Q4_K weights in GGUF layout.
fn gguf_weights(n: usize, k: usize) -> Vec<BlockQ4K> {
    let nb = k / QK_K;
    (0..n * nb)
        .map(|b| BlockQ4K {
            d: f16::from_f32(uniform(3 * b) * 0.01),
            dmin: f16::from_f32(uniform(3 * b + 1) * 0.01),
            scales: std::array::from_fn(|i| hash(3 * b + 2 + 7 * i) as u8),
            qs: std::array::from_fn(|i| hash(b * 128 + i) as u8),
        })
        .collect()
}

/// The same weights repacked eight rows at a time, as llama.cpp does at load.
fn repacked(blocks: &[BlockQ4K], n: usize, k: usize) -> Vec<BlockQ4Kx8> {
    let nb = k / QK_K;
    (0..n / 8)
        .flat_map(|g| {
            let blocks = &blocks;
            (0..nb).map(move |x| interleave(&std::array::from_fn(|r| blocks[(8 * g + r) * nb + x])))
        })
        .collect()
}

/// Runs `f` repeatedly for about `budget` and returns the best time of one run.
fn best_time(budget: Duration, mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    let mut best = Duration::MAX;
    while start.elapsed() < budget || best == Duration::MAX {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed());
    }
    best
}

fn main() {
    let level = match std::env::args().nth(1).as_deref() {
        Some("portable") => SimdLevel::Portable,
        _ => simd_level(),
    };
    println!("kernels: {}", level.name());
    let budget = Duration::from_millis(1500);

    for (n, k) in [(2048, 2048), (11008, 2048), (65536, 2048)] {
        let gguf = gguf_weights(n, k);
        let packed = repacked(&gguf, n, k);
        let x: Vec<f32> = (0..k).map(uniform).collect();
        let mut act = zeroed_q8k(k / QK_K);
        quantize_row_q8k(&x, &mut act);
        let mut out = vec![0.0f32; n];
        let bytes = (n * k / QK_K * std::mem::size_of::<BlockQ4K>()) as f64;
        let t = best_time(budget, || gemv_q4k(level, k, &gguf, &act, &mut out));
        let tp = best_time(budget, || gemv_q4k_x8(level, k, &packed, &act, &mut out));
        for (layout, t) in [("gguf", t), ("repacked", tp)] {
            println!(
                "gemv {n}x{k} ({layout}): {:8.1} us  {:6.2} GB/s of weights",
                t.as_secs_f64() * 1e6,
                bytes / t.as_secs_f64() / 1e9
            );
        }
    }

    let (n, k) = (2048, 2048);
    let gguf = gguf_weights(n, k);
    let packed = repacked(&gguf, n, k);
    for m in [8, 512] {
        let x: Vec<f32> = (0..m * k).map(uniform).collect();
        let mut act = zeroed_q8k_x4(m / 4 * k / QK_K);
        for (rows, a) in x.chunks_exact(4 * k).zip(act.chunks_exact_mut(k / QK_K)) {
            quantize_rows_q8k_x4(level, rows, k, a);
        }
        let mut out = vec![0.0f32; m * n];
        // As the matmul calls it: one chunk of 32 weight rows at a time.
        let chunk = 32 * k / QK_K;
        let t = best_time(budget * 2, || {
            for (c, w) in gguf.chunks_exact(chunk).enumerate() {
                gemm_q4k(level, k, w, &act, m, &mut out[32 * c..], n);
            }
        });
        let tp = best_time(budget * 2, || {
            gemm_q4k_x8(level, k, &packed, &act, m, &mut out, n)
        });
        let flops = 2.0 * (m * n * k) as f64;
        for (layout, t) in [("gguf", t), ("repacked", tp)] {
            println!(
                "gemm {n}x{k}, m={m} ({layout}): {:8.2} ms  {:6.1} GFLOP/s",
                t.as_secs_f64() * 1e3,
                flops / t.as_secs_f64() / 1e9
            );
        }
    }
    let m = 512;
    let x: Vec<f32> = (0..m * k).map(uniform).collect();
    let mut act = zeroed_q8k_x4(m / 4 * k / QK_K);
    let tq = best_time(budget, || {
        for (rows, a) in x.chunks_exact(4 * k).zip(act.chunks_exact_mut(k / QK_K)) {
            quantize_rows_q8k_x4(level, rows, k, a);
        }
    });
    println!(
        "quantize {m}x{k} to Q8_Kx4: {:8.1} us ({:.2} GB/s of f32)",
        tq.as_secs_f64() * 1e6,
        (m * k * 4) as f64 / tq.as_secs_f64() / 1e9
    );
    let mut row = zeroed_q8k(k / QK_K);
    let tr = best_time(budget, || quantize_row_q8k(&x[..k], &mut row));
    println!(
        "quantize one row of {k} to Q8_K: {:8.2} us",
        tr.as_secs_f64() * 1e6
    );
}
