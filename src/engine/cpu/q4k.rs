//! llama.cpp's repacked Q4_K × Q8_K kernels (`ggml-cpu/repack.cpp`, `arch/x86/repack.cpp`),
//! bit for bit, on repacked weights and on the weights as the GGUF file stores them:
//! `ggml_gemv_q4_K_8x8_q8_K` (one activation row) and `ggml_gemm_q4_K_8x8_q8_K` (four rows at a
//! time).
//!
//! The integer dot products are exact, so only the float steps decide the bits; both paths do,
//! per output, `acc = fma(float(int), d_w * d_a, acc)` and the same for the minimums, then
//! `acc - acc_min`. The gemv does one such step per 256-value block, the gemm one per pair of
//! 32-value sub-blocks (four per block), so the same row gives slightly different bits through
//! the two (as in llama.cpp).
//!
//! llama.cpp repacks the weights at load into eight interleaved rows ([`BlockQ4Kx8`],
//! `q4_K_8x8`), which its gemv reads about 1.3x as fast as the file's layout. Repacking the 3B's
//! 1.35 GB of Q4_K at load took most of a 2-3 s load (fresh pages to zero, then fill), so the
//! model starts on the file's layout, used in place from its shared mapping, and repacks in the
//! background ([`Matrix::repack`](super::matmul::Matrix::repack)). Both layouts give the same
//! bits: [`gemv_q4k`] computes each row's exact integer sums straight from the GGUF blocks, and
//! [`gemm_q4k`] interleaves the rows it is given into a per-thread scratch and runs the
//! repacked gemm ([`gemm_q4k_x8`]).
//!
//! On CPUs with AVX-512 F/BW/VL/VNNI the repacked gemv and gemm run in `vpdpbusd` form
//! (`avx512`), with the AVX2 kernels' bits; tests run them in an x86 emulator where the CPU
//! lacks AVX-512 (`super::emulator`).
//!
//! Using them as llama.cpp's `forward_mul_mat` does: quantize activation rows
//! `0 .. m - m % 4` four at a time ([`quantize_rows_q8k_x4`](super::q8k::quantize_rows_q8k_x4))
//! and run [`gemm_q4k`] (or [`gemm_q4k_x8`]) on them; quantize each remaining row with
//! [`quantize_row_q8k`](super::q8k::quantize_row_q8k) and run [`gemv_q4k`] (or
//! [`gemv_q4k_x8`]). Every output is computed whole by one call, so splitting the weight rows
//! across threads in chunks of whole 8-row groups (llama.cpp: multiples of 8) gives the same
//! bits for any thread count.

use super::SimdLevel;
use super::blocks::{BlockQ4K, BlockQ4Kx8, BlockQ8K, BlockQ8Kx4, QK_K, as_blocks, as_blocks_mut};
use half::f16;

/// Why a Q4_K tensor cannot be repacked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    /// The row count is not a multiple of the eight rows interleaved together.
    #[error("Q4_K repacking needs a multiple of 8 rows, got {rows}")]
    RowsNotMultipleOf8 {
        /// Rows in the tensor.
        rows: usize,
    },
    /// The row length is not a whole number of 256-value blocks.
    #[error("Q4_K rows must be whole blocks of {QK_K} values, got {k}")]
    PartialBlock {
        /// Values per row.
        k: usize,
    },
    /// The byte count does not match the shape.
    #[error("a {rows}x{k} Q4_K tensor has {expected} bytes, got {actual}")]
    WrongSize {
        /// Rows in the tensor.
        rows: usize,
        /// Values per row.
        k: usize,
        /// Bytes the shape needs.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
    /// The data is not aligned for its f16 fields.
    #[error("Q4_K data is not 2-byte aligned")]
    Misaligned,
}

/// Rewrites a Q4_K tensor of `rows` rows (`rows % 8 == 0`) × `k` columns, stored as GGUF
/// blocks, into [`BlockQ4Kx8`] order in place: group `g`'s block `x` holds block `x` of rows
/// `8 g .. 8 g + 8` (llama.cpp's `repack_q4_K_to_q4_K_8_bl`). Uses a scratch copy of one 8-row
/// group.
pub fn repack_q4k_x8_in_place(data: &mut [u8], rows: usize, k: usize) -> Result<(), KernelError> {
    if !k.is_multiple_of(QK_K) {
        return Err(KernelError::PartialBlock { k });
    }
    if !rows.is_multiple_of(8) {
        return Err(KernelError::RowsNotMultipleOf8 { rows });
    }
    let nb = k / QK_K;
    let group_bytes = 8 * nb * std::mem::size_of::<BlockQ4K>();
    let expected = rows / 8 * group_bytes;
    if data.len() != expected {
        return Err(KernelError::WrongSize {
            rows,
            k,
            expected,
            actual: data.len(),
        });
    }
    let mut scratch = Vec::with_capacity(8 * nb);
    for group in data.chunks_exact_mut(group_bytes) {
        scratch.clear();
        scratch.extend_from_slice(as_blocks::<BlockQ4K>(group).ok_or(KernelError::Misaligned)?);
        let out = as_blocks_mut::<BlockQ4Kx8>(group).ok_or(KernelError::Misaligned)?;
        for (x, block) in out.iter_mut().enumerate() {
            interleave_into(std::array::from_fn(|i| &scratch[x + i * nb]), block);
        }
    }
    Ok(())
}

/// An all-zero interleaved block (what scratch space starts as).
const EMPTY_X8: BlockQ4Kx8 = BlockQ4Kx8 {
    d: [f16::ZERO; 8],
    dmin: [f16::ZERO; 8],
    scales: [0; 96],
    qs: [0; QK_K * 4],
};

/// llama.cpp's `make_block_q4_Kx8` with 8-byte interleaving.
pub fn interleave(rows: &[BlockQ4K; 8]) -> BlockQ4Kx8 {
    let mut out = EMPTY_X8;
    interleave_into(std::array::from_fn(|r| &rows[r]), &mut out);
    out
}

/// [`interleave`] of eight blocks wherever they lie, written straight into `out` (the gemm on
/// the GGUF layout interleaves on every call, so no copies on the way).
pub fn interleave_into(rows: [&BlockQ4K; 8], out: &mut BlockQ4Kx8) {
    out.d = rows.map(|r| r.d);
    out.dmin = rows.map(|r| r.dmin);
    #[cfg(target_arch = "x86_64")]
    if super::avx2_available() {
        // SAFETY: the CPU has AVX2 (checked just above).
        unsafe { avx2::interleave_qs(rows, &mut out.qs) };
    } else {
        interleave_qs(rows, &mut out.qs);
    }
    #[cfg(not(target_arch = "x86_64"))]
    interleave_qs(rows, &mut out.qs);
    // Each row's pairs decoded once, then packed again per sub-block across the rows.
    let decoded: [[u8; 16]; 8] = rows.map(|r| decode_scale_mins(&r.scales));
    for sub in 0..8 {
        let scales = std::array::from_fn(|r| decoded[r][sub]);
        let mins = std::array::from_fn(|r| decoded[r][8 + sub]);
        out.scales[12 * sub..12 * sub + 12].copy_from_slice(&pack_scale_mins(scales, mins));
    }
}

/// The values of [`interleave_into`]: 8-byte chunk `t` of row `r` goes to chunk `8 t + r`.
fn interleave_qs(rows: [&BlockQ4K; 8], qs: &mut [u8; QK_K * 4]) {
    for (t, chunks) in qs.chunks_exact_mut(64).enumerate() {
        for (chunk, row) in chunks.chunks_exact_mut(8).zip(rows) {
            chunk.copy_from_slice(&row.qs[8 * t..8 * t + 8]);
        }
    }
}

/// The inverse of [`interleave`]: the eight GGUF blocks back.
pub fn deinterleave(block: &BlockQ4Kx8) -> [BlockQ4K; 8] {
    std::array::from_fn(|r| {
        let mut qs = [0u8; QK_K / 2];
        for (t, chunk) in qs.chunks_exact_mut(8).enumerate() {
            let i = 8 * t + r;
            chunk.copy_from_slice(&block.qs[8 * i..8 * i + 8]);
        }
        let pairs: [(u8, u8); 8] =
            std::array::from_fn(|sub| scale_min_k4(r, group(&block.scales, sub)));
        BlockQ4K {
            d: block.d[r],
            dmin: block.dmin[r],
            scales: pack_scale_mins(pairs.map(|p| p.0), pairs.map(|p| p.1)),
            qs,
        }
    })
}

#[inline(always)]
fn group(scales: &[u8; 96], sub: usize) -> &[u8; 12] {
    scales[12 * sub..12 * sub + 12]
        .try_into()
        .expect("12-byte group")
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and minimum number `j` of a 12-byte packing.
fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The 12-byte packing of eight 6-bit scales and minimums that [`scale_min_k4`] reads.
fn pack_scale_mins(scales: [u8; 8], mins: [u8; 8]) -> [u8; 12] {
    let word = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let (s_lo, s_hi) = (word(&scales[..4]), word(&scales[4..]));
    let (m_lo, m_hi) = (word(&mins[..4]), word(&mins[4..]));
    // Byte-wise: the low six bits of pairs 0-3, with bits 4-5 of pairs 4-7 on top; then the low
    // four bits of pairs 4-7 (scale in the low nibble, minimum in the high one).
    let q = [
        (s_lo & KMASK1) | (((s_hi >> 4) & KMASK3) << 6),
        (m_lo & KMASK1) | (((m_hi >> 4) & KMASK3) << 6),
        (s_hi & KMASK2) | ((m_hi & KMASK2) << 4),
    ];
    let mut out = [0u8; 12];
    for (o, w) in out.chunks_exact_mut(4).zip(q) {
        o.copy_from_slice(&w.to_le_bytes());
    }
    out
}

const KMASK1: u32 = 0x3f3f_3f3f;
const KMASK2: u32 = 0x0f0f_0f0f;
const KMASK3: u32 = 0x0303_0303;

/// llama.cpp's `utmp` decoding of a 12-byte packing, as four words: bytes 0-7 are the eight
/// 6-bit scales, bytes 8-15 the eight minimums.
#[inline(always)]
fn utmp(group: &[u8; 12]) -> [u32; 4] {
    let word = |i: usize| {
        u32::from_le_bytes([
            group[4 * i],
            group[4 * i + 1],
            group[4 * i + 2],
            group[4 * i + 3],
        ])
    };
    let mut u = [word(0), word(1), word(2), 0];
    u[3] = ((u[2] >> 4) & KMASK2) | (((u[1] >> 6) & KMASK3) << 4);
    let aux = u[1] & KMASK1;
    u[1] = (u[2] & KMASK2) | (((u[0] >> 6) & KMASK3) << 4);
    u[2] = aux;
    u[0] &= KMASK1;
    u
}

/// [`utmp`] as bytes: the scales of sub-blocks 0-7, then their minimums.
pub(super) fn decode_scale_mins(group: &[u8; 12]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (o, w) in out.chunks_exact_mut(4).zip(utmp(group)) {
        o.copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// llama.cpp's gemv on GGUF-layout weights: `out[j]` = row `j` of `w` (`out.len()` rows of
/// `k / QK_K` blocks, one row after another) · one activation row (`act.len() == k / QK_K`),
/// with the bits of [`gemv_q4k_x8`] on the same rows repacked.
pub fn gemv_q4k(level: SimdLevel, k: usize, w: &[BlockQ4K], act: &[BlockQ8K], out: &mut [f32]) {
    let nb = k / QK_K;
    assert!(k.is_multiple_of(QK_K) && nb > 0, "k must be whole blocks");
    assert_eq!(act.len(), nb, "one Q8_K block per 256 columns");
    assert_eq!(w.len(), nb * out.len(), "one output per weight row");
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && super::avx2_available() {
        // One row at a time: each row is one sequential stream for the prefetchers. Four rows
        // per pass computed faster from cache but read memory at half the speed
        // (examples/kernel_bench.rs, Zen 3).
        for (row, out) in w.chunks_exact(nb).zip(out.iter_mut()) {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
            *out = unsafe { avx2::gemv_row(row, act) };
        }
        return;
    }
    let _ = level;
    for (row, out) in w.chunks_exact(nb).zip(out.iter_mut()) {
        *out = gemv_row_portable(row, act);
    }
}

thread_local! {
    /// The weight rows of the gemm's current call, interleaved ([`gemm_q4k`]).
    static INTERLEAVED: std::cell::RefCell<Vec<BlockQ4Kx8>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// llama.cpp's gemm on GGUF-layout weights (rows of `k / QK_K` blocks, whole 8-row groups):
/// `m` activation rows (`m % 4 == 0`, `act` holds `m / 4` groups of `k / QK_K` blocks) times
/// `w`; writes `out[r * out_stride + j]` for weight row `j`. The rows are interleaved into a
/// per-thread scratch first (each is then reused for every four activation rows), so callers
/// pass a thread's share of the rows, not a whole large matrix.
pub fn gemm_q4k(
    level: SimdLevel,
    k: usize,
    w: &[BlockQ4K],
    act: &[BlockQ8Kx4],
    m: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let nb = k / QK_K;
    assert!(k.is_multiple_of(QK_K) && nb > 0, "k must be whole blocks");
    with_interleaved(w, nb, |w| gemm_q4k_x8(level, k, w, act, m, out, out_stride));
}

/// Runs `f` on the GGUF-layout rows `w` (rows of `nb` blocks, whole 8-row groups) interleaved
/// as llama.cpp repacks them, in a per-thread scratch (kept for the next call). Not reentrant:
/// `f` must not call it again.
pub fn with_interleaved<R>(w: &[BlockQ4K], nb: usize, f: impl FnOnce(&[BlockQ4Kx8]) -> R) -> R {
    assert!(
        nb > 0 && w.len().is_multiple_of(8 * nb),
        "whole 8-row groups"
    );
    INTERLEAVED.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let blocks = w.len() / 8;
        if scratch.len() < blocks {
            scratch.resize(blocks, EMPTY_X8);
        }
        let scratch = &mut scratch[..blocks];
        for (group, packed) in w.chunks_exact(8 * nb).zip(scratch.chunks_exact_mut(nb)) {
            for (x, block) in packed.iter_mut().enumerate() {
                interleave_into(std::array::from_fn(|r| &group[r * nb + x]), block);
            }
        }
        f(scratch)
    })
}

/// Integer sums of one GGUF block against one activation block: Σ scale·(q4·q8) and
/// Σ min·(Σq8) over its eight sub-blocks.
fn block_sums(x: &BlockQ4K, y: &BlockQ8K) -> (i32, i32) {
    let (mut dot, mut min) = (0i32, 0i32);
    for sub in 0..8 {
        let (scale, m) = scale_min_k4(sub, &x.scales);
        let packed = &x.qs[32 * (sub / 2)..][..32];
        let sum: i32 = packed
            .iter()
            .zip(&y.qs[32 * sub..][..32])
            .map(|(&p, &q8)| {
                let q4 = if sub % 2 == 0 { p & 0xf } else { p >> 4 };
                i32::from(q4) * i32::from(q8)
            })
            .sum();
        dot += i32::from(scale) * sum;
        min += i32::from(m) * (i32::from(y.bsums[2 * sub]) + i32::from(y.bsums[2 * sub + 1]));
    }
    (dot, min)
}

/// The portable gemv for one GGUF-layout row: one FMA step per block, as [`gemv_group_portable`].
fn gemv_row_portable(w: &[BlockQ4K], act: &[BlockQ8K]) -> f32 {
    let (mut acc, mut acc_min) = (0.0f32, 0.0f32);
    for (x, y) in w.iter().zip(act) {
        let (dot, min) = block_sums(x, y);
        acc = (dot as f32).mul_add(x.d.to_f32() * y.d, acc);
        acc_min = (min as f32).mul_add(x.dmin.to_f32() * y.d, acc_min);
    }
    acc - acc_min
}

/// llama.cpp's gemv on repacked weights: `out[j]` = row `j` of the repacked weights
/// (`8 * w.len() / (k / QK_K)` rows: whole 8-row groups) · one activation row
/// (`act.len() == k / QK_K`).
pub fn gemv_q4k_x8(
    level: SimdLevel,
    k: usize,
    w: &[BlockQ4Kx8],
    act: &[BlockQ8K],
    out: &mut [f32],
) {
    let nb = k / QK_K;
    assert!(k.is_multiple_of(QK_K) && nb > 0, "k must be whole blocks");
    assert_eq!(act.len(), nb, "one Q8_K block per 256 columns");
    assert!(w.len().is_multiple_of(nb), "whole 8-row groups");
    assert_eq!(out.len(), 8 * (w.len() / nb), "one output per weight row");
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx512 && super::avx512_available() {
        for (wg, out) in w.chunks_exact(nb).zip(out.chunks_exact_mut(8)) {
            // SAFETY: the CPU has AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI (checked just above).
            let result = unsafe { avx512::gemv_group(wg, act) };
            out.copy_from_slice(&result);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && super::avx2_available() {
        for (wg, out) in w.chunks_exact(nb).zip(out.chunks_exact_mut(8)) {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
            let result = unsafe { avx2::gemv_group(wg, act) };
            out.copy_from_slice(&result);
        }
        return;
    }
    let _ = level;
    for (wg, out) in w.chunks_exact(nb).zip(out.chunks_exact_mut(8)) {
        out.copy_from_slice(&gemv_group_portable(wg, act));
    }
}

/// llama.cpp's gemm: `m` activation rows (`m % 4 == 0`, `act` holds `m / 4` groups of
/// `k / QK_K` blocks) times the repacked weights; writes `out[r * out_stride + j]` for weight
/// row `j` (`out_stride` at least the weight rows).
pub fn gemm_q4k_x8(
    level: SimdLevel,
    k: usize,
    w: &[BlockQ4Kx8],
    act: &[BlockQ8Kx4],
    m: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let nb = k / QK_K;
    assert!(k.is_multiple_of(QK_K) && nb > 0, "k must be whole blocks");
    assert!(m.is_multiple_of(4), "gemm takes rows four at a time");
    assert_eq!(act.len(), m / 4 * nb, "m / 4 groups of Q8_Kx4 blocks");
    assert!(w.len().is_multiple_of(nb), "whole 8-row groups");
    let n = 8 * (w.len() / nb);
    assert!(out_stride >= n, "out_stride below the weight rows");
    if m == 0 {
        return;
    }
    assert!(out.len() >= (m - 1) * out_stride + n, "output too short");
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx512 && super::avx512_available() {
        // SAFETY: the CPU has AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI (checked just above);
        // shapes checked above.
        unsafe { avx512::gemm(nb, w, act, m, out, out_stride) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && super::avx2_available() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above); shapes checked above.
        unsafe { avx2::gemm(nb, w, act, m, out, out_stride) };
        return;
    }
    let _ = level;
    gemm_portable(nb, w, act, m, out, out_stride);
}

/// Calls `tile(weight groups, activation groups, first output row, first output column)` for
/// every run of up to four 8-row weight groups with each run of four groups of four activation
/// rows (16 rows), then with each remaining group alone: the gemm kernels' tiling. Allocates
/// nothing.
fn for_each_tile<'a>(
    nb: usize,
    w: &'a [BlockQ4Kx8],
    act: &'a [BlockQ8Kx4],
    m: usize,
    mut tile: impl FnMut(&[&'a [BlockQ4Kx8]], &[&'a [BlockQ8Kx4]], usize, usize),
) {
    let n_groups = w.len() / nb;
    let wg = |x: usize| &w[x * nb..(x + 1) * nb];
    let mut each_weight_tile = |rows: &[&'a [BlockQ8Kx4]], row: usize| {
        for x in (0..n_groups).step_by(4) {
            let wgs: [_; 4] = std::array::from_fn(|i| wg((x + i).min(n_groups - 1)));
            tile(&wgs[..(n_groups - x).min(4)], rows, row, 8 * x);
        }
    };
    let groups = m / 4;
    let group = |y: usize| &act[y * nb..(y + 1) * nb];
    let full = groups / 4;
    for y in 0..full {
        let rows = [
            group(4 * y),
            group(4 * y + 1),
            group(4 * y + 2),
            group(4 * y + 3),
        ];
        each_weight_tile(&rows, 16 * y);
    }
    for y in 4 * full..groups {
        each_weight_tile(&[group(y)], 4 * y);
    }
}

/// Integer sums for one pair of sub-blocks (`sub = 2 pair`, `2 pair + 1`) of eight weight rows
/// against one activation row: per row, Σ scale·(q4·q8) and Σ min·(Σq8).
fn pair_sums(w: &BlockQ4Kx8, q8: &[i8], bsums: &[i16], pair: usize) -> ([i32; 8], [i32; 8]) {
    let mut dots = [0i32; 8];
    let mut mins = [0i32; 8];
    for (r, (dot, min)) in dots.iter_mut().zip(&mut mins).enumerate() {
        for half in 0..2 {
            let sub = 2 * pair + half;
            let (scale, m) = scale_min_k4(r, group(&w.scales, sub));
            let mut sum = 0i32;
            for l in 0..32 {
                let packed = w.qs[256 * pair + 64 * (l / 8) + 8 * r + l % 8];
                let q4 = if half == 0 { packed & 0xf } else { packed >> 4 };
                sum += i32::from(q4) * i32::from(q8[32 * sub + l]);
            }
            *dot += i32::from(scale) * sum;
            let q8_sum = i32::from(bsums[2 * sub]) + i32::from(bsums[2 * sub + 1]);
            *min += i32::from(m) * q8_sum;
        }
    }
    (dots, mins)
}

fn f16s(v: &[f16; 8]) -> [f32; 8] {
    v.map(f16::to_f32)
}

/// The portable gemv for one 8-row group: one FMA step per block.
fn gemv_group_portable(w: &[BlockQ4Kx8], act: &[BlockQ8K]) -> [f32; 8] {
    let mut acc = [0.0f32; 8];
    let mut acc_min = [0.0f32; 8];
    for (wb, ab) in w.iter().zip(act) {
        let (d, dmin) = (f16s(&wb.d), f16s(&wb.dmin));
        let mut dots = [0i32; 8];
        let mut mins = [0i32; 8];
        for pair in 0..4 {
            let (pd, pm) = pair_sums(wb, &ab.qs, &ab.bsums, pair);
            for c in 0..8 {
                dots[c] += pd[c];
                mins[c] += pm[c];
            }
        }
        for c in 0..8 {
            acc[c] = (dots[c] as f32).mul_add(d[c] * ab.d, acc[c]);
            acc_min[c] = (mins[c] as f32).mul_add(dmin[c] * ab.d, acc_min[c]);
        }
    }
    std::array::from_fn(|c| acc[c] - acc_min[c])
}

/// One activation row of a [`BlockQ8Kx4`], de-interleaved.
fn activation_row(a: &BlockQ8Kx4, r: usize) -> ([i8; QK_K], [i16; QK_K / 16]) {
    let qs = std::array::from_fn(|j| a.qs[32 * (j / 8) + 8 * r + j % 8]);
    let bsums = std::array::from_fn(|g| a.bsums[16 * (g / 4) + 4 * r + g % 4]);
    (qs, bsums)
}

/// The portable gemm: one FMA step per pair of sub-blocks.
fn gemm_portable(
    nb: usize,
    w: &[BlockQ4Kx8],
    act: &[BlockQ8Kx4],
    m: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    for (y, ag) in act.chunks_exact(nb).enumerate().take(m / 4) {
        for (x, wg) in w.chunks_exact(nb).enumerate() {
            let mut acc = [[0.0f32; 8]; 4];
            let mut acc_min = [[0.0f32; 8]; 4];
            for (wb, ab) in wg.iter().zip(ag) {
                let (d, dmin) = (f16s(&wb.d), f16s(&wb.dmin));
                let rows: [_; 4] = std::array::from_fn(|r| activation_row(ab, r));
                for pair in 0..4 {
                    for (r, (qs, bsums)) in rows.iter().enumerate() {
                        let (dots, mins) = pair_sums(wb, qs, bsums, pair);
                        for c in 0..8 {
                            acc[r][c] = (dots[c] as f32).mul_add(d[c] * ab.d[r], acc[r][c]);
                            acc_min[r][c] =
                                (mins[c] as f32).mul_add(dmin[c] * ab.d[r], acc_min[r][c]);
                        }
                    }
                }
            }
            for r in 0..4 {
                let row = &mut out[(4 * y + r) * out_stride + 8 * x..][..8];
                for c in 0..8 {
                    row[c] = acc[r][c] - acc_min[r][c];
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::lanes::avx2::prefetch_ahead;
    use super::{BlockQ4K, BlockQ4Kx8, BlockQ8K, BlockQ8Kx4, group, utmp};
    use std::arch::x86_64::*;

    /// The 16 bytes llama.cpp's `utmp` decoding makes of one 12-byte group: eight 6-bit scales
    /// (of eight rows in a repacked block, of eight sub-blocks in a GGUF one), then their
    /// minimums.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn mins_and_scales(group: &[u8; 12]) -> __m128i {
        let u = utmp(group);
        _mm_set_epi32(u[3] as i32, u[2] as i32, u[1] as i32, u[0] as i32)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn load256(bytes: &[u8], offset: usize) -> __m256i {
        assert!(offset + 32 <= bytes.len());
        // SAFETY: in bounds (checked above); unaligned load.
        unsafe { _mm256_loadu_si256(bytes.as_ptr().add(offset).cast()) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn i8_bytes(v: &[i8]) -> &[u8] {
        // SAFETY: i8 and u8 have the same size and alignment, every bit pattern valid.
        unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len()) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn broadcast128(v: __m128i) -> __m256i {
        let v = _mm256_castsi128_si256(v);
        _mm256_permute2f128_si256::<0>(v, v)
    }

    /// Eight f16 into f32 (F16C, exact).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn f16x8(v: &[half::f16; 8]) -> __m128i {
        // SAFETY: [f16; 8] is 16 readable bytes.
        unsafe { _mm_loadu_si128(v.as_ptr().cast()) }
    }

    /// Eight activation bytes, broadcast to every 64-bit lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn broadcast64(bytes: &[u8], offset: usize) -> __m256i {
        assert!(offset + 8 <= bytes.len());
        // SAFETY: in bounds (checked above); unaligned 8-byte read.
        let v = unsafe { bytes.as_ptr().add(offset).cast::<i64>().read_unaligned() };
        _mm256_set1_epi64x(v)
    }

    /// `ggml_gemv_q4_K_8x8_q8_K` for one group of eight weight rows, with its bits but fewer
    /// instructions: each 32-byte load holds 8 bytes of four rows, which meet 8 activation
    /// bytes broadcast to every 64-bit lane, so no lane needs rearranging. The integer sums of
    /// a block are exact in either form (a sub-block's 32 products of 4-bit by 8-bit values
    /// fit an i16 lane), and the float steps are llama.cpp's, lane for lane. From cache it
    /// reads 26.9 GB/s of weights on one Zen 3 core against 20.7 for llama.cpp's instruction
    /// sequence (`kernel_bench`), and the 3B generates about 4% faster.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `w.len() == act.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gemv_group(w: &[BlockQ4Kx8], act: &[BlockQ8K]) -> [f32; 8] {
        // Lanes of a block's integer sums after `hadd`: rows 0 1 4 5 2 3 6 7.
        let deltamask = _mm_set_epi8(15, 14, 13, 12, 7, 6, 5, 4, 11, 10, 9, 8, 3, 2, 1, 0);
        let finalpermutemask = _mm256_set_epi32(7, 6, 3, 2, 5, 4, 1, 0);
        // Each row's scale (bytes 0-7 of a decoded group) as i16, four times: rows 0-3 of the
        // group in one register, rows 4-7 in the other.
        let scales_0123 = _mm256_set_epi8(
            -1, 3, -1, 3, -1, 3, -1, 3, -1, 2, -1, 2, -1, 2, -1, 2, //
            -1, 1, -1, 1, -1, 1, -1, 1, -1, 0, -1, 0, -1, 0, -1, 0,
        );
        let scales_4567 = _mm256_set_epi8(
            -1, 7, -1, 7, -1, 7, -1, 7, -1, 6, -1, 6, -1, 6, -1, 6, //
            -1, 5, -1, 5, -1, 5, -1, 5, -1, 4, -1, 4, -1, 4, -1, 4,
        );
        let m4b = _mm256_set1_epi8(0x0f);

        let mut acc_row = _mm256_setzero_ps();
        let mut acc_min_rows = _mm256_setzero_ps();
        for (wb, ab) in w.iter().zip(act) {
            prefetch_ahead(wb);
            let row_scale_f32 = _mm256_set1_ps(ab.d);
            let col_scale_f32 = _mm256_cvtph_ps(_mm_shuffle_epi8(f16x8(&wb.d), deltamask));
            let col_dmin_f32 = _mm256_cvtph_ps(f16x8(&wb.dmin));
            let mut iacc_0123 = _mm256_setzero_si256();
            let mut iacc_4567 = _mm256_setzero_si256();
            let mut iacc_min_b = _mm256_setzero_si256();

            // SAFETY: bsums is 32 readable bytes.
            let q8sums = unsafe { _mm256_loadu_si256(ab.bsums.as_ptr().cast()) };
            let mut q8s = broadcast128(_mm_hadd_epi16(
                _mm256_castsi256_si128(q8sums),
                _mm256_extracti128_si256::<1>(q8sums),
            ));
            let aq = i8_bytes(&ab.qs);

            for sb in 0..4 {
                // Sub-block 2 sb in the low nibbles, 2 sb + 1 in the high ones; i16 sums of
                // rows 0-3 and 4-7 of each.
                let mut lo = [_mm256_setzero_si256(); 2];
                let mut hi = [_mm256_setzero_si256(); 2];
                for c in 0..4 {
                    let act_lo = broadcast64(aq, sb * 64 + 8 * c);
                    let act_hi = broadcast64(aq, sb * 64 + 32 + 8 * c);
                    for half in 0..2 {
                        let v = load256(&wb.qs, sb * 256 + 64 * c + 32 * half);
                        let v_lo = _mm256_and_si256(v, m4b);
                        let v_hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4b);
                        lo[half] = _mm256_add_epi16(lo[half], _mm256_maddubs_epi16(v_lo, act_lo));
                        hi[half] = _mm256_add_epi16(hi[half], _mm256_maddubs_epi16(v_hi, act_hi));
                    }
                }
                let ms0 = broadcast128(mins_and_scales(group(&wb.scales, 2 * sb)));
                let ms1 = broadcast128(mins_and_scales(group(&wb.scales, 2 * sb + 1)));
                let mins_01 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(
                    _mm_shuffle_epi32::<78>(_mm256_castsi256_si128(ms0)),
                    _mm_shuffle_epi32::<78>(_mm256_castsi256_si128(ms1)),
                ));
                let scaled = |sums: __m256i, ms: __m256i, mask: __m256i| {
                    _mm256_madd_epi16(sums, _mm256_shuffle_epi8(ms, mask))
                };
                iacc_0123 = _mm256_add_epi32(
                    iacc_0123,
                    _mm256_add_epi32(
                        scaled(lo[0], ms0, scales_0123),
                        scaled(hi[0], ms1, scales_0123),
                    ),
                );
                iacc_4567 = _mm256_add_epi32(
                    iacc_4567,
                    _mm256_add_epi32(
                        scaled(lo[1], ms0, scales_4567),
                        scaled(hi[1], ms1, scales_4567),
                    ),
                );

                let iacc_min_sb = _mm256_madd_epi16(_mm256_shuffle_epi32::<0>(q8s), mins_01);
                q8s = _mm256_bsrli_epi128::<4>(q8s);
                iacc_min_b = _mm256_add_epi32(iacc_min_b, iacc_min_sb);
            }
            let iacc_b = _mm256_hadd_epi32(iacc_0123, iacc_4567);

            acc_row = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(iacc_b),
                _mm256_mul_ps(col_scale_f32, row_scale_f32),
                acc_row,
            );
            acc_min_rows = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(iacc_min_b),
                _mm256_mul_ps(col_dmin_f32, row_scale_f32),
                acc_min_rows,
            );
        }
        acc_row = _mm256_permutevar8x32_ps(acc_row, finalpermutemask);
        let mut out = [0.0f32; 8];
        // SAFETY: out is 8 writable f32.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), _mm256_sub_ps(acc_row, acc_min_rows)) };
        out
    }

    /// [`super::interleave_qs`] in registers: 32 bytes (four chunks) of four rows at a time,
    /// transposed as 64-bit lanes.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn interleave_qs(rows: [&BlockQ4K; 8], qs: &mut [u8; 1024]) {
        for half in 0..2 {
            for quarter in 0..4 {
                // Chunks 4 q .. 4 q + 4 of rows 4 h .. 4 h + 4.
                let v: [__m256i; 4] =
                    std::array::from_fn(|i| load256(&rows[4 * half + i].qs, 32 * quarter));
                let lo01 = _mm256_unpacklo_epi64(v[0], v[1]);
                let hi01 = _mm256_unpackhi_epi64(v[0], v[1]);
                let lo23 = _mm256_unpacklo_epi64(v[2], v[3]);
                let hi23 = _mm256_unpackhi_epi64(v[2], v[3]);
                let chunks = [
                    _mm256_permute2x128_si256::<0x20>(lo01, lo23),
                    _mm256_permute2x128_si256::<0x20>(hi01, hi23),
                    _mm256_permute2x128_si256::<0x31>(lo01, lo23),
                    _mm256_permute2x128_si256::<0x31>(hi01, hi23),
                ];
                for (c, v) in chunks.into_iter().enumerate() {
                    let at = 64 * (4 * quarter + c) + 32 * half;
                    let dst: &mut [u8] = &mut qs[at..at + 32];
                    // SAFETY: dst is 32 writable bytes; unaligned store.
                    unsafe { _mm256_storeu_si256(dst.as_mut_ptr().cast(), v) };
                }
            }
        }
    }

    /// The gemv for one GGUF-layout row: per block the exact integer sums as llama.cpp's AVX2
    /// `ggml_vec_dot_q4_K_q8_K` forms them, then [`gemv_group`]'s two FMA steps, taken in lanes
    /// 0 (values) and 1 (minimums) of one register.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `w.len() == act.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gemv_row(w: &[BlockQ4K], act: &[BlockQ8K]) -> f32 {
        let m4b = _mm256_set1_epi8(0x0f);
        // Broadcasts 16-bit scale `i` to every lane (llama.cpp's `get_scale_shuffle_k4`).
        let scale_shuffle: [__m256i; 8] =
            std::array::from_fn(|i| _mm256_set1_epi16((2 * i as i16) | ((2 * i as i16 + 1) << 8)));
        let mut acc = _mm_setzero_ps();
        for (x, y) in w.iter().zip(act) {
            let mins_and_scales = _mm256_cvtepu8_epi16(mins_and_scales(&x.scales));
            // SAFETY: bsums is 32 readable bytes.
            let q8sums = unsafe { _mm256_loadu_si256(y.bsums.as_ptr().cast()) };
            let q8s = _mm_hadd_epi16(
                _mm256_castsi256_si128(q8sums),
                _mm256_extracti128_si256::<1>(q8sums),
            );
            let mins = _mm_madd_epi16(_mm256_extracti128_si256::<1>(mins_and_scales), q8s);
            let scales = broadcast128(_mm256_castsi256_si128(mins_and_scales));
            let aq = i8_bytes(&y.qs);
            let mut sums = _mm256_setzero_si256();
            for j in 0..4 {
                let q4bits = load256(&x.qs, 32 * j);
                let q4l = _mm256_and_si256(q4bits, m4b);
                let q4h = _mm256_and_si256(_mm256_srli_epi16::<4>(q4bits), m4b);
                let low = _mm256_madd_epi16(
                    _mm256_shuffle_epi8(scales, scale_shuffle[2 * j]),
                    _mm256_maddubs_epi16(q4l, load256(aq, 64 * j)),
                );
                let high = _mm256_madd_epi16(
                    _mm256_shuffle_epi8(scales, scale_shuffle[2 * j + 1]),
                    _mm256_maddubs_epi16(q4h, load256(aq, 64 * j + 32)),
                );
                sums = _mm256_add_epi32(sums, _mm256_add_epi32(low, high));
            }
            // Lane 0: Σ of the values' sums, lane 1: Σ of the minimums' (exact, any order).
            let dots = _mm_add_epi32(
                _mm256_castsi256_si128(sums),
                _mm256_extracti128_si256::<1>(sums),
            );
            let pairs = _mm_hadd_epi32(dots, mins);
            let ints = _mm_hadd_epi32(pairs, pairs);
            // d and dmin are the block's first four bytes: lanes 0 and 1.
            // SAFETY: a block starts with its two f16 scales (4 readable bytes).
            let word = unsafe { std::ptr::read_unaligned((x as *const BlockQ4K).cast::<i32>()) };
            let scale = _mm_cvtph_ps(_mm_cvtsi32_si128(word));
            acc = _mm_fmadd_ps(
                _mm_cvtepi32_ps(ints),
                _mm_mul_ps(scale, _mm_set1_ps(y.d)),
                acc,
            );
        }
        _mm_cvtss_f32(_mm_sub_ps(acc, _mm_movehdup_ps(acc)))
    }

    /// One pair of sub-blocks of eight weight rows, shuffled as the gemm needs them:
    /// `[pattern][half * 4 + chunk]` for rows 0,1,4,5 (`c0145`) and 2,3,6,7 (`c2367`).
    struct RhsPair {
        c0145: [[__m256i; 8]; 2],
        c2367: [[__m256i; 8]; 2],
        scale_0145: [__m256i; 2],
        scale_2367: [__m256i; 2],
        mins_01: __m256i,
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn prepare_rhs(wb: &BlockQ4Kx8, sb: usize) -> RhsPair {
        let m4b = _mm256_set1_epi8(0x0f);
        let required_order = _mm256_set_epi32(3, 2, 1, 0, 7, 6, 5, 4);
        let mut c0145 = [[_mm256_setzero_si256(); 8]; 2];
        let mut c2367 = [[_mm256_setzero_si256(); 8]; 2];
        for t in 0..4 {
            let r0123 = load256(&wb.qs, sb * 256 + 64 * t);
            let r4567 = load256(&wb.qs, sb * 256 + 64 * t + 32);
            let raw_0145 = _mm256_blend_epi32::<240>(
                r0123,
                _mm256_permutevar8x32_epi32(r4567, required_order),
            );
            let raw_2367 = _mm256_blend_epi32::<240>(
                _mm256_permutevar8x32_epi32(r0123, required_order),
                r4567,
            );
            for (half, shift) in [(0, false), (1, true)] {
                let nibbles = |v: __m256i| {
                    if shift {
                        _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4b)
                    } else {
                        _mm256_and_si256(v, m4b)
                    }
                };
                let (a, b) = (nibbles(raw_0145), nibbles(raw_2367));
                c0145[0][half * 4 + t] = _mm256_shuffle_epi32::<136>(a);
                c2367[0][half * 4 + t] = _mm256_shuffle_epi32::<136>(b);
                c0145[1][half * 4 + t] = _mm256_shuffle_epi32::<221>(a);
                c2367[1][half * 4 + t] = _mm256_shuffle_epi32::<221>(b);
            }
        }
        let ms0 = mins_and_scales(group(&wb.scales, 2 * sb));
        let ms1 = mins_and_scales(group(&wb.scales, 2 * sb + 1));
        let scales_0 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(ms0, ms0));
        let scales_1 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(ms1, ms1));
        RhsPair {
            c0145,
            c2367,
            scale_0145: [
                _mm256_shuffle_epi32::<68>(scales_0),
                _mm256_shuffle_epi32::<68>(scales_1),
            ],
            scale_2367: [
                _mm256_shuffle_epi32::<238>(scales_0),
                _mm256_shuffle_epi32::<238>(scales_1),
            ],
            mins_01: _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(
                _mm_shuffle_epi32::<78>(ms0),
                _mm_shuffle_epi32::<78>(ms1),
            )),
        }
    }

    /// Σ over the four chunks and both shuffle patterns of one sub-block half (i16 lanes).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn tile_dot(rhs: &[[__m256i; 8]; 2], lhs: &[[__m256i; 8]; 2], half: usize) -> __m256i {
        let mut total = _mm256_setzero_si256();
        for pattern in 0..2 {
            for t in (0..4).rev() {
                let u = half * 4 + t;
                total = _mm256_add_epi16(
                    total,
                    _mm256_maddubs_epi16(rhs[pattern][u], lhs[pattern][u]),
                );
            }
        }
        total
    }

    /// One pair of sub-blocks of four activation rows, shuffled as the gemm needs them: rows 0,1
    /// (`l01`) and 2,3 (`l23`) by `[pattern][half * 4 + chunk]`, and the pair sums of `bsums`.
    #[derive(Clone, Copy)]
    struct LhsPair {
        l01: [[__m256i; 8]; 2],
        l23: [[__m256i; 8]; 2],
        bsums_hsum: __m256i,
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn prepare_lhs(ab: &BlockQ8Kx4, sb: usize) -> LhsPair {
        let aq = i8_bytes(&ab.qs);
        let mut l01 = [[_mm256_setzero_si256(); 8]; 2];
        let mut l23 = [[_mm256_setzero_si256(); 8]; 2];
        for u in 0..8 {
            let v = load256(aq, 256 * sb + 32 * u);
            let lhs_01 = _mm256_permute2f128_si256::<0>(v, v);
            let lhs_23 = _mm256_permute2f128_si256::<17>(v, v);
            l01[0][u] = _mm256_shuffle_epi32::<160>(lhs_01);
            l23[0][u] = _mm256_shuffle_epi32::<160>(lhs_23);
            l01[1][u] = _mm256_shuffle_epi32::<245>(lhs_01);
            l23[1][u] = _mm256_shuffle_epi32::<245>(lhs_23);
        }
        // SAFETY: 16 * sb + 16 <= 64 bsums.
        let bsums = unsafe { _mm256_loadu_si256(ab.bsums.as_ptr().add(16 * sb).cast()) };
        let bsums_hsum = broadcast128(_mm_hadd_epi16(
            _mm256_castsi256_si128(bsums),
            _mm256_extractf128_si256::<1>(bsums),
        ));

        LhsPair {
            l01,
            l23,
            bsums_hsum,
        }
    }

    /// One pair of sub-blocks of four activation rows against eight weight rows: the integer
    /// sums per (row, column) in natural column order, and the minimum sums.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn tile_pair(rhs: &RhsPair, lhs: &LhsPair) -> ([__m256i; 4], [__m256i; 4]) {
        let (l01, l23, bsums_hsum) = (lhs.l01, lhs.l23, lhs.bsums_hsum);
        let mut rows = [_mm256_setzero_si256(); 4];
        for half in 0..2 {
            let m00 = _mm256_madd_epi16(tile_dot(&rhs.c0145, &l01, half), rhs.scale_0145[half]);
            let m01 = _mm256_madd_epi16(tile_dot(&rhs.c2367, &l01, half), rhs.scale_2367[half]);
            let m10 = _mm256_madd_epi16(tile_dot(&rhs.c0145, &l23, half), rhs.scale_0145[half]);
            let m11 = _mm256_madd_epi16(tile_dot(&rhs.c2367, &l23, half), rhs.scale_2367[half]);
            let straight = [
                _mm256_blend_epi32::<204>(m00, _mm256_shuffle_epi32::<78>(m01)),
                _mm256_blend_epi32::<204>(_mm256_shuffle_epi32::<78>(m00), m01),
                _mm256_blend_epi32::<204>(m10, _mm256_shuffle_epi32::<78>(m11)),
                _mm256_blend_epi32::<204>(_mm256_shuffle_epi32::<78>(m10), m11),
            ];
            for (row, s) in rows.iter_mut().zip(straight) {
                *row = _mm256_add_epi32(*row, s);
            }
        }
        let mins = [
            _mm256_madd_epi16(_mm256_shuffle_epi32::<0>(bsums_hsum), rhs.mins_01),
            _mm256_madd_epi16(_mm256_shuffle_epi32::<85>(bsums_hsum), rhs.mins_01),
            _mm256_madd_epi16(_mm256_shuffle_epi32::<170>(bsums_hsum), rhs.mins_01),
            _mm256_madd_epi16(_mm256_shuffle_epi32::<255>(bsums_hsum), rhs.mins_01),
        ];
        (rows, mins)
    }

    /// `G` groups of four activation rows against `X` groups of eight weight rows (llama.cpp's
    /// 16-row loop is `G = 4`, its 4-row remainder loop `G = 1`, both with `X = 1`). Blocks are
    /// the outer loop, so each activation block is shuffled once for all `X` weight groups.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn gemm_block<const X: usize, const G: usize>(
        wgs: [&[BlockQ4Kx8]; X],
        act: [&[BlockQ8Kx4]; G],
    ) -> [[[__m256; 4]; G]; X] {
        let mut acc = [[[_mm256_setzero_ps(); 4]; G]; X];
        let mut acc_min = [[[_mm256_setzero_ps(); 4]; G]; X];
        let nb = wgs[0].len();
        for b in 0..nb {
            for sb in 0..4 {
                let mut lhs = [None; G];
                for (l, ag) in lhs.iter_mut().zip(&act) {
                    *l = Some(prepare_lhs(&ag[b], sb));
                }
                for (x, wg) in wgs.iter().enumerate() {
                    let wb = &wg[b];
                    let col_scale = _mm256_cvtph_ps(f16x8(&wb.d));
                    let col_dmin = _mm256_cvtph_ps(f16x8(&wb.dmin));
                    let rhs = prepare_rhs(wb, sb);
                    for (rp, lhs) in lhs.iter().enumerate() {
                        let Some(lhs) = lhs else { continue };
                        let ab = &act[rp][b];
                        let (rows, mins) = tile_pair(&rhs, lhs);
                        // SAFETY: d is 4 readable f32.
                        let d4 = unsafe { _mm_loadu_ps(ab.d.as_ptr()) };
                        let row_scale = _mm256_set_m128(d4, d4);
                        let lane = [
                            _mm256_shuffle_ps::<0>(row_scale, row_scale),
                            _mm256_shuffle_ps::<85>(row_scale, row_scale),
                            _mm256_shuffle_ps::<170>(row_scale, row_scale),
                            _mm256_shuffle_ps::<255>(row_scale, row_scale),
                        ];
                        for i in 0..4 {
                            acc[x][rp][i] = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(rows[i]),
                                _mm256_mul_ps(col_scale, lane[i]),
                                acc[x][rp][i],
                            );
                            acc_min[x][rp][i] = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(mins[i]),
                                _mm256_mul_ps(col_dmin, lane[i]),
                                acc_min[x][rp][i],
                            );
                        }
                    }
                }
            }
        }
        for (acc, acc_min) in acc.iter_mut().zip(acc_min) {
            for (acc, acc_min) in acc.iter_mut().zip(acc_min) {
                for (a, m) in acc.iter_mut().zip(acc_min) {
                    *a = _mm256_sub_ps(*a, m);
                }
            }
        }
        acc
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn store_tile<const G: usize>(
        tile: [[__m256; 4]; G],
        out: &mut [f32],
        first_row: usize,
        col: usize,
        stride: usize,
    ) {
        for (rp, rows) in tile.iter().enumerate() {
            for (i, &v) in rows.iter().enumerate() {
                let at = (first_row + 4 * rp + i) * stride + col;
                assert!(at + 8 <= out.len());
                // SAFETY: in bounds (checked above).
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(at), v) };
            }
        }
    }

    /// The AVX2 `ggml_gemm_q4_K_8x8_q8_K`'s bits, in tiles of 16 activation rows × 32 weight rows
    /// ([`gemm_block`], [`super::for_each_tile`]), then of 4 × 8.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; shapes as checked by `gemm_q4k_x8`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gemm(
        nb: usize,
        w: &[BlockQ4Kx8],
        act: &[BlockQ8Kx4],
        m: usize,
        out: &mut [f32],
        stride: usize,
    ) {
        super::for_each_tile(nb, w, act, m, |wgs, rows, row, col| {
            if let (&[w0, w1, w2, w3], &[a, b, c, d]) = (wgs, rows) {
                let tiles = gemm_block([w0, w1, w2, w3], [a, b, c, d]);
                for (j, tile) in tiles.into_iter().enumerate() {
                    store_tile(tile, out, row, col + 8 * j, stride);
                }
                return;
            }
            for (j, &wg) in wgs.iter().enumerate() {
                if let &[a, b, c, d] = rows {
                    let [tile] = gemm_block([wg], [a, b, c, d]);
                    store_tile(tile, out, row, col + 8 * j, stride);
                } else {
                    for (i, &a) in rows.iter().enumerate() {
                        let [tile] = gemm_block([wg], [a]);
                        store_tile(tile, out, row + 4 * i, col + 8 * j, stride);
                    }
                }
            }
        });
    }
}

/// AVX-512 VNNI forms of the repacked gemv and gemm, with the AVX2 kernels' bits.
///
/// `vpdpbusd` forms four u8 × i8 products and adds them to an i32 lane in one instruction, where
/// AVX2 needs `maddubs`, an i16 add and `madd`. A 64-byte chunk of a [`BlockQ4Kx8`] holds eight
/// values of each of the eight rows (row `r` at bytes `8 r .. 8 r + 8`), so one `vpdpbusd` of a
/// chunk against eight activation bytes broadcast to every row sums into lanes `2 r` and
/// `2 r + 1`. Those integer sums are exact, and every float step (`fma(float(sum), d_w · d_a,
/// acc)` per block in the gemv, per pair of sub-blocks in the gemm) is taken in the same order as
/// in the AVX2 kernels, so each output has the same bits.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::lanes::avx2::prefetch_ahead;
    use super::avx2::mins_and_scales;
    use super::{BlockQ4Kx8, BlockQ8K, BlockQ8Kx4, group};
    use std::arch::x86_64::*;

    /// One pair of sub-blocks (`2 p`, `2 p + 1`) of a weight block, ready for `vpdpbusd`.
    struct PairWeights {
        /// Per 64-byte chunk, the low nibbles (sub-block `2 p`).
        lo: [__m512i; 4],
        /// Per chunk, the high nibbles (sub-block `2 p + 1`).
        hi: [__m512i; 4],
        /// Row `r`'s scale of sub-block `2 p` in lanes `2 r` and `2 r + 1` (an i16 in an i32).
        scale_lo: __m512i,
        /// The same for sub-block `2 p + 1`.
        scale_hi: __m512i,
        /// Row `r`'s two minimums as an i16 pair in lane `r`.
        mins: __m256i,
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn load512(bytes: &[u8], offset: usize) -> __m512i {
        assert!(offset + 64 <= bytes.len());
        // SAFETY: in bounds (checked above); unaligned load.
        unsafe { _mm512_loadu_si512(bytes.as_ptr().add(offset).cast()) }
    }

    /// Eight activation bytes at `offset`, repeated in every 64-bit lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn broadcast8(q8: &[i8], offset: usize) -> __m512i {
        assert!(offset + 8 <= q8.len());
        // SAFETY: in bounds (checked above); unaligned 8-byte read.
        let v = unsafe { q8.as_ptr().add(offset).cast::<i64>().read_unaligned() };
        _mm512_set1_epi64(v)
    }

    /// Eight f16 (one per row), converted exactly and repeated in both 256-bit halves.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn f16x8_twice(v: &[half::f16; 8]) -> __m512 {
        // SAFETY: [f16; 8] is 16 readable bytes.
        let h = unsafe { _mm_loadu_si128(v.as_ptr().cast()) };
        _mm512_cvtph_ps(_mm256_broadcastsi128_si256(h))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn pair_weights(wb: &BlockQ4Kx8, p: usize) -> PairWeights {
        // Plain loops: closures (`from_fn`, `map`) do not inherit the target features, and were
        // left as calls.
        let m4b = _mm512_set1_epi8(0x0f);
        let mut lo = [_mm512_setzero_si512(); 4];
        let mut hi = [_mm512_setzero_si512(); 4];
        for t in 0..4 {
            let raw = load512(&wb.qs, 256 * p + 64 * t);
            lo[t] = _mm512_and_si512(raw, m4b);
            hi[t] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), m4b);
        }
        let ms0 = mins_and_scales(group(&wb.scales, 2 * p));
        let ms1 = mins_and_scales(group(&wb.scales, 2 * p + 1));
        PairWeights {
            lo,
            hi,
            scale_lo: _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(ms0, ms0)),
            scale_hi: _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(ms1, ms1)),
            mins: _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(
                _mm_shuffle_epi32::<78>(ms0),
                _mm_shuffle_epi32::<78>(ms1),
            )),
        }
    }

    /// Σ scale · (q4 · q8) over one pair of sub-blocks for one activation row, split over lanes
    /// `2 r` and `2 r + 1` for weight row `r`; `lo[t]`/`hi[t]` are the activation bytes of
    /// chunk `t` of the two sub-blocks, broadcast.
    ///
    /// Each lane of a `vpdpbusd` chain sums 16 products of at most 15 · 128, so it fits the i16
    /// that `vpmaddwd` multiplies by the scale.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn scaled_pair_dot(w: &PairWeights, lo: [__m512i; 4], hi: [__m512i; 4]) -> __m512i {
        let mut dot_lo = _mm512_setzero_si512();
        let mut dot_hi = _mm512_setzero_si512();
        for t in 0..4 {
            dot_lo = _mm512_dpbusd_epi32(dot_lo, w.lo[t], lo[t]);
            dot_hi = _mm512_dpbusd_epi32(dot_hi, w.hi[t], hi[t]);
        }
        _mm512_add_epi32(
            _mm512_madd_epi16(dot_lo, w.scale_lo),
            _mm512_madd_epi16(dot_hi, w.scale_hi),
        )
    }

    /// Adds each pair of neighbouring lanes: lane `r` of the result is `a[2 r] + a[2 r + 1]`,
    /// lane `8 + r` is `b[2 r] + b[2 r + 1]`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn fold_neighbours(a: __m512i, b: __m512i) -> __m512i {
        let even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        let odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
        _mm512_add_epi32(
            _mm512_permutex2var_epi32(a, even, b),
            _mm512_permutex2var_epi32(a, odd, b),
        )
    }

    /// The gemv for one group of eight weight rows: [`super::avx2::gemv_group`]'s bits.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI; `w.len() == act.len()`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn gemv_group(w: &[BlockQ4Kx8], act: &[BlockQ8K]) -> [f32; 8] {
        let mut acc = _mm256_setzero_ps();
        let mut acc_min = _mm256_setzero_ps();
        for (wb, ab) in w.iter().zip(act) {
            prefetch_ahead(wb);
            let row_scale = _mm256_set1_ps(ab.d);
            // SAFETY: [f16; 8] is 16 readable bytes.
            let col_scale = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(wb.d.as_ptr().cast()) });
            // SAFETY: as above.
            let col_dmin = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(wb.dmin.as_ptr().cast()) });
            // SAFETY: bsums is 32 readable bytes.
            let q8sums = unsafe { _mm256_loadu_si256(ab.bsums.as_ptr().cast()) };
            // Lane `p`: the pair (Σ q8 of sub-block 2 p, of 2 p + 1).
            let sub_sums = _mm_hadd_epi16(
                _mm256_castsi256_si128(q8sums),
                _mm256_extracti128_si256::<1>(q8sums),
            );
            let mut dots = _mm512_setzero_si512();
            let mut mins = _mm256_setzero_si256();
            for p in 0..4 {
                let pw = pair_weights(wb, p);
                let (mut lo, mut hi) = ([_mm512_setzero_si512(); 4], [_mm512_setzero_si512(); 4]);
                for t in 0..4 {
                    lo[t] = broadcast8(&ab.qs, 64 * p + 8 * t);
                    hi[t] = broadcast8(&ab.qs, 64 * p + 32 + 8 * t);
                }
                dots = _mm512_add_epi32(dots, scaled_pair_dot(&pw, lo, hi));
                let sums = _mm256_permutevar8x32_epi32(
                    _mm256_castsi128_si256(sub_sums),
                    _mm256_set1_epi32(p as i32),
                );
                mins = _mm256_add_epi32(mins, _mm256_madd_epi16(sums, pw.mins));
            }
            let dots = _mm512_castsi512_si256(fold_neighbours(dots, dots));
            acc = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(dots),
                _mm256_mul_ps(col_scale, row_scale),
                acc,
            );
            acc_min = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(mins),
                _mm256_mul_ps(col_dmin, row_scale),
                acc_min,
            );
        }
        let mut out = [0.0f32; 8];
        // SAFETY: out is 8 writable f32.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), _mm256_sub_ps(acc, acc_min)) };
        out
    }

    /// Four activation rows' scales arranged for two row pairs: rows (0, 1) and (2, 3), each
    /// row's scale in eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn row_pair_scales(d: &[f32; 4]) -> [__m512; 2] {
        // SAFETY: d is 4 readable f32.
        let d4 = _mm512_castps128_ps512(unsafe { _mm_loadu_ps(d.as_ptr()) });
        [
            _mm512_permutexvar_ps(
                _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                d4,
            ),
            _mm512_permutexvar_ps(
                _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2),
                d4,
            ),
        ]
    }

    /// Σ min · Σq8 of one pair of sub-blocks for four activation rows against eight weight rows,
    /// as two row pairs (lanes `0..8`: the first row, `8..16`: the second).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn pair_mins(ab: &BlockQ8Kx4, p: usize, mins: __m256i) -> [__m512i; 2] {
        // SAFETY: 16 p + 16 <= 64 bsums.
        let bsums = unsafe { _mm256_loadu_si256(ab.bsums.as_ptr().add(16 * p).cast()) };
        // Lane `i`: activation row i's pair (Σ q8 of sub-block 2 p, of 2 p + 1).
        let sums = _mm512_castsi128_si512(_mm_hadd_epi16(
            _mm256_castsi256_si128(bsums),
            _mm256_extracti128_si256::<1>(bsums),
        ));
        let mins = _mm512_broadcast_i64x4(mins);
        let rows = |hi: i32, lo: i32| {
            let idx = _mm512_set_epi32(
                hi, hi, hi, hi, hi, hi, hi, hi, lo, lo, lo, lo, lo, lo, lo, lo,
            );
            _mm512_madd_epi16(_mm512_permutexvar_epi32(idx, sums), mins)
        };
        [rows(1, 0), rows(3, 2)]
    }

    /// `G` groups of four activation rows against one group of eight weight rows: per group,
    /// the outputs of row pairs (0, 1) and (2, 3).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn gemm_tile<const G: usize>(wg: &[BlockQ4Kx8], act: [&[BlockQ8Kx4]; G]) -> [[__m512; 2]; G] {
        let mut acc = [[_mm512_setzero_ps(); 2]; G];
        let mut acc_min = [[_mm512_setzero_ps(); 2]; G];
        for (b, wb) in wg.iter().enumerate() {
            let col_scale = f16x8_twice(&wb.d);
            let col_dmin = f16x8_twice(&wb.dmin);
            for p in 0..4 {
                let pw = pair_weights(wb, p);
                for g in 0..G {
                    let ab = &act[g][b];
                    // Row i's chunk t of sub-block s is at 32 (4 s + t) + 8 i.
                    let mut dots = [_mm512_setzero_si512(); 4];
                    for (i, dot) in dots.iter_mut().enumerate() {
                        let (mut lo, mut hi) =
                            ([_mm512_setzero_si512(); 4], [_mm512_setzero_si512(); 4]);
                        for t in 0..4 {
                            lo[t] = broadcast8(&ab.qs, 256 * p + 32 * t + 8 * i);
                            hi[t] = broadcast8(&ab.qs, 256 * p + 128 + 32 * t + 8 * i);
                        }
                        *dot = scaled_pair_dot(&pw, lo, hi);
                    }
                    let rows = [
                        fold_neighbours(dots[0], dots[1]),
                        fold_neighbours(dots[2], dots[3]),
                    ];
                    let mins = pair_mins(ab, p, pw.mins);
                    let row_scales = row_pair_scales(&ab.d);
                    for h in 0..2 {
                        acc[g][h] = _mm512_fmadd_ps(
                            _mm512_cvtepi32_ps(rows[h]),
                            _mm512_mul_ps(col_scale, row_scales[h]),
                            acc[g][h],
                        );
                        acc_min[g][h] = _mm512_fmadd_ps(
                            _mm512_cvtepi32_ps(mins[h]),
                            _mm512_mul_ps(col_dmin, row_scales[h]),
                            acc_min[g][h],
                        );
                    }
                }
            }
        }
        for (acc, acc_min) in acc.iter_mut().zip(acc_min) {
            for (a, m) in acc.iter_mut().zip(acc_min) {
                *a = _mm512_sub_ps(*a, m);
            }
        }
        acc
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn store_tile<const G: usize>(
        tile: [[__m512; 2]; G],
        out: &mut [f32],
        first_row: usize,
        col: usize,
        stride: usize,
    ) {
        for (g, pairs) in tile.iter().enumerate() {
            for (h, &v) in pairs.iter().enumerate() {
                let halves = [
                    _mm512_castps512_ps256(v),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
                ];
                for (e, half) in halves.into_iter().enumerate() {
                    let at = (first_row + 4 * g + 2 * h + e) * stride + col;
                    assert!(at + 8 <= out.len());
                    // SAFETY: in bounds (checked above).
                    unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(at), half) };
                }
            }
        }
    }

    /// The gemm, rows in groups of 16, then of 4: [`super::avx2::gemm`]'s bits. Allocates
    /// nothing (the emulator tests run it without an operating system).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI; shapes as checked by
    /// `gemm_q4k_x8`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn gemm(
        nb: usize,
        w: &[BlockQ4Kx8],
        act: &[BlockQ8Kx4],
        m: usize,
        out: &mut [f32],
        stride: usize,
    ) {
        super::for_each_tile(nb, w, act, m, |wgs, rows, row, col| {
            for (j, &wg) in wgs.iter().enumerate() {
                if let &[a, b, c, d] = rows {
                    store_tile(gemm_tile(wg, [a, b, c, d]), out, row, col + 8 * j, stride);
                } else {
                    for (i, &a) in rows.iter().enumerate() {
                        store_tile(gemm_tile(wg, [a]), out, row + 4 * i, col + 8 * j, stride);
                    }
                }
            }
        });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::engine::cpu::q8k::tests::{TestRng, tricky_rows};
    use crate::engine::cpu::q8k::{
        quantize_row_q8k, quantize_rows_q8k_x4, zeroed_q8k, zeroed_q8k_x4,
    };
    use candle_core::quantized::GgmlType;
    use candle_core::quantized::k_quants::BlockQ4K as CandleQ4K;

    /// GGUF Q4_K blocks of `rows` × `k` random weights, quantized by candle (as llama.cpp's
    /// `quantize_row_q4_K_ref`), and their dequantized floats.
    pub(crate) fn random_q4k(
        rows: usize,
        k: usize,
        rng: &mut TestRng,
    ) -> (Vec<BlockQ4K>, Vec<f32>) {
        let x: Vec<f32> = (0..rows * k).map(|_| rng.uniform() * 0.1).collect();
        let zero = CandleQ4K::zeros();
        let mut blocks = vec![zero; rows * k / QK_K];
        CandleQ4K::from_float(&x, &mut blocks);
        let mut deq = vec![0.0f32; rows * k];
        CandleQ4K::to_float(&blocks, &mut deq);
        (from_candle(&blocks).to_vec(), deq)
    }

    fn from_candle(blocks: &[CandleQ4K]) -> &[BlockQ4K] {
        const _: () = assert!(std::mem::size_of::<CandleQ4K>() == std::mem::size_of::<BlockQ4K>());
        // SAFETY: both are repr(C) {f16 d, f16 dmin, [u8; 12], [u8; 128]}.
        unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast(), blocks.len()) }
    }

    /// Blocks of arbitrary bytes: every scale, minimum and nibble value occurs.
    fn arbitrary_q4k(n: usize, rng: &mut TestRng) -> Vec<BlockQ4K> {
        (0..n)
            .map(|_| BlockQ4K {
                d: f16::from_f32(rng.uniform() * 0.01),
                dmin: f16::from_f32(rng.uniform() * 0.01),
                scales: std::array::from_fn(|_| rng.next_u64() as u8),
                qs: std::array::from_fn(|_| rng.next_u64() as u8),
            })
            .collect()
    }

    fn block_bytes(b: &BlockQ4K) -> Vec<u8> {
        let mut v = b.d.to_le_bytes().to_vec();
        v.extend(b.dmin.to_le_bytes());
        v.extend(b.scales);
        v.extend(b.qs);
        v
    }

    /// GGUF-layout rows (`rows % 8 == 0`) interleaved as llama.cpp repacks them: group `g`'s
    /// block `x` holds block `x` of rows `8 g .. 8 g + 8`.
    fn repack(blocks: &[BlockQ4K], rows: usize, k: usize) -> Vec<BlockQ4Kx8> {
        let nb = k / QK_K;
        (0..rows / 8)
            .flat_map(|g| {
                (0..nb).map(move |x| {
                    interleave(&std::array::from_fn(|r| blocks[(8 * g + r) * nb + x]))
                })
            })
            .collect()
    }

    fn q8k_rows(x: &[f32], k: usize) -> Vec<BlockQ8K> {
        let mut out = zeroed_q8k(x.len() / QK_K);
        for (row, o) in x.chunks_exact(k).zip(out.chunks_exact_mut(k / QK_K)) {
            quantize_row_q8k(row, o);
        }
        out
    }

    fn q8k_x4(level: SimdLevel, x: &[f32], k: usize) -> Vec<BlockQ8Kx4> {
        let mut out = zeroed_q8k_x4(x.len() / QK_K / 4);
        for (rows, o) in x.chunks_exact(4 * k).zip(out.chunks_exact_mut(k / QK_K)) {
            quantize_rows_q8k_x4(level, rows, k, o);
        }
        out
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn interleaving_round_trips() {
        let mut rng = TestRng(1);
        let blocks = arbitrary_q4k(8 * 3, &mut rng);
        for group in blocks.chunks_exact(8) {
            let rows: &[BlockQ4K; 8] = group.try_into().unwrap();
            let back = deinterleave(&interleave(rows));
            for (a, b) in rows.iter().zip(&back) {
                assert_eq!(block_bytes(a), block_bytes(b));
            }
        }
    }

    #[test]
    fn the_avx2_value_interleave_equals_the_portable_one() {
        if !crate::engine::cpu::avx2_available() {
            return;
        }
        let blocks = arbitrary_q4k(8, &mut TestRng(7));
        let rows = std::array::from_fn(|r| &blocks[r]);
        let (mut portable, mut avx2) = ([0u8; 1024], [0u8; 1024]);
        interleave_qs(rows, &mut portable);
        // SAFETY: AVX2 is available (checked above).
        unsafe { avx2::interleave_qs(rows, &mut avx2) };
        assert_eq!(portable, avx2);
    }

    #[test]
    fn in_place_repack_orders_blocks_by_row_group() {
        let mut rng = TestRng(2);
        let (rows, k) = (16, 512);
        let blocks = arbitrary_q4k(rows * k / QK_K, &mut rng);
        let bytes: Vec<u8> = blocks.iter().flat_map(block_bytes).collect();
        let mut aligned = vec![0u16; bytes.len() / 2];
        // SAFETY: u16 has no invalid bit patterns; the view covers exactly `aligned`.
        let view = unsafe {
            std::slice::from_raw_parts_mut(aligned.as_mut_ptr().cast::<u8>(), bytes.len())
        };
        view.copy_from_slice(&bytes);
        repack_q4k_x8_in_place(view, rows, k).unwrap();
        let repacked = as_blocks::<BlockQ4Kx8>(view).unwrap();
        let nb = k / QK_K;
        for (i, block) in repacked.iter().enumerate() {
            let (g, x) = (i / nb, i % nb);
            for (r, b) in deinterleave(block).iter().enumerate() {
                assert_eq!(block_bytes(b), block_bytes(&blocks[(8 * g + r) * nb + x]));
            }
        }
    }

    #[test]
    fn repack_rejects_bad_shapes() {
        let mut data = vec![0u8; 8 * 144];
        assert_eq!(
            repack_q4k_x8_in_place(&mut data, 4, 512),
            Err(KernelError::RowsNotMultipleOf8 { rows: 4 })
        );
        assert_eq!(
            repack_q4k_x8_in_place(&mut data, 8, 300),
            Err(KernelError::PartialBlock { k: 300 })
        );
        assert!(matches!(
            repack_q4k_x8_in_place(&mut data, 8, 512),
            Err(KernelError::WrongSize {
                expected: 2304,
                actual: 1152,
                ..
            })
        ));
    }

    #[test]
    fn the_gguf_layout_gemv_gives_the_repacked_gemv_bits_on_both_levels() {
        let mut rng = TestRng(2);
        for (n, k) in [(8, 256), (16, 768), (24, 2048)] {
            let blocks = arbitrary_q4k(n * k / QK_K, &mut rng);
            let w = repack(&blocks, n, k);
            let x = tricky_rows(k, &mut rng);
            for a in q8k_rows(&x, k).chunks_exact(k / QK_K) {
                let mut reference = vec![0.0; n];
                gemv_q4k_x8(SimdLevel::Portable, k, &w, a, &mut reference);
                for level in levels() {
                    let mut ours = vec![0.0; n];
                    gemv_q4k(level, k, &blocks, a, &mut ours);
                    assert_eq!(bits(&ours), bits(&reference), "{level:?} n = {n}, k = {k}");
                }
            }
        }
    }

    #[test]
    fn the_gguf_layout_gemm_gives_the_repacked_gemm_bits() {
        let mut rng = TestRng(6);
        for (n, k, m) in [(8, 256, 4), (32, 512, 20)] {
            let blocks = arbitrary_q4k(n * k / QK_K, &mut rng);
            let w = repack(&blocks, n, k);
            let x: Vec<f32> = (0..m / 4).flat_map(|_| tricky_rows(k, &mut rng)).collect();
            for level in levels() {
                let act = q8k_x4(level, &x, k);
                let stride = n + 3;
                let mut reference = vec![f32::NAN; m * stride];
                let mut ours = vec![f32::NAN; m * stride];
                gemm_q4k_x8(level, k, &w, &act, m, &mut reference, stride);
                gemm_q4k(level, k, &blocks, &act, m, &mut ours, stride);
                assert_eq!(bits(&ours), bits(&reference), "{level:?} n = {n}, m = {m}");
            }
        }
    }

    /// Portable, and AVX2 where the CPU has it.
    fn levels() -> Vec<SimdLevel> {
        let mut levels = vec![SimdLevel::Portable];
        if crate::engine::cpu::avx2_available() {
            levels.push(SimdLevel::Avx2);
        }
        levels
    }

    #[test]
    fn gemv_portable_and_avx2_agree_bit_for_bit() {
        if !crate::engine::cpu::avx2_available() {
            return;
        }
        let mut rng = TestRng(3);
        for (n, k) in [(8, 256), (16, 768), (24, 2048)] {
            let w = repack(&arbitrary_q4k(n * k / QK_K, &mut rng), n, k);
            let x = tricky_rows(k, &mut rng);
            let act = q8k_rows(&x, k);
            for a in act.chunks_exact(k / QK_K) {
                let mut portable = vec![0.0; n];
                let mut avx2 = vec![0.0; n];
                gemv_q4k_x8(SimdLevel::Portable, k, &w, a, &mut portable);
                gemv_q4k_x8(SimdLevel::Avx2, k, &w, a, &mut avx2);
                assert_eq!(bits(&portable), bits(&avx2), "n = {n}, k = {k}");
            }
        }
    }

    #[test]
    fn gemm_portable_and_avx2_agree_bit_for_bit() {
        if !crate::engine::cpu::avx2_available() {
            return;
        }
        let mut rng = TestRng(4);
        for (n, k, m) in [(8, 256, 4), (16, 512, 20), (8, 1024, 16)] {
            let w = repack(&arbitrary_q4k(n * k / QK_K, &mut rng), n, k);
            let x: Vec<f32> = (0..m / 4).flat_map(|_| tricky_rows(k, &mut rng)).collect();
            let act = q8k_x4(SimdLevel::Avx2, &x, k);
            let stride = n + 3;
            let mut portable = vec![f32::NAN; m * stride];
            let mut avx2 = vec![f32::NAN; m * stride];
            gemm_q4k_x8(SimdLevel::Portable, k, &w, &act, m, &mut portable, stride);
            gemm_q4k_x8(SimdLevel::Avx2, k, &w, &act, m, &mut avx2, stride);
            assert_eq!(bits(&portable), bits(&avx2), "n = {n}, k = {k}, m = {m}");
        }
    }

    /// Σ dequantized weight × dequantized activation in f64, and Σ of their magnitudes.
    fn reference_dot(w: &[f32], qs: impl Iterator<Item = f32>) -> (f64, f64) {
        w.iter().zip(qs).fold((0.0, 0.0), |(s, a), (&w, q)| {
            let t = f64::from(w) * f64::from(q);
            (s + t, a + t.abs())
        })
    }

    #[test]
    fn gemv_and_gemm_match_a_float_reference_and_each_other_closely() {
        let mut rng = TestRng(5);
        let (n, k, m) = (16, 1024, 8);
        let (blocks, deq) = random_q4k(n, k, &mut rng);
        let w = repack(&blocks, n, k);
        let x = rng.activations(m * k);
        let rows = q8k_rows(&x, k);
        let x4 = q8k_x4(SimdLevel::Portable, &x, k);
        let mut gemm = vec![0.0; m * n];
        gemm_q4k_x8(SimdLevel::Portable, k, &w, &x4, m, &mut gemm, n);
        let nb = k / QK_K;
        for r in 0..m {
            let a = &rows[r * nb..(r + 1) * nb];
            let mut gemv = vec![0.0; n];
            gemv_q4k_x8(SimdLevel::Portable, k, &w, a, &mut gemv);
            for j in 0..n {
                let q = a
                    .iter()
                    .flat_map(|b| b.qs.iter().map(move |&q| b.d * f32::from(q)));
                let (expected, scale) = reference_dot(&deq[j * k..(j + 1) * k], q);
                let tol = 1e-5 * scale + 1e-9;
                assert!(
                    (f64::from(gemv[j]) - expected).abs() <= tol,
                    "gemv r{r} j{j}"
                );
                assert!(
                    (f64::from(gemm[r * n + j]) - expected).abs() <= 4.0 * tol,
                    "gemm r{r} j{j}"
                );
            }
        }
    }

    /// The AVX-512 kernels against the AVX2 ones (the portable ones on a CPU without AVX2), bit
    /// for bit: natively on an AVX-512 CPU, in the emulator otherwise (see `emulator`).
    #[cfg(target_arch = "x86_64")]
    mod on_avx512 {
        use super::*;
        use crate::engine::cpu::emulator::{Entry, run_or_skip};

        /// The arguments of one AVX-512 call, as raw parts the entry functions rebuild.
        #[repr(C)]
        struct Call {
            nb: usize,
            w: *const BlockQ4Kx8,
            w_len: usize,
            act: *const u8,
            act_len: usize,
            m: usize,
            out: *mut f32,
            out_len: usize,
            stride: usize,
        }

        /// `gemv_q4k_x8`'s AVX-512 loop; `act` is `nb` [`BlockQ8K`].
        unsafe extern "C" fn gemv_entry(arg: *mut u8) {
            // SAFETY: the test passes a live `Call` whose parts are valid for these lengths.
            unsafe {
                let c = &*arg.cast::<Call>();
                let w = std::slice::from_raw_parts(c.w, c.w_len);
                let act = std::slice::from_raw_parts(c.act.cast::<BlockQ8K>(), c.act_len);
                let out = std::slice::from_raw_parts_mut(c.out, c.out_len);
                for (wg, out) in w.chunks_exact(c.nb).zip(out.chunks_exact_mut(8)) {
                    out.copy_from_slice(&avx512::gemv_group(wg, act));
                }
            }
        }

        /// `gemm_q4k_x8`'s AVX-512 kernel; `act` is `m / 4 * nb` [`BlockQ8Kx4`].
        unsafe extern "C" fn gemm_entry(arg: *mut u8) {
            // SAFETY: as in `gemv_entry`.
            unsafe {
                let c = &*arg.cast::<Call>();
                let w = std::slice::from_raw_parts(c.w, c.w_len);
                let act = std::slice::from_raw_parts(c.act.cast::<BlockQ8Kx4>(), c.act_len);
                let out = std::slice::from_raw_parts_mut(c.out, c.out_len);
                avx512::gemm(c.nb, w, act, c.m, out, c.stride);
            }
        }

        /// The best level below AVX-512 this CPU has: what the AVX-512 bits must equal.
        fn reference_level() -> SimdLevel {
            *levels().last().expect("portable is always there")
        }

        /// One product to run on AVX-512, with the reference's output.
        struct Case {
            call: Call,
            expected: Vec<f32>,
            label: String,
        }

        fn check(cases: &mut [Case], outputs: &mut [Vec<f32>], entry: Entry) {
            let calls: Vec<(Entry, *mut u8)> = cases
                .iter_mut()
                .map(|c| (entry, (&raw mut c.call).cast::<u8>()))
                .collect();
            let mut views: Vec<&mut [u8]> = outputs
                .iter_mut()
                .map(|o| {
                    // SAFETY: f32 has no invalid bit patterns; the view covers the vector.
                    unsafe { std::slice::from_raw_parts_mut(o.as_mut_ptr().cast(), 4 * o.len()) }
                })
                .collect();
            let Some(ran) = run_or_skip(&calls, &mut views) else {
                return;
            };
            for (case, out) in cases.iter().zip(outputs.iter()) {
                assert_eq!(bits(out), bits(&case.expected), "{} ({ran:?})", case.label);
            }
        }

        #[test]
        fn the_avx512_gemv_gives_the_avx2_bits() {
            let mut rng = TestRng(11);
            let level = reference_level();
            let mut weights = Vec::new();
            let mut acts = Vec::new();
            let mut expected = Vec::new();
            let mut shapes = Vec::new();
            for (n, k) in [(8, 256), (16, 768), (24, 2048), (40, 512), (8, 11008)] {
                let w = repack(&arbitrary_q4k(n * k / QK_K, &mut rng), n, k);
                for a in q8k_rows(&tricky_rows(k, &mut rng), k).chunks_exact(k / QK_K) {
                    let mut out = vec![0.0; n];
                    gemv_q4k_x8(level, k, &w, a, &mut out);
                    weights.push(w.clone());
                    acts.push(a.to_vec());
                    expected.push(out);
                    shapes.push((n, k));
                }
            }
            let mut outputs: Vec<Vec<f32>> =
                expected.iter().map(|e| vec![f32::NAN; e.len()]).collect();
            let mut cases: Vec<Case> = shapes
                .iter()
                .enumerate()
                .map(|(i, &(n, k))| Case {
                    call: Call {
                        nb: k / QK_K,
                        w: weights[i].as_ptr(),
                        w_len: weights[i].len(),
                        act: acts[i].as_ptr().cast(),
                        act_len: acts[i].len(),
                        m: 1,
                        out: outputs[i].as_mut_ptr(),
                        out_len: n,
                        stride: n,
                    },
                    expected: expected[i].clone(),
                    label: format!("gemv n = {n}, k = {k} against {level:?}"),
                })
                .collect();
            check(&mut cases, &mut outputs, gemv_entry);
        }

        #[test]
        fn the_avx512_gemm_gives_the_avx2_bits() {
            let mut rng = TestRng(12);
            let level = reference_level();
            // m = 4 and 20 take the 4-row loop only or after one 16-row tile; 36 and 68 both.
            let shapes = [
                (8, 256, 4),
                (16, 512, 20),
                (24, 768, 36),
                (8, 1024, 16),
                (40, 512, 68),
                (8, 11008, 8),
            ];
            let mut weights = Vec::new();
            let mut acts = Vec::new();
            let mut expected = Vec::new();
            for (n, k, m) in shapes {
                let w = repack(&arbitrary_q4k(n * k / QK_K, &mut rng), n, k);
                let x: Vec<f32> = (0..m / 4).flat_map(|_| tricky_rows(k, &mut rng)).collect();
                let a = q8k_x4(level, &x, k);
                let stride = n + 3;
                let mut out = vec![f32::NAN; m * stride];
                gemm_q4k_x8(level, k, &w, &a, m, &mut out, stride);
                weights.push(w);
                acts.push(a);
                expected.push(out);
            }
            let mut outputs: Vec<Vec<f32>> =
                expected.iter().map(|e| vec![f32::NAN; e.len()]).collect();
            let mut cases: Vec<Case> = shapes
                .iter()
                .enumerate()
                .map(|(i, &(n, k, m))| Case {
                    call: Call {
                        nb: k / QK_K,
                        w: weights[i].as_ptr(),
                        w_len: weights[i].len(),
                        act: acts[i].as_ptr().cast(),
                        act_len: acts[i].len(),
                        m,
                        out: outputs[i].as_mut_ptr(),
                        out_len: outputs[i].len(),
                        stride: n + 3,
                    },
                    expected: expected[i].clone(),
                    label: format!("gemm n = {n}, k = {k}, m = {m} against {level:?}"),
                })
                .collect();
            check(&mut cases, &mut outputs, gemm_entry);
        }
    }
}
