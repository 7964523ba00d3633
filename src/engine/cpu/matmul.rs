//! Weight matrices in their GGUF quantization and the activations they multiply, on the pool.
//!
//! A forward pass quantizes each input once ([`Activations::quantize`]) for every matrix that
//! reads it (Q, K and V; gate and up), then runs [`Matrix::matmul`] for each. Output rows are
//! handed to the pool's threads in chunks by an atomic counter, so both threads finish
//! together; each thread computes its rows for every input row, reusing the weights from cache.

use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::k_quants::{self, GgmlType};
use half::f16;

use super::blocks::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ4Kx8, BlockQ5_0, BlockQ5_1, BlockQ5K,
    BlockQ6K, BlockQ8_0, BlockQ8_1, BlockQ8K, BlockQ8Kx4, QK, QK_K, as_blocks,
};
use super::pool::{Pool, SharedMut};
use super::tiles::{TILE_ROWS, TILE_TOKENS, TiledBlock};
use super::{SimdLevel, dequant, q2k, q3k, q4_1, q4k, q5k, q6k, q8_0, q8k, simd_level};

/// From this many inputs on, llama.cpp multiplies Q6_K, Q5_K, Q3_K and Q2_K through its tiled K-quant path
/// (which sums in another order than its vec_dot).
const TILED_K_QUANT_FROM: usize = 8;

/// Output rows one chunk of work covers (a multiple of 8, the rows Q4_K's gemm interleaves).
const ROWS_PER_CHUNK: usize = 32;

/// The least weight bytes a thread claims at once of a product of at most
/// [`DECODE_MAX_INPUTS`] inputs, which streams the weights from memory. Such a product is split
/// by [`Pool::for_each_guided`]: ranges of rows that shrink as the work runs out, so a thread
/// claims about 20 times per matrix instead of once per 128 rows (86 times for one of the 3B's
/// FFN matrices), and the last claims are short. Generation 2-4% faster than with 128-row
/// chunks (the 3B on Zen 3, the two alternated token by token in one process), as fast beside
/// a busy process; 128-row chunks had been 11% faster than 32-row ones.
const DECODE_MIN_CHUNK_BYTES: usize = 64 << 10;

/// Inputs up to which [`DECODE_MIN_CHUNK_BYTES`] applies (the gemv-only batches).
const DECODE_MAX_INPUTS: usize = 3;

/// Calls `$f::<B>(args)` with candle's block type `B` for `$dtype`.
macro_rules! with_candle_block {
    ($dtype:expr, $f:ident, $($arg:expr),*) => {
        match $dtype {
            GgmlDType::Q4_0 => $f::<k_quants::BlockQ4_0>($($arg),*),
            GgmlDType::Q4_1 => $f::<k_quants::BlockQ4_1>($($arg),*),
            GgmlDType::Q5_0 => $f::<k_quants::BlockQ5_0>($($arg),*),
            GgmlDType::Q5_1 => $f::<k_quants::BlockQ5_1>($($arg),*),
            GgmlDType::Q8_0 => $f::<k_quants::BlockQ8_0>($($arg),*),
            GgmlDType::Q8_1 => $f::<k_quants::BlockQ8_1>($($arg),*),
            GgmlDType::Q2K => $f::<k_quants::BlockQ2K>($($arg),*),
            GgmlDType::Q3K => $f::<k_quants::BlockQ3K>($($arg),*),
            GgmlDType::Q4K => $f::<k_quants::BlockQ4K>($($arg),*),
            GgmlDType::Q5K => $f::<k_quants::BlockQ5K>($($arg),*),
            GgmlDType::Q6K => $f::<k_quants::BlockQ6K>($($arg),*),
            GgmlDType::Q8K => $f::<k_quants::BlockQ8K>($($arg),*),
            other => unreachable!("{other:?} is not a candle block type"),
        }
    };
}

/// Why a weight matrix cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MatmulError {
    /// The tensor's bytes do not hold `rows × cols` values of its type.
    #[error("{dtype:?} data of {len} bytes does not hold a {rows} × {cols} matrix")]
    Size {
        /// Weight type.
        dtype: GgmlDType,
        /// Bytes given.
        len: usize,
        /// Output rows.
        rows: usize,
        /// Input columns.
        cols: usize,
    },
    /// No kernel multiplies this type.
    #[error("no matrix kernel for {0:?} weights")]
    Unsupported(GgmlDType),
    /// The bytes are not aligned for the type's blocks.
    #[error("{0:?} weights are misaligned in memory")]
    Misaligned(GgmlDType),
    /// No memory for the copy of a matrix that [`Matrix::repack`] makes.
    #[error("no memory for a copy of the weights: {0}")]
    RepackMemory(#[source] std::io::Error),
    /// A Q4_K matrix could not be repacked.
    #[error("could not repack Q4_K weights: {0}")]
    Repack(#[from] q4k::KernelError),
}

/// Where a matrix's bytes live: a region of the mapped model file, or memory of its own.
#[derive(Clone)]
pub struct WeightBytes {
    store: Arc<Store>,
    offset: usize,
    len: usize,
}

/// The owner of weight bytes.
pub enum Store {
    /// Mapped memory: the model file (shared, read-only).
    Mapped(memmap2::Mmap),
    /// An 8-byte aligned buffer (tests, and data that is misaligned in the file).
    Owned(Vec<u64>, usize),
}

impl Store {
    /// A store owning a copy of `bytes`, 8-byte aligned.
    pub fn owned(bytes: &[u8]) -> Self {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        // SAFETY: the u64 buffer holds at least bytes.len() bytes; u8 has no invalid values.
        let dst =
            unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), bytes.len()) };
        dst.copy_from_slice(bytes);
        Self::Owned(words, bytes.len())
    }

    /// All bytes of the store.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Self::Mapped(map) => map,
            // SAFETY: the first `len` bytes of the u64 buffer are initialised.
            Self::Owned(words, len) => unsafe {
                std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), *len)
            },
        }
    }
}

impl WeightBytes {
    /// `len` bytes at `offset` of `store` (the caller checked they lie inside it).
    pub fn new(store: Arc<Store>, offset: usize, len: usize) -> Self {
        assert!(
            offset + len <= store.bytes().len(),
            "weight bytes out of range"
        );
        Self { store, offset, len }
    }

    /// A matrix's own copy of `bytes`.
    pub fn owned(bytes: &[u8]) -> Self {
        Self::new(Arc::new(Store::owned(bytes)), 0, bytes.len())
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.store.bytes()[self.offset..][..self.len]
    }

    /// Copies the bytes into `dst` (as long) a slice at a time, dropping each slice's pages
    /// of a mapped file from this process once copied (they stay in the page cache), so
    /// weights used from the copy are not counted twice in its memory, not even while the
    /// 3B's 215 MB output head is copied. Reading the bytes again is still correct: they are
    /// read back from the file.
    fn copy_releasing(&self, dst: &mut [u8]) {
        const SLICE: usize = 8 << 20;
        for (i, (to, from)) in dst
            .chunks_mut(SLICE)
            .zip(self.bytes().chunks(SLICE))
            .enumerate()
        {
            to.copy_from_slice(from);
            self.release_pages(self.offset + i * SLICE, from.len());
        }
    }

    /// Drops the pages of `len` mapped bytes at `offset` of the store from this process (see
    /// [`WeightBytes::copy_releasing`]); nothing for owned bytes.
    fn release_pages(&self, offset: usize, len: usize) {
        #[cfg(unix)]
        if let Store::Mapped(map) = self.store.as_ref() {
            // SAFETY: the map is a shared, read-only mapping of the model file, so after
            // MADV_DONTNEED a read faults the same bytes back in from the page cache; nothing
            // writes through it.
            let result = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
            };
            if let Err(err) = result {
                log::debug!("could not release {len} mapped bytes: {err}");
            }
        }
        #[cfg(not(unix))]
        let _ = (offset, len);
    }
}

/// How a matrix is multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// f32 weights, f32 activations.
    F32,
    /// f16 weights widened on the fly, f32 activations.
    F16,
    /// Q4_1 weights with llama.cpp-rounded Q8_1 activations ([`super::q4_1`]).
    Q4_1,
    /// Q5_1 with llama.cpp-rounded Q8_1 activations (summed as Q4_1).
    Q5_1,
    /// Q4_K in whole 8-row groups, with llama.cpp's repacked-weight numerics ([`q4k`]): its
    /// gemm for activation rows in groups of four, its gemv for the rest. Read from the GGUF
    /// layout until [`Matrix::repack`] has made the interleaved copy, then from that copy (the
    /// same bits either way).
    Q4K,
    /// Q6_K with Q8_K activations: llama.cpp's vec_dot for fewer than
    /// [`TILED_K_QUANT_FROM`] inputs, its tiled K-quant order from there on.
    Q6K,
    /// Q5_K with Q8_K activations, as Q6_K ([`super::q5k`]).
    Q5K,
    /// Q3_K with Q8_K activations, as Q6_K ([`super::q3k`]).
    Q3K,
    /// Q2_K with Q8_K activations, as Q6_K ([`super::q2k`]).
    Q2K,
    /// Q8_0 weights with llama.cpp-rounded Q8_0 activations.
    Q8_0,
    /// Q5_0 weights with llama.cpp-rounded Q8_0 activations.
    Q5_0,
    /// Q4_0 weights with llama.cpp-rounded Q8_0 activations, summed as llama.cpp's repacked
    /// Q4_0 kernels do ([`super::q4_0`]).
    Q4_0,
    /// Candle's per-row `vec_dot` for this block type (activations of its `VecDotType`).
    Candle(GgmlDType),
}

/// The form an input must be in for a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ActKind {
    /// Plain f32.
    F32,
    /// llama.cpp's Q8_1 ([`BlockQ8_1`]).
    Q8_1,
    /// llama.cpp's Q8_K, every row (candle's k-quant kernels read the same layout).
    Q8K,
    /// llama.cpp's Q8_K of rows `0 .. m - m % 4`, four rows interleaved (for the gemm).
    Q8Kx4,
    /// llama.cpp's Q8_0 (AVX2 rounding).
    Q8_0,
    /// Candle blocks of this type.
    Candle(GgmlDType),
}

/// A weight matrix `(rows, cols)`: `out = x · Wᵀ` maps inputs of `cols` values to `rows`.
#[derive(Clone)]
pub struct Matrix {
    dtype: GgmlDType,
    kernel: Kernel,
    rows: usize,
    cols: usize,
    data: WeightBytes,
    /// The weights in memory of their own, once [`Matrix::repack`] made it: Q4_K interleaved
    /// eight rows at a time, Q6_K as the file stores them. Shared by clones (a tied output head
    /// is the embedding matrix).
    repacked: Arc<std::sync::OnceLock<WeightBytes>>,
}

impl Matrix {
    /// A matrix of `rows × cols` values of `dtype` stored in `data` (row-major, GGUF layout).
    pub fn new(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        data: WeightBytes,
    ) -> Result<Self, MatmulError> {
        let block = dtype.block_size();
        let expected = cols
            .is_multiple_of(block)
            .then(|| {
                rows.checked_mul(cols / block)?
                    .checked_mul(dtype.type_size())
            })
            .flatten();
        if expected != Some(data.len) {
            return Err(MatmulError::Size {
                dtype,
                len: data.len,
                rows,
                cols,
            });
        }
        let kernel = match dtype {
            GgmlDType::F32 => Kernel::F32,
            GgmlDType::F16 => Kernel::F16,
            GgmlDType::Q4_1 => Kernel::Q4_1,
            GgmlDType::Q5_1 => Kernel::Q5_1,
            GgmlDType::Q6K => Kernel::Q6K,
            GgmlDType::Q5K => Kernel::Q5K,
            GgmlDType::Q3K => Kernel::Q3K,
            GgmlDType::Q2K => Kernel::Q2K,
            GgmlDType::Q8_0 => Kernel::Q8_0,
            GgmlDType::Q5_0 => Kernel::Q5_0,
            GgmlDType::Q4_0 => Kernel::Q4_0,
            GgmlDType::Q4K if rows.is_multiple_of(8) => Kernel::Q4K,
            GgmlDType::Q4K => Kernel::Candle(dtype),
            other => return Err(MatmulError::Unsupported(other)),
        };
        let align = match dtype {
            GgmlDType::F32 => 4,
            _ => 2,
        };
        if data.bytes().as_ptr().align_offset(align) != 0 {
            return Err(MatmulError::Misaligned(dtype));
        }
        Ok(Self {
            dtype,
            kernel,
            rows,
            cols,
            data,
            repacked: Arc::default(),
        })
    }

    /// Whether [`Matrix::repack`] has work to do: a Q4_K or Q6_K matrix not yet copied.
    pub fn needs_repack(&self) -> bool {
        matches!(self.kernel, Kernel::Q4K | Kernel::Q6K) && self.repacked.get().is_none()
    }

    /// Copies a Q4_K or Q6_K matrix into fresh anonymous memory, on huge pages where the kernel
    /// gives them, then switches every later product to the copy; the file's pages of the
    /// matrix are released as they are copied, so no weight is held twice. Q4_K is interleaved
    /// into the layout llama.cpp's kernels read fastest (the gemv about 1.3x as fast from
    /// cache as on the GGUF layout). Q6_K keeps the file's layout: read from 2 MiB pages instead
    /// of the page cache's 4 KiB ones, a generated token took 1-2% less time (the 3B on Zen 3,
    /// the two copies alternated token by token in one process). Safe while other threads
    /// multiply: they finish on the bytes they started with (pages released under them are
    /// read back from the page cache). Does nothing for other matrices or a second time.
    pub fn repack(&self) -> Result<(), MatmulError> {
        if !self.needs_repack() {
            return Ok(());
        }
        let mut copy =
            memmap2::MmapMut::map_anon(self.data.len).map_err(MatmulError::RepackMemory)?;
        #[cfg(target_os = "linux")]
        if let Err(err) = copy.advise(memmap2::Advice::HugePage) {
            log::debug!("no huge pages for a copy of a matrix: {err}");
        }
        self.data.copy_releasing(&mut copy);
        if self.kernel == Kernel::Q4K {
            q4k::repack_q4k_x8_in_place(&mut copy, self.rows, self.cols)?;
        }
        let copy = copy.make_read_only().map_err(MatmulError::RepackMemory)?;
        let len = copy.len();
        // A clone that copied the same matrix meanwhile won; this copy is dropped.
        let _ = self
            .repacked
            .set(WeightBytes::new(Arc::new(Store::Mapped(copy)), 0, len));
        Ok(())
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The weight type.
    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// The forms of input this matrix reads.
    fn act_kinds(&self) -> &'static [ActKind] {
        match self.kernel {
            Kernel::F32 | Kernel::F16 => &[ActKind::F32],
            Kernel::Q4_1 | Kernel::Q5_1 => &[ActKind::Q8_1],
            Kernel::Q4K => &[ActKind::Q8Kx4, ActKind::Q8K],
            Kernel::Q6K | Kernel::Q5K | Kernel::Q3K | Kernel::Q2K => &[ActKind::Q8K],
            Kernel::Q8_0 | Kernel::Q5_0 | Kernel::Q4_0 => &[ActKind::Q8_0],
            Kernel::Candle(dtype) => match candle_vec_dot_type(dtype) {
                GgmlDType::Q8K => &[ActKind::Q8K],
                GgmlDType::Q8_0 => &[ActKind::Candle(GgmlDType::Q8_0)],
                GgmlDType::Q8_1 => &[ActKind::Candle(GgmlDType::Q8_1)],
                other => unreachable!("candle kernels read Q8_K, Q8_0 or Q8_1, not {other:?}"),
            },
        }
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.dtype.block_size() * self.dtype.type_size()
    }

    /// Row `row` as f32 (an embedding lookup).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let file_layout = match self.repacked.get() {
            Some(copy) if self.kernel != Kernel::Q4K => copy,
            _ => &self.data,
        };
        let bytes = &file_layout.bytes()[row * self.row_bytes()..][..self.row_bytes()];
        if dequant::dequantize_row(self.dtype, bytes, out).is_err() {
            with_candle_block!(self.dtype, dequantize_candle_row, bytes, out);
        }
    }

    /// `out (m × rows) = x · Wᵀ` for the `m` inputs of `act` (quantized for this matrix).
    pub fn matmul(&self, pool: &Pool, act: &Activations, out: &mut [f32]) {
        let m = act.m;
        assert_eq!(act.k, self.cols, "input width");
        assert!(out.len() >= m * self.rows, "output too small");
        let out = SharedMut::new(&mut out[..m * self.rows]);
        let kind = self.act_kinds()[0];
        let rows_into = |rows: std::ops::Range<usize>| match self.kernel {
            Kernel::F32 => self.rows_f32(act.f32(), m, rows, out),
            Kernel::F16 => self.rows_f16(act.f32(), m, rows, out),
            Kernel::Q4_1 => self.rows_of_blocks::<BlockQ4_1>(act.q8_1(), m, rows, out),
            Kernel::Q5_1 => self.rows_of_blocks::<BlockQ5_1>(act.q8_1(), m, rows, out),
            Kernel::Q4K => self.rows_q4k(act, rows, out),
            Kernel::Q6K => self.rows_tiled_kquant::<BlockQ6K>(act, rows, out),
            Kernel::Q5K => self.rows_tiled_kquant::<BlockQ5K>(act, rows, out),
            Kernel::Q3K => self.rows_tiled_kquant::<BlockQ3K>(act, rows, out),
            Kernel::Q2K => self.rows_tiled_kquant::<BlockQ2K>(act, rows, out),
            Kernel::Q8_0 => self.rows_of_blocks::<BlockQ8_0>(act.q8_0(), m, rows, out),
            Kernel::Q5_0 => self.rows_of_blocks::<BlockQ5_0>(act.q8_0(), m, rows, out),
            Kernel::Q4_0 => self.rows_of_blocks::<BlockQ4_0>(act.q8_0(), m, rows, out),
            Kernel::Candle(dtype) => {
                with_candle_block!(dtype, candle_rows, self, act.blocks(kind), m, rows, out)
            }
        };
        if m <= DECODE_MAX_INPUTS {
            let min_rows = (DECODE_MIN_CHUNK_BYTES / self.row_bytes().max(1)).next_multiple_of(8);
            pool.for_each_guided(self.rows, 8, min_rows, rows_into);
        } else {
            pool.for_each_chunk(self.rows, ROWS_PER_CHUNK, rows_into);
        }
    }

    /// Rows `rows` (whole 8-row groups) of a Q4_K matrix for every input, as llama.cpp splits
    /// them: the gemm for the inputs in groups of four, the gemv for the rest.
    fn rows_q4k(&self, act: &Activations, rows: std::ops::Range<usize>, out: SharedMut<'_, f32>) {
        let nb = self.cols / QK_K;
        let packed = self
            .repacked
            .get()
            .and_then(|p| as_blocks::<BlockQ4Kx8>(p.bytes()));
        if let Some(w) = packed {
            return self.rows_q4k_x8(&w[rows.start / 8 * nb..rows.end / 8 * nb], act, rows, out);
        }
        let gguf: &[BlockQ4K] = as_blocks(self.data.bytes()).unwrap_or_default();
        let gguf = &gguf[rows.start * nb..rows.end * nb];
        if act.gemm_rows() > 0 {
            // The gemm needs these rows interleaved; the leftover inputs' gemv then reads the
            // same interleaved rows, from cache.
            q4k::with_interleaved(gguf, nb, |w| self.rows_q4k_x8(w, act, rows, out));
            return;
        }
        let (level, q8k) = (simd_level(), act.q8k());
        for t in 0..act.m {
            let start = t * self.rows;
            // SAFETY: each chunk of output rows goes to exactly one thread.
            let dst = unsafe { out.range_mut(start + rows.start..start + rows.end) };
            q4k::gemv_q4k(level, self.cols, gguf, &q8k[t * nb..(t + 1) * nb], dst);
        }
    }

    /// [`Matrix::rows_q4k`] on the interleaved rows `w` (the repacked copy's, or a scratch's).
    fn rows_q4k_x8(
        &self,
        w: &[BlockQ4Kx8],
        act: &Activations,
        rows: std::ops::Range<usize>,
        out: SharedMut<'_, f32>,
    ) {
        let level = simd_level();
        let (k, nb, m) = (self.cols, self.cols / QK_K, act.m);
        let m4 = act.gemm_rows();
        if m4 > 0 {
            GEMM_SCRATCH.with(|scratch| {
                let tile = &mut scratch.borrow_mut();
                tile.clear();
                tile.resize(m4 * rows.len(), 0.0);
                q4k::gemm_q4k_x8(level, k, w, act.q8k_x4(), m4, tile, rows.len());
                for (t, tile_row) in tile.chunks_exact(rows.len()).enumerate() {
                    let start = t * self.rows;
                    // SAFETY: each chunk of output rows goes to exactly one thread.
                    let dst = unsafe { out.range_mut(start + rows.start..start + rows.end) };
                    dst.copy_from_slice(tile_row);
                }
            });
        }
        let q8k = act.q8k();
        for t in m4..m {
            let start = t * self.rows;
            // SAFETY: as above.
            let dst = unsafe { out.range_mut(start + rows.start..start + rows.end) };
            q4k::gemv_q4k_x8(level, k, w, &q8k[t * nb..(t + 1) * nb], dst);
        }
    }

    /// Writes `out[t][rows]` for every input `t` with `dot(row, t)`.
    fn write_rows(
        &self,
        m: usize,
        rows: std::ops::Range<usize>,
        out: SharedMut<'_, f32>,
        dot: impl Fn(usize, usize) -> f32,
    ) {
        self.write_token_rows(0..m, rows, out, dot);
    }

    /// [`Self::write_rows`] for the activation rows `tokens` only.
    fn write_token_rows(
        &self,
        tokens: std::ops::Range<usize>,
        rows: std::ops::Range<usize>,
        out: SharedMut<'_, f32>,
        dot: impl Fn(usize, usize) -> f32,
    ) {
        for t in tokens {
            let start = t * self.rows;
            // SAFETY: each chunk of output rows goes to exactly one thread.
            let dst = unsafe { out.range_mut(start + rows.start..start + rows.end) };
            for (d, r) in dst.iter_mut().zip(rows.clone()) {
                *d = dot(r, t);
            }
        }
    }

    fn rows_f32(&self, x: &[f32], m: usize, rows: std::ops::Range<usize>, out: SharedMut<'_, f32>) {
        let bytes = self.data.bytes();
        let k = self.cols;
        // SAFETY: alignment to 4 was checked in `new`; f32 has no invalid bit patterns.
        let w: &[f32] =
            unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), bytes.len() / 4) };
        self.write_rows(m, rows, out, |r, t| {
            dot_f32(&w[r * k..][..k], &x[t * k..][..k])
        });
    }

    fn rows_f16(&self, x: &[f32], m: usize, rows: std::ops::Range<usize>, out: SharedMut<'_, f32>) {
        let bytes = self.data.bytes();
        let k = self.cols;
        let mut widened = vec![0f32; k];
        for r in rows {
            for (o, b) in widened
                .iter_mut()
                .zip(bytes[r * 2 * k..][..2 * k].chunks_exact(2))
            {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
            self.write_rows(m, r..r + 1, out, |_, t| dot_f32(&widened, &x[t * k..][..k]));
        }
    }

    /// Rows of a Q6_K, Q5_K, Q3_K or Q2_K matrix: llama.cpp's vec_dot for fewer than
    /// [`TILED_K_QUANT_FROM`] inputs, its tiled order (several tokens per pass) from there on.
    fn rows_tiled_kquant<B: TiledKQuant>(
        &self,
        act: &Activations,
        rows: std::ops::Range<usize>,
        out: SharedMut<'_, f32>,
    ) {
        let (m, tiled) = (act.m, act.gemm_rows() >= TILED_K_QUANT_FROM);
        let act = act.q8k();
        let level = simd_level();
        let nb = self.cols / QK_K;
        let bytes = self.repacked.get().unwrap_or(&self.data).bytes();
        let w: &[B] = as_blocks(bytes).unwrap_or_default();
        if !tiled {
            self.write_rows(m, rows, out, |r, t| {
                B::dot(level, &w[r * nb..][..nb], &act[t * nb..][..nb])
            });
            return;
        }
        const T: usize = q6k::TOKENS_PER_PASS;
        let full = if B::SIXTEEN_TOKENS_PER_PASS {
            self.tiled_kquant_passes::<B, 16>(w, act, 0..m, rows.clone(), out)
        } else {
            0
        };
        let full = self.tiled_kquant_passes::<B, T>(w, act, full..m, rows.clone(), out);
        let full = self.tiled_kquant_passes::<B, { T / 2 }>(w, act, full..m, rows.clone(), out);
        self.write_token_rows(full..m, rows, out, |r, t| {
            B::tiled(level, &w[r * nb..][..nb], &act[t * nb..][..nb])
        });
    }

    /// The tiled k-quant products of the rows `rows` with the activation rows `tokens` in whole
    /// passes of `T`; returns the end of the activation rows done.
    fn tiled_kquant_passes<B: TiledKQuant, const T: usize>(
        &self,
        w: &[B],
        act: &[BlockQ8K],
        tokens: std::ops::Range<usize>,
        rows: std::ops::Range<usize>,
        out: SharedMut<'_, f32>,
    ) -> usize {
        let (level, nb) = (simd_level(), self.cols / QK_K);
        let full = tokens.end - tokens.len() % T;
        for t0 in (tokens.start..full).step_by(T) {
            // SAFETY: each chunk of output rows goes to exactly one thread; the T token rows
            // are disjoint.
            let mut dst: [&mut [f32]; T] = std::array::from_fn(|i| unsafe {
                let start = (t0 + i) * self.rows;
                out.range_mut(start + rows.start..start + rows.end)
            });
            let acts: [&[BlockQ8K]; T] = std::array::from_fn(|i| &act[(t0 + i) * nb..][..nb]);
            for (j, r) in rows.clone().enumerate() {
                let values = B::tiled_tokens(level, &w[r * nb..][..nb], acts);
                for (d, v) in dst.iter_mut().zip(values) {
                    d[j] = v;
                }
            }
        }
        full
    }

    /// Rows of a matrix of 32-value weight blocks `B`: a prompt's (and for some types a few
    /// inputs') in tiles of [`TILE_ROWS`] weight rows × up to [`TILE_TOKENS`] tokens (each
    /// output with the one-output kernel's bits), the rows left over one output at a time.
    fn rows_of_blocks<B: TiledBlock + super::blocks::PodBlock>(
        &self,
        act: &[B::Act],
        m: usize,
        rows: std::ops::Range<usize>,
        out: SharedMut<'_, f32>,
    ) {
        let blocks = BlockRows {
            level: simd_level(),
            w: as_blocks(self.data.bytes()).unwrap_or_default(),
            act,
            nb: self.cols / QK,
        };
        let tiled_rows = if m > DECODE_MAX_INPUTS || B::TILES_FOR_FEW_INPUTS {
            rows.len() - rows.len() % TILE_ROWS
        } else {
            0
        };
        if tiled_rows > 0 {
            let tiled = rows.start..rows.start + tiled_rows;
            let full_tokens = m - m % TILE_TOKENS;
            for t0 in (0..full_tokens).step_by(TILE_TOKENS) {
                self.write_block_tiles::<B, TILE_TOKENS>(&blocks, t0, tiled.clone(), out);
            }
            match m - full_tokens {
                0 => {}
                1 => self.write_block_tiles::<B, 1>(&blocks, full_tokens, tiled, out),
                2 => self.write_block_tiles::<B, 2>(&blocks, full_tokens, tiled, out),
                _ => self.write_block_tiles::<B, 3>(&blocks, full_tokens, tiled, out),
            }
        }
        let untiled = rows.start + tiled_rows..rows.end;
        self.write_token_rows(0..m, untiled, out, |r, t| {
            B::dot(blocks.level, blocks.row(r), blocks.token(t))
        });
    }

    /// The tiles of the `T` tokens from `t0` with the rows `rows` (whole tiles).
    fn write_block_tiles<B: TiledBlock, const T: usize>(
        &self,
        blocks: &BlockRows<'_, B>,
        t0: usize,
        rows: std::ops::Range<usize>,
        out: SharedMut<'_, f32>,
    ) {
        let acts: [_; T] = std::array::from_fn(|i| blocks.token(t0 + i));
        self.write_tiles(t0, rows.start, rows.len(), out, |r0| {
            let w = std::array::from_fn(|i| blocks.row(r0 + i));
            B::tile(blocks.level, w, acts)
        });
    }

    /// Writes the `tiled_rows` rows (a multiple of [`TILE_ROWS`]) from `first_row` of the `T`
    /// token rows from `t0` with `tile(r0)`, the outputs `[row][token]` of the matrix rows
    /// `r0..r0 + TILE_ROWS`.
    fn write_tiles<const T: usize>(
        &self,
        t0: usize,
        first_row: usize,
        tiled_rows: usize,
        out: SharedMut<'_, f32>,
        tile: impl Fn(usize) -> [[f32; T]; TILE_ROWS],
    ) {
        debug_assert!(tiled_rows.is_multiple_of(TILE_ROWS));
        // SAFETY: each chunk of output rows goes to exactly one thread; the token rows are
        // disjoint.
        let mut dst: [&mut [f32]; T] = std::array::from_fn(|i| unsafe {
            let start = (t0 + i) * self.rows + first_row;
            out.range_mut(start..start + tiled_rows)
        });
        for r0 in (0..tiled_rows).step_by(TILE_ROWS) {
            for (i, per_token) in tile(first_row + r0).iter().enumerate() {
                for (d, &v) in dst.iter_mut().zip(per_token) {
                    d[r0 + i] = v;
                }
            }
        }
    }
}

/// A k-quant block type that llama.cpp multiplies with its vec_dot for fewer than
/// [`TILED_K_QUANT_FROM`] inputs and with its tiled K-quant matmul from there on.
trait TiledKQuant: super::blocks::PodBlock {
    /// Whether a prompt goes through the kernels sixteen tokens per pass before passes of
    /// [`q6k::TOKENS_PER_PASS`]: for a type whose blocks cost much to unpack, where the
    /// unpacked block stays in memory and is read once per chunk for each eight tokens.
    const SIXTEEN_TOKENS_PER_PASS: bool = false;
    /// One output in the vec_dot's order.
    fn dot(level: SimdLevel, w: &[Self], act: &[BlockQ8K]) -> f32;
    /// One output in the tiled order.
    fn tiled(level: SimdLevel, w: &[Self], act: &[BlockQ8K]) -> f32;
    /// [`TiledKQuant::tiled`] of one row with `T` activation rows.
    fn tiled_tokens<const T: usize>(
        level: SimdLevel,
        w: &[Self],
        acts: [&[BlockQ8K]; T],
    ) -> [f32; T];
}

/// Implements [`TiledKQuant`] for `$block` with its module's three kernels.
macro_rules! tiled_kquant {
    ($block:ty, $dot:path, $tiled:path, $tiled_tokens:path $(, $sixteen:expr)?) => {
        impl TiledKQuant for $block {
            $(const SIXTEEN_TOKENS_PER_PASS: bool = $sixteen;)?
            fn dot(level: SimdLevel, w: &[Self], act: &[BlockQ8K]) -> f32 {
                $dot(level, w, act)
            }
            fn tiled(level: SimdLevel, w: &[Self], act: &[BlockQ8K]) -> f32 {
                $tiled(level, w, act)
            }
            fn tiled_tokens<const T: usize>(
                level: SimdLevel,
                w: &[Self],
                acts: [&[BlockQ8K]; T],
            ) -> [f32; T] {
                $tiled_tokens(level, w, acts)
            }
        }
    };
}

tiled_kquant!(
    BlockQ6K,
    q6k::dot_q6k_q8k,
    q6k::dot_q6k_q8k_tiled,
    q6k::dot_q6k_q8k_tiled_tokens
);
tiled_kquant!(
    BlockQ5K,
    q5k::dot_q5k_q8k,
    q5k::dot_q5k_q8k_tiled,
    q5k::dot_q5k_q8k_tiled_tokens,
    true
);
tiled_kquant!(
    BlockQ3K,
    q3k::dot_q3k_q8k,
    q3k::dot_q3k_q8k_tiled,
    q3k::dot_q3k_q8k_tiled_tokens
);
tiled_kquant!(
    BlockQ2K,
    q2k::dot_q2k_q8k,
    q2k::dot_q2k_q8k_tiled,
    q2k::dot_q2k_q8k_tiled_tokens
);

/// A matrix of 32-value weight blocks and the quantized inputs it is multiplied with.
struct BlockRows<'a, B: TiledBlock> {
    level: SimdLevel,
    w: &'a [B],
    act: &'a [B::Act],
    /// Blocks per row.
    nb: usize,
}

impl<B: TiledBlock> BlockRows<'_, B> {
    fn row(&self, r: usize) -> &[B] {
        &self.w[r * self.nb..][..self.nb]
    }

    fn token(&self, t: usize) -> &[B::Act] {
        &self.act[t * self.nb..][..self.nb]
    }
}

/// A zeroed Q8_1 block (the activation buffer's filler before quantization).
const EMPTY_Q8_1: BlockQ8_1 = BlockQ8_1 {
    d: f16::ZERO,
    s: f16::ZERO,
    qs: [0; 32],
};

/// The activation block type of candle's kernel for `dtype`.
fn candle_vec_dot_type(dtype: GgmlDType) -> GgmlDType {
    fn of<B: GgmlType>() -> GgmlDType {
        B::VecDotType::DTYPE
    }
    with_candle_block!(dtype, of,)
}

/// Reinterprets bytes as candle blocks of type `B`.
fn candle_blocks<B: GgmlType>(bytes: &[u8]) -> &[B] {
    let size = std::mem::size_of::<B>();
    assert!(bytes.len().is_multiple_of(size));
    assert!(bytes.as_ptr().align_offset(std::mem::align_of::<B>()) == 0);
    // SAFETY: candle's block types are repr(C) structs of integers and f16 (any bit pattern is
    // valid); length and alignment are checked above.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<B>(), bytes.len() / size) }
}

fn dequantize_candle_row<B: GgmlType>(bytes: &[u8], out: &mut [f32]) {
    B::to_float(candle_blocks::<B>(bytes), out);
}

fn candle_rows<B: GgmlType>(
    w: &Matrix,
    act: &[u8],
    m: usize,
    rows: std::ops::Range<usize>,
    out: SharedMut<'_, f32>,
) {
    let blocks = candle_blocks::<B>(w.data.bytes());
    let act = candle_blocks::<B::VecDotType>(act);
    let per_row = w.cols / B::BLCK_SIZE;
    let k = w.cols;
    w.write_rows(m, rows, out, |r, t| {
        B::vec_dot(
            k,
            &blocks[r * per_row..][..per_row],
            &act[t * per_row..][..per_row],
        )
    });
}

fn quantize_candle_rows<B: GgmlType>(
    pool: &Pool,
    x: &[f32],
    m: usize,
    k: usize,
    buf: &mut Vec<u64>,
) {
    let per_row = k / B::BLCK_SIZE;
    let bytes = m * per_row * std::mem::size_of::<B>();
    buf.clear();
    buf.resize(bytes.div_ceil(8), 0);
    // SAFETY: the buffer holds `bytes` bytes, 8-byte aligned; candle blocks are plain data.
    let blocks: &mut [B] =
        unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<B>(), m * per_row) };
    let shared = SharedMut::new(blocks);
    pool.for_each_chunk(m, 1, |rows| {
        for t in rows {
            // SAFETY: each row goes to exactly one thread.
            let dst = unsafe { shared.range_mut(t * per_row..(t + 1) * per_row) };
            B::from_float(&x[t * k..][..k], dst);
        }
    });
}

/// Q8_K blocks from which quantizing is split over the pool's threads: below it, waking a
/// thread costs about what it saves (a block takes about 0.1 us).
const SPLIT_FROM_BLOCKS: usize = 16;

/// Calls `f(range)` for ranges of `0..n` Q8_K blocks (blocks are independent, so a range may
/// cross rows): one range per thread, or one in all when there are few.
fn for_block_ranges(pool: &Pool, n: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    if n < SPLIT_FROM_BLOCKS {
        if n > 0 {
            f(0..n);
        }
        return;
    }
    pool.for_each_split(n, 1, f);
}

thread_local! {
    /// A thread's gemm output tile, reused.
    static GEMM_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An 8-lane f32 dot product (vectorisable; the order is fixed, not llama.cpp's).
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (xa, xb) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += xa[l] * xb[l];
        }
    }
    crate::engine::attention::hsum(&lanes) + tail
}

/// The inputs of one or more matmuls, quantized once into every form they need.
#[derive(Default)]
pub struct Activations {
    m: usize,
    k: usize,
    f32: Vec<f32>,
    q8_1: Vec<BlockQ8_1>,
    q8k: Vec<BlockQ8K>,
    q8k_x4: Vec<BlockQ8Kx4>,
    q8_0: Vec<BlockQ8_0>,
    /// Every input row through the single-row kernels (see [`Activations::set_row_invariant`]).
    row_invariant: bool,
    candle: Vec<(GgmlDType, Vec<u64>)>,
    ready: Vec<ActKind>,
}

impl Activations {
    /// Empty buffers (they grow to the largest input and are reused).
    pub fn new() -> Self {
        Self::default()
    }

    /// With `true`, every input row is multiplied by the kernels llama.cpp uses for a single
    /// token (no Q4_K gemm, no tiled Q6_K), so a row's result does not depend on how many rows
    /// go through together: decoding token by token then reproduces a prefill exactly. llama.cpp
    /// itself (the default, `false`) rounds a prompt row and a decoded token differently.
    pub fn set_row_invariant(&mut self, row_invariant: bool) {
        self.row_invariant = row_invariant;
    }

    /// Input rows multiplied by the many-row kernels (gemm, tiled): the first `m - m % 4`.
    fn gemm_rows(&self) -> usize {
        if self.row_invariant {
            0
        } else {
            self.m - self.m % 4
        }
    }

    /// [`Activations::quantize`] of `x` after `prepare(offset, part)` has rewritten consecutive
    /// parts of it in place (`offset` is where `part` starts in `x`). Where every matrix takes
    /// Q8_K rows only (Q6_K, and Q4_K for fewer than four rows), each thread prepares whole
    /// blocks and quantizes them at once, in one pass over the pool: a generated token's SwiGLU
    /// and its quantization for the down projection cost one dispatch, split evenly, instead of
    /// two with the quantization on one thread.
    pub fn quantize_prepared(
        &mut self,
        pool: &Pool,
        x: &mut [f32],
        m: usize,
        k: usize,
        for_matrices: &[&Matrix],
        prepare: impl Fn(usize, &mut [f32]) + Sync,
    ) {
        assert!(x.len() >= m * k, "input too short");
        let x = &mut x[..m * k];
        self.m = m;
        let kinds = || for_matrices.iter().flat_map(|m| m.act_kinds());
        // Q8Kx4 holds the gemm's rows, of which a token or two has none.
        let no_gemm_rows = self.gemm_rows() == 0;
        let only_q8k =
            kinds().all(|&kind| kind == ActKind::Q8K || (kind == ActKind::Q8Kx4 && no_gemm_rows));
        if !only_q8k || !k.is_multiple_of(QK_K) {
            let values = SharedMut::new(x);
            pool.for_each_split(values.len(), QK_K, |part| {
                // SAFETY: each part goes to exactly one thread.
                prepare(part.start, unsafe { values.range_mut(part) })
            });
            return self.quantize(pool, x, m, k, for_matrices);
        }
        self.k = k;
        self.ready.clear();
        let values = SharedMut::new(x);
        self.quantize_q8k(pool, m * k, |blocks| {
            let range = blocks.start * QK_K..blocks.end * QK_K;
            // SAFETY: each range of blocks, and so of values, goes to exactly one thread.
            let part = unsafe { values.range_mut(range) };
            prepare(blocks.start * QK_K, part);
            part
        });
        self.ready.push(ActKind::Q8K);
        if kinds().any(|&kind| kind == ActKind::Q8Kx4) {
            self.q8k_x4.clear();
            self.ready.push(ActKind::Q8Kx4);
        }
    }

    /// Quantizes `len` values (whole Q8_K blocks) into `self.q8k`, ranges of blocks spread over
    /// the pool ([`for_block_ranges`]); `values(blocks)` gives the values of a range of blocks,
    /// called once per range on the thread that quantizes it.
    fn quantize_q8k<'x>(
        &mut self,
        pool: &Pool,
        len: usize,
        values: impl Fn(std::ops::Range<usize>) -> &'x [f32] + Sync,
    ) {
        self.q8k.resize(len / QK_K, q8k::zeroed_q8k(1)[0]);
        let shared = SharedMut::new(&mut self.q8k);
        for_block_ranges(pool, shared.len(), |blocks| {
            let x = values(blocks.clone());
            // SAFETY: each range of blocks goes to exactly one thread.
            q8k::quantize_row_q8k(x, unsafe { shared.range_mut(blocks) });
        });
    }

    /// Prepares `x` (`m` rows of `k` values) for every matrix of `for_matrices`.
    pub fn quantize(
        &mut self,
        pool: &Pool,
        x: &[f32],
        m: usize,
        k: usize,
        for_matrices: &[&Matrix],
    ) {
        assert!(x.len() >= m * k, "input too short");
        let x = &x[..m * k];
        self.m = m;
        self.k = k;
        self.ready.clear();
        for &kind in for_matrices.iter().flat_map(|m| m.act_kinds()) {
            if self.ready.contains(&kind) {
                continue;
            }
            match kind {
                ActKind::Q8K => self.quantize_q8k(pool, x.len(), |blocks| {
                    &x[blocks.start * QK_K..blocks.end * QK_K]
                }),
                ActKind::Q8Kx4 => {
                    let (nb, groups) = (k / QK_K, self.gemm_rows() / 4);
                    self.q8k_x4.resize(groups * nb, q8k::zeroed_q8k_x4(1)[0]);
                    let shared = SharedMut::new(&mut self.q8k_x4);
                    let level = simd_level();
                    pool.for_each_chunk(groups, 1, |range| {
                        for g in range {
                            // SAFETY: each group of four rows goes to exactly one thread.
                            let dst = unsafe { shared.range_mut(g * nb..(g + 1) * nb) };
                            q8k::quantize_rows_q8k_x4(level, &x[4 * g * k..][..4 * k], k, dst);
                        }
                    });
                }
                ActKind::Q8_0 => {
                    let nb = k / QK;
                    self.q8_0.resize(
                        m * nb,
                        BlockQ8_0 {
                            d: f16::ZERO,
                            qs: [0; QK],
                        },
                    );
                    let shared = SharedMut::new(&mut self.q8_0);
                    let level = simd_level();
                    pool.for_each_chunk(m, 1, |rows| {
                        for t in rows {
                            // SAFETY: each row goes to exactly one thread.
                            let dst = unsafe { shared.range_mut(t * nb..(t + 1) * nb) };
                            q8_0::quantize_row_q8_0(level, &x[t * k..][..k], dst);
                        }
                    });
                }
                ActKind::F32 => {
                    self.f32.clear();
                    self.f32.extend_from_slice(x);
                }
                ActKind::Q8_1 => {
                    self.q8_1.clear();
                    self.q8_1.resize(m * k / 32, EMPTY_Q8_1);
                    let shared = SharedMut::new(&mut self.q8_1);
                    let level = simd_level();
                    pool.for_each_chunk(m, 1, |rows| {
                        for t in rows {
                            // SAFETY: each row goes to exactly one thread.
                            let dst = unsafe { shared.range_mut(t * k / 32..(t + 1) * k / 32) };
                            q4_1::quantize_row_q8_1(level, &x[t * k..][..k], dst);
                        }
                    });
                }
                ActKind::Candle(dtype) => {
                    let index = match self.candle.iter().position(|(d, _)| *d == dtype) {
                        Some(i) => i,
                        None => {
                            self.candle.push((dtype, Vec::new()));
                            self.candle.len() - 1
                        }
                    };
                    let buf = &mut self.candle[index].1;
                    with_candle_block!(dtype, quantize_candle_rows, pool, x, m, k, buf);
                }
            }
            self.ready.push(kind);
        }
    }

    /// Rows of input.
    pub fn m(&self) -> usize {
        self.m
    }

    fn check(&self, kind: ActKind) {
        assert!(
            self.ready.contains(&kind),
            "activations not quantized for {kind:?}"
        );
    }

    fn f32(&self) -> &[f32] {
        self.check(ActKind::F32);
        &self.f32
    }

    fn q8_1(&self) -> &[BlockQ8_1] {
        self.check(ActKind::Q8_1);
        &self.q8_1
    }

    fn q8k(&self) -> &[BlockQ8K] {
        self.check(ActKind::Q8K);
        &self.q8k[..self.m * self.k / QK_K]
    }

    fn q8_0(&self) -> &[BlockQ8_0] {
        self.check(ActKind::Q8_0);
        &self.q8_0[..self.m * self.k / QK]
    }

    fn q8k_x4(&self) -> &[BlockQ8Kx4] {
        self.check(ActKind::Q8Kx4);
        &self.q8k_x4[..self.gemm_rows() / 4 * self.k / QK_K]
    }

    /// Activations for a candle kernel, as raw bytes of its block type.
    fn blocks(&self, kind: ActKind) -> &[u8] {
        if kind == ActKind::Q8K {
            let q8k = self.q8k();
            // SAFETY: BlockQ8K is plain data; candle's BlockQ8K has the same repr(C) layout
            // (llama.cpp's block_q8_K), so its kernels read these bytes as their own blocks.
            return unsafe {
                std::slice::from_raw_parts(q8k.as_ptr().cast::<u8>(), std::mem::size_of_val(q8k))
            };
        }
        self.check(kind);
        let ActKind::Candle(dtype) = kind else {
            unreachable!("only candle activations are raw blocks")
        };
        let words = self
            .candle
            .iter()
            .find(|(d, _)| *d == dtype)
            .map(|(_, w)| w.as_slice())
            .unwrap_or_default();
        let len = self.m * self.k / dtype.block_size() * dtype.type_size();
        // SAFETY: the buffer was sized to hold `len` bytes when quantized.
        unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 37 + seed * 11) % 101) as f32 - 50.0) / 40.0)
            .collect()
    }

    /// A matrix of `dtype` quantized by candle from deterministic values.
    fn matrix(dtype: GgmlDType, rows: usize, cols: usize) -> (Matrix, Vec<f32>) {
        let w = Tensor::from_vec(values(rows * cols, 1), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let bytes = q.data().unwrap();
        let dequant = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
        let m = Matrix::new(dtype, rows, cols, WeightBytes::owned(&bytes)).unwrap();
        (m, dequant.to_vec1().unwrap())
    }

    /// Q4_K matrices of whole 8-row groups take the llama.cpp-numerics kernel, others candle's
    /// (`Kernel::Candle`): the same rows must give close values through both.
    #[test]
    fn q4k_in_row_groups_matches_candles_kernel_for_1_to_9_rows() {
        let (rows, k) = (48, 512);
        let pool = Pool::new(2);
        let (grouped, dequant) = matrix(GgmlDType::Q4K, rows, k);
        assert_eq!(grouped.kernel, Kernel::Q4K);
        let mut row = vec![0f32; k];
        grouped.dequantize_row(13, &mut row);
        assert_eq!(row, dequant[13 * k..14 * k]);
        let plain_rows = rows - 3;
        let bytes = &grouped.data.bytes()[..plain_rows * grouped.row_bytes()];
        let plain = Matrix::new(GgmlDType::Q4K, plain_rows, k, WeightBytes::owned(bytes)).unwrap();
        assert_eq!(plain.kernel, Kernel::Candle(GgmlDType::Q4K));
        for m in 1..=9 {
            let x = values(m * k, m + 3);
            let mut act = Activations::new();
            act.quantize(&pool, &x, m, k, &[&grouped, &plain]);
            let (mut a, mut b) = (vec![0f32; m * rows], vec![0f32; m * plain_rows]);
            grouped.matmul(&pool, &act, &mut a);
            plain.matmul(&pool, &act, &mut b);
            for t in 0..m {
                let ours = &a[t * rows..][..plain_rows];
                for (g, r) in ours.iter().zip(&b[t * plain_rows..][..plain_rows]) {
                    assert!((g - r).abs() < 1e-3 * (1.0 + r.abs()), "m={m}: {g} vs {r}");
                }
            }
        }
    }

    #[test]
    fn repacking_q4k_and_q6k_changes_no_bit_of_any_product_or_row() {
        let (rows, k) = (48, 768);
        let pool = Pool::new(2);
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let (w, _) = matrix(dtype, rows, k);
            let clone = w.clone();
            assert!(w.needs_repack(), "{dtype:?}");
            let products = |w: &Matrix| -> Vec<Vec<u32>> {
                (1..=9)
                    .map(|m| {
                        let x = values(m * k, m + 5);
                        let mut act = Activations::new();
                        act.quantize(&pool, &x, m, k, &[w]);
                        let mut out = vec![0f32; m * rows];
                        w.matmul(&pool, &act, &mut out);
                        out.iter().map(|v| v.to_bits()).collect()
                    })
                    .collect()
            };
            let row_of = |w: &Matrix| {
                let mut row = vec![0f32; k];
                w.dequantize_row(9, &mut row);
                row
            };
            let (before, row_before) = (products(&w), row_of(&w));
            w.repack().unwrap();
            assert!(
                !w.needs_repack() && !clone.needs_repack(),
                "clones share the copy"
            );
            let copy = w.repacked.get().expect("a copy").bytes();
            assert_eq!(
                copy == w.data.bytes(),
                dtype == GgmlDType::Q6K,
                "Q6_K keeps the file's layout, Q4_K is interleaved"
            );
            assert_eq!(products(&clone), before, "{dtype:?}");
            assert_eq!(row_of(&clone), row_before, "{dtype:?}");
        }
        let (f16, _) = matrix(GgmlDType::F16, 8, 256);
        assert!(!f16.needs_repack());
        f16.repack().unwrap();
        assert!(f16.repacked.get().is_none());
    }

    fn reference(w: &[f32], x: &[f32], rows: usize, k: usize) -> Vec<f32> {
        x.chunks_exact(k)
            .flat_map(|xr| {
                w.chunks_exact(k)
                    .map(move |wr| wr.iter().zip(xr).map(|(a, b)| a * b).sum::<f32>())
            })
            .take(x.len() / k * rows)
            .collect()
    }

    #[test]
    fn every_type_matches_the_dequantized_product_for_1_to_9_rows() {
        let (rows, k) = (72, 512);
        let pool = Pool::new(2);
        let types = [
            GgmlDType::F32,
            GgmlDType::F16,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::Q3K,
            GgmlDType::Q2K,
        ];
        for dtype in types {
            let (w, dequant) = matrix(dtype, rows, k);
            let mut act = Activations::new();
            for m in 1..=9 {
                let x = values(m * k, m);
                act.quantize(&pool, &x, m, k, &[&w]);
                let mut out = vec![0f32; m * rows];
                w.matmul(&pool, &act, &mut out);
                let want = reference(&dequant, &x, rows, k);
                for (g, r) in out.iter().zip(&want) {
                    assert!(
                        (g - r).abs() < 0.02 * (4.0 + r.abs()),
                        "{dtype:?} m={m}: {g} vs {r}"
                    );
                }
                // With row-invariant activations a row's result does not depend on the batch
                // it is computed in (llama.cpp's own many-row Q6_K path rounds differently).
                let mut invariant = Activations::new();
                invariant.set_row_invariant(true);
                invariant.quantize(&pool, &x, m, k, &[&w]);
                w.matmul(&pool, &invariant, &mut out);
                let last = &x[(m - 1) * k..];
                let mut one = Activations::new();
                one.quantize(&pool, last, 1, k, &[&w]);
                let mut single = vec![0f32; rows];
                w.matmul(&pool, &one, &mut single);
                assert_eq!(single, out[(m - 1) * rows..], "{dtype:?} m={m}");
            }
        }
    }

    #[test]
    fn tiled_prompt_rows_give_every_token_its_one_token_bits_at_any_row_count() {
        // 70 rows: the last chunk (64..70) ends in 2 rows outside the 4-row tiles; 7 tokens:
        // one whole tile of tokens and three left over (a 3-token tile).
        let (rows, k, m) = (70, 256, 7);
        let pool = Pool::new(2);
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
        ] {
            let (w, _) = matrix(dtype, rows, k);
            let x = values(m * k, 5);
            let mut batch = Activations::new();
            batch.set_row_invariant(true);
            batch.quantize(&pool, &x, m, k, &[&w]);
            let mut out = vec![0f32; m * rows];
            w.matmul(&pool, &batch, &mut out);
            for (t, got) in out.chunks_exact(rows).enumerate() {
                let mut one = Activations::new();
                one.quantize(&pool, &x[t * k..][..k], 1, k, &[&w]);
                let mut single = vec![0f32; rows];
                w.matmul(&pool, &one, &mut single);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(got), bits(&single), "{dtype:?}, token {t}");
            }
        }
    }

    /// Every output of a Q6_K, Q5_K, Q3_K or Q2_K prompt (Q5_K's passes of 16 tokens, passes
    /// of 8, then of 4, then single tokens) has the tiled order's bits.
    #[test]
    fn tiled_k_quant_prompts_give_every_output_the_tiled_bits_at_any_token_count() {
        fn check<B: TiledKQuant>(dtype: GgmlDType) {
            let (rows, k) = (12, 512);
            let pool = Pool::new(2);
            let (w, _) = matrix(dtype, rows, k);
            let blocks: &[B] = as_blocks(w.data.bytes()).unwrap();
            let nb = k / QK_K;
            for m in [8, 9, 12, 13, 15, 16, 17, 29, 33] {
                let x = values(m * k, m);
                let mut act = Activations::new();
                act.quantize(&pool, &x, m, k, &[&w]);
                let mut out = vec![0f32; m * rows];
                w.matmul(&pool, &act, &mut out);
                let q = act.q8k();
                for (t, got) in out.chunks_exact(rows).enumerate() {
                    for (r, g) in got.iter().enumerate() {
                        let row = &blocks[r * nb..][..nb];
                        let want = B::tiled(simd_level(), row, &q[t * nb..][..nb]);
                        assert_eq!(
                            g.to_bits(),
                            want.to_bits(),
                            "{dtype:?} m={m} token {t} row {r}"
                        );
                    }
                }
            }
        }
        check::<BlockQ6K>(GgmlDType::Q6K);
        check::<BlockQ5K>(GgmlDType::Q5K);
        check::<BlockQ3K>(GgmlDType::Q3K);
        check::<BlockQ2K>(GgmlDType::Q2K);
    }

    #[test]
    fn one_and_two_threads_give_the_same_bits() {
        let (w, _) = matrix(GgmlDType::Q4K, 136, 256);
        let x = values(5 * 256, 3);
        let mut results = Vec::new();
        for threads in [1, 2] {
            let pool = Pool::new(threads);
            let mut act = Activations::new();
            act.quantize(&pool, &x, 5, 256, &[&w]);
            let mut out = vec![0f32; 5 * 136];
            w.matmul(&pool, &act, &mut out);
            results.push(out);
        }
        assert_eq!(results[0], results[1]);
    }

    /// Preparing and quantizing in one pass (Q8_K rows: Q6_K, Q4_K for 1-3 rows) or in two
    /// (the gemm's rows, other types) gives the bits of preparing first and quantizing after,
    /// with any number of threads, rows and blocks per row.
    #[test]
    fn quantizing_a_prepared_input_equals_preparing_then_quantizing() {
        let double_and_shift = |start: usize, part: &mut [f32]| {
            for (i, v) in part.iter_mut().enumerate() {
                *v = *v * 2.0 + ((start + i) % 7) as f32 * 0.25;
            }
        };
        for dtype in [GgmlDType::Q6K, GgmlDType::Q4K, GgmlDType::Q4_1] {
            for (m, k) in [(1, 256 * 43), (1, 512), (3, 256 * 17), (5, 256 * 9)] {
                let rows = 16;
                let (w, _) = matrix(dtype, rows, k);
                let x = values(m * k, m + k);
                let mut prepared = x.clone();
                double_and_shift(0, &mut prepared);
                for threads in [1, 2, 3] {
                    let pool = Pool::new(threads);
                    let mut expected_act = Activations::new();
                    expected_act.quantize(&pool, &prepared, m, k, &[&w]);
                    let mut expected = vec![0f32; m * rows];
                    w.matmul(&pool, &expected_act, &mut expected);

                    let (mut act, mut input) = (Activations::new(), x.clone());
                    act.quantize_prepared(&pool, &mut input, m, k, &[&w], double_and_shift);
                    assert_eq!(input, prepared, "{dtype:?} m={m} k={k} threads={threads}");
                    let mut got = vec![0f32; m * rows];
                    w.matmul(&pool, &act, &mut got);
                    assert_eq!(got, expected, "{dtype:?} m={m} k={k} threads={threads}");
                }
            }
        }
    }

    #[test]
    fn dequantized_rows_match_candle() {
        for dtype in [
            GgmlDType::F32,
            GgmlDType::F16,
            GgmlDType::Q4_1,
            GgmlDType::Q6K,
        ] {
            let (w, dequant) = matrix(dtype, 16, 256);
            let mut row = vec![0f32; 256];
            w.dequantize_row(5, &mut row);
            assert_eq!(row, dequant[5 * 256..6 * 256], "{dtype:?}");
        }
    }

    #[test]
    fn wrong_sizes_are_errors() {
        let bytes = WeightBytes::owned(&[0u8; 100]);
        assert!(matches!(
            Matrix::new(GgmlDType::Q4_1, 2, 64, bytes),
            Err(MatmulError::Size { .. })
        ));
    }
}
