//! A bounded, validating reader for GGUF files.
//!
//! Every count and length read from the file is checked against the bytes that are actually left
//! in the file before anything is allocated, so a corrupt or hostile file yields an
//! [`EngineError`] instead of an abort or a panic.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Shape};

use super::error::EngineError;

/// The four magic bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Default tensor data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Largest tensor rank GGUF allows.
const MAX_DIMS: u32 = 4;

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

/// A reader that knows how many bytes remain, so lengths can be checked before allocating.
struct BoundedReader<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read> BoundedReader<R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn truncated(&self, what: &str) -> EngineError {
        EngineError::Truncated {
            what: what.to_string(),
            offset: self.pos,
        }
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], EngineError> {
        if self.remaining() < N as u64 {
            return Err(self.truncated(what));
        }
        let mut buf = [0u8; N];
        self.inner
            .read_exact(&mut buf)
            .map_err(|_| self.truncated(what))?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32, EngineError> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, EngineError> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    /// Checks that `count` items of at least `min_item_bytes` each can still fit in the file.
    fn check_count(&self, what: &str, count: u64, min_item_bytes: u64) -> Result<(), EngineError> {
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

    fn string(&mut self, what: &str) -> Result<String, EngineError> {
        let len = self.u64(what)?;
        self.check_count(what, len, 1)?;
        let mut buf = vec![0u8; len as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|_| self.truncated(what))?;
        self.pos += len;
        String::from_utf8(buf).map_err(|_| EngineError::InvalidUtf8 {
            what: what.to_string(),
        })
    }

    fn value(&mut self, type_id: u32, key: &str, depth: u32) -> Result<MetaValue, EngineError> {
        Ok(match type_id {
            0 => MetaValue::U8(u8::from_le_bytes(self.bytes(key)?)),
            1 => MetaValue::I8(i8::from_le_bytes(self.bytes(key)?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.bytes(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.bytes(key)?)),
            4 => MetaValue::U32(u32::from_le_bytes(self.bytes(key)?)),
            5 => MetaValue::I32(i32::from_le_bytes(self.bytes(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.bytes(key)?)),
            7 => MetaValue::Bool(self.bytes::<1>(key)?[0] != 0),
            8 => MetaValue::String(self.string(key)?),
            9 => {
                if depth > 0 {
                    return Err(EngineError::InvalidMetadata {
                        key: key.to_string(),
                        reason: "nested arrays are not supported".into(),
                    });
                }
                let elem_type = self.u32(key)?;
                let count = self.u64(key)?;
                let min_size = min_value_size(elem_type).ok_or_else(|| {
                    EngineError::InvalidMetadata {
                        key: key.to_string(),
                        reason: format!("unknown array element type {elem_type}"),
                    }
                })?;
                self.check_count(key, count, min_size)?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem_type, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(key)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.bytes(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.bytes(key)?)),
            other => {
                return Err(EngineError::InvalidMetadata {
                    key: key.to_string(),
                    reason: format!("unknown value type {other}"),
                });
            }
        })
    }
}

/// The smallest number of bytes one value of a GGUF type can occupy.
fn min_value_size(type_id: u32) -> Option<u64> {
    Some(match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}

impl GgufFile {
    /// Opens and parses the header of a GGUF file, validating its structure.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, EngineError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let file_size = file
            .metadata()
            .map_err(|source| EngineError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        Self::read(BufReader::with_capacity(1 << 20, file), file_size, path)
    }

    /// Parses a GGUF header from any reader of `file_size` bytes.
    pub fn read<R: Read>(reader: R, file_size: u64, path: &Path) -> Result<Self, EngineError> {
        let mut r = BoundedReader {
            inner: reader,
            pos: 0,
            len: file_size,
        };
        let magic: [u8; 4] = r.bytes("magic").map_err(|_| EngineError::NotGguf {
            path: path.to_path_buf(),
        })?;
        if magic != GGUF_MAGIC {
            return Err(EngineError::NotGguf {
                path: path.to_path_buf(),
            });
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(EngineError::UnsupportedVersion(version));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // A key/value pair needs at least a key length, a type and a 1-byte value.
        r.check_count("metadata count", n_kv, 13)?;
        // A tensor entry needs at least a name length, a rank, a type and an offset.
        r.check_count("tensor count", n_tensors, 24)?;

        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let type_id = r.u32(&key)?;
            let value = r.value(type_id, &key, 0)?;
            metadata.insert(key, value);
        }

        let mut raw_tensors = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32(&name)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(EngineError::BadTensor {
                    name,
                    reason: format!("rank {n_dims} is not between 1 and {MAX_DIMS}"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&name)?);
            }
            let type_id = r.u32(&name)?;
            let offset = r.u64(&name)?;
            raw_tensors.push((name, dims, type_id, offset));
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(EngineError::InvalidMetadata {
                        key: "general.alignment".into(),
                        reason: format!("{v:?} is not a power of two"),
                    });
                }
            },
        };
        let data_offset = r.pos.div_ceil(alignment) * alignment;

        let mut tensors = Vec::with_capacity(raw_tensors.len());
        for (name, dims, type_id, rel_offset) in raw_tensors {
            let dtype =
                ggml_dtype_from_id(type_id).ok_or_else(|| EngineError::UnknownQuantization {
                    name: name.clone(),
                    type_id,
                })?;
            let info = tensor_info(name, dims, dtype, rel_offset, data_offset, file_size)?;
            tensors.push(info);
        }

        Ok(Self {
            path: path.to_path_buf(),
            file_size,
            version,
            metadata,
            tensors,
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
        v.as_str().ok_or_else(|| wrong_type(key, "string", v))
    }

    /// A required unsigned integer key.
    pub fn get_u64(&self, key: &str) -> Result<u64, EngineError> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| wrong_type(key, "unsigned integer", v))
    }

    /// A required float key (integers are accepted).
    pub fn get_f64(&self, key: &str) -> Result<f64, EngineError> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| wrong_type(key, "number", v))
    }

    /// A required array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, EngineError> {
        let v = self.require(key)?;
        let arr = v.as_array().ok_or_else(|| wrong_type(key, "array", v))?;
        arr.iter()
            .map(|item| item.as_str().ok_or_else(|| wrong_type(key, "string", item)))
            .collect()
    }

    /// A required array of integers.
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>, EngineError> {
        let v = self.require(key)?;
        let arr = v.as_array().ok_or_else(|| wrong_type(key, "array", v))?;
        arr.iter()
            .map(|item| item.as_i64().ok_or_else(|| wrong_type(key, "integer", item)))
            .collect()
    }

    /// The tensor directory entry with this name.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Reads one tensor's data from `file` into a (still quantized) candle tensor.
    ///
    /// `scratch` is reused across calls to avoid a fresh allocation per tensor.
    pub fn load_qtensor(
        &self,
        file: &mut File,
        info: &TensorInfo,
        scratch: &mut Vec<u64>,
    ) -> Result<QTensor, EngineError> {
        let n_bytes = info.n_bytes as usize;
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
        file.read_exact(bytes).map_err(|_| EngineError::Truncated {
            what: format!("data of tensor {}", info.name),
            offset: info.offset,
        })?;
        let storage = QStorage::from_data(std::borrow::Cow::Borrowed(bytes), &Device::Cpu, info.dtype)?;
        Ok(QTensor::new(storage, info.shape())?)
    }
}

fn wrong_type(key: &str, expected: &str, found: &MetaValue) -> EngineError {
    EngineError::InvalidMetadata {
        key: key.to_string(),
        reason: format!("expected {expected}, found {}", found.type_name()),
    }
}

/// Validates one tensor directory entry against the file's size and the type's block layout.
fn tensor_info(
    name: String,
    dims: Vec<u64>,
    dtype: GgmlDType,
    rel_offset: u64,
    data_offset: u64,
    file_size: u64,
) -> Result<TensorInfo, EngineError> {
    let bad = |reason: String| EngineError::BadTensor {
        name: name.clone(),
        reason,
    };
    let elem_count = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
    if dims.contains(&0) {
        return Err(bad(format!("dimensions {dims:?} contain zero")));
    }
    let block = dtype.block_size() as u64;
    if dims[0] % block != 0 {
        return Err(bad(format!(
            "row length {} is not a multiple of the {} block size {block}",
            dims[0],
            dtype_name(dtype)
        )));
    }
    let n_bytes = (elem_count / block)
        .checked_mul(dtype.type_size() as u64)
        .ok_or_else(|| bad("size overflows".into()))?;
    let offset = data_offset
        .checked_add(rel_offset)
        .ok_or_else(|| bad("offset overflows".into()))?;
    let end = offset
        .checked_add(n_bytes)
        .ok_or_else(|| bad("offset overflows".into()))?;
    if end > file_size {
        return Err(EngineError::Truncated {
            what: format!("data of tensor {name} (needs bytes {offset}..{end})"),
            offset: file_size,
        });
    }
    Ok(TensorInfo {
        name,
        dims,
        dtype,
        offset,
        n_bytes,
    })
}
