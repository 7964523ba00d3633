//! Saved KV states: the keys and values a model computed for an exact token prefix, tied to the
//! model file, cache element type and context length that produced them, so a conversation can
//! continue without recomputing its history (after switching conversations or a restart).
//!
//! File format (version [`FORMAT_VERSION`], little-endian):
//!
//! | bytes | what |
//! |---|---|
//! | 8 | magic `SMOLDKV\0` |
//! | 4 | format version |
//! | 4 | `header_len`: bytes of the header block |
//! | `header_len` | header: model identity, element type, context length, layers, row width, tokens |
//! | 4 | CRC-32 of the header block |
//! | data | per layer: the keys, then the values, in the cache's layout: whole blocks of [`BLOCK`](super::attention::BLOCK) positions covering the tokens ([`KvStateInfo::stored_positions`] `× row` elements each) |
//! | 4 | CRC-32 of the data |
//!
//! Reading checks every field against the file's real size before allocating anything, so a
//! truncated, corrupt or foreign file is an error, never a panic or a huge allocation.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use half::f16;
use serde::Serialize;

use super::attention::stored_positions;
use super::error::{EngineError, Result};
use super::session::Engine;

/// The file's first bytes.
const MAGIC: &[u8; 8] = b"SMOLDKV\0";
/// Version of the file layout; files of other versions are rejected.
pub const FORMAT_VERSION: u32 = 2;
/// Bytes before the header block: magic, version, header length.
const PREAMBLE_LEN: u64 = 16;
/// Header bytes besides the tokens.
const FIXED_HEADER_LEN: usize = 8 + 8 + 4 + 8 + 4 + 1 + 8 + 4 + 4 + 8;
/// Most tokens a state may hold (far above any context SmolDesk runs).
const MAX_TOKENS: u64 = 1 << 22;
/// Most layers a state may have.
const MAX_LAYERS: u32 = 4096;
/// Most values in one position's key (or value) row.
const MAX_ROW_WIDTH: u32 = 1 << 20;
/// Most header bytes of a model file that are hashed for its identity.
const MAX_HASHED_HEADER: u64 = 256 << 20;
/// Size of the I/O buffers.
const IO_BUFFER: usize = 1 << 20;

/// Why a KV state could not be saved, read or used.
#[derive(Debug, thiserror::Error)]
pub enum KvStateError {
    /// Reading or writing the file failed.
    #[error("cannot access the saved state {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid state file (wrong magic or version, truncated, corrupt).
    #[error("the saved state {path} is unusable: {reason}")]
    Invalid {
        /// The file involved.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The state was computed with another model file, cache type or shape.
    #[error("the saved state does not fit the loaded model: {0}")]
    Mismatch(String),
}

/// Identity of a model file: a state is only valid with the file that computed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ModelFileIdentity {
    /// Size of the file in bytes.
    pub file_size: u64,
    /// Modification time, seconds since the Unix epoch (0 if unknown).
    pub modified_secs: u64,
    /// Sub-second part of the modification time.
    pub modified_nanos: u32,
    /// Bytes of the GGUF header (metadata and tensor directory).
    pub header_len: u64,
    /// CRC-32 of the header bytes (at most the first 256 MiB).
    pub header_crc: u32,
}

impl ModelFileIdentity {
    /// Reads the size and modification time of the file at `path` and hashes its first
    /// `header_len` bytes (the GGUF header up to the tensor data).
    pub fn of_file(path: &Path, header_len: u64) -> Result<Self> {
        let io_error = |source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_error)?;
        let metadata = file.metadata().map_err(io_error)?;
        let modified = metadata
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        let mut hasher = crc32fast::Hasher::new();
        let mut reader =
            BufReader::with_capacity(IO_BUFFER, file).take(header_len.min(MAX_HASHED_HEADER));
        let mut buffer = vec![0u8; IO_BUFFER];
        loop {
            let n = reader.read(&mut buffer).map_err(io_error)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
        Ok(Self {
            file_size: metadata.len(),
            modified_secs: modified.as_secs(),
            modified_nanos: modified.subsec_nanos(),
            header_len,
            header_crc: hasher.finalize(),
        })
    }
}

/// The element type of a KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvElement {
    /// Half precision (the default cache, as llama.cpp's).
    #[default]
    F16,
    /// Single precision.
    F32,
}

impl KvElement {
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            Self::F16 => 2,
            Self::F32 => 4,
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::F16 => 1,
            Self::F32 => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::F16),
            2 => Some(Self::F32),
            _ => None,
        }
    }
}

/// Keys and values of one layer for positions `0..len`, as little-endian bytes of the cache's
/// element type, in the cache's own layout (whole blocks of [`BLOCK`](super::attention::BLOCK) positions, so saving and
/// restoring copy memory as it is). What `Model::kv_layer_bytes` gives and
/// `Model::set_kv_bytes` takes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KvLayerBytes {
    /// The element type of `keys` and `values`.
    pub element: KvElement,
    /// The keys.
    pub keys: Vec<u8>,
    /// The values.
    pub values: Vec<u8>,
}

/// Cache element types that convert to and from [`KvLayerBytes`].
pub trait KvBytes: Sized + Copy {
    /// This type's tag.
    const ELEMENT: KvElement;
    /// Appends the little-endian bytes of `values` to `out`.
    fn extend_bytes(values: &[Self], out: &mut Vec<u8>);
    /// Decodes little-endian bytes (a whole number of values) into a vector with room for
    /// `capacity` values.
    fn from_bytes(bytes: &[u8], capacity: usize) -> Vec<Self>;
}

impl KvBytes for f16 {
    const ELEMENT: KvElement = KvElement::F16;
    fn extend_bytes(values: &[Self], out: &mut Vec<u8>) {
        out.reserve(values.len() * 2);
        out.extend(values.iter().flat_map(|v| v.to_bits().to_le_bytes()));
    }
    fn from_bytes(bytes: &[u8], capacity: usize) -> Vec<Self> {
        let mut out = Vec::with_capacity(capacity.max(bytes.len() / 2));
        out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]]))),
        );
        out
    }
}

impl KvBytes for f32 {
    const ELEMENT: KvElement = KvElement::F32;
    fn extend_bytes(values: &[Self], out: &mut Vec<u8>) {
        out.reserve(values.len() * 4);
        out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    }
    fn from_bytes(bytes: &[u8], capacity: usize) -> Vec<Self> {
        let mut out = Vec::with_capacity(capacity.max(bytes.len() / 4));
        out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        out
    }
}

impl KvLayerBytes {
    /// Encodes a layer's keys and values.
    pub fn encode<T: KvBytes>(keys: &[T], values: &[T]) -> Self {
        let mut out = Self {
            element: T::ELEMENT,
            keys: Vec::new(),
            values: Vec::new(),
        };
        T::extend_bytes(keys, &mut out.keys);
        T::extend_bytes(values, &mut out.values);
        out
    }

    /// Decodes keys and values as `T`, checking the element type and that both hold exactly
    /// `values` entries; each vector has room for `capacity` values (so the tokens that follow
    /// a restore do not move the cache).
    pub fn decode<T: KvBytes>(
        &self,
        values: usize,
        capacity: usize,
    ) -> Result<(Vec<T>, Vec<T>), KvStateError> {
        if self.element != T::ELEMENT {
            return Err(KvStateError::Mismatch(format!(
                "the state holds {:?} values but the cache is {:?}",
                self.element,
                T::ELEMENT
            )));
        }
        let expected = values * self.element.size();
        if self.keys.len() != expected || self.values.len() != expected {
            return Err(KvStateError::Mismatch(format!(
                "a layer holds {} key and {} value bytes, expected {expected}",
                self.keys.len(),
                self.values.len()
            )));
        }
        Ok((
            T::from_bytes(&self.keys, capacity),
            T::from_bytes(&self.values, capacity),
        ))
    }
}

/// What a state is and what it fits, without its keys and values (the header of its file).
#[derive(Debug, Clone, PartialEq)]
pub struct KvStateInfo {
    /// The model file that computed it.
    pub identity: ModelFileIdentity,
    /// The cache's element type.
    pub element: KvElement,
    /// The engine's context length (KV capacity) when it was saved.
    pub context_length: usize,
    /// Transformer layers.
    pub n_layer: usize,
    /// Values per position in one layer's keys (KV heads × head dimension).
    pub row_width: usize,
    /// The exact tokens whose keys and values the state holds, in order.
    pub tokens: Vec<u32>,
}

impl KvStateInfo {
    /// Positions whose keys and values the state stores: its tokens rounded up to whole
    /// blocks of the cache.
    pub fn stored_positions(&self) -> usize {
        stored_positions(self.tokens.len())
    }

    /// Bytes of keys and values in the state.
    pub fn data_bytes(&self) -> u64 {
        (self.n_layer * 2 * self.stored_positions() * self.row_width * self.element.size()) as u64
    }

    /// Bytes of the whole state file.
    pub fn file_bytes(&self) -> u64 {
        PREAMBLE_LEN + (FIXED_HEADER_LEN + 4 * self.tokens.len()) as u64 + 4 + self.data_bytes() + 4
    }

    fn encode_header(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED_HEADER_LEN + 4 * self.tokens.len());
        let id = &self.identity;
        out.extend(id.file_size.to_le_bytes());
        out.extend(id.modified_secs.to_le_bytes());
        out.extend(id.modified_nanos.to_le_bytes());
        out.extend(id.header_len.to_le_bytes());
        out.extend(id.header_crc.to_le_bytes());
        out.push(self.element.code());
        out.extend((self.context_length as u64).to_le_bytes());
        out.extend((self.n_layer as u32).to_le_bytes());
        out.extend((self.row_width as u32).to_le_bytes());
        out.extend((self.tokens.len() as u64).to_le_bytes());
        out.extend(self.tokens.iter().flat_map(|t| t.to_le_bytes()));
        out
    }

    fn decode_header(bytes: &[u8]) -> std::result::Result<Self, String> {
        let mut r = ByteReader { bytes, pos: 0 };
        let identity = ModelFileIdentity {
            file_size: r.u64()?,
            modified_secs: r.u64()?,
            modified_nanos: r.u32()?,
            header_len: r.u64()?,
            header_crc: r.u32()?,
        };
        let code = r.u8()?;
        let element =
            KvElement::from_code(code).ok_or_else(|| format!("unknown element type {code}"))?;
        let context_length = r.u64()?;
        let n_layer = r.u32()?;
        let row_width = r.u32()?;
        let n_tokens = r.u64()?;
        if n_layer == 0 || n_layer > MAX_LAYERS || row_width == 0 || row_width > MAX_ROW_WIDTH {
            return Err(format!(
                "implausible shape: {n_layer} layers of {row_width} values"
            ));
        }
        if n_tokens > MAX_TOKENS || n_tokens > context_length {
            return Err(format!(
                "{n_tokens} tokens do not fit a context of {context_length}"
            ));
        }
        if (r.remaining() as u64) != n_tokens * 4 {
            return Err(format!(
                "the header holds {} token bytes for {n_tokens} tokens",
                r.remaining()
            ));
        }
        let tokens = (0..n_tokens)
            .map(|_| r.u32())
            .collect::<std::result::Result<_, _>>()?;
        Ok(Self {
            identity,
            element,
            context_length: usize::try_from(context_length).map_err(|e| e.to_string())?,
            n_layer: n_layer as usize,
            row_width: row_width as usize,
            tokens,
        })
    }

    /// Reads only the header of a state file (cheap: no keys or values), validating its
    /// checksum and that the file's size matches what the header describes.
    pub fn read(path: &Path) -> Result<Self, KvStateError> {
        let mut file = StateReader::open(path)?;
        let info = file.header()?;
        Ok(info)
    }
}

/// A saved KV state: what it fits plus the keys and values of every layer.
#[derive(Debug, Clone, PartialEq)]
pub struct KvState {
    info: KvStateInfo,
    layers: Vec<KvLayerBytes>,
}

impl KvState {
    /// Builds a state from its description and one [`KvLayerBytes`] per layer; checks that
    /// they agree.
    pub fn new(info: KvStateInfo, layers: Vec<KvLayerBytes>) -> Result<Self, KvStateError> {
        let per_layer = info.stored_positions() * info.row_width * info.element.size();
        if layers.len() != info.n_layer {
            return Err(KvStateError::Mismatch(format!(
                "{} layers given for {}",
                layers.len(),
                info.n_layer
            )));
        }
        for layer in &layers {
            if layer.element != info.element
                || layer.keys.len() != per_layer
                || layer.values.len() != per_layer
            {
                return Err(KvStateError::Mismatch(
                    "a layer's bytes do not match the state's shape".into(),
                ));
            }
        }
        Ok(Self { info, layers })
    }

    /// What the state is and fits.
    pub fn info(&self) -> &KvStateInfo {
        &self.info
    }

    /// The tokens whose keys and values the state holds.
    pub fn tokens(&self) -> &[u32] {
        &self.info.tokens
    }

    /// The keys and values, one entry per layer.
    pub fn layers(&self) -> &[KvLayerBytes] {
        &self.layers
    }

    /// Bytes the keys and values take (in memory and, nearly all of the file, on disk).
    pub fn size_bytes(&self) -> u64 {
        self.info.data_bytes()
    }

    /// Writes the state to `path` atomically: into a temporary file beside it, synced to disk,
    /// then renamed over `path`. Returns the bytes written. On error nothing is left behind.
    pub fn write_atomic(&self, path: &Path) -> Result<u64, KvStateError> {
        let tmp = temp_path(path);
        let result = self.write_to(&tmp).and_then(|bytes| {
            std::fs::rename(&tmp, path).map_err(|source| KvStateError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            Ok(bytes)
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    fn write_to(&self, path: &Path) -> Result<u64, KvStateError> {
        let io_error = |source| KvStateError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::create(path).map_err(io_error)?;
        let mut out = BufWriter::with_capacity(IO_BUFFER, file);
        let header = self.info.encode_header();
        let header_len = u32::try_from(header.len())
            .map_err(|_| KvStateError::Mismatch("too many tokens to save".into()))?;
        out.write_all(MAGIC).map_err(io_error)?;
        out.write_all(&FORMAT_VERSION.to_le_bytes())
            .map_err(io_error)?;
        out.write_all(&header_len.to_le_bytes()).map_err(io_error)?;
        out.write_all(&header).map_err(io_error)?;
        out.write_all(&crc32fast::hash(&header).to_le_bytes())
            .map_err(io_error)?;
        let mut crc = crc32fast::Hasher::new();
        for layer in &self.layers {
            for bytes in [&layer.keys, &layer.values] {
                crc.update(bytes);
                out.write_all(bytes).map_err(io_error)?;
            }
        }
        out.write_all(&crc.finalize().to_le_bytes())
            .map_err(io_error)?;
        let file = out.into_inner().map_err(|e| io_error(e.into_error()))?;
        file.sync_all().map_err(io_error)?;
        Ok(self.info.file_bytes())
    }

    /// Reads and fully validates a state file: magic, version, both checksums, and a size
    /// that matches the header exactly.
    pub fn read(path: &Path) -> Result<Self, KvStateError> {
        Self::read_checked(path, |_| Ok(()))
    }

    /// [`KvState::read`], passing the header to `check` first: a state it refuses (another
    /// model, another shape, one far larger than the model's cache could be) is rejected
    /// before any of its keys and values are read or memory is set aside for them.
    pub fn read_checked(
        path: &Path,
        check: impl FnOnce(&KvStateInfo) -> Result<(), KvStateError>,
    ) -> Result<Self, KvStateError> {
        let mut file = StateReader::open(path)?;
        let info = file.header()?;
        check(&info)?;
        let per_layer = info.stored_positions() * info.row_width * info.element.size();
        let mut crc = crc32fast::Hasher::new();
        let mut layers = Vec::with_capacity(info.n_layer);
        for _ in 0..info.n_layer {
            let keys = file.bytes(per_layer, &mut crc)?;
            let values = file.bytes(per_layer, &mut crc)?;
            layers.push(KvLayerBytes {
                element: info.element,
                keys,
                values,
            });
        }
        let stored = file.u32()?;
        if stored != crc.finalize() {
            return Err(file.invalid("the keys and values are corrupt (checksum mismatch)"));
        }
        Self::new(info, layers)
    }
}

/// The temporary file a state is written to before it is renamed into place.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// A state file being read, with its real size.
struct StateReader {
    path: PathBuf,
    reader: BufReader<File>,
    file_len: u64,
}

impl StateReader {
    fn open(path: &Path) -> Result<Self, KvStateError> {
        let io_error = |source| KvStateError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_error)?;
        let file_len = file.metadata().map_err(io_error)?.len();
        Ok(Self {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(IO_BUFFER, file),
            file_len,
        })
    }

    fn invalid(&self, reason: impl Into<String>) -> KvStateError {
        KvStateError::Invalid {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    fn exact(&mut self, buf: &mut [u8]) -> Result<(), KvStateError> {
        self.reader.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.invalid("the file is truncated")
            } else {
                KvStateError::Io {
                    path: self.path.clone(),
                    source: e,
                }
            }
        })
    }

    fn u32(&mut self) -> Result<u32, KvStateError> {
        let mut b = [0u8; 4];
        self.exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads `len` bytes (already checked against the file's size) into a new buffer.
    fn bytes(&mut self, len: usize, crc: &mut crc32fast::Hasher) -> Result<Vec<u8>, KvStateError> {
        let mut buf = vec![0u8; len];
        self.exact(&mut buf)?;
        crc.update(&buf);
        Ok(buf)
    }

    /// Reads and checks the preamble and header, and that the file is exactly as long as the
    /// header says.
    fn header(&mut self) -> Result<KvStateInfo, KvStateError> {
        if self.file_len < PREAMBLE_LEN + 8 {
            return Err(self.invalid("the file is truncated"));
        }
        let mut magic = [0u8; 8];
        self.exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(self.invalid("not a SmolDesk KV state file"));
        }
        let version = self.u32()?;
        if version != FORMAT_VERSION {
            return Err(self.invalid(format!(
                "format version {version}, this build reads version {FORMAT_VERSION}"
            )));
        }
        let header_len = u64::from(self.u32()?);
        if header_len < FIXED_HEADER_LEN as u64 || PREAMBLE_LEN + header_len + 8 > self.file_len {
            return Err(self.invalid("the header is truncated or damaged"));
        }
        let mut header = vec![0u8; header_len as usize];
        self.exact(&mut header)?;
        let stored = self.u32()?;
        if stored != crc32fast::hash(&header) {
            return Err(self.invalid("the header is corrupt (checksum mismatch)"));
        }
        let info = KvStateInfo::decode_header(&header).map_err(|reason| self.invalid(reason))?;
        let expected = info
            .n_layer
            .checked_mul(2)
            .and_then(|n| n.checked_mul(info.stored_positions()))
            .and_then(|n| n.checked_mul(info.row_width))
            .and_then(|n| n.checked_mul(info.element.size()))
            .and_then(|n| (n as u64).checked_add(PREAMBLE_LEN + header_len + 8));
        match expected {
            Some(len) if len == self.file_len => Ok(info),
            Some(len) if len > self.file_len => Err(self.invalid("the file is truncated")),
            _ => Err(self.invalid("the file's size does not match its header")),
        }
    }
}

/// Little-endian reads from a header block, failing instead of running past its end.
struct ByteReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl ByteReader<'_> {
    fn take<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        let slice = self
            .bytes
            .get(self.pos..self.pos + N)
            .ok_or_else(|| "the header ends too early".to_string())?;
        self.pos += N;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take::<1>()?[0])
    }

    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.take()?))
    }

    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.take()?))
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }
}

impl Engine {
    /// The keys and values of every cached token, with what they fit (this model file, cache
    /// type and context length), for saving and restoring later.
    pub fn export_kv_state(&self) -> KvState {
        let len = self.cached.len();
        let layers: Vec<KvLayerBytes> = (0..self.info().hparams.n_layer)
            .map(|layer| self.model.kv_layer_bytes(layer, len))
            .collect();
        let info = KvStateInfo {
            element: layers.first().map(|l| l.element).unwrap_or_default(),
            ..self.kv_state_shape(self.cached.clone())
        };
        KvState { info, layers }
    }

    /// Replaces the KV cache with a saved state and returns the tokens restored; the next
    /// [`Engine::prefill`] then reuses its longest prefix shared with the prompt. A state from
    /// another model file, cache type, context length or shape is refused and the cache is
    /// left as it was.
    pub fn import_kv_state(&mut self, state: &KvState) -> Result<usize> {
        self.check_kv_state(state.info())?;
        let len = state.tokens().len();
        self.model.set_kv_bytes(state.layers(), len)?;
        self.cached = state.tokens().to_vec();
        Ok(len)
    }

    /// Checks that a state (from its header alone) fits the loaded model: same model file,
    /// context length and shape. The element type is checked by the import itself.
    pub fn check_kv_state(&self, info: &KvStateInfo) -> Result<(), KvStateError> {
        let expected = self.kv_state_shape(Vec::new());
        let mismatch = |what: &str| Err(KvStateError::Mismatch(what.to_string()));
        if info.identity != expected.identity {
            return mismatch("it was computed with another model file");
        }
        if info.context_length != expected.context_length {
            return mismatch("it was computed with another context length");
        }
        if info.n_layer != expected.n_layer || info.row_width != expected.row_width {
            return mismatch("its layer shape differs");
        }
        if info.tokens.len() > expected.context_length {
            return mismatch("it holds more tokens than the context");
        }
        Ok(())
    }

    /// This engine's state description for `tokens` (element type left at its default).
    fn kv_state_shape(&self, tokens: Vec<u32>) -> KvStateInfo {
        let info = self.info();
        KvStateInfo {
            identity: info.file_identity,
            element: KvElement::default(),
            context_length: self.context_length(),
            n_layer: info.hparams.n_layer,
            row_width: info.hparams.n_head_kv * info.hparams.head_dim,
            tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_state(tokens: usize) -> KvState {
        let info = KvStateInfo {
            identity: ModelFileIdentity {
                file_size: 1234,
                modified_secs: 99,
                modified_nanos: 7,
                header_len: 512,
                header_crc: 0xdead_beef,
            },
            element: KvElement::F16,
            context_length: 64,
            n_layer: 3,
            row_width: 4,
            tokens: (0..tokens as u32).map(|t| t * 7 + 1).collect(),
        };
        let layers = (0..3)
            .map(|l| {
                let keys: Vec<f16> = (0..stored_positions(tokens) * 4)
                    .map(|i| f16::from_f32((l * 100 + i) as f32 * 0.25))
                    .collect();
                let values: Vec<f16> = keys.iter().map(|k| -*k).collect();
                KvLayerBytes::encode(&keys, &values)
            })
            .collect();
        KvState::new(info, layers).unwrap()
    }

    #[test]
    fn a_written_state_reads_back_identical() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.kv");
        let state = sample_state(10);
        let written = state.write_atomic(&path).unwrap();
        assert_eq!(written, std::fs::metadata(&path).unwrap().len());
        assert_eq!(KvState::read(&path).unwrap(), state);
        assert_eq!(&KvStateInfo::read(&path).unwrap(), state.info());
        assert!(!temp_path(&path).exists());
    }

    #[test]
    fn layer_bytes_round_trip_and_check_their_shape() {
        let keys = [f16::from_f32(1.5), f16::from_f32(-2.0)];
        let bytes = KvLayerBytes::encode(&keys, &keys);
        let (k, v) = bytes.decode::<f16>(2, 8).unwrap();
        assert_eq!((k.as_slice(), v.as_slice()), (&keys[..], &keys[..]));
        assert!(bytes.decode::<f16>(3, 3).is_err());
        assert!(bytes.decode::<f32>(1, 1).is_err());
    }

    #[test]
    fn a_refused_header_stops_the_read_before_the_keys_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.kv");
        let state = sample_state(40);
        state.write_atomic(&path).unwrap();
        // Damage the last data byte: reading the keys and values would fail its checksum.
        let mut bytes = std::fs::read(&path).unwrap();
        let last_data = bytes.len() - 5;
        bytes[last_data] ^= 0x55;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            KvState::read(&path),
            Err(KvStateError::Invalid { .. })
        ));
        let mut seen = None;
        let refused = KvState::read_checked(&path, |info| {
            seen = Some(info.clone());
            Err(KvStateError::Mismatch("another model".into()))
        });
        // The check's error, not the data's checksum error: the body was never read.
        assert!(
            matches!(&refused, Err(KvStateError::Mismatch(m)) if m == "another model"),
            "{refused:?}"
        );
        assert_eq!(seen.as_ref(), Some(state.info()));
        // An accepting check reads on (and finds the damage).
        assert!(matches!(
            KvState::read_checked(&path, |_| Ok(())),
            Err(KvStateError::Invalid { .. })
        ));
    }

    #[test]
    fn every_flipped_byte_or_truncation_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.kv");
        sample_state(5).write_atomic(&path).unwrap();
        let good = std::fs::read(&path).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            assert!(KvState::read(&path).is_err(), "flipped byte {i} accepted");
        }
        for len in [0, 7, 16, 40, good.len() / 2, good.len() - 1] {
            std::fs::write(&path, &good[..len]).unwrap();
            assert!(KvState::read(&path).is_err(), "truncated to {len} accepted");
        }
        let mut longer = good.clone();
        longer.push(0);
        std::fs::write(&path, &longer).unwrap();
        assert!(KvState::read(&path).is_err(), "trailing byte accepted");
    }

    #[test]
    fn a_huge_token_count_is_refused_without_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.kv");
        let state = sample_state(2);
        let mut header = state.info().encode_header();
        // n_tokens sits just before the token ids.
        let at = header.len() - 2 * 4 - 8;
        header[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let mut file = Vec::new();
        file.extend(MAGIC);
        file.extend(FORMAT_VERSION.to_le_bytes());
        file.extend((header.len() as u32).to_le_bytes());
        file.extend(&header);
        file.extend(crc32fast::hash(&header).to_le_bytes());
        file.extend([0u8; 64]);
        std::fs::write(&path, &file).unwrap();
        let err = KvState::read(&path).unwrap_err();
        assert!(matches!(err, KvStateError::Invalid { .. }), "{err}");
    }

    #[test]
    fn another_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.kv");
        sample_state(3).write_atomic(&path).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let err = KvState::read(&path).unwrap_err().to_string();
        assert!(err.contains("version"), "{err}");
    }

    #[test]
    fn writing_into_a_missing_folder_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing/a.kv");
        assert!(sample_state(1).write_atomic(&path).is_err());
    }
}
