//! llama.cpp's quantized block layouts (`ggml-common.h`, `ggml-cpu/repack.h`), byte for byte,
//! so GGUF tensor data can be read in place.

use half::f16;

/// Values per k-quant super-block.
pub const QK_K: usize = 256;
/// Values per legacy block (Q4_0, Q4_1, Q5_0, Q8_0, Q8_1).
pub const QK: usize = 32;

/// Q2_K: 16 sub-blocks of 16 2-bit values with 4-bit scales and minimums (84 bytes).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ2K {
    /// Per sub-block: the scale in the low nibble, the minimum in the high one.
    pub scales: [u8; QK_K / 16],
    /// The values, four per byte (value `128h + 32c + p` in bits `2c` of byte `32h + p`).
    pub qs: [u8; QK_K / 4],
    /// Scale of the sub-block scales.
    pub d: f16,
    /// Scale of the sub-block minimums.
    pub dmin: f16,
}

/// Q3_K: 16 sub-blocks of 16 3-bit values (-4..4) with 6-bit scales (110 bytes).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ3K {
    /// Third bits of the values (value `128h + 32c + p` in bit `4h + c` of byte `p`).
    pub hmask: [u8; QK_K / 8],
    /// Low 2 bits of the values, laid out as Q2_K's.
    pub qs: [u8; QK_K / 4],
    /// The 16 sub-block scales, 6 bits each (offset by 32), packed into 12 bytes.
    pub scales: [u8; 12],
    /// Scale of the sub-block scales.
    pub d: f16,
}

/// Q4_K: 8 sub-blocks of 32 4-bit values with 6-bit scales and minimums (144 bytes).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ4K {
    /// Scale of the sub-block scales.
    pub d: f16,
    /// Scale of the sub-block minimums.
    pub dmin: f16,
    /// Sub-block scales and minimums, 6 bits each, packed.
    pub scales: [u8; 12],
    /// 4-bit values.
    pub qs: [u8; QK_K / 2],
}

/// Eight Q4_K blocks of eight consecutive rows, interleaved as llama.cpp's `block_q4_Kx8`
/// (1,152 bytes: exactly eight [`BlockQ4K`], so a tensor can be repacked in place).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ4Kx8 {
    /// The eight rows' `d`.
    pub d: [f16; 8],
    /// The eight rows' `dmin`.
    pub dmin: [f16; 8],
    /// The eight rows' scales, interleaved.
    pub scales: [u8; 96],
    /// The eight rows' 4-bit values, interleaved.
    pub qs: [u8; QK_K * 4],
}

/// Q5_K: 8 sub-blocks of 32 5-bit values with 6-bit scales and minimums (176 bytes).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ5K {
    /// Scale of the sub-block scales.
    pub d: f16,
    /// Scale of the sub-block minimums.
    pub dmin: f16,
    /// Sub-block scales and minimums, 6 bits each, packed as Q4_K's.
    pub scales: [u8; 12],
    /// Fifth bits of the values.
    pub qh: [u8; QK_K / 8],
    /// Low 4 bits.
    pub qs: [u8; QK_K / 2],
}

/// Q6_K: 16 sub-blocks of 16 6-bit values with 8-bit scales (210 bytes).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ6K {
    /// Low 4 bits of the values.
    pub ql: [u8; QK_K / 2],
    /// High 2 bits of the values.
    pub qh: [u8; QK_K / 4],
    /// Sub-block scales.
    pub scales: [i8; QK_K / 16],
    /// Super-block scale.
    pub d: f16,
}

/// Q8_K activations: 256 8-bit values, an f32 scale and sums of 16 (292 bytes).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ8K {
    /// Scale.
    pub d: f32,
    /// Quantized values.
    pub qs: [i8; QK_K],
    /// Sums of each 16 consecutive values.
    pub bsums: [i16; QK_K / 16],
}

/// Four rows of Q8_K activations interleaved as llama.cpp's `block_q8_Kx4` (for the tiled gemm).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ8Kx4 {
    /// The four rows' scales.
    pub d: [f32; 4],
    /// The four rows' values, interleaved.
    pub qs: [i8; QK_K * 4],
    /// The four rows' sums of 16, interleaved.
    pub bsums: [i16; QK_K / 4],
}

/// Q8_0: 32 8-bit values and an f16 scale (34 bytes).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ8_0 {
    /// Scale.
    pub d: f16,
    /// Quantized values.
    pub qs: [i8; QK],
}

/// Q5_0: 32 5-bit values and an f16 scale (22 bytes).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ5_0 {
    /// Scale.
    pub d: f16,
    /// Fifth bits of the 32 values.
    pub qh: [u8; 4],
    /// Low 4 bits.
    pub qs: [u8; QK / 2],
}

/// Q4_0: 32 4-bit values (value − 8) and an f16 scale (18 bytes).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ4_0 {
    /// Scale.
    pub d: f16,
    /// 4-bit values, low nibbles first.
    pub qs: [u8; QK / 2],
}

/// Q4_1: 32 4-bit values with an f16 scale and minimum (20 bytes).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ4_1 {
    /// Scale.
    pub d: f16,
    /// Minimum.
    pub m: f16,
    /// 4-bit values.
    pub qs: [u8; QK / 2],
}

/// Q5_1: 32 5-bit values with an f16 scale and minimum (24 bytes).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ5_1 {
    /// Scale.
    pub d: f16,
    /// Minimum.
    pub m: f16,
    /// Fifth bits of the 32 values.
    pub qh: [u8; 4],
    /// Low 4 bits.
    pub qs: [u8; QK / 2],
}

/// Q8_1 activations: 32 8-bit values, scale `d` and `s = d · Σq` (36 bytes).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ8_1 {
    /// Scale.
    pub d: f16,
    /// Scale times the sum of the values.
    pub s: f16,
    /// Quantized values.
    pub qs: [i8; QK],
}

/// Reinterprets raw tensor bytes as blocks of type `B`, or `None` when the length is not a
/// whole number of blocks or the bytes are misaligned for `B`.
///
/// Only for the plain-old-data block types of this module (integers and f16s, every bit
/// pattern valid).
pub fn as_blocks<B: PodBlock>(bytes: &[u8]) -> Option<&[B]> {
    let size = std::mem::size_of::<B>();
    if !bytes.len().is_multiple_of(size)
        || bytes.as_ptr().align_offset(std::mem::align_of::<B>()) != 0
    {
        return None;
    }
    // SAFETY: B is a repr(C) struct of integers/f16 (PodBlock), so every bit pattern is valid;
    // length and alignment were checked above.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<B>(), bytes.len() / size) })
}

/// Mutable form of [`as_blocks`].
pub fn as_blocks_mut<B: PodBlock>(bytes: &mut [u8]) -> Option<&mut [B]> {
    let size = std::mem::size_of::<B>();
    if !bytes.len().is_multiple_of(size)
        || bytes.as_ptr().align_offset(std::mem::align_of::<B>()) != 0
    {
        return None;
    }
    // SAFETY: as in `as_blocks`; the borrow is unique.
    Some(unsafe {
        std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<B>(), bytes.len() / size)
    })
}

/// Marker for the block types above: `repr(C)`, no padding, every bit pattern valid.
///
/// # Safety
/// Implement only for such types.
pub unsafe trait PodBlock: Copy + 'static {}

// SAFETY: each is repr(C), made only of integers and f16, without padding (sizes checked below).
unsafe impl PodBlock for BlockQ2K {}
unsafe impl PodBlock for BlockQ3K {}
unsafe impl PodBlock for BlockQ4K {}
unsafe impl PodBlock for BlockQ4Kx8 {}
unsafe impl PodBlock for BlockQ5K {}
unsafe impl PodBlock for BlockQ6K {}
unsafe impl PodBlock for BlockQ8K {}
unsafe impl PodBlock for BlockQ8Kx4 {}
unsafe impl PodBlock for BlockQ8_0 {}
unsafe impl PodBlock for BlockQ5_0 {}
unsafe impl PodBlock for BlockQ4_0 {}
unsafe impl PodBlock for BlockQ4_1 {}
unsafe impl PodBlock for BlockQ5_1 {}
unsafe impl PodBlock for BlockQ8_1 {}

const _: () = {
    assert!(std::mem::size_of::<BlockQ2K>() == 84);
    assert!(std::mem::size_of::<BlockQ3K>() == 110);
    assert!(std::mem::size_of::<BlockQ4K>() == 144);
    assert!(std::mem::size_of::<BlockQ4Kx8>() == 8 * 144);
    assert!(std::mem::size_of::<BlockQ5K>() == 176);
    assert!(std::mem::size_of::<BlockQ6K>() == 210);
    assert!(std::mem::size_of::<BlockQ8K>() == 292);
    assert!(std::mem::size_of::<BlockQ8Kx4>() == 16 + 1024 + 128);
    assert!(std::mem::size_of::<BlockQ8_0>() == 34);
    assert!(std::mem::size_of::<BlockQ5_0>() == 22);
    assert!(std::mem::size_of::<BlockQ4_0>() == 18);
    assert!(std::mem::size_of::<BlockQ4_1>() == 20);
    assert!(std::mem::size_of::<BlockQ5_1>() == 24);
    assert!(std::mem::size_of::<BlockQ8_1>() == 36);
};
