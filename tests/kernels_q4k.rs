//! Bit-exactness of the Q8_K quantizer and the Q4_K matmul, on the GGUF layout and repacked,
//! against llama.cpp's own outputs (golden vectors in tests/fixtures/kernels/, format in its README.md).

use smoldesk::engine::cpu::blocks::{BlockQ4K, BlockQ4Kx8, BlockQ8K, QK_K};
use smoldesk::engine::cpu::q4k::{
    gemm_q4k, gemm_q4k_x8, gemv_q4k, gemv_q4k_x8, repack_q4k_x8_in_place,
};
use smoldesk::engine::cpu::q8k::{
    quantize_row_q8k, quantize_rows_q8k_x4, zeroed_q8k, zeroed_q8k_x4,
};
use smoldesk::engine::cpu::{SimdLevel, avx2_available};
use std::path::PathBuf;

const GGML_TYPE_Q4_K: u32 = 12;
const GGML_TYPE_Q8_K: u32 = 15;

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kernels")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A little-endian cursor over a fixture.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        out
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn usize(&mut self) -> usize {
        self.u32() as usize
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn f32s(&mut self, n: usize) -> Vec<f32> {
        self.take(4 * n)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

/// The levels to check: portable always, AVX2 where the CPU has it.
fn levels() -> Vec<SimdLevel> {
    let mut levels = vec![SimdLevel::Portable];
    if avx2_available() {
        levels.push(SimdLevel::Avx2);
    }
    levels
}

fn q8k_bytes(b: &BlockQ8K) -> Vec<u8> {
    let mut v = b.d.to_le_bytes().to_vec();
    v.extend(b.qs.iter().map(|&q| q as u8));
    v.extend(b.bsums.iter().flat_map(|s| s.to_le_bytes()));
    v
}

#[test]
fn quantize_row_q8k_matches_llama_cpp_bit_for_bit() {
    let bytes = fixture("q-q8_K.bin");
    let mut r = Reader {
        bytes: &bytes,
        at: 0,
    };
    assert_eq!(r.take(4), b"SDQZ");
    assert_eq!(r.u32(), 1);
    assert_eq!(r.u32(), GGML_TYPE_Q8_K);
    let (rows, k, row_bytes) = (r.usize(), r.usize(), r.usize());
    assert_eq!(row_bytes, k / QK_K * 292);
    let x = r.f32s(rows * k);
    for (row, x) in x.chunks_exact(k).enumerate() {
        let expected = r.take(row_bytes);
        let mut out = zeroed_q8k(k / QK_K);
        quantize_row_q8k(x, &mut out);
        let ours: Vec<u8> = out.iter().flat_map(q8k_bytes).collect();
        assert_eq!(ours, expected, "row {row}");
    }
}

/// One SDMM file: llama.cpp's `W · X` for several batch sizes.
struct MatmulCase {
    n: usize,
    k: usize,
    w: Vec<u8>,
    x: Vec<f32>,
    outputs: Vec<(usize, Vec<f32>)>,
}

fn read_matmul(name: &str) -> MatmulCase {
    let bytes = fixture(name);
    let mut r = Reader {
        bytes: &bytes,
        at: 0,
    };
    assert_eq!(r.take(4), b"SDMM");
    assert_eq!(r.u32(), 1);
    assert_eq!(r.u32(), GGML_TYPE_Q4_K);
    let (n, k, m_max, n_cases, _threads) = (r.usize(), r.usize(), r.usize(), r.usize(), r.u32());
    assert_eq!(r.u32(), 1, "llama.cpp repacked this weight");
    let w_bytes = r.u64() as usize;
    let w = r.take(w_bytes).to_vec();
    let x = r.f32s(m_max * k);
    let outputs = (0..n_cases)
        .map(|_| {
            let m = r.usize();
            (m, r.f32s(m * n))
        })
        .collect();
    assert_eq!(r.at, bytes.len());
    MatmulCase {
        n,
        k,
        w,
        x,
        outputs,
    }
}

/// The bytes of `blocks` (plain old data: integers and f16s), writable.
fn bytes_of<B: Copy>(blocks: &mut [B]) -> &mut [u8] {
    // SAFETY: B is plain old data; the view covers exactly `blocks`.
    unsafe {
        std::slice::from_raw_parts_mut(
            blocks.as_mut_ptr().cast::<u8>(),
            std::mem::size_of_val(blocks),
        )
    }
}

/// The weight bytes of `case` in an aligned buffer of blocks `B`.
fn weights_as<B: Copy>(case: &MatmulCase, zero: B) -> Vec<B> {
    let mut blocks = vec![zero; case.w.len() / std::mem::size_of::<B>()];
    bytes_of(&mut blocks).copy_from_slice(&case.w);
    blocks
}

/// The repacked weights of a GGUF-layout Q4_K matrix.
fn repacked(case: &MatmulCase) -> Vec<BlockQ4Kx8> {
    let zero = BlockQ4Kx8 {
        d: [Default::default(); 8],
        dmin: [Default::default(); 8],
        scales: [0; 96],
        qs: [0; 1024],
    };
    let mut blocks = weights_as(case, zero);
    repack_q4k_x8_in_place(bytes_of(&mut blocks), case.n, case.k).unwrap();
    blocks
}

/// The weights as the GGUF file stores them.
fn gguf_blocks(case: &MatmulCase) -> Vec<BlockQ4K> {
    let zero = BlockQ4K {
        d: Default::default(),
        dmin: Default::default(),
        scales: [0; 12],
        qs: [0; 128],
    };
    weights_as(case, zero)
}

/// The weights in one of the two layouts the model multiplies.
enum Weights<'a> {
    /// As the file stores them (the model's first products, before the background repack).
    Gguf(&'a [BlockQ4K]),
    /// Repacked as llama.cpp does.
    Repacked(&'a [BlockQ4Kx8]),
}

/// llama.cpp's split: rows `0 .. m - m % 4` through the 4-row quantizer and the gemm, the rest
/// through the row quantizer and the gemv.
fn matmul(level: SimdLevel, w: &Weights, n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    let nb = k / QK_K;
    let tiled = m - m % 4;
    let mut out = vec![f32::NAN; m * n];
    let mut act4 = zeroed_q8k_x4(tiled / 4 * nb);
    for (rows, a) in x[..tiled * k]
        .chunks_exact(4 * k)
        .zip(act4.chunks_exact_mut(nb))
    {
        quantize_rows_q8k_x4(level, rows, k, a);
    }
    match w {
        Weights::Gguf(w) => gemm_q4k(level, k, w, &act4, tiled, &mut out, n),
        Weights::Repacked(w) => gemm_q4k_x8(level, k, w, &act4, tiled, &mut out, n),
    }
    for r in tiled..m {
        let mut act = zeroed_q8k(nb);
        quantize_row_q8k(&x[r * k..(r + 1) * k], &mut act);
        let dst = &mut out[r * n..(r + 1) * n];
        match w {
            Weights::Gguf(w) => gemv_q4k(level, k, w, &act, dst),
            Weights::Repacked(w) => gemv_q4k_x8(level, k, w, &act, dst),
        }
    }
    out
}

fn assert_matmul_matches(name: &str) {
    let case = read_matmul(name);
    let (packed, gguf) = (repacked(&case), gguf_blocks(&case));
    let layouts = [
        ("repacked", Weights::Repacked(&packed)),
        ("gguf", Weights::Gguf(&gguf)),
    ];
    for level in levels() {
        for (layout, w) in &layouts {
            for (m, expected) in &case.outputs {
                let ours = matmul(level, w, case.n, case.k, &case.x, *m);
                for (i, (a, b)) in ours.iter().zip(expected).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{name} {} {layout} m={m}: token {} row {}: {a} vs llama.cpp {b}",
                        level.name(),
                        i / case.n,
                        i % case.n
                    );
                }
            }
        }
    }
}

#[test]
fn q4k_matmul_matches_llama_cpp_bit_for_bit_k512() {
    assert_matmul_matches("mm-q4_K-n64-k512.bin");
}

#[test]
fn q4k_matmul_matches_llama_cpp_bit_for_bit_k1536() {
    assert_matmul_matches("mm-q4_K-n64-k1536.bin");
}

/// The same token gives different bits through the gemm (batch of 4+) and the gemv (leftover
/// rows), in llama.cpp as here: check that the fixture shows it, so nobody "fixes" it.
#[test]
fn gemm_and_gemv_rows_differ_in_llama_cpp_too() {
    let case = read_matmul("mm-q4_K-n64-k512.bin");
    let by_m = |m: usize| &case.outputs.iter().find(|(mm, _)| *mm == m).unwrap().1;
    let (gemv_m1, gemm_m4) = (by_m(1), by_m(4));
    let n = case.n;
    let differing = (0..n)
        .filter(|&j| gemv_m1[j].to_bits() != gemm_m4[j].to_bits())
        .count();
    assert!(
        differing > 0,
        "token 0: gemv (m=1) and gemm (m=4) agree everywhere"
    );
    for j in 0..n {
        let (a, b) = (gemv_m1[j], gemm_m4[j]);
        assert!(
            (a - b).abs() <= 1e-4 * a.abs().max(b.abs()) + 1e-6,
            "row {j}: {a} vs {b}"
        );
    }
}
