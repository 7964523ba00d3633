//! Token sampling: temperature, top-k, top-p, min-p, repeat penalty, seeded randomness.
//!
//! The filters run in the order Hugging Face transformers applies them (the order SmolLM's
//! recommended settings assume): repeat penalty, temperature, top-k, top-p, min-p, then a seeded
//! draw. Temperature 0 (or top-k 1) is greedy: the most likely token, ties going to the lowest id.
//! NaN logits count as impossible tokens; the sampler never panics.
//!
//! A draw over a 128k vocabulary costs a few linear passes and never sorts it: the scan for the
//! maximum and for the candidates is vectorised, tokens whose weight is negligible next to the
//! best one are skipped, and top-k and top-p total the count or weight per weight bucket, then
//! sort only the bucket where the target is reached.

use serde::{Deserialize, Serialize};

use super::Architecture;

/// How the next token is chosen from the logits. Temperature 0 means greedy (argmax).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 picks the most likely token.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability adds up to p (1.0 = off).
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one (0 = off).
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of recently seen tokens by this (1.0 = off).
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    pub repeat_last_n: usize,
    /// Random seed; the same seed and inputs give the same reply.
    pub seed: u64,
    /// Most tokens to generate in one reply.
    pub max_tokens: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.6,
            top_k: 0,
            top_p: 0.95,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 42,
            max_tokens: 2048,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

/// The sampling settings each model family's authors recommend: SmolLM3 temperature 0.6 and
/// top-p 0.95; Llama-style models such as SmolLM2 temperature 0.2 and top-p 0.9.
pub fn model_defaults(arch: Architecture) -> SamplingParams {
    match arch {
        Architecture::SmolLm3 => SamplingParams {
            temperature: 0.6,
            top_p: 0.95,
            ..SamplingParams::default()
        },
        Architecture::Llama => SamplingParams {
            temperature: 0.2,
            top_p: 0.9,
            ..SamplingParams::default()
        },
    }
}

/// Tokens whose weight relative to the most likely one is below `e^-27.6` (about 1e-12) are
/// never drawn: even 128k of them together stay below f32 resolution of the total weight.
const NEGLIGIBLE_LOG_WEIGHT: f32 = -27.6;

/// Top-k and top-p group weights into buckets of 1/2^(23-19) = 1/16 of a power of two.
const WEIGHT_BUCKET_SHIFT: u32 = 19;

/// Buckets for weights down to 2^-64, far below the negligible weight (about 2^-40).
const WEIGHT_BUCKETS: usize = 64 * 16;

/// Greedy decoding and candidate collection scan the scores in chunks of this many values,
/// one bit of a `u32` mask each.
const SCAN_CHUNK: usize = 32;

/// A token that may be drawn, with its weight relative to the most likely token (at most 1).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Candidate {
    token: u32,
    weight: f32,
}

impl Candidate {
    /// Heavier first; the lower id first among equal weights, so results are deterministic.
    fn heavier_first(&self, other: &Self) -> std::cmp::Ordering {
        other
            .weight
            .total_cmp(&self.weight)
            .then(self.token.cmp(&other.token))
    }
}

/// Chooses tokens from logits according to [`SamplingParams`], with its own seeded randomness.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
    /// Penalised, temperature-scaled logits.
    scores: Vec<f32>,
    /// The tokens that survived the filters so far.
    candidates: Vec<Candidate>,
    /// Candidates in the bucket where top-k's count or top-p's mass reaches its target.
    boundary: Vec<Candidate>,
    /// Count or probability mass per weight bucket.
    bucket_totals: Vec<f64>,
    /// Distinct recent tokens for the repeat penalty.
    recent: Vec<u32>,
}

impl Sampler {
    /// A sampler with the given settings, its randomness seeded from `params.seed`.
    pub fn new(params: &SamplingParams) -> Self {
        Self {
            params: params.clone(),
            rng: SplitMix64::new(params.seed),
            scores: Vec::new(),
            candidates: Vec::new(),
            boundary: Vec::new(),
            bucket_totals: Vec::new(),
            recent: Vec::new(),
        }
    }

    /// The settings this sampler uses.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (one per vocabulary entry), penalising tokens among
    /// the last `repeat_last_n` of `recent_tokens`. An empty `logits` gives token 0.
    pub fn sample(&mut self, logits: &[f32], recent_tokens: &[u32]) -> u32 {
        let temperature = self.params.temperature;
        let is_greedy = temperature.is_nan() || temperature <= 0.0 || self.params.top_k == 1;
        self.load_scores(logits, if is_greedy { 1.0 } else { temperature });
        self.apply_repeat_penalty(recent_tokens);
        let (best_token, best) = argmax(&self.scores);
        if is_greedy || !best.is_finite() {
            return best_token;
        }
        self.collect_candidates(best);
        self.keep_top_k();
        let total = total_weight(&self.candidates);
        self.keep_above_min_p();
        self.keep_top_p(total);
        self.draw().unwrap_or(best_token)
    }

    /// Copies the logits divided by the temperature, turning NaN into impossible tokens.
    fn load_scores(&mut self, logits: &[f32], temperature: f32) {
        let inverse_temperature = temperature.recip();
        self.scores.clear();
        self.scores.extend(logits.iter().map(|&logit| {
            let scaled = logit * inverse_temperature;
            if scaled.is_nan() {
                f32::NEG_INFINITY
            } else {
                scaled
            }
        }));
    }

    /// llama.cpp's repeat penalty, once per distinct recent token. Dividing by a positive
    /// temperature keeps signs, so penalising scaled logits equals penalising raw ones.
    fn apply_repeat_penalty(&mut self, recent_tokens: &[u32]) {
        let penalty = self.params.repeat_penalty;
        let is_active = penalty.is_finite() && penalty > 0.0 && penalty != 1.0;
        if !is_active || self.params.repeat_last_n == 0 {
            return;
        }
        let window_start = recent_tokens
            .len()
            .saturating_sub(self.params.repeat_last_n);
        self.recent.clear();
        self.recent
            .extend_from_slice(&recent_tokens[window_start..]);
        self.recent.sort_unstable();
        self.recent.dedup();
        for &token in &self.recent {
            if let Some(score) = self.scores.get_mut(token as usize) {
                *score = if *score > 0.0 {
                    *score / penalty
                } else {
                    *score * penalty
                };
            }
        }
    }

    /// Every token whose weight `e^(score - best)` is not negligible, by ascending id.
    fn collect_candidates(&mut self, best: f32) {
        let floor = best + NEGLIGIBLE_LOG_WEIGHT;
        self.candidates.clear();
        for (chunk_index, chunk) in self.scores.chunks(SCAN_CHUNK).enumerate() {
            let chunk_start = chunk_index * SCAN_CHUNK;
            for offset in set_bits(mask_of(chunk, |score| score >= floor)) {
                if let Some(&score) = chunk.get(offset) {
                    self.candidates.push(Candidate {
                        token: (chunk_start + offset) as u32,
                        weight: score - best,
                    });
                }
            }
        }
        for candidate in &mut self.candidates {
            candidate.weight = fast_exp(candidate.weight);
        }
    }

    /// Keeps the k heaviest candidates (counting each as 1 towards the target k).
    fn keep_top_k(&mut self) {
        let k = self.params.top_k;
        if k == 0 || k >= self.candidates.len() {
            return;
        }
        self.keep_heaviest(k as f64, |_| 1.0);
    }

    /// Drops candidates less likely than `min_p` times the best one (whose weight is 1).
    fn keep_above_min_p(&mut self) {
        let min_p = self.params.min_p;
        if min_p.is_nan() || min_p <= 0.0 {
            return;
        }
        let threshold = min_p.min(1.0);
        self.candidates
            .retain(|candidate| candidate.weight >= threshold);
    }

    /// Keeps the smallest set of heaviest candidates whose weight reaches `top_p * total`.
    /// `total` is the weight before min-p, so this is the nucleus top-p picks before min-p runs.
    fn keep_top_p(&mut self, total: f64) {
        let top_p = self.params.top_p;
        let is_active = top_p > 0.0 && top_p < 1.0;
        if !is_active {
            return;
        }
        self.keep_heaviest(f64::from(top_p) * total, f64::from);
    }

    /// Keeps the fewest heaviest candidates whose `measure` (1 to count them, the weight to
    /// sum probability) adds up to `target`, or all of them if it never does.
    ///
    /// Instead of sorting, it totals the measure per bucket (a sixteenth of an octave of
    /// weight wide), finds the bucket where the running total reaches the target and sorts
    /// only the candidates in that bucket.
    fn keep_heaviest(&mut self, target: f64, measure: impl Fn(f32) -> f64) {
        let Some(boundary_bucket) = self.find_boundary_bucket(target, &measure) else {
            return;
        };
        self.candidates
            .retain(|candidate| weight_bucket(candidate.weight) <= boundary_bucket);
        self.boundary.clear();
        let boundary = &mut self.boundary;
        let mut running = 0.0;
        self.candidates.retain(|candidate| {
            let is_inside = weight_bucket(candidate.weight) < boundary_bucket;
            if is_inside {
                running += measure(candidate.weight);
            } else {
                boundary.push(*candidate);
            }
            is_inside
        });
        boundary.sort_unstable_by(Candidate::heavier_first);
        for candidate in boundary.iter() {
            self.candidates.push(*candidate);
            running += measure(candidate.weight);
            if running >= target {
                break;
            }
        }
    }

    /// The first bucket (heaviest first) where the running total of `measure` reaches
    /// `target`; `None` when all candidates together stay below it.
    fn find_boundary_bucket(&mut self, target: f64, measure: impl Fn(f32) -> f64) -> Option<usize> {
        self.bucket_totals.clear();
        self.bucket_totals.resize(WEIGHT_BUCKETS, 0.0);
        for candidate in &self.candidates {
            if let Some(total) = self.bucket_totals.get_mut(weight_bucket(candidate.weight)) {
                *total += measure(candidate.weight);
            }
        }
        let mut running = 0.0;
        self.bucket_totals.iter().position(|&bucket_total| {
            running += bucket_total;
            running >= target
        })
    }

    /// Draws one candidate in proportion to its weight; `None` if there is none.
    fn draw(&mut self) -> Option<u32> {
        let last = self.candidates.last()?.token;
        let mut remaining = self.rng.next_unit() * total_weight(&self.candidates);
        for candidate in &self.candidates {
            remaining -= f64::from(candidate.weight);
            if remaining < 0.0 {
                return Some(candidate.token);
            }
        }
        Some(last)
    }
}

/// The largest value (negative infinity for an empty slice), in lanes so that it vectorises.
fn max_of(values: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let remainder = chunks.remainder();
    for chunk in chunks {
        for (lane, &value) in lanes.iter_mut().zip(chunk) {
            *lane = if value > *lane { value } else { *lane };
        }
    }
    lanes.iter().chain(remainder).fold(
        f32::NEG_INFINITY,
        |best, &value| {
            if value > best { value } else { best }
        },
    )
}

/// The sum of the candidates' weights, in lanes so that it vectorises.
fn total_weight(candidates: &[Candidate]) -> f64 {
    const LANES: usize = 4;
    let mut lanes = [0.0f64; LANES];
    let chunks = candidates.chunks_exact(LANES);
    let remainder: f64 = chunks
        .remainder()
        .iter()
        .map(|candidate| f64::from(candidate.weight))
        .sum();
    for chunk in chunks {
        for (lane, candidate) in lanes.iter_mut().zip(chunk) {
            *lane += f64::from(candidate.weight);
        }
    }
    lanes.iter().sum::<f64>() + remainder
}

/// The lowest index of the largest value, and that value; `(0, -inf)` when nothing beats -inf.
/// NaN never wins.
fn argmax(values: &[f32]) -> (u32, f32) {
    let best = max_of(values);
    for (chunk_index, chunk) in values.chunks(SCAN_CHUNK).enumerate() {
        if let Some(offset) = set_bits(mask_of(chunk, |value| value == best)).next() {
            return ((chunk_index * SCAN_CHUNK + offset) as u32, best);
        }
    }
    (0, best)
}

/// Bit `i` is set when `keep(values[i])`, for the first 32 values.
fn mask_of(values: &[f32], keep: impl Fn(f32) -> bool) -> u32 {
    values
        .iter()
        .take(SCAN_CHUNK)
        .enumerate()
        .fold(0, |mask, (bit, &value)| {
            mask | (u32::from(keep(value)) << bit)
        })
}

/// The positions of the set bits, lowest first.
fn set_bits(mut mask: u32) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        let bit = mask.trailing_zeros() as usize;
        mask &= mask.wrapping_sub(1);
        (bit < 32).then_some(bit)
    })
}

/// The bucket of a weight in (0, 1]: 0 for the heaviest, at most `WEIGHT_BUCKETS - 1`. The bit
/// patterns of positive floats grow with their values, so buckets are ordered like weights.
fn weight_bucket(weight: f32) -> usize {
    let bucket =
        (1.0f32.to_bits().saturating_sub(weight.to_bits()) >> WEIGHT_BUCKET_SHIFT) as usize;
    bucket.min(WEIGHT_BUCKETS - 1)
}

/// `e^x` in a form the compiler can vectorise: 0 below -87, a relative error of a few 1e-6
/// elsewhere, and exactly 1 at 0.
fn fast_exp(x: f32) -> f32 {
    /// Adding 1.5 × 2^23 rounds an f32 of magnitude below 2^22 to an integer, which then sits
    /// in the low bits of the sum.
    const ROUND_TO_INTEGER: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.0, 88.0);
    let power_of_two = clamped * std::f32::consts::LOG2_E;
    let shifted = power_of_two + ROUND_TO_INTEGER;
    let whole = shifted - ROUND_TO_INTEGER;
    let y = (power_of_two - whole) * std::f32::consts::LN_2;
    // Taylor series of e^y for |y| <= ln(2)/2, accurate to about 1e-7.
    let series = 1.0
        + y * (1.0
            + y * (1.0 / 2.0
                + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y * (1.0 / 120.0 + y * (1.0 / 720.0))))));
    let exponent = shifted.to_bits().wrapping_sub(ROUND_TO_INTEGER.to_bits());
    let scale = f32::from_bits(exponent.wrapping_add(127) << 23);
    if x < -87.0 { 0.0 } else { series * scale }
}

/// A small, fast, seedable random number generator (SplitMix64).
#[derive(Debug, Clone)]
struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform number in [0, 1).
    fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            ..SamplingParams::default()
        }
    }

    /// Logits whose softmax (at temperature 1) is exactly `probabilities`.
    fn logits_of(probabilities: &[f32]) -> Vec<f32> {
        probabilities.iter().map(|p| p.ln()).collect()
    }

    /// How often each token is drawn in `draws` samples.
    fn frequencies(sampler: &mut Sampler, logits: &[f32], draws: usize) -> Vec<f64> {
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            let token = sampler.sample(logits, &[]) as usize;
            counts[token] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    /// A deterministic pseudo-random logit vector shaped like a language model's.
    fn model_like_logits(vocab: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..vocab)
            .map(|_| {
                let u = rng.next_unit() as f32;
                // Mostly low scores, a thin tail of high ones.
                -5.0 + 25.0 * u.powi(8) + 2.0 * (rng.next_unit() as f32)
            })
            .collect()
    }

    #[test]
    fn greedy_is_argmax() {
        let logits = [0.1, 2.5, -1.0, 2.4, f32::NAN];
        let mut sampler = Sampler::new(&SamplingParams::greedy());
        assert_eq!(sampler.sample(&logits, &[]), 1);
        let big = model_like_logits(5000, 7);
        assert_eq!(sampler.sample(&big, &[]) as usize, reference_argmax(&big));
    }

    fn reference_argmax(values: &[f32]) -> usize {
        let best = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        values.iter().position(|&v| v == best).unwrap_or(0)
    }

    #[test]
    fn greedy_ties_go_to_the_lowest_id() {
        let mut sampler = Sampler::new(&SamplingParams::greedy());
        assert_eq!(sampler.sample(&[1.0, 3.0, 3.0, 3.0], &[]), 1);
    }

    #[test]
    fn nan_and_degenerate_inputs_do_not_panic() {
        let mut sampler = Sampler::new(&SamplingParams {
            top_k: 2,
            min_p: 0.5,
            repeat_penalty: 1.3,
            ..SamplingParams::default()
        });
        assert_eq!(sampler.sample(&[], &[5, 9]), 0);
        assert_eq!(sampler.sample(&[f32::NAN, f32::NAN], &[]), 0);
        assert_eq!(sampler.sample(&[f32::NAN, 1.0, f32::NAN], &[7000]), 1);
        assert_eq!(sampler.sample(&[0.0, f32::INFINITY, f32::INFINITY], &[]), 1);
        let all_masked = [f32::NEG_INFINITY; 4];
        assert_eq!(sampler.sample(&all_masked, &[]), 0);
        let mut odd = Sampler::new(&SamplingParams {
            temperature: f32::INFINITY,
            top_p: f32::NAN,
            min_p: f32::NAN,
            repeat_penalty: f32::NAN,
            ..SamplingParams::default()
        });
        let token = odd.sample(&[1.0, f32::NEG_INFINITY, 2.0], &[]);
        assert!(token == 0 || token == 2);
    }

    #[test]
    fn same_seed_gives_same_tokens() {
        let logits = model_like_logits(2000, 3);
        let settings = params(1.0);
        let run = |settings: &SamplingParams| {
            let mut sampler = Sampler::new(settings);
            (0..50)
                .map(|_| sampler.sample(&logits, &[]))
                .collect::<Vec<_>>()
        };
        let first = run(&settings);
        assert_eq!(first, run(&settings));
        let other_seed = SamplingParams {
            seed: settings.seed + 1,
            ..settings
        };
        assert_ne!(first, run(&other_seed));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits = model_like_logits(3000, 11);
        let expected = reference_argmax(&logits) as u32;
        let mut sampler = Sampler::new(&SamplingParams {
            top_k: 1,
            ..params(1.5)
        });
        for _ in 0..20 {
            assert_eq!(sampler.sample(&logits, &[]), expected);
        }
    }

    #[test]
    fn top_k_keeps_only_the_k_best() {
        let logits = logits_of(&[0.1, 0.3, 0.05, 0.25, 0.3]);
        let mut sampler = Sampler::new(&SamplingParams {
            top_k: 2,
            ..params(1.0)
        });
        let freq = frequencies(&mut sampler, &logits, 4000);
        assert_eq!(freq[0] + freq[2] + freq[3], 0.0);
        assert!((freq[1] - 0.5).abs() < 0.05 && (freq[4] - 0.5).abs() < 0.05);
    }

    #[test]
    fn top_k_ties_go_to_the_lowest_ids() {
        let logits = vec![0.0f32; 1000];
        let mut sampler = Sampler::new(&SamplingParams {
            top_k: 10,
            ..params(1.0)
        });
        let drawn: Vec<u32> = (0..500).map(|_| sampler.sample(&logits, &[])).collect();
        assert!(drawn.iter().all(|&t| t < 10), "{drawn:?}");
        assert!((0..10).all(|t| drawn.contains(&t)));
    }

    #[test]
    fn top_p_is_measured_before_min_p() {
        // Top-p 0.85 on the whole distribution keeps 0.5, 0.3 and 0.12 (0.92); min-p 0.2 then
        // drops only 0.08. Applying min-p first would renormalise and let top-p drop 0.12 too.
        let logits = logits_of(&[0.5, 0.3, 0.12, 0.08]);
        let mut sampler = Sampler::new(&SamplingParams {
            top_p: 0.85,
            min_p: 0.2,
            ..params(1.0)
        });
        let freq = frequencies(&mut sampler, &logits, 20_000);
        assert_eq!(freq[3], 0.0);
        assert!((freq[2] - 0.12 / 0.92).abs() < 0.015, "{freq:?}");
    }

    #[test]
    fn min_p_removes_the_tail() {
        let logits = logits_of(&[0.5, 0.3, 0.12, 0.08]);
        let mut sampler = Sampler::new(&SamplingParams {
            min_p: 0.2,
            ..params(1.0)
        });
        let freq = frequencies(&mut sampler, &logits, 8000);
        // Kept: 0.5 and 0.3 (≥ 0.1) and 0.12; 0.08 < 0.2 × 0.5 is removed.
        assert_eq!(freq[3], 0.0);
        assert!(freq[2] > 0.0);
        assert!((freq[0] - 0.5 / 0.92).abs() < 0.03);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        let logits = logits_of(&[0.1, 0.4, 0.2, 0.3]);
        // Sorted: 0.4, 0.3 (0.7), 0.2 (0.9), 0.1. p = 0.8 keeps the first three.
        let mut sampler = Sampler::new(&SamplingParams {
            top_p: 0.8,
            ..params(1.0)
        });
        let freq = frequencies(&mut sampler, &logits, 20_000);
        assert_eq!(freq[0], 0.0);
        for (token, p) in [(1, 0.4 / 0.9), (3, 0.3 / 0.9), (2, 0.2 / 0.9)] {
            assert!((freq[token] - p).abs() < 0.02, "token {token}: {freq:?}");
        }
        let mut narrow = Sampler::new(&SamplingParams {
            top_p: 0.35,
            ..params(1.0)
        });
        let freq = frequencies(&mut narrow, &logits, 200);
        assert_eq!(freq[1], 1.0);
    }

    #[test]
    fn top_p_over_a_flat_vocabulary_keeps_the_lowest_ids() {
        // 1000 equally likely tokens: p = 0.5 must keep exactly the 500 lowest ids.
        let logits = vec![0.0f32; 1000];
        let mut sampler = Sampler::new(&SamplingParams {
            top_p: 0.5,
            ..params(1.0)
        });
        let drawn: Vec<u32> = (0..3000).map(|_| sampler.sample(&logits, &[])).collect();
        assert!(drawn.iter().all(|&t| t < 500));
        assert!(drawn.iter().any(|&t| t >= 400));
    }

    #[test]
    fn repeat_penalty_changes_the_argmax() {
        let logits = [2.0, 1.8, -0.5, 1.0];
        let mut plain = Sampler::new(&SamplingParams::greedy());
        assert_eq!(plain.sample(&logits, &[0]), 0);
        let mut penalised = Sampler::new(&SamplingParams {
            repeat_penalty: 1.2,
            ..SamplingParams::greedy()
        });
        // 2.0 / 1.2 ≈ 1.67 < 1.8.
        assert_eq!(penalised.sample(&logits, &[0, 0, 0]), 1);
        // A negative logit is multiplied: -0.5 × 1.2 stays below the others.
        assert_eq!(penalised.sample(&[-0.5, -0.55], &[0]), 1);
    }

    #[test]
    fn repeat_penalty_only_looks_at_the_last_n_tokens() {
        let logits = [2.0, 1.8, 0.0];
        let recent = [0, 2, 2];
        let with_window = |repeat_last_n| {
            let mut sampler = Sampler::new(&SamplingParams {
                repeat_penalty: 1.2,
                repeat_last_n,
                ..SamplingParams::greedy()
            });
            sampler.sample(&logits, &recent)
        };
        assert_eq!(with_window(2), 0);
        assert_eq!(with_window(3), 1);
        assert_eq!(with_window(0), 0);
    }

    #[test]
    fn temperature_sampling_follows_the_distribution() {
        let probabilities = [0.5f32, 0.3, 0.2];
        let logits = logits_of(&probabilities);
        let draws = 40_000;
        let mut at_one = Sampler::new(&params(1.0));
        let freq = frequencies(&mut at_one, &logits, draws);
        for (f, p) in freq.iter().zip(probabilities) {
            assert!((f - f64::from(p)).abs() < 0.015, "{freq:?}");
        }
        // At temperature 2 the probabilities become proportional to sqrt(p).
        let mut at_two = Sampler::new(&params(2.0));
        let freq = frequencies(&mut at_two, &logits, draws);
        let roots: Vec<f64> = probabilities.iter().map(|&p| f64::from(p).sqrt()).collect();
        let sum: f64 = roots.iter().sum();
        for (f, r) in freq.iter().zip(&roots) {
            assert!((f - r / sum).abs() < 0.015, "{freq:?}");
        }
    }

    #[test]
    fn low_temperature_concentrates_on_the_best() {
        let logits = logits_of(&[0.5, 0.3, 0.2]);
        let mut sampler = Sampler::new(&params(0.05));
        let freq = frequencies(&mut sampler, &logits, 2000);
        assert!(freq[0] > 0.99, "{freq:?}");
    }

    #[test]
    fn fast_exp_matches_exp() {
        assert_eq!(fast_exp(0.0), 1.0);
        assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp(-100.0), 0.0);
        for step in 0..=8700 {
            let x = -(step as f32) * 0.01;
            let (fast, exact) = (fast_exp(x), x.exp());
            assert!(
                ((fast - exact) / exact).abs() < 2e-5,
                "x {x}: {fast} vs {exact}"
            );
        }
    }

    #[test]
    fn weight_buckets_are_ordered_like_weights() {
        assert_eq!(weight_bucket(1.0), 0);
        assert_eq!(weight_bucket(0.5), 16);
        let mut previous = 0;
        for step in 1..2000 {
            let bucket = weight_bucket((-(step as f32) * 0.01).exp());
            assert!(bucket >= previous);
            previous = bucket;
        }
        assert!(previous > 16 * 28);
    }

    /// The nucleus by the definition: sort everything, keep the shortest prefix reaching p.
    fn reference_nucleus(logits: &[f32], temperature: f32, top_p: f32) -> Vec<usize> {
        let scaled: Vec<f64> = logits.iter().map(|&l| f64::from(l / temperature)).collect();
        let best = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scaled.iter().map(|s| (s - best).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
        let mut mass = 0.0;
        let mut kept = Vec::new();
        for token in order {
            kept.push(token);
            mass += weights[token];
            if mass >= f64::from(top_p) * total {
                break;
            }
        }
        kept
    }

    #[test]
    fn top_p_matches_the_sorted_definition() {
        for seed in 0..5 {
            let logits = model_like_logits(3000, seed);
            let nucleus = reference_nucleus(&logits, 0.7, 0.8);
            let mut sampler = Sampler::new(&SamplingParams {
                top_p: 0.8,
                seed,
                ..params(0.7)
            });
            let mut seen = vec![false; logits.len()];
            for _ in 0..3000 {
                seen[sampler.sample(&logits, &[]) as usize] = true;
            }
            let outside: Vec<usize> = (0..logits.len())
                .filter(|&t| seen[t] && !nucleus.contains(&t))
                .collect();
            assert!(
                outside.is_empty(),
                "seed {seed}: drew {outside:?} outside the nucleus"
            );
            let drawn = seen.iter().filter(|&&s| s).count();
            assert!(
                drawn * 2 > nucleus.len().min(3000),
                "seed {seed}: {drawn} of {}",
                nucleus.len()
            );
        }
    }

    #[test]
    fn model_defaults_per_architecture() {
        let smollm3 = model_defaults(Architecture::SmolLm3);
        assert_eq!((smollm3.temperature, smollm3.top_p), (0.6, 0.95));
        let llama = model_defaults(Architecture::Llama);
        assert_eq!((llama.temperature, llama.top_p), (0.2, 0.9));
    }

    #[test]
    fn sampling_a_128k_vocabulary_is_fast() {
        let logits = model_like_logits(128_256, 5);
        let recent: Vec<u32> = (0..64).map(|i| i * 1000).collect();
        let mut sampler = Sampler::new(&SamplingParams {
            repeat_penalty: 1.1,
            min_p: 0.05,
            top_k: 40,
            ..SamplingParams::default()
        });
        let mut plain = Sampler::new(&SamplingParams::default());
        let rounds = 50;
        let start = std::time::Instant::now();
        for _ in 0..rounds {
            sampler.sample(&logits, &recent);
            plain.sample(&logits, &recent);
        }
        let per_sample = start.elapsed() / (2 * rounds);
        // Generous for unoptimised test builds on a busy machine; release is far below 1 ms.
        assert!(per_sample.as_millis() < 20, "{per_sample:?} per sample");
    }
}
