//! The machine's read bandwidth: the bound on decode speed, which streams every weight once
//! per token.

use std::time::Instant;

/// Passes [`read_bandwidth_gb_s`] takes the best of.
pub const PASSES: usize = 5;

/// Best read bandwidth over [`PASSES`] passes of `threads` threads each summing its share of
/// a `bytes`-long buffer, in GB/s.
pub fn read_bandwidth_gb_s(bytes: usize, threads: usize) -> f64 {
    // Distinct non-zero values so that every page is really backed by memory.
    let buffer: Vec<u64> = (0..bytes / 8).map(|i| i as u64 | 1).collect();
    let share = buffer.len().div_ceil(threads.max(1));
    let mut best: f64 = 0.0;
    for _ in 0..PASSES {
        let start = Instant::now();
        let total = std::thread::scope(|scope| {
            let workers: Vec<_> = buffer
                .chunks(share)
                .map(|part| scope.spawn(move || sum_words(part)))
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.max((buffer.len() * 8) as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Wrapping sum of `words` with independent lanes, so loads are not serialised by one adder.
fn sum_words(words: &[u64]) -> u64 {
    let mut lanes = [0u64; 8];
    let mut chunks = words.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, &w) in lanes.iter_mut().zip(chunk) {
            *lane = lane.wrapping_add(w);
        }
    }
    let rest = chunks
        .remainder()
        .iter()
        .fold(0u64, |a, &w| a.wrapping_add(w));
    lanes.iter().fold(rest, |a, &l| a.wrapping_add(l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_words_adds_every_word_including_the_remainder() {
        let words: Vec<u64> = (1..=21).collect();
        assert_eq!(sum_words(&words), 21 * 22 / 2);
    }

    #[test]
    fn bandwidth_is_positive_on_a_small_buffer() {
        assert!(read_bandwidth_gb_s(1 << 20, 2) > 0.0);
    }
}
