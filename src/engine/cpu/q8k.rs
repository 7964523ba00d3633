//! Q8_K activation quantization, as llama.cpp does it on x86 before a K-quant matmul.
//!
//! Two quantizers, because llama.cpp uses two that round the same but pick the sign of the scale
//! differently when a block holds both `+max` and `-max`:
//! - [`quantize_row_q8k`]: `quantize_row_q8_K_ref` (`ggml-quants.c`, what `quantize_row_q8_K`
//!   calls on x86), one row into plain [`BlockQ8K`]s. It is compiled without `-march=native`, so
//!   `nearest_int(iscale * x)` is a separate multiply and add (no FMA contraction).
//! - [`quantize_rows_q8k_x4`]: `ggml_quantize_mat_q8_K_4x8` (`arch/x86/repack.cpp`), four rows
//!   into interleaved [`BlockQ8Kx4`]s for the repacked gemm.

use super::SimdLevel;
use super::blocks::{BlockQ8K, BlockQ8Kx4, QK_K};

/// `n` zeroed [`BlockQ8K`]s: room for a quantized row of `n * QK_K` values.
pub fn zeroed_q8k(n: usize) -> Vec<BlockQ8K> {
    vec![
        BlockQ8K {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; QK_K / 16]
        };
        n
    ]
}

/// `n` zeroed [`BlockQ8Kx4`]s: room for four quantized rows of `n * QK_K` values.
pub fn zeroed_q8k_x4(n: usize) -> Vec<BlockQ8Kx4> {
    vec![
        BlockQ8Kx4 {
            d: [0.0; 4],
            qs: [0; QK_K * 4],
            bsums: [0; QK_K / 4]
        };
        n
    ]
}

/// llama.cpp's `quantize_row_q8_K` on x86: `x.len() == out.len() * QK_K`.
///
/// An all-zero block gets `d = 0`, zero values and zero sums (llama.cpp leaves its sums
/// unwritten there; they only ever meet `d = 0`).
///
/// With AVX2 (unless `SMOLDESK_SIMD=portable`) eight values at a time, with the same bits: a
/// generated token quantizes one row before each of a layer's products, on one thread while
/// the other waits, so the scalar loop showed in its profile.
pub fn quantize_row_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    assert_eq!(x.len(), out.len() * QK_K, "Q8_K row length");
    #[cfg(target_arch = "x86_64")]
    let avx2 = super::simd_level() >= SimdLevel::Avx2 && super::avx2_available();
    for (block, x) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above); `x` is one block.
        if avx2 && unsafe { avx2::quantize_block(x, block) } {
            continue;
        }
        quantize_block_ref(x, block);
    }
}

fn quantize_block_ref(x: &[f32], block: &mut BlockQ8K) {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        block.d = 0.0;
        block.qs = [0; QK_K];
        block.bsums = [0; QK_K / 16];
        return;
    }
    let iscale = -127.0f32 / max;
    for (q, &v) in block.qs.iter_mut().zip(x) {
        *q = nearest_int(iscale * v).min(127) as i8;
    }
    for (sum, group) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
        *sum = group.iter().map(|&q| i16::from(q)).sum();
    }
    block.d = 1.0 / iscale;
}

/// ggml's `nearest_int`: round half to even through the float adder (valid for |x| < 2^22).
fn nearest_int(x: f32) -> i32 {
    let bits = (x + 12_582_912.0f32).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// llama.cpp's `ggml_quantize_mat_q8_K_4x8`: four rows of `k` values (`x` is `4 * k`,
/// row-major) into `k / QK_K` interleaved blocks.
///
/// Values are interleaved eight at a time (`qs[32 j + 8 r + t]` is row `r`, value `8 j + t`);
/// `bsums[16 s + 4 r + g]` is row `r`'s sum of values `64 s + 16 g ..+ 16`. The scale is
/// `-127 / max` when some value equals `+max|x|`, else `127 / max|x|`.
pub fn quantize_rows_q8k_x4(level: SimdLevel, x: &[f32], k: usize, out: &mut [BlockQ8Kx4]) {
    assert!(k.is_multiple_of(QK_K), "Q8_K rows must be whole blocks");
    assert_eq!(x.len(), 4 * k, "four rows of k values");
    assert_eq!(out.len(), k / QK_K, "one Q8_Kx4 block per 256 columns");
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && super::avx2_available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above); lengths checked above.
        unsafe { avx2::quantize_rows_x4(x, k, out) };
        return;
    }
    let _ = level;
    quantize_rows_x4_portable(x, k, out);
}

fn quantize_rows_x4_portable(x: &[f32], k: usize, out: &mut [BlockQ8Kx4]) {
    for (i, block) in out.iter_mut().enumerate() {
        let mut quants = [[0i8; QK_K]; 4];
        for (r, row_quants) in quants.iter_mut().enumerate() {
            let src = &x[r * k + i * QK_K..][..QK_K];
            let amax = src.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let iscale = if amax == 0.0 {
                0.0
            } else if src.contains(&amax) {
                -127.0 / amax
            } else {
                127.0 / amax
            };
            block.d[r] = if amax == 0.0 { 0.0 } else { 1.0 / iscale };
            for (q, &v) in row_quants.iter_mut().zip(src) {
                *q = ((v * iscale).round_ties_even() as i32).clamp(-128, 127) as i8;
            }
        }
        for (j, chunk) in block.qs.chunks_exact_mut(8).enumerate() {
            let (group, r) = (j / 4, j % 4);
            chunk.copy_from_slice(&quants[r][group * 8..][..8]);
        }
        for (idx, sum) in block.bsums.iter_mut().enumerate() {
            let (s, r, g) = (idx / 16, (idx / 4) % 4, idx % 4);
            let start = 64 * s + 16 * g;
            *sum = quants[r][start..start + 16]
                .iter()
                .map(|&q| i16::from(q))
                .sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BlockQ8K, BlockQ8Kx4, QK_K};
    use std::arch::x86_64::*;

    /// `quantize_block_ref` of one block, eight values at a time, with its bits; `false` (and
    /// nothing written) for a block it leaves to the reference: one holding a NaN or an
    /// infinity, or so small that `-127 / max` overflows (where the reference's scalar `as i8`
    /// wraps out-of-range values that packing here would saturate).
    ///
    /// # Safety
    /// The CPU must support AVX2; `x.len() == QK_K`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_block(x: &[f32], block: &mut BlockQ8K) -> bool {
        assert_eq!(x.len(), QK_K);
        // SAFETY: called with i < QK_K / 8, and x holds QK_K values.
        let load = |i: usize| unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * i)) };
        let sign_bit = _mm256_set1_ps(-0.0);
        let mut max_abs = _mm256_setzero_ps();
        let mut unordered = _mm256_setzero_ps();
        for i in 0..QK_K / 8 {
            let v = load(i);
            max_abs = _mm256_max_ps(max_abs, _mm256_andnot_ps(sign_bit, v));
            unordered = _mm256_or_ps(unordered, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        }
        if _mm256_movemask_ps(unordered) != 0 {
            return false;
        }
        let mut lanes = [0f32; 8];
        // SAFETY: 8 writable f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), max_abs) };
        let amax = lanes.iter().fold(0f32, |a, &b| a.max(b));
        if amax == 0.0 {
            block.d = 0.0;
            block.qs = [0; QK_K];
            block.bsums = [0; QK_K / 16];
            return true;
        }
        // The reference keeps the first value of the largest magnitude, with its sign.
        let Some(&max) = x.iter().find(|v| v.abs() == amax) else {
            return false;
        };
        let iscale = -127.0f32 / max;
        if !amax.is_finite() || !iscale.is_finite() {
            return false;
        }
        let scale = _mm256_set1_ps(iscale);
        // ggml's `nearest_int`: a separate multiply and add, as the reference.
        let magic = _mm256_set1_ps(12_582_912.0);
        let mantissa = _mm256_set1_epi32(0x007f_ffff);
        let offset = _mm256_set1_epi32(0x0040_0000);
        let top = _mm256_set1_epi32(127);
        let bias = _mm256_set1_epi8(-128);
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for chunk in 0..QK_K / 32 {
            let q: [__m256i; 4] = std::array::from_fn(|t| {
                let rounded = _mm256_add_ps(_mm256_mul_ps(scale, load(4 * chunk + t)), magic);
                let int = _mm256_sub_epi32(
                    _mm256_and_si256(_mm256_castps_si256(rounded), mantissa),
                    offset,
                );
                _mm256_min_epi32(int, top)
            });
            // Every value lies in -127..=127 here, so packing is exact.
            let bytes = _mm256_permutevar8x32_epi32(
                _mm256_packs_epi16(
                    _mm256_packs_epi32(q[0], q[1]),
                    _mm256_packs_epi32(q[2], q[3]),
                ),
                order,
            );
            // SAFETY: 32 writable bytes at chunk * 32 of qs.
            unsafe { _mm256_storeu_si256(block.qs.as_mut_ptr().add(32 * chunk).cast(), bytes) };
            // Sums of 8 bytes, offset by 128 each to make them unsigned.
            let sums = _mm256_sad_epu8(_mm256_xor_si256(bytes, bias), _mm256_setzero_si256());
            let mut sum = [0u64; 4];
            // SAFETY: 32 writable bytes.
            unsafe { _mm256_storeu_si256(sum.as_mut_ptr().cast(), sums) };
            block.bsums[2 * chunk] = (sum[0] + sum[1]) as i16 - 16 * 128;
            block.bsums[2 * chunk + 1] = (sum[2] + sum[3]) as i16 - 16 * 128;
        }
        block.d = 1.0 / iscale;
        true
    }

    /// The AVX2 branch of `ggml_quantize_mat_q8_K_4x8`, instruction for instruction.
    ///
    /// # Safety
    /// The CPU must support AVX2; `x.len() == 4 * k`, `out.len() == k / QK_K`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_rows_x4(x: &[f32], k: usize, out: &mut [BlockQ8Kx4]) {
        let xp = x.as_ptr();
        let mut srcv = [[_mm256_setzero_ps(); 32]; 4];
        let mut iscale_vec = [_mm256_setzero_ps(); 4];
        for (i, y) in out.iter_mut().enumerate() {
            for row in 0..4 {
                // SAFETY: row * k + i * QK_K + 256 <= 4 * k = x.len().
                let base = unsafe { xp.add(row * k + i * QK_K) };
                let sign_bit = _mm256_set1_ps(-0.0);
                let mut max_abs = _mm256_setzero_ps();
                let mut mask_abs = _mm256_setzero_ps();
                for sb in 0..8 {
                    let v: [__m256; 4] = std::array::from_fn(|t| unsafe {
                        _mm256_loadu_ps(base.add(sb * 32 + t * 8))
                    });
                    let abs = v.map(|v| _mm256_andnot_ps(sign_bit, v));
                    if sb == 0 {
                        max_abs = _mm256_max_ps(abs[0], abs[1]);
                        max_abs = _mm256_max_ps(max_abs, abs[2]);
                        max_abs = _mm256_max_ps(max_abs, abs[3]);
                        mask_abs = any_equal(max_abs, &v);
                    } else {
                        let previous = max_abs;
                        for a in abs {
                            max_abs = _mm256_max_ps(max_abs, a);
                        }
                        let unchanged = _mm256_cmp_ps::<_CMP_EQ_OQ>(previous, max_abs);
                        mask_abs = _mm256_and_ps(mask_abs, unchanged);
                        mask_abs = _mm256_or_ps(mask_abs, any_equal(max_abs, &v));
                    }
                    srcv[row][sb * 4..sb * 4 + 4].copy_from_slice(&v);
                }
                let mut max4 = _mm_max_ps(
                    _mm256_extractf128_ps::<1>(max_abs),
                    _mm256_castps256_ps128(max_abs),
                );
                max4 = _mm_max_ps(max4, _mm_movehl_ps(max4, max4));
                max4 = _mm_max_ss(max4, _mm_movehdup_ps(max4));
                let max_scalar = _mm_cvtss_f32(max4);
                let final_mask = _mm256_and_ps(
                    mask_abs,
                    _mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_set1_ps(max_scalar), max_abs),
                );
                let positive_max = _mm256_movemask_ps(final_mask) != 0;
                let iscale = match (max_scalar != 0.0, positive_max) {
                    (false, _) => 0.0,
                    (true, true) => -127.0 / max_scalar,
                    (true, false) => 127.0 / max_scalar,
                };
                y.d[row] = if max_scalar != 0.0 { 1.0 / iscale } else { 0.0 };
                iscale_vec[row] = _mm256_set1_ps(iscale);
            }

            let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            let mut quants = [_mm256_setzero_si256(); 32];
            for (j, quant) in quants.iter_mut().enumerate() {
                let q: [__m256i; 4] = std::array::from_fn(|r| {
                    let v = _mm256_mul_ps(srcv[r][j], iscale_vec[r]);
                    _mm256_cvtps_epi32(_mm256_round_ps::<_MM_FROUND_TO_NEAREST_INT>(v))
                });
                let i0 = _mm256_packs_epi32(q[0], q[1]);
                let i2 = _mm256_packs_epi32(q[2], q[3]);
                let packed = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(i0, i2), perm);
                // SAFETY: 32 * j + 32 <= 1024 = qs.len().
                unsafe { _mm256_storeu_si256(y.qs.as_mut_ptr().add(32 * j).cast(), packed) };
                *quant = packed;
            }
            store_bsums(&quants, y);
        }
    }

    /// Lanes where any of `v` equals `max` (the block's maximum is reached by a positive value).
    #[target_feature(enable = "avx2,fma,f16c")]
    fn any_equal(max: __m256, v: &[__m256; 4]) -> __m256 {
        let m: [__m256; 4] = std::array::from_fn(|t| _mm256_cmp_ps::<_CMP_EQ_OQ>(max, v[t]));
        _mm256_or_ps(_mm256_or_ps(m[0], m[1]), _mm256_or_ps(m[2], m[3]))
    }

    /// The interleaved sums of 16 from the interleaved quants (llama.cpp's shuffle-and-blend).
    #[target_feature(enable = "avx2,fma,f16c")]
    fn store_bsums(quants: &[__m256i; 32], y: &mut BlockQ8Kx4) {
        let broadcast = |m: __m128i| {
            _mm256_permute2f128_si256::<0>(_mm256_castsi128_si256(m), _mm256_castsi128_si256(m))
        };
        let mask_sb2 = broadcast(_mm_setr_epi8(
            0, 1, 0, 1, 4, 5, 6, 7, 8, 9, 8, 9, 12, 13, 14, 15,
        ));
        let mask_sb3 = broadcast(_mm_setr_epi8(
            0, 1, 2, 3, 0, 1, 6, 7, 8, 9, 10, 11, 8, 9, 14, 15,
        ));
        let mask_sb4 = broadcast(_mm_setr_epi8(
            0, 1, 2, 3, 4, 5, 0, 1, 8, 9, 10, 11, 12, 13, 8, 9,
        ));
        let one = _mm256_set1_epi8(1);
        let interleave = |q0: __m256i, q2: __m256i, q4: __m256i, q6: __m256i| {
            let mut v = _mm256_blend_epi16::<34>(q0, _mm256_shuffle_epi8(q2, mask_sb2));
            v = _mm256_blend_epi16::<68>(v, _mm256_shuffle_epi8(q4, mask_sb3));
            _mm256_blend_epi16::<136>(v, _mm256_shuffle_epi8(q6, mask_sb4))
        };
        let half_sums = |mut q: [__m256i; 4]| {
            let mut sums = _mm256_maddubs_epi16(one, interleave(q[0], q[1], q[2], q[3]));
            for _ in 0..3 {
                q = q.map(|v| _mm256_srli_epi64::<16>(v));
                sums = _mm256_add_epi16(
                    sums,
                    _mm256_maddubs_epi16(one, interleave(q[0], q[1], q[2], q[3])),
                );
            }
            sums
        };
        for k in 0..4 {
            let q = &quants[k * 8..k * 8 + 8];
            let first = half_sums([q[0], q[2], q[4], q[6]]);
            let second = half_sums([q[1], q[3], q[5], q[7]]);
            let sums = _mm256_add_epi16(first, second);
            // SAFETY: 16 * k + 16 <= 64 = bsums.len().
            unsafe { _mm256_storeu_si256(y.bsums.as_mut_ptr().add(16 * k).cast(), sums) };
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small deterministic generator for test data (splitmix64).
    pub(crate) struct TestRng(pub u64);

    impl TestRng {
        pub(crate) fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Uniform in [-1, 1).
        pub(crate) fn uniform(&mut self) -> f32 {
            (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }

        /// Activations: mostly small, about 1% outliers, some exact zeros.
        pub(crate) fn activations(&mut self, n: usize) -> Vec<f32> {
            (0..n)
                .map(|_| match self.next_u64() % 100 {
                    0 => self.uniform() * 20.0,
                    1 => 0.0,
                    _ => self.uniform(),
                })
                .collect()
        }
    }

    /// Rows that exercise the sign choice, ties, zero blocks and extreme magnitudes.
    pub(crate) fn tricky_rows(k: usize, rng: &mut TestRng) -> Vec<f32> {
        let mut x = rng.activations(4 * k);
        x[..QK_K].fill(0.0); // an all-zero block
        x[k + 3] = 40.0; // +max and -max in one block
        x[k + 200] = -40.0;
        x[2 * k + 7] = -40.0; // -max first, then +max
        x[2 * k + 100] = 40.0;
        for (j, v) in x[3 * k..3 * k + QK_K].iter_mut().enumerate() {
            *v = (j as f32 - 128.0 + 0.5) * (1.0 / 127.5); // rounding ties
        }
        if k > QK_K {
            x[3 * k + QK_K..3 * k + 2 * QK_K]
                .iter_mut()
                .for_each(|v| *v *= 1e-30);
        }
        x
    }

    fn bits_of_x4(b: &[BlockQ8Kx4]) -> Vec<(u32, i8, i16)> {
        b.iter()
            .flat_map(|b| (0..1024).map(move |j| (b.d[j % 4].to_bits(), b.qs[j], b.bsums[j % 64])))
            .collect()
    }

    #[test]
    fn x4_portable_and_avx2_agree_bit_for_bit() {
        if !crate::engine::cpu::avx2_available() {
            return;
        }
        let mut rng = TestRng(7);
        for k in [256, 512, 1024, 2048] {
            let x = tricky_rows(k, &mut rng);
            let mut portable = zeroed_q8k_x4(k / QK_K);
            let mut avx2 = zeroed_q8k_x4(k / QK_K);
            quantize_rows_q8k_x4(SimdLevel::Portable, &x, k, &mut portable);
            quantize_rows_q8k_x4(SimdLevel::Avx2, &x, k, &mut avx2);
            assert_eq!(bits_of_x4(&portable), bits_of_x4(&avx2), "k = {k}");
        }
    }

    #[test]
    fn x4_matches_the_row_quantizer_except_for_the_sign_choice() {
        let mut rng = TestRng(11);
        let k = 512;
        let x = tricky_rows(k, &mut rng);
        let mut x4 = zeroed_q8k_x4(k / QK_K);
        quantize_rows_q8k_x4(SimdLevel::Portable, &x, k, &mut x4);
        for r in 0..4 {
            let mut row = zeroed_q8k(k / QK_K);
            quantize_row_q8k(&x[r * k..(r + 1) * k], &mut row);
            for (i, (blk, b4)) in row.iter().zip(&x4).enumerate() {
                // Rows 2 and 3 start with a block holding -max before +max: the two quantizers
                // pick opposite signs there.
                let sign = if r >= 2 && i == 0 { -1 } else { 1 };
                assert_eq!(blk.d, b4.d[r] * sign as f32, "row {r} block {i}");
                for j in 0..QK_K {
                    let (g, t) = (j / 8, j % 8);
                    assert_eq!(blk.qs[j], b4.qs[32 * g + 8 * r + t] * sign as i8);
                }
                for g16 in 0..16 {
                    let (s, g) = (g16 / 4, g16 % 4);
                    assert_eq!(blk.bsums[g16], b4.bsums[16 * s + 4 * r + g] * sign as i16);
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn row_quantizer_avx2_gives_the_reference_bits() {
        if !crate::engine::cpu::avx2_available() {
            return;
        }
        let bits = |b: &BlockQ8K| (b.d.to_bits(), b.qs, b.bsums);
        let mut rng = TestRng(21);
        let k = 512;
        let mut blocks: Vec<Vec<f32>> = tricky_rows(k, &mut rng)
            .chunks_exact(QK_K)
            .map(<[f32]>::to_vec)
            .collect();
        for scale in [1e-38f32, 1e-45, 3e38] {
            blocks.push(rng.activations(QK_K).iter().map(|v| v * scale).collect());
        }
        for special in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0] {
            let mut block = rng.activations(QK_K);
            block[77] = special;
            blocks.push(block);
        }
        blocks.push(vec![-0.0; QK_K]);
        for _ in 0..200 {
            blocks.push(rng.activations(QK_K));
        }
        let mut handled = 0;
        for (i, x) in blocks.iter().enumerate() {
            let mut reference = zeroed_q8k(1);
            quantize_block_ref(x, &mut reference[0]);
            let mut fast = zeroed_q8k(1);
            // SAFETY: AVX2 checked above; one block.
            if unsafe { avx2::quantize_block(x, &mut fast[0]) } {
                handled += 1;
                assert_eq!(bits(&fast[0]), bits(&reference[0]), "block {i}");
            }
        }
        assert!(handled >= 205, "the AVX2 path took only {handled} blocks");
    }

    #[test]
    fn row_quantizer_follows_llama_cpp_reference_rules() {
        let mut x = vec![0.0f32; 2 * QK_K];
        for (j, v) in x[QK_K..].iter_mut().enumerate() {
            *v = j as f32 - 100.0;
        }
        let mut out = vec![
            BlockQ8K {
                d: 1.0,
                qs: [1; QK_K],
                bsums: [1; 16]
            };
            2
        ];
        quantize_row_q8k(&x, &mut out);
        assert_eq!(out[0].d, 0.0);
        assert!(out[0].qs.iter().all(|&q| q == 0));
        // max |x| = 155 (positive): iscale = -127/155, so the largest value maps to -127.
        let iscale = -127.0f32 / 155.0;
        assert_eq!(out[1].d, 1.0 / iscale);
        assert_eq!(out[1].qs[255], -127);
        assert_eq!(out[1].qs[100], 0);
        let expected: i16 = out[1].qs[..16].iter().map(|&q| i16::from(q)).sum();
        assert_eq!(out[1].bsums[0], expected);
    }
}
