//! Timing of attention (the last `SEQ` query tokens, default 1, over a cached context of
//! `CONTEXT` positions, SmolLM3-3B shapes: 16 query heads, 4 KV heads of 128, f16 cache) on a
//! pool of `THREADS` threads, over `LAYERS` separate caches (default 36, as the model has, so
//! the caches come from memory as in a real forward pass, not from the L3 cache):
//! `cargo run --release --example attention_bench [-- CONTEXT [THREADS [SEQ [LAYERS]]]]`.
//! One query token takes the decode path; more take the prompt (tiled) path.
//!
//! Prints the time per layer and the cache read rate. Numbers are rough on a shared machine.

use half::f16;
use smoldesk::engine::attention::{AttentionShape, KvRows, SumOrder, attend_into};
use smoldesk::engine::cpu::pool::Pool;
use std::time::{Duration, Instant};

/// Pseudo-random in [-1, 1) (speed does not depend on the values).
fn uniform(i: usize) -> f32 {
    let bits = (i as u64 ^ 0x5bd1_e995).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
    bits as f32 / (1u64 << 23) as f32 - 1.0
}

fn main() {
    let mut args = std::env::args().skip(1);
    let context: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2048);
    let threads: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let seq: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let layers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(36);
    let (seq, layers) = (seq.clamp(1, context), layers.max(1));
    let (n_head, n_kv, hd) = (16, 4, 128);
    let row = n_kv * hd;
    let values =
        |seed: usize| -> Vec<f32> { (0..context * row).map(|i| uniform(i + seed)).collect() };
    let caches: Vec<KvRows<f16>> = (0..layers)
        .map(|l| {
            let mut kv = KvRows::<f16>::default();
            kv.append(
                0,
                n_kv,
                hd,
                &values(l << 24),
                &values((l << 24) + (1 << 30)),
            );
            kv
        })
        .collect();
    let q: Vec<f32> = (0..seq * n_head * hd).map(|i| uniform(i + 7)).collect();
    let shape = AttentionShape {
        n_head,
        n_kv,
        head_dim: hd,
        offset: context - seq,
        seq,
        order: SumOrder::LlamaCpp,
    };
    let pool = Pool::new(threads);
    let mut out = vec![0f32; seq * n_head * hd];
    let start = Instant::now();
    let mut best = Duration::MAX;
    while start.elapsed() < Duration::from_secs(3) {
        let t = Instant::now();
        for kv in &caches {
            attend_into(&pool, &q, kv, shape, &mut out);
        }
        best = best.min(t.elapsed() / layers as u32);
    }
    let bytes = 2 * context * row * 2;
    println!(
        "attention of {seq} token(s), context {context}, {threads} threads, {layers} layers: {:.1} µs per layer, {:.1} GB/s of cache",
        best.as_secs_f64() * 1e6,
        bytes as f64 / best.as_secs_f64() / 1e9
    );
}
