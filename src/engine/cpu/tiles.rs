//! Prompt products of the 32-value weight types (Q8_0, Q5_0, Q4_1, Q5_1, Q4_0) in tiles of
//! [`TILE_ROWS`] weight rows × [`TILE_TOKENS`] activation rows.
//!
//! One output at a time (`dot_q8_0_q8_0` and friends), each weight block is unpacked and each
//! activation block loaded once per output; a tile unpacks a weight block once for its
//! `TILE_TOKENS` tokens and loads an activation block once for its `TILE_ROWS` rows, as
//! llamafile's `tinyBLAS_Q0_AVX` does. Each output still takes exactly the one-output kernel's
//! steps (per block `fma(d_w · d_x, float(4-product lanes), acc)` into 8 lanes, then
//! `hsum_float_8`, and for Q4_1 the minimums' `Σ m · s` added after it), so the bits are the
//! same: the tiles only change which outputs are computed together.
//!
//! Prompt of 128 tokens on a Q8_0 SmolLM3-3B (Zen 3, 2 threads): 11.8–12.7 tok/s one output at
//! a time, 18.2–19.8 in tiles, 22.4–23.6 once a row's four scale products are one
//! multiplication and lane shuffles (instead of a scalar product and a broadcast per output);
//! llama.cpp 23.9. The 4 × 4 shape and the loop orders below are the fastest of those tried in
//! the model (4 × 2, 4 × 3, 3 × 4, 2 × 4, each row over all blocks alone, all tiles of a row
//! group before the next; `tiles_bench` ranks them differently, so it only checks a change
//! roughly).

use super::SimdLevel;
use super::blocks::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1};
use super::{lanes, q4_0, q4_1, q8_0};

/// Weight rows of one tile.
pub const TILE_ROWS: usize = 4;
/// Activation rows (tokens) of one tile.
pub const TILE_TOKENS: usize = 4;

/// A 32-value weight block type whose products run one output at a time or in tiles.
pub trait TiledBlock: Sized {
    /// The activation block type it is multiplied with.
    type Act;

    /// Whether products of a few inputs (generation) also go in tiles of rows: true where a
    /// tile's rows share work that one output at a time repeats (Q4_0's block sums), false
    /// where the one-output kernel already streams the weights as fast as memory allows.
    const TILES_FOR_FEW_INPUTS: bool = false;

    /// One output: the dot product of a weight row with an activation row (llama.cpp's
    /// `vec_dot` for the type).
    fn dot(level: SimdLevel, w: &[Self], act: &[Self::Act]) -> f32;

    /// `out[r][t]` = [`TiledBlock::dot`] of `rows[r]` with `acts[t]`, bit for bit (`R`, `T` ≤ 4;
    /// all rows and activation rows of the same length).
    fn tile<const R: usize, const T: usize>(
        level: SimdLevel,
        rows: [&[Self]; R],
        acts: [&[Self::Act]; T],
    ) -> [[f32; T]; R];
}

/// Implements [`TiledBlock`] for a weight block type with its one-output kernel.
macro_rules! tiled_block {
    ($block:ty, $act:ty, $dot:path) => {
        impl TiledBlock for $block {
            type Act = $act;

            fn dot(level: SimdLevel, w: &[Self], act: &[$act]) -> f32 {
                $dot(level, w, act)
            }

            fn tile<const R: usize, const T: usize>(
                level: SimdLevel,
                rows: [&[Self]; R],
                acts: [&[$act]; T],
            ) -> [[f32; T]; R] {
                #[cfg(target_arch = "x86_64")]
                if level >= SimdLevel::Avx2 && lanes::avx2_available() {
                    // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
                    return unsafe { avx2::tile(rows, acts) };
                }
                each_pair(level, rows, acts, $dot)
            }
        }
    };
}

tiled_block!(BlockQ8_0, BlockQ8_0, q8_0::dot_q8_0_q8_0);
tiled_block!(BlockQ5_0, BlockQ8_0, q8_0::dot_q5_0_q8_0);
tiled_block!(BlockQ4_1, BlockQ8_1, q4_1::dot_q4_1_q8_1);
tiled_block!(BlockQ5_1, BlockQ8_1, q4_1::dot_q5_1_q8_1);

impl TiledBlock for BlockQ4_0 {
    type Act = BlockQ8_0;
    const TILES_FOR_FEW_INPUTS: bool = true;

    fn dot(level: SimdLevel, w: &[Self], act: &[BlockQ8_0]) -> f32 {
        q4_0::dot_q4_0_q8_0(level, w, act)
    }

    fn tile<const R: usize, const T: usize>(
        level: SimdLevel,
        rows: [&[Self]; R],
        acts: [&[BlockQ8_0]; T],
    ) -> [[f32; T]; R] {
        q4_0::tile(level, rows, acts)
    }
}

/// A tile from the one-output kernel (the portable path).
fn each_pair<W, A, const R: usize, const T: usize>(
    level: SimdLevel,
    rows: [&[W]; R],
    acts: [&[A]; T],
    dot: fn(SimdLevel, &[W], &[A]) -> f32,
) -> [[f32; T]; R] {
    rows.map(|w| acts.map(|a| dot(level, w, a)))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::super::blocks::{BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1, QK};
    use super::super::lanes::avx2::*;

    /// The 4 lanes of a register.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn lanes_of(v: __m128) -> [f32; 4] {
        let mut lanes = [0f32; 4];
        // SAFETY: writes exactly the 4 floats of `lanes`.
        unsafe { _mm_storeu_ps(lanes.as_mut_ptr(), v) };
        lanes
    }

    /// A weight block unpacked for [`tile`].
    #[derive(Clone, Copy)]
    pub(super) struct Unpacked {
        /// The 32 values: signed bytes, or unsigned for Q4_1.
        values: __m256i,
        /// The block's scale.
        d: f16,
        /// Q4_1: the block's minimum.
        m: f16,
    }

    /// A 32-value weight block type as the AVX2 one-output kernels read it.
    ///
    /// # Safety
    /// Implementations may use AVX2, FMA and F16C in `unpack`.
    pub(super) unsafe trait WeightBlock: super::TiledBlock<Act: ActBlock> {
        /// Whether the values are signed (`mul_sum_i8_pairs_float`) rather than unsigned
        /// (`mul_sum_us8_pairs_float`, with a minimum).
        const SIGNED: bool;
        /// # Safety
        /// The CPU must support AVX2, FMA and F16C.
        unsafe fn unpack(&self) -> Unpacked;
        /// The block's scale.
        fn scale(&self) -> f16;
    }

    /// A 32-value activation block: scale, values and (Q8_1) `d · Σq`.
    pub(super) trait ActBlock {
        fn d(&self) -> f16;
        fn qs(&self) -> &[i8; QK];
        fn s(&self) -> f16;
    }

    impl ActBlock for BlockQ8_0 {
        fn d(&self) -> f16 {
            self.d
        }
        fn qs(&self) -> &[i8; QK] {
            &self.qs
        }
        fn s(&self) -> f16 {
            f16::ZERO
        }
    }

    impl ActBlock for BlockQ8_1 {
        fn d(&self) -> f16 {
            self.d
        }
        fn qs(&self) -> &[i8; QK] {
            &self.qs
        }
        fn s(&self) -> f16 {
            self.s
        }
    }

    /// Signed values and their scale.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn signed(values: __m256i, d: f16) -> Unpacked {
        Unpacked {
            values,
            d,
            m: f16::ZERO,
        }
    }

    // SAFETY: `unpack` uses AVX2/F16C only, which its contract requires.
    unsafe impl WeightBlock for BlockQ8_0 {
        const SIGNED: bool = true;
        fn scale(&self) -> f16 {
            self.d
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn unpack(&self) -> Unpacked {
            signed(load_i8(&self.qs), self.d)
        }
    }

    // SAFETY: as above.
    unsafe impl WeightBlock for BlockQ5_0 {
        const SIGNED: bool = true;
        fn scale(&self) -> f16 {
            self.d
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn unpack(&self) -> Unpacked {
            signed(q5_0_values(&self.qs, &self.qh), self.d)
        }
    }

    /// Implements [`WeightBlock`] for an unsigned type with a minimum (`d`, `m` fields), its
    /// values unpacked by `$values`.
    macro_rules! unsigned_weight_block {
        ($block:ty, $values:expr) => {
            // SAFETY: as above.
            unsafe impl WeightBlock for $block {
                const SIGNED: bool = false;
                fn scale(&self) -> f16 {
                    self.d
                }
                #[inline]
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn unpack(&self) -> Unpacked {
                    Unpacked {
                        values: $values(self),
                        d: self.d,
                        m: self.m,
                    }
                }
            }
        };
    }

    unsigned_weight_block!(BlockQ4_1, |b: &BlockQ4_1| bytes_from_nibbles_32(&b.qs));
    unsigned_weight_block!(BlockQ5_1, |b: &BlockQ5_1| q5_1_values(&b.qs, &b.qh));

    /// One tile of `R` weight rows × `T` activation rows (see the module documentation).
    /// Every row and activation row has the same number of blocks.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile<W: WeightBlock, const R: usize, const T: usize>(
        rows: [&[W]; R],
        acts: [&[W::Act]; T],
    ) -> [[f32; T]; R] {
        const { assert!(R <= 4 && T >= 1 && T <= 4, "scales are widened 4 at a time") };
        let nb = acts[0].len();
        assert!(rows.iter().all(|r| r.len() == nb) && acts.iter().all(|a| a.len() == nb));
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        let mut mins = [[0f32; T]; R];
        for b in 0..nb {
            // SAFETY: b < nb, every row's and activation row's length (asserted above).
            let (x, y) = unsafe {
                (
                    rows.map(|r| r.get_unchecked(b)),
                    acts.map(|a| a.get_unchecked(b)),
                )
            };
            let q8 = y.map(|y| load_i8(y.qs()));
            // SAFETY (both): the caller's contract.
            if W::SIGNED {
                unsafe { signed_block(&mut acc, x, q8, y.map(|y| y.d())) };
            } else {
                unsafe { unsigned_block(&mut acc, &mut mins, x, q8, y) };
            }
        }
        std::array::from_fn(|r| {
            std::array::from_fn(|t| {
                let sum = hsum_float_8(acc[r][t]);
                if W::SIGNED { sum } else { sum + mins[r][t] }
            })
        })
    }

    /// Lane `i` (< 4) of each 128-bit half of `v` in all of that half's lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn lane_broadcast(v: __m256, i: usize) -> __m256 {
        match i {
            0 => _mm256_shuffle_ps::<0x00>(v, v),
            1 => _mm256_shuffle_ps::<0x55>(v, v),
            2 => _mm256_shuffle_ps::<0xAA>(v, v),
            _ => _mm256_shuffle_ps::<0xFF>(v, v),
        }
    }

    /// One block of a signed type's tile, a row at a time: one row's `|x|` and `x` are live
    /// with the `T` activations. Unpacking all rows first and going a token at a time (as
    /// tinyBLAS does) was slower in the model: 13-17 against 20 tok/s on the Q8_0 3B.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn signed_block<W: WeightBlock, const R: usize, const T: usize>(
        acc: &mut [[__m256; T]; R],
        x: [&W; R],
        q8: [__m256i; T],
        dy: [f16; T],
    ) {
        let dx = lanes_of(widen_f16_4(std::array::from_fn(|r| {
            x.get(r).map_or(f16::ZERO, |x| x.scale())
        })));
        let dy = widen_f16_4(std::array::from_fn(|t| {
            dy.get(t).copied().unwrap_or(f16::ZERO)
        }));
        let dy = _mm256_set_m128(dy, dy);
        for (r, x) in x.iter().enumerate() {
            // SAFETY: the caller's contract.
            let w = unsafe { x.unpack() };
            let magnitudes = _mm256_sign_epi8(w.values, w.values);
            let d = _mm256_mul_ps(_mm256_set1_ps(dx[r]), dy);
            for t in 0..T {
                let d = lane_broadcast(d, t);
                let sums = mul_sum_us8_pairs_float(magnitudes, _mm256_sign_epi8(q8[t], w.values));
                acc[r][t] = _mm256_fmadd_ps(d, sums, acc[r][t]);
            }
        }
    }

    /// One block of an unsigned type's tile (Q4_1, Q5_1), a token at a time over all rows, with
    /// the minimums' terms
    /// (a row at a time was 25% slower in `tiles_bench`). The rows' scales are widened
    /// together and their products with a token's taken in one multiplication, each lane
    /// rounding as the scalar product does.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unsigned_block<W: WeightBlock, const R: usize, const T: usize>(
        acc: &mut [[__m256; T]; R],
        mins: &mut [[f32; T]; R],
        x: [&W; R],
        q8: [__m256i; T],
        y: [&W::Act; T],
    ) {
        // SAFETY: the caller's contract.
        let w = x.map(|x| unsafe { x.unpack() });
        let dx = widen_f16_4(std::array::from_fn(|r| w.get(r).map_or(f16::ZERO, |w| w.d)));
        let m = lanes_of(widen_f16_4(std::array::from_fn(|r| {
            w.get(r).map_or(f16::ZERO, |w| w.m)
        })));
        for (t, y) in y.iter().enumerate() {
            let (dy, s) = widen_f16_pair(y.d(), y.s());
            let d = _mm_mul_ps(dx, _mm_set1_ps(dy));
            let d = _mm256_set_m128(d, d);
            for (r, w) in w.iter().enumerate() {
                let d = lane_broadcast(d, r);
                let sums = mul_sum_us8_pairs_float(w.values, q8[t]);
                acc[r][t] = _mm256_fmadd_ps(d, sums, acc[r][t]);
                mins[r][t] += m[r] * s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::lanes::test_data::Rng;
    use crate::engine::cpu::q4_1::quantize_q8_1;
    use crate::engine::cpu::q8_0::quantize_q8_0;
    use half::f16;

    const LEVELS: [SimdLevel; 2] = [SimdLevel::Portable, SimdLevel::Avx2];

    /// A weight scale: mostly random, with zero, negative zero and a subnormal mixed in.
    fn scale(rng: &mut Rng, block: usize) -> f16 {
        match block % 11 {
            4 => f16::ZERO,
            7 => f16::NEG_ZERO,
            9 => f16::from_bits(3),
            _ => f16::from_f32(rng.uniform() * 0.05),
        }
    }

    fn random_bytes<const N: usize>(rng: &mut Rng) -> [u8; N] {
        std::array::from_fn(|_| rng.next_u64() as u8)
    }

    /// Checks that every output of an `R` × `T` tile has the one-output kernel's bits on both
    /// levels, for 1 to 40 blocks, with an activation block of equal values in token 1.
    fn check_shape<W: TiledBlock, const R: usize, const T: usize>(
        rng: &mut Rng,
        make_row: &impl Fn(&mut Rng, usize) -> Vec<W>,
        make_act: &impl Fn(SimdLevel, &[f32]) -> Vec<W::Act>,
    ) {
        for nb in [1, 2, 5, 18, 40] {
            let rows: Vec<Vec<W>> = (0..R).map(|_| make_row(rng, nb)).collect();
            for level in LEVELS {
                let acts: Vec<Vec<W::Act>> = (0..T)
                    .map(|t| {
                        let mut x = rng.activations(nb * 32);
                        if t == 1 {
                            x[..32].iter_mut().for_each(|v| *v = -1.0);
                        }
                        make_act(level, &x)
                    })
                    .collect();
                let got = W::tile::<R, T>(
                    level,
                    std::array::from_fn(|r| &rows[r][..]),
                    std::array::from_fn(|t| &acts[t][..]),
                );
                for (r, row) in rows.iter().enumerate() {
                    for (t, act) in acts.iter().enumerate() {
                        let want = W::dot(level, row, act);
                        assert_eq!(
                            got[r][t].to_bits(),
                            want.to_bits(),
                            "{level:?}, {R}×{T} tile, {nb} blocks, row {r}, token {t}: {} vs {want}",
                            got[r][t]
                        );
                    }
                }
            }
        }
    }

    /// [`check_shape`] for the matmul's tile and its edge shapes.
    fn check<W: TiledBlock>(
        make_row: impl Fn(&mut Rng, usize) -> Vec<W>,
        make_act: impl Fn(SimdLevel, &[f32]) -> Vec<W::Act>,
    ) {
        let rng = &mut Rng(31);
        check_shape::<W, TILE_ROWS, TILE_TOKENS>(rng, &make_row, &make_act);
        check_shape::<W, TILE_ROWS, 1>(rng, &make_row, &make_act);
        check_shape::<W, 3, 2>(rng, &make_row, &make_act);
        check_shape::<W, 1, 1>(rng, &make_row, &make_act);
    }

    #[test]
    fn q8_0_tiles_give_each_output_the_one_output_bits() {
        let make = |rng: &mut Rng, nb: usize| -> Vec<BlockQ8_0> {
            (0..nb)
                .map(|i| BlockQ8_0 {
                    d: scale(rng, i),
                    // -128 (whose sign flip wraps) in every third block.
                    qs: if i % 3 == 0 {
                        [-128; 32]
                    } else {
                        random_bytes::<32>(rng).map(|b| b as i8)
                    },
                })
                .collect()
        };
        check(make, quantize_q8_0);
    }

    #[test]
    fn q5_0_tiles_give_each_output_the_one_output_bits() {
        let make = |rng: &mut Rng, nb: usize| -> Vec<BlockQ5_0> {
            (0..nb)
                .enumerate()
                .map(|(i, _)| BlockQ5_0 {
                    d: scale(rng, i),
                    qh: random_bytes(rng),
                    qs: random_bytes(rng),
                })
                .collect()
        };
        check(make, quantize_q8_0);
    }

    #[test]
    fn q5_1_tiles_give_each_output_the_one_output_bits() {
        let make = |rng: &mut Rng, nb: usize| -> Vec<BlockQ5_1> {
            (0..nb)
                .map(|i| BlockQ5_1 {
                    d: scale(rng, i),
                    m: f16::from_f32(rng.uniform() * 0.3),
                    qh: random_bytes(rng),
                    qs: random_bytes(rng),
                })
                .collect()
        };
        check(make, quantize_q8_1);
    }

    #[test]
    fn q4_1_tiles_give_each_output_the_one_output_bits() {
        let make = |rng: &mut Rng, nb: usize| -> Vec<BlockQ4_1> {
            (0..nb)
                .enumerate()
                .map(|(i, _)| BlockQ4_1 {
                    d: scale(rng, i),
                    m: f16::from_f32(rng.uniform() * 0.3),
                    qs: random_bytes(rng),
                })
                .collect()
        };
        check(make, quantize_q8_1);
    }
}
