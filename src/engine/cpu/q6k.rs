//! Dot products of Q6_K weight rows with Q8_K activations, as llama.cpp's AVX2
//! `ggml_vec_dot_q6_K_q8_K` computes them (`arch/x86/quants.c`).
//!
//! Batches: llama.cpp takes `vec_dot` ([`dot_q6k_q8k`]) for batches of 1 to 7 tokens. From 8
//! tokens on it uses its tiled K-quant matmul (`ggml-cpu/tiled/`, off with `GGML_CPU_TILED_MM=0`),
//! which computes each super-block's exact integer sum and accumulates
//! `fma(d_w · sum, d_x, acc)` in one scalar per output, blocks in order: [`dot_q6k_q8k_tiled`].
//!
//! The `_rows` form computes several weight rows per pass over the activations; every row's
//! value is summed exactly as the one-row form sums it, so both give the same bits.
//!
//! Levels: portable, AVX2 (llama.cpp's instruction sequence, with the scale shuffles of our own)
//! and AVX-512 F/BW/VL/VNNI (`vpmaddubsw` + `vpdpwssd` on 64-byte registers), all with the same
//! bits. The AVX-512 form is tested bit for bit against the AVX2 one in the emulator; its speed
//! is not measured yet (no AVX-512 machine so far).

use super::SimdLevel;
use super::blocks::{BlockQ6K, BlockQ8K, QK_K};
use super::lanes::{self, LANES};
use super::tiled_kquant;

/// Weight rows [`dot_q6k_q8k_rows`] computes per pass over the activations. Two rows per pass
/// measured about 3x slower than one (examples/q6k_bench.rs, AVX2, Zen 3), so one it is.
pub const ROWS_PER_PASS: usize = 1;

/// Dot product of one Q6_K weight row with Q8_K activations of the same length.
pub fn dot_q6k_q8k(level: SimdLevel, w: &[BlockQ6K], act: &[BlockQ8K]) -> f32 {
    debug_assert_eq!(w.len(), act.len());
    #[cfg(target_arch = "x86_64")]
    if takes_avx512(level) {
        // SAFETY: the CPU has AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI (checked just above).
        return unsafe { avx512::dot(w, act) };
    }
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && lanes::avx2_available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        return unsafe { avx2::dot_rows::<1>([w], act)[0] };
    }
    let _ = level;
    dot_portable(w, act)
}

/// `out[r]` = dot product of row `r` of `w` (rows of `act.len()` blocks, one after another)
/// with `act`; the same bits as [`dot_q6k_q8k`] row by row, faster.
pub fn dot_q6k_q8k_rows(level: SimdLevel, w: &[BlockQ6K], act: &[BlockQ8K], out: &mut [f32]) {
    let blocks = act.len();
    debug_assert_eq!(w.len(), blocks * out.len());
    if blocks == 0 {
        out.fill(0.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && lanes::avx2_available() && !takes_avx512(level) {
        let group = blocks * ROWS_PER_PASS;
        let mut outs = out.chunks_exact_mut(ROWS_PER_PASS);
        let mut groups = w.chunks_exact(group);
        for (o, rows) in (&mut outs).zip(&mut groups) {
            let rows = std::array::from_fn(|r| &rows[r * blocks..(r + 1) * blocks]);
            // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
            o.copy_from_slice(&unsafe { avx2::dot_rows::<ROWS_PER_PASS>(rows, act) });
        }
        let rest = groups.remainder().chunks_exact(blocks);
        for (o, row) in outs.into_remainder().iter_mut().zip(rest) {
            // SAFETY: as above.
            *o = unsafe { avx2::dot_rows::<1>([row], act)[0] };
        }
        return;
    }
    for (o, row) in out.iter_mut().zip(w.chunks_exact(blocks)) {
        *o = dot_q6k_q8k(level, row, act);
    }
}

/// Whether the kernels at `level` take their AVX-512 form: asked for, and the CPU has it.
#[cfg(target_arch = "x86_64")]
fn takes_avx512(level: SimdLevel) -> bool {
    level >= SimdLevel::Avx512 && super::avx512_available()
}

/// The 256 unsigned 6-bit values of a Q6_K block (0..64; the -32 offset is applied through
/// the activations' sums, as llama.cpp does).
pub fn q6k_values(block: &BlockQ6K) -> [u8; QK_K] {
    std::array::from_fn(|e| {
        let (half, within) = (e / 128, e % 128);
        let (chunk, t) = (within / 32, within % 32);
        let low_byte = block.ql[64 * half + 32 * (chunk % 2) + t];
        let low = if chunk < 2 {
            low_byte & 0x0F
        } else {
            low_byte >> 4
        };
        let high = (block.qh[32 * half + t] >> (2 * chunk)) & 3;
        low | (high << 4)
    })
}

/// Dot product of one Q6_K weight row with Q8_K activations summed as llama.cpp's tiled matmul
/// sums it (its path for batches of 8 tokens or more).
pub fn dot_q6k_q8k_tiled(level: SimdLevel, w: &[BlockQ6K], act: &[BlockQ8K]) -> f32 {
    debug_assert_eq!(w.len(), act.len());
    #[cfg(target_arch = "x86_64")]
    if takes_avx512(level) {
        // SAFETY: the CPU has AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI (checked just above).
        return unsafe { avx512::dot_tiled_tokens(w, [act])[0] };
    }
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && lanes::avx2_available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        return unsafe { avx2::dot_tiled(w, act) };
    }
    let _ = level;
    let mut acc = 0f32;
    for (x, y) in w.iter().zip(act) {
        let sum = block_lanes(x, y)
            .iter()
            .fold(0i32, |a, &v| a.wrapping_add(v));
        acc = tiled_kquant::step(acc, x.d.to_f32(), sum, y.d);
    }
    acc
}

/// Activation rows a prompt's Q6_K and Q5_K products take per pass over a weight row
/// ([`dot_q6k_q8k_tiled_tokens`], `q5k::dot_q5k_q8k_tiled_tokens`); a remainder of four or more
/// takes a pass of four. Eight rather than four: the 3B's prompt of 64 tokens 1.15-1.25x as fast
/// on a Q6_K file and 1.1x on a Q5_K_M one (Zen 3, 2 threads).
pub const TOKENS_PER_PASS: usize = 8;

/// `out[i]` = [`dot_q6k_q8k_tiled`] of `w` with `acts[i]`, bit for bit. The AVX2 form unpacks
/// each weight block once for all `T` rows instead of once per row: about a quarter of the
/// prompt's time went to that unpacking.
pub fn dot_q6k_q8k_tiled_tokens<const T: usize>(
    level: SimdLevel,
    w: &[BlockQ6K],
    acts: [&[BlockQ8K]; T],
) -> [f32; T] {
    debug_assert!(acts.iter().all(|a| a.len() == w.len()));
    #[cfg(target_arch = "x86_64")]
    if takes_avx512(level) {
        // SAFETY: the CPU has AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI (checked just above).
        return unsafe { avx512::dot_tiled_tokens(w, acts) };
    }
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && lanes::avx2_available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        return unsafe { avx2::dot_tiled_tokens(w, acts) };
    }
    acts.map(|act| dot_q6k_q8k_tiled(level, w, act))
}

/// The AVX2 kernel's 8 i32 lanes for one block, in plain Rust: sub-block-scaled sums of 4
/// products each, minus `32 · Σ scale · bsum` per lane pair (the values' -32 offset).
fn block_lanes(x: &BlockQ6K, y: &BlockQ8K) -> [i32; LANES] {
    let values = q6k_values(x);
    let mut sumi = [0i32; LANES];
    for chunk in 0..QK_K / 32 {
        let u: &[u8; 32] = values[32 * chunk..][..32].try_into().unwrap_or(&[0; 32]);
        let s: &[i8; 32] = y.qs[32 * chunk..][..32].try_into().unwrap_or(&[0; 32]);
        let quads = lanes::maddubs_quads(u, s);
        for (lane, (sum, quad)) in sumi.iter_mut().zip(quads).enumerate() {
            let scale = i32::from(x.scales[2 * chunk + lane / 4]);
            *sum = sum.wrapping_add(scale.wrapping_mul(quad));
        }
    }
    for (lane, sum) in sumi.iter_mut().enumerate() {
        let pair = |i: usize| i32::from(y.bsums[i]) * i32::from(x.scales[i]);
        let offset = pair(2 * lane)
            .wrapping_add(pair(2 * lane + 1))
            .wrapping_shl(5);
        *sum = sum.wrapping_sub(offset);
    }
    sumi
}

/// [`dot_q6k_q8k`] in plain Rust: per block the lanes converted and fused-multiply-added with
/// `d_x · d_w`, then the horizontal sum.
fn dot_portable(w: &[BlockQ6K], act: &[BlockQ8K]) -> f32 {
    let mut acc = [0f32; LANES];
    for (x, y) in w.iter().zip(act) {
        lanes::fma_lanes(&mut acc, y.d * x.d.to_f32(), &block_lanes(x, y));
    }
    lanes::hsum_float_8(&acc)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::blocks::{BlockQ6K, BlockQ8K, QK_K};
    use super::super::lanes::avx2::{hsum_float_8, prefetch_ahead, widen_f16};
    use super::super::tiled_kquant::avx2::accumulate_block;

    /// Byte shuffles that pick, from a block's eight scales of one half widened to i16, the
    /// pair of chunk `k` of that half: scale `2k` for lanes 0-3, `2k + 1` for lanes 4-7 (the
    /// i16 form of llama.cpp's `get_scale_shuffle`, one instruction instead of a byte shuffle
    /// and a widening).
    static SCALE_PAIR: [[u8; 32]; 4] = {
        let mut table = [[0u8; 32]; 4];
        let mut k = 0;
        while k < 4 {
            let mut b = 0;
            while b < 32 {
                table[k][b] = (4 * k + 2 * (b / 16) + b % 2) as u8;
                b += 1;
            }
            k += 1;
        }
        table
    };

    /// Half `j` (values `128 j .. 128 j + 128`) of a block's 6-bit values, as four 32-byte
    /// chunks of unsigned bytes in llama.cpp's order.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn unpack_half(x: &BlockQ6K, j: usize) -> [__m256i; 4] {
        let m3 = _mm256_set1_epi8(3);
        let m15 = _mm256_set1_epi8(15);
        let m12 = _mm256_set1_epi8(12);
        let m48 = _mm256_set1_epi8(48);
        let m192 = _mm256_set1_epi8(-64);
        assert!(j < QK_K / 128);
        // SAFETY: j < 2, so the loads read inside ql (128 bytes) and qh (64 bytes).
        let (q4bits1, q4bits2, q4bits_h) = unsafe {
            let q4 = x.ql.as_ptr().add(64 * j);
            (
                _mm256_loadu_si256(q4.cast()),
                _mm256_loadu_si256(q4.add(32).cast()),
                _mm256_loadu_si256(x.qh.as_ptr().add(32 * j).cast()),
            )
        };
        let q4h_0 = _mm256_slli_epi16::<4>(_mm256_and_si256(q4bits_h, m3));
        let q4h_1 = _mm256_slli_epi16::<2>(_mm256_and_si256(q4bits_h, m12));
        let q4h_2 = _mm256_and_si256(q4bits_h, m48);
        let q4h_3 = _mm256_srli_epi16::<2>(_mm256_and_si256(q4bits_h, m192));
        [
            _mm256_or_si256(_mm256_and_si256(q4bits1, m15), q4h_0),
            _mm256_or_si256(_mm256_and_si256(q4bits2, m15), q4h_1),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(q4bits1), m15),
                q4h_2,
            ),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(q4bits2), m15),
                q4h_3,
            ),
        ]
    }

    /// The sub-block scales (as i16 pairs) of the four chunks of half `j`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn half_scales(scales: &Scales, j: usize) -> [__m256i; 4] {
        std::array::from_fn(|k| {
            // SAFETY: SCALE_PAIR rows are 32 bytes.
            let pick = unsafe { _mm256_loadu_si256(SCALE_PAIR[k].as_ptr().cast()) };
            _mm256_shuffle_epi8(scales.halves[j], pick)
        })
    }

    /// Σ scale · (q6 · q8) over one half of a block, per lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn half_lanes(q: &[__m256i; 4], scales: &[__m256i; 4], y: &BlockQ8K, j: usize) -> __m256i {
        // SAFETY: j < 2 (checked by `unpack_half`), so 128 j + 128 <= 256 bytes of qs.
        let q8: [__m256i; 4] = std::array::from_fn(|k| unsafe {
            _mm256_loadu_si256(y.qs.as_ptr().add(128 * j + 32 * k).cast())
        });
        let p: [__m256i; 4] = std::array::from_fn(|k| {
            _mm256_madd_epi16(scales[k], _mm256_maddubs_epi16(q[k], q8[k]))
        });
        _mm256_add_epi32(_mm256_add_epi32(p[0], p[1]), _mm256_add_epi32(p[2], p[3]))
    }

    /// A block's 16 sub-block scales widened to i16: in order, and each half's eight in
    /// both 128-bit lanes.
    pub(super) struct Scales {
        /// The 16 in order.
        pub(super) wide: __m256i,
        /// Half `j`'s eight, in both 128-bit lanes.
        halves: [__m256i; 2],
    }

    /// `x`'s scales (see [`Scales`]).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn load_scales(x: &BlockQ6K) -> Scales {
        // SAFETY: scales is 16 readable bytes.
        let wide = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(x.scales.as_ptr().cast()) });
        Scales {
            wide,
            halves: [
                _mm256_permute2x128_si256::<0x00>(wide, wide),
                _mm256_permute2x128_si256::<0x11>(wide, wide),
            ],
        }
    }

    /// `32 · Σ scale · bsum` per lane pair: the values' -32 offset.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn offset_lanes(scales: &Scales, q8sums: __m256i) -> __m256i {
        _mm256_slli_epi32::<5>(_mm256_madd_epi16(q8sums, scales.wide))
    }

    /// The 8 i32 lanes of `ggml_vec_dot_q6_K_q8_K` for one block (`q8sums` = `y.bsums`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn block_lanes(x: &BlockQ6K, y: &BlockQ8K, q8sums: __m256i) -> __m256i {
        let scales = load_scales(x);
        let mut sumi = _mm256_setzero_si256();
        for j in 0..QK_K / 128 {
            let lanes = half_lanes(&unpack_half(x, j), &half_scales(&scales, j), y, j);
            sumi = _mm256_add_epi32(sumi, lanes);
        }
        _mm256_sub_epi32(sumi, offset_lanes(&scales, q8sums))
    }

    /// Loads a block's 16 activation sums.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn load_bsums(y: &BlockQ8K) -> __m256i {
        // SAFETY: reads exactly the 32 bytes of `bsums`.
        unsafe { _mm256_loadu_si256(y.bsums.as_ptr().cast()) }
    }

    /// `ggml_vec_dot_q6_K_q8_K` for `R` weight rows at once, each summed exactly as alone.
    /// Every row has `act.len()` blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn dot_rows<const R: usize>(rows: [&[BlockQ6K]; R], act: &[BlockQ8K]) -> [f32; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        for (i, y) in act.iter().enumerate() {
            let q8sums = load_bsums(y);
            for (acc, row) in acc.iter_mut().zip(&rows) {
                let x = &row[i];
                prefetch_ahead(x);
                let d = _mm256_set1_ps(y.d * widen_f16(x.d));
                let sumi = block_lanes(x, y, q8sums);
                *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), *acc);
            }
        }
        std::array::from_fn(|r| hsum_float_8(acc[r]))
    }

    /// The tiled matmul's order: the block's integer sum, `d_w · sum`, fused into the scalar
    /// accumulator with `d_x`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn dot_tiled(w: &[BlockQ6K], act: &[BlockQ8K]) -> f32 {
        let [dot] = dot_tiled_tokens(w, [act]);
        dot
    }

    /// [`dot_tiled`] of one weight row with `T` activation rows, unpacking each weight block
    /// once for all of them. The integer sums are exact, so each result has `dot_tiled`'s bits.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn dot_tiled_tokens<const T: usize>(w: &[BlockQ6K], acts: [&[BlockQ8K]; T]) -> [f32; T] {
        let mut acc = [0f32; T];
        for (b, x) in w.iter().enumerate() {
            let scales = load_scales(x);
            let mut sumi = [_mm256_setzero_si256(); T];
            for j in 0..QK_K / 128 {
                let q = unpack_half(x, j);
                let sc = half_scales(&scales, j);
                for (sum, act) in sumi.iter_mut().zip(&acts) {
                    *sum = _mm256_add_epi32(*sum, half_lanes(&q, &sc, &act[b], j));
                }
            }
            for (sum, act) in sumi.iter_mut().zip(&acts) {
                *sum = _mm256_sub_epi32(*sum, offset_lanes(&scales, load_bsums(&act[b])));
            }
            // `half`'s `to_f32`, not `widen_f16` as elsewhere: here the F16C form made the
            // prompt 1.2x slower (alternated `smoldesk bench` runs, Zen 3).
            accumulate_block(&mut acc, sumi, x.d.to_f32(), &acts, b);
        }
        acc
    }
}

/// The AVX-512 (F/BW/VL/VNNI) forms of the AVX2 kernels, with their bits. A block's values are
/// unpacked into four 64-byte registers (two of llama.cpp's 32-value chunks each) and each
/// register's products are summed by `vpmaddubsw` and scaled and added by `vpdpwssd`: two
/// instructions per 64 values where AVX2 takes three per 32. Every sum is an exact integer
/// (a pair of products is at most 2 · 63 · 128, well inside i16), and each product goes to the
/// same one of the AVX2 kernel's 8 lanes, so the lanes, and all that follows from them, are the
/// same.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::super::blocks::{BlockQ6K, BlockQ8K};
    use super::super::lanes::avx2::{hsum_float_8, prefetch_ahead, widen_f16};
    use super::super::tiled_kquant::avx2::accumulate_block;
    use super::avx2::{Scales, load_bsums, load_scales, offset_lanes};

    /// A weight block ready for [`block_lanes`].
    struct Unpacked {
        /// Register `q` holds values `64 q .. 64 q + 64`: chunks `2 (q % 2)` and `2 (q % 2) + 1`
        /// of half `q / 2`, in llama.cpp's order.
        values: [__m512i; 4],
        /// For register `q`, the scale of each value pair's sub-block as i16: pair `i` lies in
        /// sub-block `4 q + i / 8`.
        scales: [__m512i; 4],
        /// The scales as [`offset_lanes`] takes them.
        offsets: Scales,
    }

    /// `x`'s values and scales (see [`Unpacked`]).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn unpack(x: &BlockQ6K) -> Unpacked {
        let m3 = _mm512_set1_epi8(3);
        let m15 = _mm512_set1_epi8(15);
        // The 2 high bits of chunk c sit at bits 2c of qh; the low 256 bits of a register take
        // chunk 0 (or 2), the high ones chunk 1 (or 3). (Plain code, no closures: closures do
        // not inherit the target features.)
        let shift01 = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(2));
        let shift23 = _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_set1_epi16(4)),
            _mm256_set1_epi16(6),
        );
        let mut values = [_mm512_setzero_si512(); 4];
        for half in 0..2 {
            // SAFETY: half < 2: 64 bytes of ql from 64 half (128 in all), 32 of qh from 32 half.
            let (ql, qh) = unsafe {
                (
                    _mm512_loadu_si512(x.ql.as_ptr().add(64 * half).cast()),
                    _mm512_broadcast_i64x4(_mm256_loadu_si256(x.qh.as_ptr().add(32 * half).cast())),
                )
            };
            let high01 = _mm512_and_si512(_mm512_srlv_epi16(qh, shift01), m3);
            let high23 = _mm512_and_si512(_mm512_srlv_epi16(qh, shift23), m3);
            values[2 * half] =
                _mm512_or_si512(_mm512_and_si512(ql, m15), _mm512_slli_epi16::<4>(high01));
            values[2 * half + 1] = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16::<4>(ql), m15),
                _mm512_slli_epi16::<4>(high23),
            );
        }
        let offsets = load_scales(x);
        let wide = _mm512_castsi256_si512(offsets.wide);
        let mut scales = [_mm512_setzero_si512(); 4];
        for (q, scales) in scales.iter_mut().enumerate() {
            // Pair i of register q: sub-block 4 q + i / 8.
            let pick = _mm512_add_epi16(
                _mm512_set1_epi16(4 * q as i16),
                _mm512_set_epi16(
                    3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0,
                    0, 0, 0, 0, 0, 0,
                ),
            );
            *scales = _mm512_permutexvar_epi16(pick, wide);
        }
        Unpacked {
            values,
            scales,
            offsets,
        }
    }

    /// The AVX2 kernel's 8 i32 lanes of one block (`super::avx2::block_lanes`), the -32
    /// offset included.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn block_lanes(x: &Unpacked, y: &BlockQ8K) -> __m256i {
        let mut sums = _mm512_setzero_si512();
        for q in 0..4 {
            // SAFETY: q < 4: 64 of the 256 bytes of qs.
            let q8 = unsafe { _mm512_loadu_si512(y.qs.as_ptr().add(64 * q).cast()) };
            let pairs = _mm512_maddubs_epi16(x.values[q], q8);
            sums = _mm512_dpwssd_epi32(sums, pairs, x.scales[q]);
        }
        // Lane l of the low and of the high 256 bits both belong to the AVX2 kernel's lane l.
        let lanes = _mm256_add_epi32(
            _mm512_castsi512_si256(sums),
            _mm512_extracti64x4_epi64::<1>(sums),
        );
        _mm256_sub_epi32(lanes, offset_lanes(&x.offsets, load_bsums(y)))
    }

    /// `super::avx2::dot_rows` for one row, with its bits.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn dot(w: &[BlockQ6K], act: &[BlockQ8K]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (x, y) in w.iter().zip(act) {
            prefetch_ahead(x);
            let d = _mm256_set1_ps(y.d * widen_f16(x.d));
            let sumi = block_lanes(&unpack(x), y);
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum_float_8(acc)
    }

    /// `super::avx2::dot_tiled_tokens`, with its bits: each block unpacked once for the `T`
    /// activation rows.
    ///
    /// # Safety
    /// As [`dot`].
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn dot_tiled_tokens<const T: usize>(
        w: &[BlockQ6K],
        acts: [&[BlockQ8K]; T],
    ) -> [f32; T] {
        let mut acc = [0f32; T];
        for (b, x) in w.iter().enumerate() {
            let unpacked = unpack(x);
            let mut lanes = [_mm256_setzero_si256(); T];
            for (lanes, act) in lanes.iter_mut().zip(&acts) {
                *lanes = block_lanes(&unpacked, &act[b]);
            }
            accumulate_block(&mut acc, lanes, widen_f16(x.d), &acts, b);
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::lanes::test_data::Rng;
    use crate::engine::cpu::q8_0::tests::{as_candle, float_reference};
    use candle_core::quantized::k_quants;
    use half::f16;

    pub(crate) fn random_q6k(rng: &mut Rng, n: usize) -> Vec<BlockQ6K> {
        (0..n)
            .map(|i| BlockQ6K {
                ql: std::array::from_fn(|_| rng.next_u64() as u8),
                qh: std::array::from_fn(|_| rng.next_u64() as u8),
                scales: std::array::from_fn(|_| (rng.next_u64() % 256) as u8 as i8),
                d: f16::from_f32(if i % 5 == 4 {
                    0.0
                } else {
                    rng.uniform() * 0.01
                }),
            })
            .collect()
    }
    /// Q8_K activations quantized like llama.cpp's `quantize_row_q8_K`.
    pub(crate) fn q8k(x: &[f32]) -> Vec<BlockQ8K> {
        let mut out = crate::engine::cpu::q8k::zeroed_q8k(x.len() / QK_K);
        crate::engine::cpu::q8k::quantize_row_q8k(x, &mut out);
        out
    }

    #[test]
    fn q6k_portable_and_avx2_agree_to_the_bit_in_both_orders() {
        let mut rng = Rng(10);
        for blocks in [1, 2, 3, 8] {
            let act = q8k(&rng.activations(blocks * QK_K));
            let mut w = random_q6k(&mut rng, blocks);
            w[0].scales = [i8::MIN; 16];
            w[0].ql = [0xFF; 128];
            w[0].qh = [0xFF; 64];
            let p = dot_q6k_q8k(SimdLevel::Portable, &w, &act);
            assert_eq!(
                dot_q6k_q8k(SimdLevel::Avx2, &w, &act).to_bits(),
                p.to_bits()
            );
        }
    }

    #[test]
    fn several_rows_per_pass_give_each_row_the_same_bits() {
        let mut rng = Rng(11);
        let blocks = 3;
        let act = q8k(&rng.activations(blocks * QK_K));
        for n_rows in [1, 2, 3, 5] {
            let w = random_q6k(&mut rng, blocks * n_rows);
            for level in [SimdLevel::Portable, SimdLevel::Avx2, SimdLevel::Avx512] {
                let mut out = vec![0f32; n_rows];
                dot_q6k_q8k_rows(level, &w, &act, &mut out);
                for (o, row) in out.iter().zip(w.chunks_exact(blocks)) {
                    assert_eq!(o.to_bits(), dot_q6k_q8k(level, row, &act).to_bits());
                }
            }
        }
    }

    #[test]
    fn several_tokens_per_pass_give_each_token_the_tiled_bits() {
        let mut rng = Rng(13);
        for blocks in [1, 3, 8] {
            let mut w = random_q6k(&mut rng, blocks);
            w[0].scales = [i8::MIN; 16];
            w[0].ql = [0xFF; 128];
            w[0].qh = [0xFF; 64];
            let acts: Vec<Vec<BlockQ8K>> = (0..TOKENS_PER_PASS)
                .map(|_| q8k(&rng.activations(blocks * QK_K)))
                .collect();
            let rows: [&[BlockQ8K]; TOKENS_PER_PASS] = std::array::from_fn(|i| &acts[i][..]);
            for level in [SimdLevel::Portable, SimdLevel::Avx2, SimdLevel::Avx512] {
                let got = dot_q6k_q8k_tiled_tokens(level, &w, rows);
                // The pass of four that takes a remainder of the prompt.
                let four =
                    dot_q6k_q8k_tiled_tokens::<4>(level, &w, std::array::from_fn(|i| rows[i]));
                for (g, act) in got.iter().zip(rows).chain(four.iter().zip(rows)) {
                    let want = dot_q6k_q8k_tiled(SimdLevel::Portable, &w, act);
                    assert_eq!(g.to_bits(), want.to_bits(), "{level:?}, {blocks} blocks");
                }
            }
        }
    }

    #[test]
    fn q6k_matches_a_float_reference_on_dequantized_weights() {
        let mut rng = Rng(12);
        let blocks = 4;
        let x: Vec<f32> = (0..blocks * QK_K).map(|_| rng.uniform()).collect();
        let w = random_q6k(&mut rng, blocks);
        let act = q8k(&x);
        let (want, bound) = float_reference::<k_quants::BlockQ6K>(as_candle(&w), &x, QK_K);
        for level in [SimdLevel::Portable, SimdLevel::Avx2, SimdLevel::Avx512] {
            for dot in [dot_q6k_q8k, dot_q6k_q8k_tiled] {
                let got = f64::from(dot(level, &w, &act));
                assert!((got - want).abs() <= bound, "{got} vs {want} ± {bound}");
            }
        }
    }

    /// The AVX-512 kernels against the best level below them, bit for bit, natively or in the
    /// emulator (see `emulator`).
    #[cfg(target_arch = "x86_64")]
    mod on_avx512 {
        use super::*;
        use crate::engine::cpu::emulator::{Entry, run_or_skip};

        const T: usize = TOKENS_PER_PASS;

        /// The arguments of one AVX-512 call, as raw parts the entry functions rebuild.
        #[repr(C)]
        struct Call {
            /// Weight rows of `nb` blocks, one after another.
            w: *const BlockQ6K,
            w_len: usize,
            /// `T` activation rows of `nb` blocks, one after another.
            act: *const BlockQ8K,
            nb: usize,
            /// `T` outputs per weight row: row `r`, activation row `t` at `T r + t`.
            out: *mut f32,
        }

        /// Rebuilds a call's slices: the weights, the `T` activation rows and the outputs.
        ///
        /// # Safety
        /// `c` is a live `Call` whose parts are valid for these lengths.
        unsafe fn parts<'a>(c: &Call) -> (&'a [BlockQ6K], [&'a [BlockQ8K]; T], &'a mut [f32]) {
            // SAFETY: as the caller guarantees.
            unsafe {
                let w = std::slice::from_raw_parts(c.w, c.w_len);
                let mut acts: [&[BlockQ8K]; T] = [&[]; T];
                for (t, a) in acts.iter_mut().enumerate() {
                    *a = std::slice::from_raw_parts(c.act.add(t * c.nb), c.nb);
                }
                let out = std::slice::from_raw_parts_mut(c.out, T * (c.w_len / c.nb));
                (w, acts, out)
            }
        }

        /// Runs `dot` on every (weight row, activation row) of the call at `arg`.
        ///
        /// # Safety
        /// `arg` is a live `Call`; the emulator (or this CPU) has AVX-512.
        unsafe fn each_pair(arg: *mut u8, dot: unsafe fn(&[BlockQ6K], &[BlockQ8K]) -> f32) {
            // SAFETY: as the caller guarantees.
            unsafe {
                let c = &*arg.cast::<Call>();
                let (w, acts, out) = parts(c);
                for (row, out) in w.chunks_exact(c.nb).zip(out.chunks_exact_mut(T)) {
                    for (o, act) in out.iter_mut().zip(acts) {
                        *o = dot(row, act);
                    }
                }
            }
        }

        /// The single-token dot (`dot_q6k_q8k`) of every (weight row, activation row).
        unsafe extern "C" fn dot_entry(arg: *mut u8) {
            // SAFETY: the test passes a live `Call`; the emulator (or this CPU) has AVX-512.
            unsafe { each_pair(arg, avx512::dot) }
        }

        /// The tiled order, one activation row per pass (`dot_q6k_q8k_tiled`).
        unsafe extern "C" fn tiled_entry(arg: *mut u8) {
            // SAFETY: as in `dot_entry` (the closure runs inside `each_pair`).
            unsafe { each_pair(arg, |w, act| avx512::dot_tiled_tokens(w, [act])[0]) }
        }

        /// The tiled order, `T` activation rows per pass (`dot_q6k_q8k_tiled_tokens`).
        unsafe extern "C" fn tiled_tokens_entry(arg: *mut u8) {
            // SAFETY: as in `dot_entry`.
            unsafe {
                let c = &*arg.cast::<Call>();
                let (w, acts, out) = parts(c);
                for (row, out) in w.chunks_exact(c.nb).zip(out.chunks_exact_mut(T)) {
                    out.copy_from_slice(&avx512::dot_tiled_tokens(row, acts));
                }
            }
        }

        /// The best level below AVX-512 this CPU has: what the AVX-512 bits must equal.
        fn reference_level() -> SimdLevel {
            if crate::engine::cpu::avx2_available() {
                SimdLevel::Avx2
            } else {
                SimdLevel::Portable
            }
        }

        /// Weights and `T` activation rows of `nb` blocks with the extremes in them: weight
        /// blocks of all-63 values at scale -128 and at scale 127 (the same block when there is
        /// one), activation blocks of all -128 and all 127.
        fn case_data(rng: &mut Rng, rows: usize, nb: usize) -> (Vec<BlockQ6K>, Vec<BlockQ8K>) {
            let mut w = random_q6k(rng, rows * nb);
            w[0].scales = [i8::MIN; 16];
            w[0].ql = [0xFF; 128];
            w[0].qh = [0xFF; 64];
            let last = &mut w[rows * nb - 1];
            last.scales = [i8::MAX; 16];
            last.ql = [0xFF; 128];
            last.qh = [0xFF; 64];
            let mut act: Vec<BlockQ8K> = (0..T)
                .flat_map(|_| q8k(&rng.activations(nb * QK_K)))
                .collect();
            act[0].qs = [-128; QK_K];
            act[0].bsums = [-128 * 16; QK_K / 16];
            let last = act.len() - 1;
            act[last].qs = [127; QK_K];
            act[last].bsums = [127 * 16; QK_K / 16];
            (w, act)
        }

        /// The bit patterns of `v`, compared exactly.
        fn bits(v: &[f32]) -> Vec<u32> {
            v.iter().map(|x| x.to_bits()).collect()
        }

        /// Runs `entry` on AVX-512 for weight rows × block counts, and compares with `reference`
        /// (weight row, activation row) at the reference level.
        fn check(entry: Entry, reference: fn(SimdLevel, &[BlockQ6K], &[BlockQ8K]) -> f32) {
            let mut rng = Rng(21);
            let level = reference_level();
            let shapes = [(1, 1), (3, 2), (2, 3), (5, 8), (2, 43)];
            let data: Vec<_> = shapes
                .iter()
                .map(|&(rows, nb)| case_data(&mut rng, rows, nb))
                .collect();
            let expected: Vec<Vec<f32>> = shapes
                .iter()
                .zip(&data)
                .map(|(&(_, nb), (w, act))| {
                    w.chunks_exact(nb)
                        .flat_map(|row| act.chunks_exact(nb).map(|a| reference(level, row, a)))
                        .collect()
                })
                .collect();
            let mut outputs: Vec<Vec<f32>> =
                expected.iter().map(|e| vec![f32::NAN; e.len()]).collect();
            let mut calls: Vec<Call> = shapes
                .iter()
                .zip(&data)
                .zip(&mut outputs)
                .map(|((&(_, nb), (w, act)), out)| Call {
                    w: w.as_ptr(),
                    w_len: w.len(),
                    act: act.as_ptr(),
                    nb,
                    out: out.as_mut_ptr(),
                })
                .collect();
            let runs: Vec<(Entry, *mut u8)> = calls
                .iter_mut()
                .map(|c| (entry, (c as *mut Call).cast::<u8>()))
                .collect();
            let mut views: Vec<&mut [u8]> = outputs
                .iter_mut()
                .map(|o| {
                    // SAFETY: f32 has no invalid bit patterns; the view covers the vector.
                    unsafe { std::slice::from_raw_parts_mut(o.as_mut_ptr().cast(), 4 * o.len()) }
                })
                .collect();
            let Some(ran) = run_or_skip(&runs, &mut views) else {
                return;
            };
            for ((shape, out), want) in shapes.iter().zip(&outputs).zip(&expected) {
                assert_eq!(
                    bits(out),
                    bits(want),
                    "{shape:?} ({ran:?}) against {level:?}"
                );
            }
        }

        #[test]
        fn the_avx512_dot_gives_the_avx2_bits() {
            check(dot_entry, dot_q6k_q8k);
        }

        #[test]
        fn the_avx512_tiled_dot_gives_the_avx2_bits() {
            check(tiled_entry, dot_q6k_q8k_tiled);
        }

        #[test]
        fn the_avx512_tiled_dot_of_several_tokens_gives_the_avx2_bits() {
            // The reference is the one-token tiled dot, which `several_tokens_per_pass_give_
            // each_token_the_tiled_bits` shows equal to the several-token one on every level.
            check(tiled_tokens_entry, dot_q6k_q8k_tiled);
        }
    }
}
