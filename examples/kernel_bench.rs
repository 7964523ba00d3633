//! Single-threaded timing of the repacked Q4_K kernels (llama.cpp's `q4_K_8x8`):
//! `cargo run --release --example kernel_bench [-- portable|avx2]`.
//!
//! Prints gemv speed as GB/s of weights read and gemm speed as GFLOP/s (2·m·n·k per product),
//! plus the Q8_K activation quantizers. Numbers are rough on a shared machine.

use half::f16;
use smoldesk::engine::cpu::blocks::{BlockQ4K, BlockQ4Kx8, BlockQ8K, BlockQ8Kx4, QK_K};
use smoldesk::engine::cpu::q4k::{gemm_q4k_x8, gemv_q4k_x8, interleave};
use smoldesk::engine::cpu::q8k::{quantize_row_q8k, quantize_rows_q8k_x4};
use smoldesk::engine::cpu::{SimdLevel, simd_level};
use std::time::{Duration, Instant};

/// splitmix64, so runs are repeatable without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// `n` × `k` random Q4_K weights, repacked eight rows at a time.
fn weights(n: usize, k: usize, rng: &mut Rng) -> Vec<BlockQ4Kx8> {
    let nb = k / QK_K;
    let blocks: Vec<BlockQ4K> = (0..n * nb)
        .map(|_| BlockQ4K {
            d: f16::from_f32(rng.uniform() * 0.01),
            dmin: f16::from_f32(rng.uniform() * 0.01),
            scales: std::array::from_fn(|_| rng.next() as u8),
            qs: std::array::from_fn(|_| rng.next() as u8),
        })
        .collect();
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
    let mut rng = Rng(42);
    let budget = Duration::from_millis(1500);

    for (n, k) in [(2048, 2048), (11008, 2048)] {
        let w = weights(n, k, &mut rng);
        let x: Vec<f32> = (0..k).map(|_| rng.uniform()).collect();
        let mut act = vec![
            BlockQ8K {
                d: 0.0,
                qs: [0; QK_K],
                bsums: [0; 16]
            };
            k / QK_K
        ];
        quantize_row_q8k(&x, &mut act);
        let mut out = vec![0.0f32; n];
        let t = best_time(budget, || gemv_q4k_x8(level, k, &w, &act, &mut out));
        let bytes = (n * k / QK_K * std::mem::size_of::<BlockQ4K>()) as f64;
        println!(
            "gemv {n}x{k}: {:8.1} us  {:6.2} GB/s of weights",
            t.as_secs_f64() * 1e6,
            bytes / t.as_secs_f64() / 1e9
        );
    }

    let (n, k, m) = (2048, 2048, 512);
    let w = weights(n, k, &mut rng);
    let x: Vec<f32> = (0..m * k).map(|_| rng.uniform()).collect();
    let empty = BlockQ8Kx4 {
        d: [0.0; 4],
        qs: [0; 1024],
        bsums: [0; 64],
    };
    let mut act = vec![empty; m / 4 * k / QK_K];
    let tq = best_time(budget, || {
        for (rows, a) in x.chunks_exact(4 * k).zip(act.chunks_exact_mut(k / QK_K)) {
            quantize_rows_q8k_x4(level, rows, k, a);
        }
    });
    let mut out = vec![0.0f32; m * n];
    let t = best_time(budget * 2, || {
        gemm_q4k_x8(level, k, &w, &act, m, &mut out, n)
    });
    let flops = 2.0 * (m * n * k) as f64;
    println!(
        "gemm {n}x{k}, m={m}: {:8.2} ms  {:6.1} GFLOP/s",
        t.as_secs_f64() * 1e3,
        flops / t.as_secs_f64() / 1e9
    );
    println!(
        "quantize {m}x{k} to Q8_Kx4: {:8.1} us ({:.2} GB/s of f32)",
        tq.as_secs_f64() * 1e6,
        (m * k * 4) as f64 / tq.as_secs_f64() / 1e9
    );
    let mut row = vec![
        BlockQ8K {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; 16]
        };
        k / QK_K
    ];
    let tr = best_time(budget, || quantize_row_q8k(&x[..k], &mut row));
    println!(
        "quantize one row of {k} to Q8_K: {:8.2} us",
        tr.as_secs_f64() * 1e6
    );
}
