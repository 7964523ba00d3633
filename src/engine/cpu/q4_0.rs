//! Q4_0 weight rows times Q8_0 activations, as llama.cpp computes them on x86 with AVX2 or
//! AVX-512: there it repacks every Q4_0 matrix whose rows are a multiple of 8 at load
//! (`repack.cpp`, `q4_0_8x8_q8_0`) and multiplies through `ggml_gemv_q4_0_8x8_q8_0` /
//! `ggml_gemm_q4_0_8x8_q8_0` (`arch/x86/repack.cpp`) for every batch size. Those sum each
//! output differently from `ggml_vec_dot_q4_0_q8_0`: per block the exact integer `Σ w · q` of
//! all 32 products, then one `acc = fma(float(Σ), d_w · d_x, acc)` per block in order. The
//! integer sum is exact and the rest is one rounding per block, so every SIMD level here gives
//! the same bits, and no repack is needed to get them. A matrix whose rows are not a multiple
//! of 8 is summed the same way here, where llama.cpp would take `vec_dot` and tinyBLAS, which
//! sum in 8 lanes; so would llama.cpp on a CPU without AVX2 (its generic repacked kernel takes
//! `Σ · d_w` first, then `· d_x`). None of SmolLM3's or SmolLM2's matrices is such.
//!
//! The AVX2 tiles keep four rows' sums in the lanes of one register instead of interleaving
//! the weights: two rows share a register (the low nibbles of both, then the high nibbles of
//! both), so one `madd` reduces two rows to four lanes each, and a few unpacks and adds give
//! the four exact sums, for two tokens at once in a prompt. SmolLM3-3B requantized to Q4_0
//! (Zen 3, 2 threads, `smoldesk bench --prompt-tokens 64 --gen-tokens 32`): candle's
//! `vec_dot` 4.7 tok/s prompt and 4.7 generation; these tiles 25.5–26.4 and 12.0–13.0;
//! llama.cpp 28.4 and 12.8. Without the explicit prefetch below, generation ran at 7.2.

use super::SimdLevel;
use super::blocks::{BlockQ4_0, BlockQ8_0, QK};
use super::lanes;

/// Dot product of a Q4_0 weight row with Q8_0 activations, summed as llama.cpp's repacked
/// Q4_0 kernels do (see the module documentation).
pub fn dot_q4_0_q8_0(level: SimdLevel, w: &[BlockQ4_0], act: &[BlockQ8_0]) -> f32 {
    tile::<1, 1>(level, [w], [act])[0][0]
}

/// `out[r][t]` = [`dot_q4_0_q8_0`] of `rows[r]` with `acts[t]`, bit for bit (`R`, `T` ≤ 4; all
/// rows and activation rows of the same length).
pub fn tile<const R: usize, const T: usize>(
    level: SimdLevel,
    rows: [&[BlockQ4_0]; R],
    acts: [&[BlockQ8_0]; T],
) -> [[f32; T]; R] {
    const {
        assert!(
            R <= 4 && T >= 1 && T <= 4,
            "a register holds four rows' sums"
        )
    };
    let nb = acts.first().map_or(0, |a| a.len());
    assert!(rows.iter().all(|r| r.len() == nb) && acts.iter().all(|a| a.len() == nb));
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && lanes::avx2_available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above); lengths checked above.
        return unsafe { avx2::tile(rows, acts) };
    }
    let _ = level;
    rows.map(|w| acts.map(|a| dot_portable(w, a)))
}

/// The 32 signed values (`nibble − 8`) of a Q4_0 block, low nibbles first.
pub fn q4_0_values(block: &BlockQ4_0) -> [i8; QK] {
    std::array::from_fn(|i| {
        let byte = block.qs[i % (QK / 2)];
        let nibble = if i < QK / 2 { byte & 0x0F } else { byte >> 4 };
        nibble as i8 - 8
    })
}

fn dot_portable(w: &[BlockQ4_0], act: &[BlockQ8_0]) -> f32 {
    w.iter().zip(act).fold(0f32, |acc, (x, y)| {
        let sum: i32 = q4_0_values(x)
            .iter()
            .zip(&y.qs)
            .map(|(&a, &b)| i32::from(a) * i32::from(b))
            .sum();
        // |sum| ≤ 32 · 8 · 128 < 2^24: exact in f32, as `cvtepi32_ps` converts it.
        (sum as f32).mul_add(x.d.to_f32() * y.d.to_f32(), acc)
    })
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::super::blocks::{BlockQ4_0, BlockQ8_0};
    use super::super::lanes::avx2::*;

    /// Two rows' 32 values in two registers, each holding 16 values of both rows: the low
    /// nibbles (values 0..16) of the first row then of the second, and the high nibbles
    /// (values 16..32) likewise; with their magnitudes for the sign trick.
    #[derive(Clone, Copy)]
    struct RowPair {
        low: __m256i,
        high: __m256i,
        low_magnitudes: __m256i,
        high_magnitudes: __m256i,
    }

    impl RowPair {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn new(first: &BlockQ4_0, second: &BlockQ4_0) -> Self {
            // SAFETY: reads exactly the 16 bytes of each block's values.
            let both =
                unsafe { _mm256_loadu2_m128i(second.qs.as_ptr().cast(), first.qs.as_ptr().cast()) };
            let (mask, eight) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(8));
            let low = _mm256_sub_epi8(_mm256_and_si256(both, mask), eight);
            let high = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16::<4>(both), mask), eight);
            Self {
                low,
                high,
                low_magnitudes: _mm256_sign_epi8(low, low),
                high_magnitudes: _mm256_sign_epi8(high, high),
            }
        }

        /// Per row, four lanes of partial sums of its 32 products with `q` (`q_low`, `q_high`:
        /// the activation's values 0..16 and 16..32 in both halves): the first row's in the low
        /// half, the second's in the high half. Pairs of products fit i16 (|w| ≤ 8, |q| ≤ 128),
        /// and so do two of them added, so every sum is exact.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn products(&self, q_low: __m256i, q_high: __m256i) -> __m256i {
            let low = _mm256_maddubs_epi16(self.low_magnitudes, _mm256_sign_epi8(q_low, self.low));
            let high =
                _mm256_maddubs_epi16(self.high_magnitudes, _mm256_sign_epi8(q_high, self.high));
            _mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_add_epi16(low, high))
        }
    }

    /// The exact sums of rows 0..4 from the partial sums of rows 0 and 1 (`v01`) and 2 and 3
    /// (`v23`), in the lanes of one register.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn row_sums(v01: __m256i, v23: __m256i) -> __m128i {
        // Low half (rows 1 and 3 likewise in the high half): lanes a..d of row 0 and row 2
        // become [0a + 0c, 2a + 2c, 0b + 0d, 2b + 2d], then the two pairs are added.
        let t = _mm256_add_epi32(
            _mm256_unpacklo_epi32(v01, v23),
            _mm256_unpackhi_epi32(v01, v23),
        );
        let u = _mm256_add_epi32(t, _mm256_shuffle_epi32::<0b01_00_11_10>(t));
        _mm_unpacklo_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256::<1>(u))
    }

    /// [`super::tile`] with AVX2: per block and token, the four rows' integer sums in one
    /// register, converted, and fused-multiply-added with the four scale products. A tile of
    /// fewer than four rows computes the missing ones from its first row and drops them.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; every row and activation row has the same
    /// length.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile<const R: usize, const T: usize>(
        rows: [&[BlockQ4_0]; R],
        acts: [&[BlockQ8_0]; T],
    ) -> [[f32; T]; R] {
        const { assert!(R >= 1, "a tile has a row") };
        let nb = acts.first().map_or(0, |a| a.len());
        const { assert!(T <= 4, "two pairs of tokens at most") };
        // Tokens (0, 1) and (2, 3) in the two-token layout, and the last of an odd count.
        let mut acc_pairs = [_mm256_setzero_ps(); 2];
        let mut acc_last = _mm_setzero_ps();
        // The row, and the token within a pair, of each lane of the two-token layout.
        let row_of_lane = _mm256_setr_epi32(0, 2, 0, 2, 1, 3, 1, 3);
        let token_of_lane = _mm256_setr_epi32(0, 0, 1, 1, 0, 0, 1, 1);
        for b in 0..nb {
            if T < super::super::tiles::TILE_TOKENS {
                // Few inputs: the weights stream from memory, and four rows are four short
                // streams (a row of the 3B is 1,152 bytes) that the hardware prefetchers barely
                // learn. The matrix's rows are consecutive, so the four rows' bytes are too:
                // ask for the tile's share of the bytes ahead.
                let here = rows[0]
                    .as_ptr()
                    .cast::<i8>()
                    .wrapping_add(b * R * BLOCK_BYTES);
                prefetch_line_ahead(here);
                prefetch_line_ahead(here.wrapping_add(64));
            }
            // SAFETY: b < nb, every row's and activation row's length (the caller's contract).
            let (x, y) = unsafe {
                (
                    rows.map(|r| r.get_unchecked(b)),
                    acts.map(|a| a.get_unchecked(b)),
                )
            };
            let x: [&BlockQ4_0; 4] = std::array::from_fn(|r| x.get(r).copied().unwrap_or(x[0]));
            let dx = widen_f16_4(std::array::from_fn(
                |r| if r < R { x[r].d } else { f16::ZERO },
            ));
            let dy = widen_f16_4(std::array::from_fn(|t| y.get(t).map_or(f16::ZERO, |y| y.d)));
            let pairs = [RowPair::new(x[0], x[1]), RowPair::new(x[2], x[3])];
            let products = |y: &BlockQ8_0| {
                // SAFETY: reads the two 16-byte halves of the block's 32 values.
                let (q_low, q_high) = unsafe {
                    let q = y.qs.as_ptr().cast::<__m128i>();
                    (
                        _mm256_broadcastsi128_si256(_mm_loadu_si128(q)),
                        _mm256_broadcastsi128_si256(_mm_loadu_si128(q.add(1))),
                    )
                };
                pairs.map(|p| p.products(q_low, q_high))
            };
            // Per lane of the two-token layout, its row's scale times its token's.
            let dx_lanes = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(dx), row_of_lane);
            for (p, acc) in acc_pairs.iter_mut().enumerate().take(T / 2) {
                let [a01, a23] = products(y[2 * p]);
                let [b01, b23] = products(y[2 * p + 1]);
                let tokens = _mm256_add_epi32(token_of_lane, _mm256_set1_epi32(2 * p as i32));
                let dy_lanes = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(dy), tokens);
                let sums = two_tokens_row_sums([a01, a23], [b01, b23]);
                *acc = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(sums),
                    _mm256_mul_ps(dx_lanes, dy_lanes),
                    *acc,
                );
            }
            if T % 2 == 1 {
                let [v01, v23] = products(y[T - 1]);
                let d = _mm_mul_ps(dx, lane_broadcast_128(dy, T - 1));
                acc_last = _mm_fmadd_ps(_mm_cvtepi32_ps(row_sums(v01, v23)), d, acc_last);
            }
        }
        let mut pair_lanes = [[0f32; 8]; 2];
        for (lanes, acc) in pair_lanes.iter_mut().zip(acc_pairs) {
            // SAFETY: writes exactly the 8 floats of `lanes`.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        }
        let mut last_lanes = [0f32; 4];
        // SAFETY: writes exactly the 4 floats of `last_lanes`.
        unsafe { _mm_storeu_ps(last_lanes.as_mut_ptr(), acc_last) };
        std::array::from_fn(|r| {
            std::array::from_fn(|t| match t {
                t if t < T / 2 * 2 => pair_lanes[t / 2][LANE_OF[t % 2][r]],
                _ => last_lanes[r],
            })
        })
    }

    /// In the two-token layout of [`two_tokens_row_sums`], the lane of (first or second token,
    /// row).
    const LANE_OF: [[usize; 4]; 2] = [[0, 4, 1, 5], [2, 6, 3, 7]];

    /// [`row_sums`] of two tokens at once, in lanes (token, row): (0, 0), (0, 2), (1, 0),
    /// (1, 2), (0, 1), (0, 3), (1, 1), (1, 3).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn two_tokens_row_sums(first: [__m256i; 2], second: [__m256i; 2]) -> __m256i {
        let halves = |[v01, v23]: [__m256i; 2]| {
            _mm256_add_epi32(
                _mm256_unpacklo_epi32(v01, v23),
                _mm256_unpackhi_epi32(v01, v23),
            )
        };
        let (a, b) = (halves(first), halves(second));
        _mm256_add_epi32(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b))
    }

    /// Bytes of a Q4_0 block.
    const BLOCK_BYTES: usize = std::mem::size_of::<BlockQ4_0>();

    /// Lane `i` (< 4) of `v` in all four lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn lane_broadcast_128(v: __m128, i: usize) -> __m128 {
        match i {
            0 => _mm_shuffle_ps::<0x00>(v, v),
            1 => _mm_shuffle_ps::<0x55>(v, v),
            2 => _mm_shuffle_ps::<0xAA>(v, v),
            _ => _mm_shuffle_ps::<0xFF>(v, v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::lanes::test_data::Rng;
    use crate::engine::cpu::q8_0::quantize_q8_0;
    use half::f16;

    fn random_rows(rng: &mut Rng, rows: usize, nb: usize) -> Vec<Vec<BlockQ4_0>> {
        (0..rows)
            .map(|_| {
                (0..nb)
                    .map(|i| BlockQ4_0 {
                        d: match i % 7 {
                            3 => f16::ZERO,
                            5 => f16::from_bits(3),
                            _ => f16::from_f32(rng.uniform() * 0.05 - 0.025),
                        },
                        // All-zero nibbles (value -8 everywhere) in every fifth block.
                        qs: if i % 5 == 0 {
                            [0; 16]
                        } else {
                            std::array::from_fn(|_| rng.next_u64() as u8)
                        },
                    })
                    .collect()
            })
            .collect()
    }

    /// Every output of 4×4, 4×1, 3×2 and 1×1 tiles equals the portable one-output sum, on every
    /// level, for 1 to 40 blocks; activations include a block of -127s.
    #[test]
    fn tiles_on_every_level_give_the_portable_bits() {
        let rng = &mut Rng(47);
        for nb in [1, 2, 5, 18, 40] {
            let rows = random_rows(rng, 4, nb);
            let acts: Vec<Vec<BlockQ8_0>> = (0..4)
                .map(|t| {
                    let mut x = rng.activations(nb * QK);
                    if t == 2 {
                        x[..QK].iter_mut().for_each(|v| *v = -1.0);
                    }
                    quantize_q8_0(SimdLevel::Avx2, &x)
                })
                .collect();
            let want: Vec<Vec<f32>> = rows
                .iter()
                .map(|w| acts.iter().map(|a| dot_portable(w, a)).collect())
                .collect();
            for level in [SimdLevel::Portable, SimdLevel::Avx2] {
                let check = |got: &[f32], r0: usize, t: usize| {
                    for (i, g) in got.iter().enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            want[r0 + i][t].to_bits(),
                            "{level:?}, {nb} blocks, row {}, token {t}",
                            r0 + i
                        );
                    }
                };
                let full = tile::<4, 4>(
                    level,
                    std::array::from_fn(|r| &rows[r][..]),
                    std::array::from_fn(|t| &acts[t][..]),
                );
                for t in 0..4 {
                    check(&full.map(|row| row[t]), 0, t);
                }
                let one = tile::<4, 1>(level, std::array::from_fn(|r| &rows[r][..]), [&acts[3]]);
                check(&one.map(|row| row[0]), 0, 3);
                let odd = tile::<3, 2>(
                    level,
                    std::array::from_fn(|r| &rows[r + 1][..]),
                    [&acts[0], &acts[2]],
                );
                check(&odd.map(|row| row[0]), 1, 0);
                check(&odd.map(|row| row[1]), 1, 2);
                check(&[dot_q4_0_q8_0(level, &rows[2], &acts[1])], 2, 1);
            }
        }
    }

    /// The block sum is the exact integer sum: a block of weight 7 (nibble 15) times activation
    /// 127 in every position, scale 1 × 1, gives 32 · 7 · 127.
    #[test]
    fn a_block_sums_its_products_exactly() {
        let w = [BlockQ4_0 {
            d: f16::ONE,
            qs: [0xFF; 16],
        }];
        let act = [BlockQ8_0 {
            d: f16::ONE,
            qs: [127; QK],
        }];
        for level in [SimdLevel::Portable, SimdLevel::Avx2] {
            assert_eq!(
                dot_q4_0_q8_0(level, &w, &act),
                (32 * 7 * 127) as f32,
                "{level:?}"
            );
        }
    }

    #[test]
    fn values_are_nibbles_minus_eight_low_nibbles_first() {
        let mut qs = [0u8; 16];
        qs[0] = 0x1F;
        let v = q4_0_values(&BlockQ4_0 { d: f16::ONE, qs });
        assert_eq!((v[0], v[16], v[1], v[17]), (7, -7, -8, -8));
    }
}
