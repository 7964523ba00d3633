//! A bounded, validating reader for GGUF files.
//!
//! Every count and length read from the file is checked against the bytes that are actually left
//! in the file (and against fixed sanity limits) before anything is allocated, so a corrupt or
//! hostile file yields an [`EngineError`] instead of an abort, a panic or a huge allocation.
//! After the header is read, the tensor directory is checked as a whole: known types, sizes that
//! match the shapes, aligned offsets, data inside the file, no two tensors sharing bytes.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, ErrorKind, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Shape};

use super::error::EngineError;

/// The four magic bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Default tensor data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Largest tensor rank GGUF allows.
pub const MAX_DIMS: u32 = 4;
/// Longest string (key, value or tensor name) accepted, in bytes.
pub const MAX_STRING_LEN: u64 = 64 << 20;
/// Most elements accepted in one metadata array (real vocabularies have a few hundred thousand).
pub const MAX_ARRAY_LEN: u64 = 1 << 22;
/// Most array elements accepted over all metadata, which bounds the memory the metadata takes.
pub const MAX_TOTAL_ARRAY_ELEMENTS: u64 = 1 << 24;
/// Most bytes of text (metadata keys and strings, tensor names) accepted over the whole header.
/// A 150k-token vocabulary with its merges is about 10 MB; SmolLM3-3B's header is under 8 MB.
pub const MAX_TOTAL_STRING_BYTES: u64 = 256 << 20;
/// Most tensors accepted in one file. SmolLM3-3B has 326; the largest llama.cpp models (405B
/// dense, DeepSeek and Qwen mixtures of experts) have a few thousand at most.
pub const MAX_TENSORS: u64 = 65_536;
/// Most tensor entries reserved for before they are read (the directory grows past it).
const TENSOR_RESERVATION: usize = 4096;
/// Largest `general.alignment` accepted.
const MAX_ALIGNMENT: u64 = 1 << 20;
/// Smallest possible metadata entry: key length, empty key, value type, one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest possible tensor entry: name length, rank, one dimension, type, offset.
const MIN_TENSOR_ENTRY_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// One metadata value of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// GGUF type 0.
    U8(u8),
    /// GGUF type 1.
    I8(i8),
    /// GGUF type 2.
    U16(u16),
    /// GGUF type 3.
    I16(i16),
    /// GGUF type 4.
    U32(u32),
    /// GGUF type 5.
    I32(i32),
    /// GGUF type 6.
    F32(f32),
    /// GGUF type 7.
    Bool(bool),
    /// GGUF type 8.
    String(String),
    /// GGUF type 9 (elements share one type).
    Array(Vec<MetaValue>),
    /// GGUF type 10.
    U64(u64),
    /// GGUF type 11.
    I64(i64),
    /// GGUF type 12.
    F64(f64),
}

impl MetaValue {
    /// The value as an unsigned integer, if it is any integer type that is non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            MetaValue::Bool(v) => Some(v.into()),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is any integer type that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, if it is a float or an integer.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a boolean, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF type id of the value (0 to 12).
    pub fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::String(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    /// A short name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::F32(_) => "f32",
            MetaValue::Bool(_) => "bool",
            MetaValue::String(_) => "string",
            MetaValue::Array(_) => "array",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F64(_) => "f64",
        }
    }
}

/// Where one tensor lives in a GGUF file and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in GGUF order: the first is the fastest-varying (columns).
    pub dims: Vec<u64>,
    /// Storage type of the elements.
    pub dtype: GgmlDType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Size of the data in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elem_count(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Shape in candle's (row-major) order, i.e. GGUF dimensions reversed.
    pub fn shape(&self) -> Shape {
        let dims: Vec<usize> = self.dims.iter().rev().map(|&d| d as usize).collect();
        Shape::from(dims)
    }

    /// Absolute offset one past the last byte of the data.
    pub fn end(&self) -> u64 {
        self.offset + self.n_bytes
    }
}

/// A parsed GGUF header: metadata and tensor directory, with the tensor data left on disk.
#[derive(Debug, Clone)]
pub struct GgufFile {
    /// Path the file was opened from.
    pub path: PathBuf,
    /// Total size of the file in bytes.
    pub file_size: u64,
    /// GGUF format version (2 or 3).
    pub version: u32,
    /// All metadata key/value pairs.
    pub metadata: BTreeMap<String, MetaValue>,
    /// Tensor directory in file order.
    pub tensors: Vec<TensorInfo>,
    /// Position in [`GgufFile::tensors`] of each tensor name, built once when the file is
    /// parsed so [`GgufFile::tensor_info`] finds a tensor without a scan. May be left empty
    /// (or be out of date) for a hand-built value: lookups then fall back to a scan.
    pub tensor_index: HashMap<String, usize>,
    /// Alignment of the tensor data (from `general.alignment`, default 32).
    pub alignment: u64,
    /// Absolute offset where tensor data begins.
    pub data_offset: u64,
}

/// Maps a GGUF type id to candle's quantization type.
pub fn ggml_dtype_from_id(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// The GGUF type id of a quantization type (the inverse of [`ggml_dtype_from_id`]).
pub fn ggml_dtype_id(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// A human name for a quantization type, as llama.cpp prints it (`Q4_K`, `F32`, …).
pub fn dtype_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// A label for any GGUF tensor type id, including the ones this engine cannot run
/// (`IQ4_XS (type 23)`), for error messages.
pub fn ggml_type_label(id: u32) -> String {
    if let Some(dtype) = ggml_dtype_from_id(id) {
        return dtype_name(dtype).to_string();
    }
    let name = match id {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return format!("unknown type {id}"),
    };
    format!("{name} (type {id})")
}

/// The name llama.cpp gives a `general.file_type` value (`Q4_K_M` for 15).
pub fn file_type_name(file_type: u64) -> Option<&'static str> {
    Some(match file_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        _ => return None,
    })
}

/// Bytes a tensor of this type and GGUF-order shape occupies, after checking that the shape is
/// usable (1 to 4 non-zero dimensions, rows made of whole blocks, no overflow).
pub fn tensor_byte_size(dims: &[u64], dtype: GgmlDType) -> Result<u64, String> {
    if dims.is_empty() || dims.len() > MAX_DIMS as usize {
        return Err(format!(
            "it has {} dimensions (between 1 and {MAX_DIMS} are allowed)",
            dims.len()
        ));
    }
    if dims.contains(&0) {
        return Err(format!("its shape {dims:?} contains a zero"));
    }
    let elem_count = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("its shape {dims:?} is impossibly large"))?;
    let block = dtype.block_size() as u64;
    if !dims[0].is_multiple_of(block) {
        return Err(format!(
            "its row length {} is not a multiple of the {} block size {block}",
            dims[0],
            dtype_name(dtype)
        ));
    }
    (elem_count / block)
        .checked_mul(dtype.type_size() as u64)
        .ok_or_else(|| format!("its shape {dims:?} is impossibly large"))
}

/// What the reader was reading when it failed, for error messages (formatted only on error).
#[derive(Debug, Clone, Copy)]
enum Reading<'a> {
    /// A fixed description.
    Label(&'static str),
    /// The type of a metadata value.
    TypeOf(&'a str),
    /// A metadata value.
    ValueOf(&'a str),
    /// The header of a metadata array.
    ArrayOf(&'a str),
    /// A tensor directory entry.
    EntryOf(&'a str),
}

impl std::fmt::Display for Reading<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Label(label) => f.write_str(label),
            Self::TypeOf(key) => write!(f, "the type of the metadata entry {key}"),
            Self::ValueOf(key) => write!(f, "the value of the metadata entry {key}"),
            Self::ArrayOf(key) => write!(f, "the array {key}"),
            Self::EntryOf(name) => write!(f, "the directory entry of tensor {name}"),
        }
    }
}

/// A reader that knows how many bytes remain, so lengths can be checked before allocating.
struct BoundedReader<'p, R> {
    inner: R,
    path: &'p Path,
    pos: u64,
    len: u64,
    /// Array elements read so far, bounded by [`MAX_TOTAL_ARRAY_ELEMENTS`].
    array_elements: u64,
    /// Bytes of strings read so far, bounded by [`MAX_TOTAL_STRING_BYTES`].
    string_bytes: u64,
}

impl<'p, R: Read> BoundedReader<'p, R> {
    fn new(inner: R, len: u64, path: &'p Path) -> Self {
        Self {
            inner,
            path,
            pos: 0,
            len,
            array_elements: 0,
            string_bytes: 0,
        }
    }

    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn truncated(&self, what: Reading<'_>) -> EngineError {
        EngineError::Truncated {
            what: what.to_string(),
            offset: self.len.min(self.pos),
        }
    }

    /// Fills `buf` completely, or fails with a truncation error that names `what`.
    fn fill(&mut self, buf: &mut [u8], what: Reading<'_>) -> Result<(), EngineError> {
        if self.remaining() < buf.len() as u64 {
            self.pos = self.len;
            return Err(self.truncated(what));
        }
        match self.inner.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(err) if err.kind() == ErrorKind::UnexpectedEof => Err(self.truncated(what)),
            Err(err) => Err(EngineError::Io {
                path: self.path.to_path_buf(),
                source: err,
            }),
        }
    }

    fn bytes<const N: usize>(&mut self, what: Reading<'_>) -> Result<[u8; N], EngineError> {
        let mut buf = [0u8; N];
        self.fill(&mut buf, what)?;
        Ok(buf)
    }

    fn u32(&mut self, what: Reading<'_>) -> Result<u32, EngineError> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: Reading<'_>) -> Result<u64, EngineError> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    /// Checks that `count` items of at least `min_item_bytes` each can still fit in the file.
    fn check_count(
        &self,
        what: Reading<'_>,
        count: u64,
        min_item_bytes: u64,
    ) -> Result<(), EngineError> {
        let needed = count.saturating_mul(min_item_bytes.max(1));
        if needed > self.remaining() {
            return Err(EngineError::ImplausibleCount {
                what: what.to_string(),
                count,
                offset: self.pos,
                remaining: self.remaining(),
            });
        }
        Ok(())
    }

    fn string(&mut self, what: Reading<'_>) -> Result<String, EngineError> {
        let len = self.u64(what)?;
        check_limit(what, len, MAX_STRING_LEN)?;
        self.check_count(what, len, 1)?;
        let total = self.string_bytes.saturating_add(len);
        if total > MAX_TOTAL_STRING_BYTES {
            return Err(EngineError::MetadataTooLarge {
                bytes: total,
                limit: MAX_TOTAL_STRING_BYTES,
            });
        }
        self.string_bytes = total;
        let mut buf = vec![0u8; len as usize];
        self.fill(&mut buf, what)?;
        String::from_utf8(buf).map_err(|_| EngineError::InvalidUtf8 {
            what: what.to_string(),
        })
    }

    fn value(&mut self, type_id: u32, key: &str) -> Result<MetaValue, EngineError> {
        let what = Reading::ValueOf(key);
        Ok(match type_id {
            0 => MetaValue::U8(u8::from_le_bytes(self.bytes(what)?)),
            1 => MetaValue::I8(i8::from_le_bytes(self.bytes(what)?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.bytes(what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.bytes(what)?)),
            4 => MetaValue::U32(self.u32(what)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.bytes(what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.bytes(what)?)),
            7 => MetaValue::Bool(self.bytes::<1>(what)? != [0]),
            8 => MetaValue::String(self.string(what)?),
            9 => MetaValue::Array(self.array(key)?),
            10 => MetaValue::U64(self.u64(what)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.bytes(what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.bytes(what)?)),
            other => {
                return Err(EngineError::InvalidMetadata {
                    key: key.to_string(),
                    reason: format!("its value type {other} is not a GGUF type"),
                });
            }
        })
    }

    fn array(&mut self, key: &str) -> Result<Vec<MetaValue>, EngineError> {
        let what = Reading::ArrayOf(key);
        let elem_type = self.u32(what)?;
        let count = self.u64(what)?;
        let min_size = match elem_type {
            9 => {
                return Err(EngineError::InvalidMetadata {
                    key: key.to_string(),
                    reason: "arrays of arrays are not supported".into(),
                });
            }
            other => min_value_size(other).ok_or_else(|| EngineError::InvalidMetadata {
                key: key.to_string(),
                reason: format!("its element type {other} is not a GGUF type"),
            })?,
        };
        check_limit(what, count, MAX_ARRAY_LEN)?;
        self.check_count(what, count, min_size)?;
        self.array_elements = self.array_elements.saturating_add(count);
        check_limit(
            Reading::Label("the metadata arrays (all together)"),
            self.array_elements,
            MAX_TOTAL_ARRAY_ELEMENTS,
        )?;
        let mut items = Vec::with_capacity(count as usize);
        for _ in 0..count {
            items.push(self.value(elem_type, key)?);
        }
        Ok(items)
    }
}

fn check_limit(what: Reading<'_>, count: u64, limit: u64) -> Result<(), EngineError> {
    if count > limit {
        return Err(EngineError::LimitExceeded {
            what: what.to_string(),
            count,
            limit,
        });
    }
    Ok(())
}

/// The smallest number of bytes one value of a GGUF type (other than an array) can occupy.
fn min_value_size(type_id: u32) -> Option<u64> {
    Some(match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        _ => return None,
    })
}

/// A tensor directory entry as read, before its type and placement are checked.
struct RawTensor {
    name: String,
    dims: Vec<u64>,
    type_id: u32,
    rel_offset: u64,
}

impl GgufFile {
    /// Opens and parses the header of a GGUF file, validating its structure.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, EngineError> {
        let path = path.as_ref();
        let io_err = |source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let metadata = file.metadata().map_err(io_err)?;
        if metadata.is_dir() {
            return Err(io_err(std::io::Error::new(
                ErrorKind::IsADirectory,
                "it is a folder, not a file",
            )));
        }
        Self::read(
            BufReader::with_capacity(1 << 20, file),
            metadata.len(),
            path,
        )
    }

    /// Parses a GGUF header from any reader of `file_size` bytes.
    pub fn read<R: Read>(reader: R, file_size: u64, path: &Path) -> Result<Self, EngineError> {
        let mut r = BoundedReader::new(reader, file_size, path);
        let version = read_preamble(&mut r)?;
        let n_tensors = r.u64(Reading::Label("the tensor count"))?;
        let n_kv = r.u64(Reading::Label("the metadata count"))?;
        r.check_count(Reading::Label("the metadata count"), n_kv, MIN_KV_BYTES)?;
        r.check_count(
            Reading::Label("the tensor count"),
            n_tensors,
            MIN_TENSOR_ENTRY_BYTES,
        )?;
        let needed = (n_kv * MIN_KV_BYTES).saturating_add(n_tensors * MIN_TENSOR_ENTRY_BYTES);
        r.check_count(Reading::Label("the metadata and tensor counts"), needed, 1)?;
        check_limit(
            Reading::Label("the tensor directory"),
            n_tensors,
            MAX_TENSORS,
        )?;

        let metadata = read_metadata(&mut r, n_kv)?;
        let (raw_tensors, tensor_index) = read_tensor_directory(&mut r, n_tensors)?;
        let alignment = read_alignment(&metadata)?;
        let data_offset = r.pos.div_ceil(alignment) * alignment;
        let tensors = raw_tensors
            .into_iter()
            .map(|raw| resolve_tensor(raw, data_offset, alignment, file_size))
            .collect::<Result<Vec<_>, _>>()?;
        check_no_overlap(&tensors)?;

        Ok(Self {
            path: path.to_path_buf(),
            file_size,
            version,
            metadata,
            tensors,
            tensor_index,
            alignment,
            data_offset,
        })
    }

    /// The value of a metadata key, if present.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// A required metadata key.
    pub fn require(&self, key: &str) -> Result<&MetaValue, EngineError> {
        self.get(key)
            .ok_or_else(|| EngineError::MissingKey(key.to_string()))
    }

    /// A required string key.
    pub fn get_str(&self, key: &str) -> Result<&str, EngineError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| wrong_type(key, "a string", v))
    }

    /// A required unsigned integer key.
    pub fn get_u64(&self, key: &str) -> Result<u64, EngineError> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| wrong_type(key, "a non-negative integer", v))
    }

    /// A required float key (integers are accepted).
    pub fn get_f64(&self, key: &str) -> Result<f64, EngineError> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| wrong_type(key, "a number", v))
    }

    /// A required boolean key.
    pub fn get_bool(&self, key: &str) -> Result<bool, EngineError> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| wrong_type(key, "a boolean", v))
    }

    /// A required array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, EngineError> {
        let v = self.require(key)?;
        let arr = v.as_array().ok_or_else(|| wrong_type(key, "an array", v))?;
        arr.iter()
            .map(|item| {
                item.as_str()
                    .ok_or_else(|| wrong_type(key, "strings", item))
            })
            .collect()
    }

    /// A required array of integers.
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>, EngineError> {
        let v = self.require(key)?;
        let arr = v.as_array().ok_or_else(|| wrong_type(key, "an array", v))?;
        arr.iter()
            .map(|item| {
                item.as_i64()
                    .ok_or_else(|| wrong_type(key, "integers", item))
            })
            .collect()
    }

    /// A required array of numbers (integers are accepted).
    pub fn get_f64_array(&self, key: &str) -> Result<Vec<f64>, EngineError> {
        let v = self.require(key)?;
        let arr = v.as_array().ok_or_else(|| wrong_type(key, "an array", v))?;
        arr.iter()
            .map(|item| {
                item.as_f64()
                    .ok_or_else(|| wrong_type(key, "numbers", item))
            })
            .collect()
    }

    /// The tensor directory entry with this name (names are unique: the parser rejects a
    /// repeated one).
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        if let Some(t) = self
            .tensor_index
            .get(name)
            .and_then(|&i| self.tensors.get(i))
            && t.name == name
        {
            return Some(t);
        }
        // A name that is absent (a few optional tensors per load), or a hand-built or edited
        // value whose index does not match its directory.
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Reads one tensor's data from `file` into a (still quantized) candle tensor.
    ///
    /// `scratch` is reused across calls to avoid a fresh allocation per tensor. The file may have
    /// changed since it was opened: a short read is reported as [`EngineError::Truncated`].
    pub fn load_qtensor(
        &self,
        file: &mut File,
        info: &TensorInfo,
        scratch: &mut Vec<u64>,
    ) -> Result<QTensor, EngineError> {
        // The size was checked against the file when the directory was read, so this allocation
        // is bounded by the file's size.
        let n_bytes = usize::try_from(info.n_bytes).map_err(|_| EngineError::BadTensor {
            name: info.name.clone(),
            reason: "it is too large for this computer's memory".into(),
        })?;
        // u64 words keep the buffer 8-byte aligned, which candle needs to view it as blocks.
        scratch.clear();
        scratch.resize(n_bytes.div_ceil(8), 0);
        // SAFETY: the u64 buffer holds at least n_bytes bytes and any bit pattern is a valid u8.
        let bytes: &mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(scratch.as_mut_ptr().cast::<u8>(), n_bytes) };
        let io_err = |source| EngineError::Io {
            path: self.path.clone(),
            source,
        };
        file.seek(SeekFrom::Start(info.offset)).map_err(io_err)?;
        file.read_exact(bytes).map_err(|err| {
            if err.kind() == ErrorKind::UnexpectedEof {
                EngineError::Truncated {
                    what: format!("the data of tensor {}", info.name),
                    offset: info.offset,
                }
            } else {
                io_err(err)
            }
        })?;
        let storage =
            QStorage::from_data(std::borrow::Cow::Borrowed(bytes), &Device::Cpu, info.dtype)?;
        Ok(QTensor::new(storage, info.shape())?)
    }
}

impl GgufFile {
    /// Opens the file for reading its tensors, after checking every tensor still lies inside
    /// it, so a file truncated since it was opened gives [`EngineError::Truncated`] here instead
    /// of a fault when mapped pages are read.
    pub fn open_data(&self) -> Result<File, EngineError> {
        let io_err = |source| EngineError::Io {
            path: self.path.clone(),
            source,
        };
        let file = File::open(&self.path).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        if let Some(t) = self.tensors.iter().find(|t| t.end() > len) {
            return Err(EngineError::Truncated {
                what: format!("the data of tensor {}", t.name),
                offset: t.offset,
            });
        }
        Ok(file)
    }

    /// Maps the file read-only and shared (pages come from the page cache, no copy), after the
    /// checks of [`GgufFile::open_data`].
    pub fn map_shared(&self) -> Result<memmap2::Mmap, EngineError> {
        let file = self.open_data()?;
        // SAFETY: the mapping is read-only; a file changed by another program while mapped is
        // outside what any reader can guard against.
        unsafe { memmap2::Mmap::map(&file) }.map_err(|source| EngineError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// The byte range of `info`'s data in a mapping of `map_len` bytes.
    pub fn mapped_range(
        &self,
        info: &TensorInfo,
        map_len: usize,
    ) -> Result<std::ops::Range<usize>, EngineError> {
        let truncated = || EngineError::Truncated {
            what: format!("the data of tensor {}", info.name),
            offset: info.offset,
        };
        let start = usize::try_from(info.offset).map_err(|_| truncated())?;
        let end = usize::try_from(info.end()).map_err(|_| truncated())?;
        if end > map_len {
            return Err(truncated());
        }
        Ok(start..end)
    }
}

/// Reads the magic and the version, recognising the common ways a file is not a GGUF.
fn read_preamble<R: Read>(r: &mut BoundedReader<'_, R>) -> Result<u32, EngineError> {
    let path = r.path;
    let not_gguf = || EngineError::NotGguf {
        path: path.to_path_buf(),
    };
    let magic: [u8; 4] = r
        .bytes(Reading::Label("the magic"))
        .map_err(|_| not_gguf())?;
    if magic != GGUF_MAGIC {
        return Err(not_gguf());
    }
    let version = r.u32(Reading::Label("the version"))?;
    if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
        return Err(EngineError::UnsupportedModel(
            "the big-endian GGUF layout (made for IBM mainframes)".into(),
        ));
    }
    if !(2..=3).contains(&version) {
        return Err(EngineError::UnsupportedVersion(version));
    }
    Ok(version)
}

fn read_metadata<R: Read>(
    r: &mut BoundedReader<'_, R>,
    n_kv: u64,
) -> Result<BTreeMap<String, MetaValue>, EngineError> {
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = r.string(Reading::Label("a metadata key"))?;
        let type_id = r.u32(Reading::TypeOf(&key))?;
        let value = r.value(type_id, &key)?;
        if metadata.contains_key(&key) {
            return Err(EngineError::DuplicateKey(key));
        }
        metadata.insert(key, value);
    }
    Ok(metadata)
}

/// Reads the tensor directory: its entries in file order, and the position of each name.
fn read_tensor_directory<R: Read>(
    r: &mut BoundedReader<'_, R>,
    n_tensors: u64,
) -> Result<(Vec<RawTensor>, HashMap<String, usize>), EngineError> {
    // The count was checked against MAX_TENSORS and the bytes left; the reservation is capped
    // further so a header that lies about its count costs little before it is caught.
    let reserve = usize::try_from(n_tensors)
        .unwrap_or(usize::MAX)
        .min(TENSOR_RESERVATION);
    let mut raw_tensors = Vec::with_capacity(reserve);
    let mut names = HashMap::with_capacity(reserve);
    for _ in 0..n_tensors {
        let name = r.string(Reading::Label("a tensor name"))?;
        let what = Reading::EntryOf(&name);
        let n_dims = r.u32(what)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(EngineError::BadTensor {
                name,
                reason: format!(
                    "it has {n_dims} dimensions (between 1 and {MAX_DIMS} are allowed)"
                ),
            });
        }
        let dims = (0..n_dims)
            .map(|_| r.u64(what))
            .collect::<Result<Vec<_>, _>>()?;
        let type_id = r.u32(what)?;
        let rel_offset = r.u64(what)?;
        if names.contains_key(&name) {
            return Err(EngineError::DuplicateTensor(name));
        }
        names.insert(name.clone(), raw_tensors.len());
        raw_tensors.push(RawTensor {
            name,
            dims,
            type_id,
            rel_offset,
        });
    }
    Ok((raw_tensors, names))
}

fn read_alignment(metadata: &BTreeMap<String, MetaValue>) -> Result<u64, EngineError> {
    let Some(v) = metadata.get("general.alignment") else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    match v.as_u64() {
        Some(a) if a.is_power_of_two() && a <= MAX_ALIGNMENT => Ok(a),
        _ => Err(EngineError::InvalidMetadata {
            key: "general.alignment".into(),
            reason: format!("{v:?} is not a power of two up to {MAX_ALIGNMENT}"),
        }),
    }
}

/// Checks one directory entry's type, shape and placement, and resolves its absolute offset.
fn resolve_tensor(
    raw: RawTensor,
    data_offset: u64,
    alignment: u64,
    file_size: u64,
) -> Result<TensorInfo, EngineError> {
    let RawTensor {
        name,
        dims,
        type_id,
        rel_offset,
    } = raw;
    let Some(dtype) = ggml_dtype_from_id(type_id) else {
        return Err(EngineError::UnknownQuantization { name, type_id });
    };
    let n_bytes = match tensor_byte_size(&dims, dtype) {
        Ok(n) => n,
        Err(reason) => return Err(EngineError::BadTensor { name, reason }),
    };
    if !rel_offset.is_multiple_of(alignment) {
        return Err(EngineError::MisalignedTensor {
            name,
            offset: rel_offset,
            alignment,
        });
    }
    let end = data_offset
        .checked_add(rel_offset)
        .and_then(|start| start.checked_add(n_bytes));
    match end {
        Some(end) if end <= file_size => Ok(TensorInfo {
            name,
            dims,
            dtype,
            offset: data_offset + rel_offset,
            n_bytes,
        }),
        _ => Err(EngineError::Truncated {
            what: format!("the data of tensor {name}"),
            offset: file_size,
        }),
    }
}

/// Fails if the data of any two tensors share a byte.
fn check_no_overlap(tensors: &[TensorInfo]) -> Result<(), EngineError> {
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
    by_offset.sort_by_key(|t| t.offset);
    for pair in by_offset.windows(2) {
        if let [first, second] = pair
            && first.end() > second.offset
        {
            return Err(EngineError::OverlappingTensors {
                first: first.name.clone(),
                second: second.name.clone(),
            });
        }
    }
    Ok(())
}

fn wrong_type(key: &str, expected: &str, found: &MetaValue) -> EngineError {
    EngineError::InvalidMetadata {
        key: key.to_string(),
        reason: format!("expected {expected}, found {}", found.type_name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::synth::GgufEncoder;

    fn parse(bytes: &[u8]) -> Result<GgufFile, EngineError> {
        GgufFile::read(bytes, bytes.len() as u64, Path::new("test.gguf"))
    }

    /// A header with the given metadata and tensor entries `(name, dims, type id, offset)`,
    /// followed by `data_len` zero bytes of tensor data.
    fn file_with(
        metadata: &[(&str, MetaValue)],
        tensors: &[(&str, &[u64], u32, u64)],
        data_len: usize,
    ) -> Vec<u8> {
        let mut enc = GgufEncoder::new(Vec::new());
        enc.header(3, tensors.len() as u64, metadata.len() as u64)
            .unwrap();
        for (key, value) in metadata {
            enc.key_value(key, value).unwrap();
        }
        for (name, dims, type_id, offset) in tensors {
            enc.tensor_entry(name, dims, *type_id, *offset).unwrap();
        }
        enc.pad_to(DEFAULT_ALIGNMENT).unwrap();
        let mut bytes = enc.into_inner();
        bytes.resize(bytes.len() + data_len, 0);
        bytes
    }

    #[test]
    fn parses_metadata_of_every_type() {
        let metadata = [
            ("a.u8", MetaValue::U8(7)),
            ("a.i8", MetaValue::I8(-7)),
            ("a.u16", MetaValue::U16(700)),
            ("a.i16", MetaValue::I16(-700)),
            ("a.u32", MetaValue::U32(70_000)),
            ("a.i32", MetaValue::I32(-70_000)),
            ("a.f32", MetaValue::F32(1.5)),
            ("a.bool", MetaValue::Bool(true)),
            ("a.str", MetaValue::String("héllo".into())),
            (
                "a.arr",
                MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(-2)]),
            ),
            ("a.u64", MetaValue::U64(1 << 40)),
            ("a.i64", MetaValue::I64(-(1 << 40))),
            ("a.f64", MetaValue::F64(-2.25)),
        ];
        let file = parse(&file_with(&metadata, &[], 0)).unwrap();
        for (key, value) in &metadata {
            assert_eq!(file.get(key), Some(value), "{key}");
        }
        assert_eq!(file.get_i64_array("a.arr").unwrap(), vec![1, -2]);
        assert_eq!(file.get_u64("a.i32").ok(), None);
        assert!(file.get_bool("a.bool").unwrap());
    }

    #[test]
    fn rejects_wrong_magic_and_version() {
        assert!(matches!(parse(b"GGU"), Err(EngineError::NotGguf { .. })));
        assert!(matches!(
            parse(b"<html><body>Not found</body></html>"),
            Err(EngineError::NotGguf { .. })
        ));
        let mut v1 = file_with(&[], &[], 0);
        v1[4] = 1;
        assert!(matches!(
            parse(&v1),
            Err(EngineError::UnsupportedVersion(1))
        ));
        let mut big_endian = file_with(&[], &[], 0);
        big_endian[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert!(matches!(
            parse(&big_endian),
            Err(EngineError::UnsupportedModel(_))
        ));
    }

    #[test]
    fn rejects_absurd_counts_before_allocating() {
        let mut enc = GgufEncoder::new(Vec::new());
        enc.header(3, u64::MAX / 2, 1).unwrap();
        assert!(matches!(
            parse(&enc.into_inner()),
            Err(EngineError::ImplausibleCount { .. })
        ));

        let mut enc = GgufEncoder::new(Vec::new());
        enc.header(3, 0, 1).unwrap();
        enc.string("big").unwrap();
        enc.u32(9).unwrap();
        enc.u32(0).unwrap();
        enc.u64(1 << 40).unwrap();
        assert!(matches!(
            parse(&enc.into_inner()),
            Err(EngineError::LimitExceeded { .. })
        ));

        let mut enc = GgufEncoder::new(Vec::new());
        enc.header(3, 0, 1).unwrap();
        enc.u64(u64::MAX).unwrap();
        enc.raw(&[0; 32]).unwrap();
        assert!(matches!(
            parse(&enc.into_inner()),
            Err(EngineError::LimitExceeded { .. })
        ));
    }

    #[test]
    fn a_tensor_count_past_the_limit_is_refused_even_when_the_file_could_hold_it() {
        // Enough bytes for every claimed entry, so only the fixed limit can refuse it.
        let claimed = MAX_TENSORS + 1;
        let mut enc = GgufEncoder::new(Vec::new());
        enc.header(3, claimed, 0).unwrap();
        let mut bytes = enc.into_inner();
        bytes.resize(bytes.len() + (claimed * MIN_TENSOR_ENTRY_BYTES) as usize, 0);
        match parse(&bytes) {
            Err(EngineError::LimitExceeded { count, limit, .. }) => {
                assert_eq!((count, limit), (claimed, MAX_TENSORS));
            }
            other => panic!("{other:?}"),
        }
    }

    /// A reader of a GGUF header with `n` metadata strings of `len` bytes each, made on the
    /// fly so the test holds no more than the parser keeps.
    struct ManyStrings {
        header: std::io::Cursor<Vec<u8>>,
        entry: usize,
        n: usize,
        len: usize,
        pos: usize,
    }

    impl ManyStrings {
        /// One entry: key `k{i}` (2 bytes), type 8 (string), then the string's length.
        const ENTRY_HEAD: usize = 8 + 2 + 4 + 8;

        fn new(n: usize, len: usize) -> Self {
            let mut enc = GgufEncoder::new(Vec::new());
            enc.header(3, 0, n as u64).unwrap();
            Self {
                header: std::io::Cursor::new(enc.into_inner()),
                entry: 0,
                n,
                len,
                pos: 0,
            }
        }

        fn total_len(&self) -> u64 {
            self.header.get_ref().len() as u64 + (self.n * (Self::ENTRY_HEAD + self.len)) as u64
        }

        fn byte(&self) -> u8 {
            let mut head = Vec::with_capacity(Self::ENTRY_HEAD);
            head.extend_from_slice(&2u64.to_le_bytes());
            head.extend_from_slice(format!("k{}", self.entry % 10).as_bytes());
            head.extend_from_slice(&8u32.to_le_bytes());
            head.extend_from_slice(&(self.len as u64).to_le_bytes());
            head.get(self.pos).copied().unwrap_or(b'x')
        }
    }

    impl Read for ManyStrings {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.header.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            let mut written = 0;
            while written < buf.len() && self.entry < self.n {
                let entry_len = Self::ENTRY_HEAD + self.len;
                if self.pos >= Self::ENTRY_HEAD {
                    // The string's body: a run of `x`.
                    let run = (entry_len - self.pos).min(buf.len() - written);
                    buf[written..written + run].fill(b'x');
                    written += run;
                    self.pos += run;
                } else {
                    buf[written] = self.byte();
                    written += 1;
                    self.pos += 1;
                }
                if self.pos == entry_len {
                    self.entry += 1;
                    self.pos = 0;
                }
            }
            Ok(written)
        }
    }

    #[test]
    fn the_text_of_the_whole_header_is_bounded() {
        // Five strings of the longest length allowed each: more than the total allowed.
        let n = (MAX_TOTAL_STRING_BYTES / MAX_STRING_LEN) as usize + 1;
        let reader = ManyStrings::new(n, MAX_STRING_LEN as usize);
        let size = reader.total_len();
        match GgufFile::read(reader, size, Path::new("strings.gguf")) {
            Err(EngineError::MetadataTooLarge { bytes, limit }) => {
                assert_eq!(limit, MAX_TOTAL_STRING_BYTES);
                assert!(bytes > limit, "{bytes}");
            }
            other => panic!("{:?}", other.map(|f| f.metadata.len())),
        }
        // The same reader with fewer strings parses (the test reader itself is sound).
        let reader = ManyStrings::new(3, 16);
        let size = reader.total_len();
        let file = GgufFile::read(reader, size, Path::new("strings.gguf")).unwrap();
        assert_eq!(file.get_str("k1").unwrap(), "x".repeat(16));
    }

    #[test]
    fn tensors_are_found_by_name_through_the_index() {
        let bytes = file_with(&[], &[("a", &[8], 0, 0), ("b", &[8], 0, 32)], 64);
        let file = parse(&bytes).unwrap();
        assert_eq!(file.tensor_index.len(), 2);
        assert_eq!(file.tensor_info("b").unwrap().offset, file.data_offset + 32);
        assert!(file.tensor_info("c").is_none());
        // A value whose directory was edited after parsing still answers from the directory.
        let mut edited = file.clone();
        edited.tensors.swap(0, 1);
        edited.tensors[0].name = "c".into();
        assert_eq!(
            edited.tensor_info("c").unwrap().offset,
            file.data_offset + 32
        );
        assert_eq!(edited.tensor_info("a").unwrap().offset, file.data_offset);
        let mut unindexed = file.clone();
        unindexed.tensor_index.clear();
        assert_eq!(unindexed.tensor_info("b"), file.tensor_info("b"));
    }

    #[test]
    fn many_tensors_are_looked_up_in_linear_time() {
        // Every one of 30,000 tensors looked up 20 times: with a scan per lookup (9e9 name
        // comparisons) this took many seconds, with the index well under one.
        let n = 30_000u64;
        let names: Vec<String> = (0..n).map(|i| format!("t.{i}")).collect();
        let mut enc = GgufEncoder::new(Vec::new());
        enc.header(3, n, 0).unwrap();
        for (i, name) in names.iter().enumerate() {
            enc.tensor_entry(name, &[8], 0, i as u64 * 32).unwrap();
        }
        enc.pad_to(DEFAULT_ALIGNMENT).unwrap();
        let mut bytes = enc.into_inner();
        bytes.resize(bytes.len() + (n * 32) as usize, 0);
        let file = parse(&bytes).unwrap();
        let start = std::time::Instant::now();
        for _ in 0..20 {
            for (i, name) in names.iter().enumerate() {
                assert_eq!(
                    file.tensor_info(name).map(|t| t.name.as_str()),
                    Some(name.as_str())
                );
                assert_eq!(file.tensors[i].name, *name);
            }
        }
        let secs = start.elapsed().as_secs_f64();
        assert!(secs < 2.0, "600,000 lookups took {secs:.2} s");
    }

    #[test]
    fn rejects_nested_arrays_and_unknown_value_types() {
        let nested = MetaValue::Array(vec![MetaValue::Array(vec![])]);
        let bytes = file_with(&[("x", nested)], &[], 0);
        assert!(matches!(
            parse(&bytes),
            Err(EngineError::InvalidMetadata { .. })
        ));
        let mut enc = GgufEncoder::new(Vec::new());
        enc.header(3, 0, 1).unwrap();
        enc.string("x").unwrap();
        enc.u32(13).unwrap();
        enc.u64(0).unwrap();
        assert!(matches!(
            parse(&enc.into_inner()),
            Err(EngineError::InvalidMetadata { .. })
        ));
    }

    #[test]
    fn rejects_duplicates() {
        let bytes = file_with(&[("k", MetaValue::U8(1)), ("k", MetaValue::U8(2))], &[], 0);
        assert!(matches!(parse(&bytes), Err(EngineError::DuplicateKey(k)) if k == "k"));
        let bytes = file_with(&[], &[("t", &[8], 0, 0), ("t", &[8], 0, 32)], 64);
        assert!(matches!(parse(&bytes), Err(EngineError::DuplicateTensor(t)) if t == "t"));
    }

    #[test]
    fn checks_tensor_placement() {
        let good = file_with(&[], &[("a", &[8], 0, 0), ("b", &[8], 0, 32)], 64);
        let file = parse(&good).unwrap();
        assert_eq!(file.tensors[1].offset, file.data_offset + 32);
        assert_eq!(file.tensors[1].n_bytes, 32);

        let misaligned = file_with(&[], &[("a", &[8], 0, 4)], 64);
        assert!(matches!(
            parse(&misaligned),
            Err(EngineError::MisalignedTensor { .. })
        ));
        let overlapping = file_with(&[], &[("a", &[16], 0, 0), ("b", &[8], 0, 32)], 96);
        assert!(matches!(
            parse(&overlapping),
            Err(EngineError::OverlappingTensors { .. })
        ));
        let outside = file_with(&[], &[("a", &[8], 0, 1 << 60)], 64);
        assert!(matches!(
            parse(&outside),
            Err(EngineError::Truncated { .. })
        ));
        let wrapping = file_with(&[], &[("a", &[8], 0, u64::MAX - 31)], 64);
        assert!(matches!(
            parse(&wrapping),
            Err(EngineError::Truncated { .. })
        ));
    }

    #[test]
    fn checks_tensor_shapes_and_types() {
        let unknown = file_with(&[], &[("a", &[256], 23, 0)], 256);
        let err = parse(&unknown).unwrap_err();
        assert!(matches!(
            err,
            EngineError::UnknownQuantization { type_id: 23, .. }
        ));
        assert!(err.to_string().contains("IQ4_XS"), "{err}");

        for dims in [&[][..], &[0], &[1, 2, 3, 4, 5], &[u64::MAX, u64::MAX]] {
            let bytes = file_with(&[], &[("a", dims, 0, 0)], 64);
            assert!(
                matches!(parse(&bytes), Err(EngineError::BadTensor { .. })),
                "{dims:?}"
            );
        }
        // A Q4_K row must be made of whole 256-element blocks.
        let partial_block = file_with(&[], &[("a", &[100], 12, 0)], 256);
        assert!(matches!(
            parse(&partial_block),
            Err(EngineError::BadTensor { .. })
        ));
    }

    #[test]
    fn rejects_bad_alignment() {
        let bytes = file_with(&[("general.alignment", MetaValue::U32(24))], &[], 0);
        assert!(matches!(
            parse(&bytes),
            Err(EngineError::InvalidMetadata { .. })
        ));
        let bytes = file_with(
            &[("general.alignment", MetaValue::U32(64))],
            &[("a", &[8], 0, 0)],
            64,
        );
        let file = parse(&bytes).unwrap();
        assert_eq!(file.alignment, 64);
        assert_eq!(file.data_offset % 64, 0);
    }

    #[test]
    fn every_truncation_of_a_small_file_is_an_error() {
        let bytes = file_with(
            &[
                ("general.architecture", MetaValue::String("llama".into())),
                (
                    "tokens",
                    MetaValue::Array(vec![MetaValue::String("a".into()); 3]),
                ),
            ],
            &[("a", &[8], 0, 0)],
            32,
        );
        assert!(parse(&bytes).is_ok());
        for len in 0..bytes.len() {
            assert!(parse(&bytes[..len]).is_err(), "truncated at {len}");
        }
    }

    #[test]
    fn names_unsupported_types_and_file_types() {
        assert_eq!(ggml_type_label(12), "Q4_K");
        assert_eq!(ggml_type_label(20), "IQ4_NL (type 20)");
        assert_eq!(ggml_type_label(999), "unknown type 999");
        assert_eq!(file_type_name(15), Some("Q4_K_M"));
        assert_eq!(file_type_name(4), None);
        for id in 0..64 {
            if let Some(dtype) = ggml_dtype_from_id(id) {
                assert_eq!(ggml_dtype_id(dtype), id);
            }
        }
    }
}
