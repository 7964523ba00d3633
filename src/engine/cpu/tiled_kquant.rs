//! The float steps of llama.cpp's tiled K-quant matmul (`ggml-cpu/tiled/`), its path for 8
//! tokens or more on x86 without a repacked layout, shared by the Q2_K, Q3_K, Q5_K and Q6_K
//! kernels. Per super-block the kernel takes the weight row's exact integer sum `s` with the
//! token (and, for types with minimums, the minimums' sum `m`), then
//! `r = d_w · s`, `r = fnmadd(dmin_w, m, r)`, `acc = fma(r, d_x, acc)`, blocks in order.
//! Since every integer sum is exact, how a kernel computes it does not change a bit.

use super::blocks::BlockQ8K;

/// One super-block of a type without minimums: `fma(d_w · sum, d_x, acc)`.
#[inline(always)]
pub fn step(acc: f32, d_w: f32, sum: i32, d_x: f32) -> f32 {
    (d_w * sum as f32).mul_add(d_x, acc)
}

/// One super-block of a type with minimums: `r = d_w · sum`, `r = r − dmin_w · mins` (fused),
/// then `fma(r, d_x, acc)`. Always inlined, so that in an AVX2 kernel `mul_add` is the FMA
/// instruction rather than a call.
#[inline(always)]
pub fn step_with_min(acc: f32, d_w: f32, dmin_w: f32, sum: i32, mins: i32, d_x: f32) -> f32 {
    let scaled = d_w * sum as f32;
    let scaled = (-dmin_w).mul_add(mins as f32, scaled);
    scaled.mul_add(d_x, acc)
}

/// Block `b` of each activation row. A plain loop rather than `acts.map(|a| &a[b])`: in the
/// AVX2 kernels LLVM left that closure and `array::map` as calls, a tenth of the Q2_K prompt.
#[inline(always)]
pub fn blocks_at<'a, const T: usize>(acts: &[&'a [BlockQ8K]; T], b: usize) -> [&'a BlockQ8K; T] {
    let mut out = [&acts[0][b]; T];
    for (block, act) in out.iter_mut().zip(acts) {
        *block = &act[b];
    }
    out
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use std::arch::x86_64::*;

    use super::super::blocks::BlockQ8K;
    use super::super::lanes::avx2::{hsum_i32_4, hsum_i32_8, hsum_i32_8x4};
    use super::{step, step_with_min};

    /// The steps for block `b` of each activation row `t`, the block's integer sum being the sum
    /// of the 8 lanes `lanes[t]`: [`step`]. Four rows are reduced together (the sums are exact,
    /// so in any order) and their float steps run as the 4 lanes of one register, each lane
    /// rounding as the scalar steps do: one row at a time, the reductions and scalar steps
    /// were a fifth of the Q6_K kernel.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn accumulate_block<const T: usize>(
        acc: &mut [f32; T],
        lanes: [__m256i; T],
        d: f32,
        acts: &[&[BlockQ8K]; T],
        b: usize,
    ) {
        if !T.is_multiple_of(4) {
            for ((acc, lanes), act) in acc.iter_mut().zip(lanes).zip(acts) {
                *acc = step(*acc, d, hsum_i32_8(lanes), act[b].d);
            }
            return;
        }
        for g in (0..T).step_by(4) {
            let sums = hsum_i32_8x4(std::array::from_fn(|i| lanes[g + i]));
            let scaled = _mm_mul_ps(_mm_set1_ps(d), _mm_cvtepi32_ps(sums));
            fma_into(acc, g, scaled, token_scales(acts, g, b));
        }
    }

    /// [`accumulate_block`] for a type with minimums, whose sums for row `t` are in the 4
    /// lanes `mins[t]`: [`step_with_min`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn accumulate_block_with_min<const T: usize>(
        acc: &mut [f32; T],
        lanes: [__m256i; T],
        mins: [__m128i; T],
        (d, dmin): (f32, f32),
        acts: &[&[BlockQ8K]; T],
        b: usize,
    ) {
        if !T.is_multiple_of(4) {
            for (((acc, lanes), mins), act) in acc.iter_mut().zip(lanes).zip(mins).zip(acts) {
                let (sum, min_sum) = (hsum_i32_8(lanes), hsum_i32_4(mins));
                *acc = step_with_min(*acc, d, dmin, sum, min_sum, act[b].d);
            }
            return;
        }
        for g in (0..T).step_by(4) {
            let sums = hsum_i32_8x4(std::array::from_fn(|i| lanes[g + i]));
            let min_sums = _mm_hadd_epi32(
                _mm_hadd_epi32(mins[g], mins[g + 1]),
                _mm_hadd_epi32(mins[g + 2], mins[g + 3]),
            );
            let scaled = _mm_mul_ps(_mm_set1_ps(d), _mm_cvtepi32_ps(sums));
            let scaled = _mm_fnmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(min_sums), scaled);
            fma_into(acc, g, scaled, token_scales(acts, g, b));
        }
    }

    /// `acc[g + i] = fma(scaled[i], dx[i], acc[g + i])` for `i` in `0..4`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn fma_into<const T: usize>(acc: &mut [f32; T], g: usize, scaled: __m128, dx: __m128) {
        let at: &mut [f32] = &mut acc[g..g + 4];
        // SAFETY: `at` holds exactly 4 floats.
        unsafe {
            let at = at.as_mut_ptr();
            _mm_storeu_ps(at, _mm_fmadd_ps(scaled, dx, _mm_loadu_ps(at)));
        }
    }

    /// `d_x` of block `b` of the activation rows `g .. g + 4`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn token_scales<const T: usize>(acts: &[&[BlockQ8K]; T], g: usize, b: usize) -> __m128 {
        _mm_setr_ps(
            acts[g][b].d,
            acts[g + 1][b].d,
            acts[g + 2][b].d,
            acts[g + 3][b].d,
        )
    }
}

/// Checks shared by the tests of the kernels that take the tiled order.
#[cfg(test)]
pub(crate) mod test_support {
    use super::super::SimdLevel;
    use super::super::blocks::{BlockQ8K, QK_K};
    use super::super::lanes::test_data::Rng;
    use super::super::q8k;

    /// `nb` blocks of random activations quantized as the engine quantizes them.
    pub fn q8k_row(rng: &mut Rng, nb: usize) -> Vec<BlockQ8K> {
        let x = rng.activations(nb * QK_K);
        let mut out = q8k::zeroed_q8k(nb);
        q8k::quantize_row_q8k(&x, &mut out);
        out
    }

    /// The tiled order of one weight row with `T` activation rows.
    pub type Rows<B, const T: usize> = fn(SimdLevel, &[B], [&[BlockQ8K]; T]) -> [f32; T];

    /// A type's kernels: one output in the vec_dot's order, in the tiled order, and the tiled
    /// order for 3, 4 and 8 activation rows at once.
    pub struct Kernels<B> {
        pub dot: fn(SimdLevel, &[B], &[BlockQ8K]) -> f32,
        pub tiled: fn(SimdLevel, &[B], &[BlockQ8K]) -> f32,
        pub three: Rows<B, 3>,
        pub four: Rows<B, 4>,
        pub eight: Rows<B, 8>,
    }

    /// The plain f64 sum of a weight row times an activation row, and the sum of its terms'
    /// magnitudes (the scale of the rounding error).
    pub type Reference<B> = fn(&[B], &[BlockQ8K]) -> (f64, f64);

    /// [`check_levels_agree`] for a random weight row of each length in `sizes` (blocks) with
    /// four random activation rows, and, where a `reference` is given, every value within
    /// 1e-5 of its terms' magnitudes from the plain sum.
    pub fn check_random_rows<B>(
        kernels: &Kernels<B>,
        rng: &mut Rng,
        sizes: &[usize],
        random_blocks: fn(&mut Rng, usize) -> Vec<B>,
        reference: Option<Reference<B>>,
    ) {
        for &nb in sizes {
            let w = random_blocks(rng, nb);
            let acts: Vec<Vec<BlockQ8K>> = (0..4).map(|_| q8k_row(rng, nb)).collect();
            check_levels_agree(kernels, &w, &acts, |got, act| {
                if let Some(reference) = reference {
                    let (want, magnitude) = reference(&w, act);
                    assert!(
                        (f64::from(got) - want).abs() <= 1e-5 * magnitude,
                        "{got} {want}"
                    );
                }
            });
        }
    }

    /// Checks that the portable and AVX2 forms give the same bits in both orders for the
    /// weight row `w` with each row of `acts` (four rows), and that the several-row forms give
    /// each row the one-row tiled bits; `close(got, act)` checks a value against a plain sum.
    pub fn check_levels_agree<B>(
        kernels: &Kernels<B>,
        w: &[B],
        acts: &[Vec<BlockQ8K>],
        close: impl Fn(f32, &[BlockQ8K]),
    ) {
        let bits = |v: f32| v.to_bits();
        for act in acts {
            for dot in [kernels.dot, kernels.tiled] {
                let p = dot(SimdLevel::Portable, w, act);
                assert_eq!(
                    bits(p),
                    bits(dot(SimdLevel::Avx2, w, act)),
                    "{} blocks",
                    w.len()
                );
                close(p, act);
            }
        }
        for level in [SimdLevel::Portable, SimdLevel::Avx2] {
            let check = |got: &[f32]| {
                for (t, g) in got.iter().enumerate() {
                    let want = (kernels.tiled)(level, w, &acts[t % acts.len()]);
                    assert_eq!(
                        bits(*g),
                        bits(want),
                        "{level:?}, {} blocks, row {t}",
                        w.len()
                    );
                }
            };
            let row = |t: usize| &acts[t % acts.len()][..];
            check(&(kernels.three)(level, w, std::array::from_fn(row)));
            check(&(kernels.four)(level, w, std::array::from_fn(row)));
            check(&(kernels.eight)(level, w, std::array::from_fn(row)));
        }
    }
}
