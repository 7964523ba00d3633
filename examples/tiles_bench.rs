//! Single-threaded timing of a prompt's product with Q8_0, Q5_0 and Q4_1 weights, one output at
//! a time against tiles of weight rows × tokens (`engine::cpu::tiles`): 2,048 rows × COLUMNS
//! (default 2,048, SmolLM3's attention output; 11008 is its FFN down) and 96 tokens, in chunks
//! of 32 rows as the matmul splits them, best of 5. `cargo run --release --example tiles_bench
//! [-- COLUMNS] [portable]`. Rough on a shared machine; run it twice.

use half::f16;
use smoldesk::engine::cpu::blocks::{BlockQ4_1, BlockQ5_0, BlockQ8_0, BlockQ8_1};
use smoldesk::engine::cpu::tiles::{self, TiledBlock};
use smoldesk::engine::cpu::{SimdLevel, simd_level};
use std::time::{Duration, Instant};

const ROWS: usize = 2048;
const TOKENS: usize = 96;
/// Rows per chunk of work, as the matmul hands them to a thread (its weights stay in L2).
const CHUNK_ROWS: usize = 32;

/// Deterministic pseudo-random bits (speed does not depend on the values).
fn hash(i: usize) -> u64 {
    (i as u64 ^ 0x5bd1_e995).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 24
}

fn scale(i: usize) -> f16 {
    f16::from_f32((hash(i) % 1000) as f32 * 1e-5)
}

/// The best of 5 runs of `f`, in milliseconds.
fn best_ms(mut f: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .min()
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
        * 1e3
}

/// Times one output at a time and the tile shapes for weights `W` and activations `A`.
fn compare<W: TiledBlock>(name: &str, level: SimdLevel, w: &[W], act: &[W::Act]) {
    let blocks = act.len() / TOKENS;
    let row = |r: usize| &w[r * blocks..][..blocks];
    let token = |t: usize| &act[t * blocks..][..blocks];
    let mut sink = 0f32;
    let one = best_ms(|| {
        for chunk in (0..ROWS).step_by(CHUNK_ROWS) {
            for t in 0..TOKENS {
                for r in chunk..chunk + CHUNK_ROWS {
                    sink += W::dot(level, row(r), token(t));
                }
            }
        }
    });
    let tiled = best_ms(|| {
        for chunk in (0..ROWS).step_by(CHUNK_ROWS) {
            for t0 in (0..TOKENS).step_by(tiles::TILE_TOKENS) {
                let acts = std::array::from_fn(|i| token(t0 + i));
                for r0 in (chunk..chunk + CHUNK_ROWS).step_by(tiles::TILE_ROWS) {
                    let out = W::tile::<{ tiles::TILE_ROWS }, { tiles::TILE_TOKENS }>(
                        level,
                        std::array::from_fn(|i| row(r0 + i)),
                        acts,
                    );
                    sink += out[0][0];
                }
            }
        }
    });
    println!(
        "{name}: one output at a time {one:.1} ms, tiles of {}×{} {tiled:.1} ms ({:.2}x){}",
        tiles::TILE_ROWS,
        tiles::TILE_TOKENS,
        one / tiled,
        if sink.is_nan() { " " } else { "" }
    );
}

fn main() {
    let blocks = std::env::args()
        .skip(1)
        .find_map(|a| a.parse::<usize>().ok())
        .unwrap_or(2048)
        / 32;
    let level = if std::env::args().any(|a| a == "portable") {
        SimdLevel::Portable
    } else {
        simd_level()
    };
    println!(
        "{ROWS} rows × {} columns, {TOKENS} tokens, {} kernels, one thread",
        blocks * 32,
        level.name()
    );
    let q8: Vec<BlockQ8_0> = (0..TOKENS * blocks)
        .map(|b| BlockQ8_0 {
            d: scale(b + 7),
            qs: std::array::from_fn(|i| hash(b * 40 + i) as i8),
        })
        .collect();
    let q8_1: Vec<BlockQ8_1> = q8
        .iter()
        .map(|b| BlockQ8_1 {
            d: b.d,
            s: scale(hash(b.qs[0] as usize) as usize),
            qs: b.qs,
        })
        .collect();
    let w8: Vec<BlockQ8_0> = (0..ROWS * blocks)
        .map(|b| BlockQ8_0 {
            d: scale(b),
            qs: std::array::from_fn(|i| hash(b * 33 + i + 1) as i8),
        })
        .collect();
    let w5: Vec<BlockQ5_0> = (0..ROWS * blocks)
        .map(|b| BlockQ5_0 {
            d: scale(b),
            qh: std::array::from_fn(|i| hash(b * 21 + i) as u8),
            qs: std::array::from_fn(|i| hash(b * 21 + 4 + i) as u8),
        })
        .collect();
    let w4: Vec<BlockQ4_1> = (0..ROWS * blocks)
        .map(|b| BlockQ4_1 {
            d: scale(b),
            m: scale(b + 1),
            qs: std::array::from_fn(|i| hash(b * 19 + i) as u8),
        })
        .collect();
    compare("Q8_0", level, &w8, &q8);
    compare("Q5_0", level, &w5, &q8);
    compare("Q4_1", level, &w4, &q8_1);
}
