//! The machine's read bandwidth: the bound on decode speed, which streams every weight once
//! per token.

use std::time::Instant;

/// Passes [`read_bandwidth_gb_s`] takes the best of.
pub const PASSES: usize = 5;

/// Best read bandwidth over [`PASSES`] passes of `threads` threads each summing its share of
/// a `bytes`-long buffer, in GB/s.
pub fn read_bandwidth_gb_s(bytes: usize, threads: usize) -> f64 {
    let buffer = ReadBuffer::new(bytes);
    (0..PASSES)
        .map(|_| buffer.pass_gb_s(threads))
        .fold(0.0, f64::max)
}

/// A buffer whose reading times the machine's read bandwidth, one pass at a time (so passes
/// can be taken between other work, at the same moments as it).
pub struct ReadBuffer {
    words: Vec<u64>,
}

impl ReadBuffer {
    /// A buffer of `bytes` bytes, every page backed by memory.
    pub fn new(bytes: usize) -> Self {
        // Distinct non-zero values so that every page is really backed by memory.
        Self {
            words: (0..bytes / 8).map(|i| i as u64 | 1).collect(),
        }
    }

    /// GB/s of one pass of `threads` threads each summing its share of the buffer.
    pub fn pass_gb_s(&self, threads: usize) -> f64 {
        let share = self.words.len().div_ceil(threads.max(1)).max(1);
        let start = Instant::now();
        let total = std::thread::scope(|scope| {
            let workers: Vec<_> = self
                .words
                .chunks(share)
                .map(|part| scope.spawn(move || sum_words(part)))
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(total);
        (self.words.len() * 8) as f64 / start.elapsed().as_secs_f64() / 1e9
    }
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
        assert!(ReadBuffer::new(1 << 16).pass_gb_s(3) > 0.0);
    }
}
