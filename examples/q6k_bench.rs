//! Single-threaded timing of the Q6_K × Q8_K matrix-vector product in GB/s of weights read:
//! SmolLM3's tied output head (128,256 × 2,048) and an FFN-down-shaped 2,048 × 11,008; then of a
//! prompt's product on the FFN-down shape, 4 tokens per pass over each weight row (the tiled
//! order). `cargo run --release --example q6k_bench [-- portable]`; `SMOLDESK_SIMD=avx2` forces
//! AVX2 on an AVX-512 CPU. Rough on a shared machine.

use half::f16;
use smoldesk::engine::cpu::blocks::{BlockQ6K, BlockQ8K, QK_K};
use smoldesk::engine::cpu::q6k::{
    TOKENS_PER_PASS, dot_q6k_q8k, dot_q6k_q8k_rows, dot_q6k_q8k_tiled_tokens,
};
use smoldesk::engine::cpu::{SimdLevel, simd_level};
use std::time::{Duration, Instant};

/// Deterministic pseudo-random bits (speed does not depend on the values).
fn hash(i: usize) -> u64 {
    (i as u64 ^ 0x5bd1_e995).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 24
}

fn weights(rows: usize, blocks: usize) -> Vec<BlockQ6K> {
    (0..rows * blocks)
        .map(|b| BlockQ6K {
            ql: std::array::from_fn(|i| hash(b * 211 + i) as u8),
            qh: std::array::from_fn(|i| hash(b * 211 + 128 + i) as u8),
            scales: std::array::from_fn(|i| hash(b * 211 + 192 + i) as i8),
            d: f16::from_f32((hash(b) % 1000) as f32 * 1e-5),
        })
        .collect()
}

/// Activation row `row` of `blocks` blocks.
fn activations(row: usize, blocks: usize) -> Vec<BlockQ8K> {
    (0..blocks)
        .map(|b| BlockQ8K {
            d: 0.01,
            qs: std::array::from_fn(|i| hash((row * blocks + b) * 300 + i) as i8),
            bsums: std::array::from_fn(|i| hash((row * blocks + b) * 300 + 256 + i) as i16),
        })
        .collect()
}

/// Best time of a few runs of `f`, at least `min_total` of runs in all.
fn best(min_total: Duration, mut f: impl FnMut()) -> Duration {
    let (start, mut best) = (Instant::now(), Duration::MAX);
    while start.elapsed() < min_total || best == Duration::MAX {
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
    for (rows, k) in [(128_256, 2048), (2048, 11_008 / QK_K * QK_K)] {
        let blocks = k / QK_K;
        let w = weights(rows, blocks);
        let act = activations(0, blocks);
        let mut out = vec![0f32; rows];
        let gb = (rows * blocks * std::mem::size_of::<BlockQ6K>()) as f64 / 1e9;
        let one = best(Duration::from_secs(2), || {
            for (o, row) in out.iter_mut().zip(w.chunks_exact(blocks)) {
                *o = dot_q6k_q8k(level, row, &act);
            }
        });
        let check = out.clone();
        let multi = best(Duration::from_secs(2), || {
            dot_q6k_q8k_rows(level, &w, &act, &mut out)
        });
        assert_eq!(check, out, "row-group results differ");
        println!(
            "{} Q6_K {rows} x {k}: one row per pass {:.2} GB/s ({:.2} ms), rows per pass {:.2} GB/s ({:.2} ms)",
            level.name(),
            gb / one.as_secs_f64(),
            one.as_secs_f64() * 1e3,
            gb / multi.as_secs_f64(),
            multi.as_secs_f64() * 1e3,
        );
    }
    let (rows, k) = (2048, 11_008 / QK_K * QK_K);
    let blocks = k / QK_K;
    let w = weights(rows, blocks);
    let rows_of_act: Vec<Vec<BlockQ8K>> = (0..TOKENS_PER_PASS)
        .map(|t| activations(t, blocks))
        .collect();
    let acts: [&[BlockQ8K]; TOKENS_PER_PASS] = std::array::from_fn(|t| &rows_of_act[t][..]);
    let mut out = vec![[0f32; TOKENS_PER_PASS]; rows];
    let tiled = best(Duration::from_secs(2), || {
        for (o, row) in out.iter_mut().zip(w.chunks_exact(blocks)) {
            *o = dot_q6k_q8k_tiled_tokens(level, row, acts);
        }
    });
    let products = (rows * k * TOKENS_PER_PASS) as f64;
    println!(
        "{} Q6_K {rows} x {k}, {TOKENS_PER_PASS} tokens per pass (a prompt's order): {:.2} ms, {:.1} G products/s",
        level.name(),
        tiled.as_secs_f64() * 1e3,
        products / tiled.as_secs_f64() / 1e9,
    );
}
