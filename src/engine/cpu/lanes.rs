//! Plain-Rust models of the x86 integer and float lane operations llama.cpp's AVX2 kernels are
//! built from, so portable kernels sum in exactly the same order (and saturate where the SIMD
//! instructions saturate), and a check for the CPU features the AVX2 kernels need.

/// Lanes of one 256-bit float accumulator.
pub const LANES: usize = 8;

pub use super::avx2_available;

/// llama.cpp's `hsum_float_8`: high half plus low half, then `(0 + 2) + (1 + 3)`.
#[inline(always)]
pub fn hsum_float_8(lanes: &[f32; LANES]) -> f32 {
    let a: [f32; 4] = std::array::from_fn(|i| lanes[i + 4] + lanes[i]);
    (a[0] + a[2]) + (a[1] + a[3])
}

/// `_mm256_madd_epi16(ones, _mm256_maddubs_epi16(u, s))`: lane `l` is the sum of the four
/// products `u[i] · s[i]` for `i` in `4l..4l + 4`, each pair saturated to i16 first.
#[inline(always)]
pub fn maddubs_quads(u: &[u8; 32], s: &[i8; 32]) -> [i32; LANES] {
    std::array::from_fn(|lane| {
        let pair = |i: usize| {
            let sum = i32::from(u[i]) * i32::from(s[i]) + i32::from(u[i + 1]) * i32::from(s[i + 1]);
            sum.clamp(i32::from(i16::MIN), i32::from(i16::MAX))
        };
        pair(4 * lane) + pair(4 * lane + 2)
    })
}

/// llama.cpp's `mul_sum_i8_pairs_float` before the conversion to float: signed × signed via
/// `|x|` and `y · sign(x)` (with `_mm256_sign_epi8`'s wrapping of -128), then [`maddubs_quads`].
#[inline(always)]
pub fn signed_quads(x: &[i8; 32], y: &[i8; 32]) -> [i32; LANES] {
    let ax: [u8; 32] = std::array::from_fn(|i| x[i].unsigned_abs());
    let sy: [i8; 32] = std::array::from_fn(|i| match x[i] {
        v if v < 0 => y[i].wrapping_neg(),
        0 => 0,
        _ => y[i],
    });
    maddubs_quads(&ax, &sy)
}

/// `acc[l] = fma(scale, lanes[l], acc[l])` for integer lanes converted to float.
#[inline(always)]
pub fn fma_lanes(acc: &mut [f32; LANES], scale: f32, lanes: &[i32; LANES]) {
    for (a, &v) in acc.iter_mut().zip(lanes) {
        *a = scale.mul_add(v as f32, *a);
    }
}

/// `_mm256_cvtps_epi32` of an already rounded value: out of range and NaN give `i32::MIN`.
#[inline(always)]
pub fn cvtps_epi32(v: f32) -> i32 {
    if v.is_nan() || !(-2_147_483_648.0..2_147_483_648.0).contains(&v) {
        i32::MIN
    } else {
        v as i32
    }
}

/// The pack instructions' signed saturation of an i32 to i8 (through i16, which is the same).
#[inline(always)]
pub fn saturate_i8(v: i32) -> i8 {
    v.clamp(i32::from(i8::MIN), i32::from(i8::MAX)) as i8
}

/// AVX2 forms of the helpers above.
///
/// # Safety
/// Every function here may only be called on a CPU with AVX2, FMA and F16C
/// ([`avx2_available`]).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::missing_safety_doc)]
pub mod avx2 {
    use super::super::StreamPrefetch;
    use std::arch::x86_64::*;

    /// llama.cpp's `hsum_float_8`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn hsum_float_8(x: __m256) -> f32 {
        let mut res = _mm256_extractf128_ps::<1>(x);
        res = _mm_add_ps(res, _mm256_castps256_ps128(x));
        res = _mm_add_ps(res, _mm_movehl_ps(res, res));
        res = _mm_add_ss(res, _mm_movehdup_ps(res));
        _mm_cvtss_f32(res)
    }

    /// Bytes ahead of the current weight block the streaming kernels (the Q4_K gemv, the Q6_K
    /// dot) ask the cache for. The hardware prefetchers stop at 4 KiB pages; prefetching 8 KiB
    /// ahead generated 6-10% faster on the 3B (`smoldesk bench --prompt-tokens 1 --gen-tokens
    /// 48`, alternating runs, Zen 3). With the non-temporal hint, 2, 4, 6, 10, 12 and 16 KiB
    /// were all 1-6% slower than 8 (alternated token by token in one process). With
    /// `prefetcht1` on an Intel Xeon (session 17), 16 and 32 KiB were within the noise of 8.
    pub const PREFETCH_AHEAD: usize = 8192;

    /// Prefetches the cache lines of the `T` lying [`PREFETCH_AHEAD`] bytes after `at`, with
    /// the hint [`stream_prefetch`](super::super::stream_prefetch) chose for this CPU. The
    /// address is never dereferenced (past the end of a matrix it may name other bytes or
    /// none; a prefetch never faults).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn prefetch_ahead<T>(at: &T) {
        let lines = std::mem::size_of::<T>().div_ceil(64);
        prefetch_lines_ahead((at as *const T).cast(), lines);
    }

    /// Prefetches the cache line [`PREFETCH_AHEAD`] bytes after `at` as in [`prefetch_ahead`]
    /// (a hint: any address is safe).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn prefetch_line_ahead(at: *const i8) {
        prefetch_lines_ahead(at, 1);
    }

    /// The `lines` cache lines from [`PREFETCH_AHEAD`] bytes after `at`, with one branch on the
    /// chosen hint for all of them.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn prefetch_lines_ahead(at: *const i8, lines: usize) {
        let at = at.wrapping_add(PREFETCH_AHEAD);
        match super::super::stream_prefetch() {
            StreamPrefetch::NonTemporal => prefetch_lines::<_MM_HINT_NTA>(at, lines),
            StreamPrefetch::L2 => prefetch_lines::<_MM_HINT_T1>(at, lines),
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn prefetch_lines<const HINT: i32>(at: *const i8, lines: usize) {
        for line in 0..lines {
            _mm_prefetch::<HINT>(at.wrapping_add(64 * line));
        }
    }

    /// Two f16s widened with one F16C conversion: the values `half`'s `to_f32` gives, without
    /// its run-time feature check on every call (8 instructions and a branch, per block in
    /// the 32-value dot products). Both go in one 32-bit move, which clears the register: one
    /// f16 alone was inserted into whatever register was free, an accumulator's included,
    /// which chained every block to the previous one (generation half as fast).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn widen_f16_pair(a: half::f16, b: half::f16) -> (f32, f32) {
        let bits = u32::from(a.to_bits()) | u32::from(b.to_bits()) << 16;
        let both = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
        (_mm_cvtss_f32(both), _mm_cvtss_f32(_mm_movehdup_ps(both)))
    }

    /// One f16 widened with one F16C conversion from a 32-bit move (see [`widen_f16_pair`]).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn widen_f16(v: half::f16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(v.to_bits()))))
    }

    /// Four f16s widened with one F16C conversion (one 64-bit move, see [`widen_f16_pair`]).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn widen_f16_4(v: [half::f16; 4]) -> __m128 {
        let bits = v
            .iter()
            .rev()
            .fold(0u64, |acc, h| (acc << 16) | u64::from(h.to_bits()));
        _mm_cvtph_ps(_mm_set_epi64x(0, bits as i64))
    }

    /// The exact sums of the 8 i32 lanes of each of four registers, in the 4 lanes of one.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn hsum_i32_8x4(v: [__m256i; 4]) -> __m128i {
        // Per 128-bit half: the four registers' sums of that half's lanes; then both halves.
        let quads = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
        _mm_add_epi32(
            _mm256_castsi256_si128(quads),
            _mm256_extracti128_si256::<1>(quads),
        )
    }

    /// The sum of four i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn hsum_i32_4(v: __m128i) -> i32 {
        let pairs = _mm_add_epi32(v, _mm_unpackhi_epi64(v, v));
        _mm_cvtsi128_si32(_mm_add_epi32(pairs, _mm_shuffle_epi32::<0b01>(pairs)))
    }

    /// llama.cpp's `hsum_i32_8`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn hsum_i32_8(a: __m256i) -> i32 {
        let sum128 = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extractf128_si256::<1>(a));
        let hi64 = _mm_unpackhi_epi64(sum128, sum128);
        let sum64 = _mm_add_epi32(hi64, sum128);
        let hi32 = _mm_shuffle_epi32::<0b10_11_00_01>(sum64);
        _mm_cvtsi128_si32(_mm_add_epi32(sum64, hi32))
    }

    /// llama.cpp's `mul_sum_us8_pairs_float` without VNNI: unsigned × signed bytes, four per lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn mul_sum_us8_pairs_float(ax: __m256i, sy: __m256i) -> __m256 {
        let dot = _mm256_maddubs_epi16(ax, sy);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), dot))
    }

    /// llama.cpp's `mul_sum_i8_pairs_float`: signed × signed bytes, four per lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn mul_sum_i8_pairs_float(x: __m256i, y: __m256i) -> __m256 {
        let ax = _mm256_sign_epi8(x, x);
        let sy = _mm256_sign_epi8(y, x);
        mul_sum_us8_pairs_float(ax, sy)
    }

    /// llama.cpp's `bytes_from_nibbles_32`: 16 bytes to 32 values in 0..16, low nibbles first.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn bytes_from_nibbles_32(nibbles: &[u8; 16]) -> __m256i {
        // SAFETY: reads exactly the 16 bytes of the array.
        let tmp = unsafe { _mm_loadu_si128(nibbles.as_ptr().cast()) };
        let bytes =
            _mm256_insertf128_si256::<1>(_mm256_castsi128_si256(tmp), _mm_srli_epi16::<4>(tmp));
        _mm256_and_si256(_mm256_set1_epi8(0x0F), bytes)
    }

    /// llama.cpp's `bytes_from_bits_32`: bit `i` of the 4 bytes to byte `i` = 0xFF or 0x00.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn bytes_from_bits_32(bits: &[u8; 4]) -> __m256i {
        let x32 = i32::from_le_bytes(*bits);
        let shuf_mask = _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0x0000000000000000,
        );
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x32), shuf_mask);
        let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
        _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
    }

    /// A Q5_0 block's 32 values as signed bytes, as `ggml_vec_dot_q5_0_q8_0` unpacks them:
    /// the nibbles, minus 16 where the fifth bit is clear.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn q5_0_values(qs: &[u8; 16], qh: &[u8; 4]) -> __m256i {
        let fifth = _mm256_andnot_si256(bytes_from_bits_32(qh), _mm256_set1_epi8(0xF0u8 as i8));
        _mm256_or_si256(bytes_from_nibbles_32(qs), fifth)
    }

    /// A Q5_1 block's 32 values (0..32) as `ggml_vec_dot_q5_1_q8_1` unpacks them: the nibbles,
    /// plus 16 where the fifth bit is set.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn q5_1_values(qs: &[u8; 16], qh: &[u8; 4]) -> __m256i {
        let fifth = _mm256_and_si256(bytes_from_bits_32(qh), _mm256_set1_epi8(0x10));
        _mm256_or_si256(bytes_from_nibbles_32(qs), fifth)
    }

    /// Loads 32 unsigned bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn load_u8(bytes: &[u8; 32]) -> __m256i {
        // SAFETY: reads exactly the 32 bytes of the array.
        unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
    }

    /// Loads 32 signed bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn load_i8(bytes: &[i8; 32]) -> __m256i {
        // SAFETY: reads exactly the 32 bytes of the array.
        unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
    }
}

/// Deterministic pseudo-random test data (splitmix64), shared by the kernel tests.
#[cfg(test)]
pub mod test_data {
    /// A splitmix64 stream.
    pub struct Rng(pub u64);

    impl Rng {
        /// The next 64 random bits.
        pub fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in [-1, 1).
        pub fn uniform(&mut self) -> f32 {
            (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }

        /// `n` activations: uniform, with about 1% outliers up to ±20 and, every so often, a
        /// whole block of 32 zeros or a tiny-scaled block.
        pub fn activations(&mut self, n: usize) -> Vec<f32> {
            let mut x: Vec<f32> = (0..n)
                .map(|_| {
                    let v = self.uniform();
                    if self.next_u64().is_multiple_of(100) {
                        v * 20.0
                    } else {
                        v
                    }
                })
                .collect();
            for block in x.chunks_mut(32) {
                match self.next_u64() % 8 {
                    0 => block.fill(0.0),
                    1 => block.iter_mut().for_each(|v| *v *= 1e-6),
                    _ => {}
                }
            }
            x
        }

        /// `n` random bytes.
        pub fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next_u64() as u8).collect()
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use half::f16;

    #[test]
    fn f16s_widened_in_pairs_and_fours_equal_halfs_conversion_for_every_value() {
        if !super::avx2_available() {
            return;
        }
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        for bits in 0..=u16::MAX {
            let v = f16::from_bits(bits);
            let other = f16::from_bits(bits.rotate_left(7));
            // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
            let (a, b) = unsafe { super::avx2::widen_f16_pair(v, other) };
            assert!(
                same(a, v.to_f32()) && same(b, other.to_f32()),
                "{bits:#06x}"
            );
            let four = [
                v,
                other,
                f16::from_bits(!bits),
                f16::from_bits(bits ^ 0x8000),
            ];
            let mut lanes = [0f32; 4];
            // SAFETY: as above; the store writes the 4 floats of `lanes`.
            unsafe {
                std::arch::x86_64::_mm_storeu_ps(
                    lanes.as_mut_ptr(),
                    super::avx2::widen_f16_4(four),
                );
            }
            for (lane, h) in lanes.iter().zip(four) {
                assert!(same(*lane, h.to_f32()), "{:#06x}", h.to_bits());
            }
        }
    }
}
