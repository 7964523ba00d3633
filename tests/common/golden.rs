//! Readers for llama.cpp's kernel golden vectors in tests/fixtures/kernels/ (format in its
//! README.md).

use std::path::PathBuf;

/// The bytes of a file in tests/fixtures/kernels/.
pub fn kernel_fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kernels")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A little-endian cursor over a fixture.
pub struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    /// A cursor at the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        out
    }

    /// The next u32 as a usize.
    pub fn usize(&mut self) -> usize {
        u32::from_le_bytes(self.take(4).try_into().unwrap()) as usize
    }

    /// The next u64 as a usize.
    pub fn u64(&mut self) -> usize {
        u64::from_le_bytes(self.take(8).try_into().unwrap()) as usize
    }

    /// The next `n` f32s.
    pub fn f32s(&mut self, n: usize) -> Vec<f32> {
        self.take(4 * n)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    /// Whether every byte has been read.
    pub fn at_end(&self) -> bool {
        self.at == self.bytes.len()
    }
}

/// An `SDMM` file: llama.cpp's `W · X` for several batch sizes.
pub struct Matmul {
    /// ggml type of W.
    pub wtype: usize,
    /// Rows of W.
    pub n: usize,
    /// Columns of W.
    pub k: usize,
    /// Whether llama.cpp repacked W.
    pub repacked: bool,
    /// W in GGUF layout.
    pub w: Vec<u8>,
    /// Activation rows, `m_max × k`.
    pub x: Vec<f32>,
    /// `(m, Y)` with `Y[j][i]` = row i of W · row j of X, `m × n`.
    pub outputs: Vec<(usize, Vec<f32>)>,
}

/// Reads an `SDMM` file.
pub fn read_matmul(name: &str) -> Matmul {
    let bytes = kernel_fixture(name);
    let mut r = Reader::new(&bytes);
    assert_eq!(r.take(4), b"SDMM");
    assert_eq!(r.usize(), 1);
    let (wtype, n, k, m_max, n_cases, _threads) = (
        r.usize(),
        r.usize(),
        r.usize(),
        r.usize(),
        r.usize(),
        r.usize(),
    );
    let repacked = r.usize() == 1;
    let w_bytes = r.u64();
    let w = r.take(w_bytes).to_vec();
    let x = r.f32s(m_max * k);
    let outputs = (0..n_cases)
        .map(|_| {
            let m = r.usize();
            (m, r.f32s(m * n))
        })
        .collect();
    assert!(r.at_end());
    Matmul {
        wtype,
        n,
        k,
        repacked,
        w,
        x,
        outputs,
    }
}

/// An `SDQZ` file: rows of activations and llama.cpp's quantized blocks of each.
pub struct Quantized {
    /// ggml type of the blocks.
    pub qtype: usize,
    /// Values per row.
    pub k: usize,
    /// `(row, blocks of that row as bytes)`.
    pub rows: Vec<(Vec<f32>, Vec<u8>)>,
}

/// Reads an `SDQZ` file.
pub fn read_quantized(name: &str) -> Quantized {
    let bytes = kernel_fixture(name);
    let mut r = Reader::new(&bytes);
    assert_eq!(r.take(4), b"SDQZ");
    assert_eq!(r.usize(), 1);
    let (qtype, rows, k, row_bytes) = (r.usize(), r.usize(), r.usize(), r.usize());
    let x = r.f32s(rows * k);
    let rows = x
        .chunks_exact(k)
        .map(|row| (row.to_vec(), r.take(row_bytes).to_vec()))
        .collect();
    assert!(r.at_end());
    Quantized { qtype, k, rows }
}
