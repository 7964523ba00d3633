//! Writes synthetic GGUF models with random weights (SmolLM3-3B-shaped Q4_K_M for benchmarks).
//!
//! Also home of a small streaming GGUF writer ([`GgufEncoder`], [`write_gguf`]) that the tests
//! use to build valid and deliberately broken files.
//!
//! Speed matters more than weight values here: a pool of a few thousand random blocks is
//! quantized once per type, and each tensor row is copied from a random place in that pool, so a
//! 1.9 GB model is written in about the time the disk needs.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::error::{EngineError, Result};
use super::gguf::{DEFAULT_ALIGNMENT, GgufFile, MetaValue, ggml_dtype_id, tensor_byte_size};
use super::model_info::{HParams, expected_tensors};

/// llama.cpp's `general.file_type` for Q4_K_M.
const FILE_TYPE_Q4_K_M: u32 = 15;
/// Standard deviation of the random weights.
const WEIGHT_STD: f32 = 0.02;
/// Blocks of random weights quantized once per type and then reused.
const POOL_BLOCKS: usize = 4096;

/// Writes GGUF structures as little-endian bytes and counts what it wrote.
pub struct GgufEncoder<W> {
    out: W,
    position: u64,
}

impl<W: Write> GgufEncoder<W> {
    /// An encoder writing to `out` from its current position, counted as 0.
    pub fn new(out: W) -> Self {
        Self { out, position: 0 }
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The underlying writer.
    pub fn into_inner(self) -> W {
        self.out
    }

    /// Writes bytes as they are.
    pub fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.position += bytes.len() as u64;
        Ok(())
    }

    /// Writes a little-endian u32.
    pub fn u32(&mut self, v: u32) -> io::Result<()> {
        self.raw(&v.to_le_bytes())
    }

    /// Writes a little-endian u64.
    pub fn u64(&mut self, v: u64) -> io::Result<()> {
        self.raw(&v.to_le_bytes())
    }

    /// Writes a GGUF string: its length as u64, then its UTF-8 bytes.
    pub fn string(&mut self, s: &str) -> io::Result<()> {
        self.u64(s.len() as u64)?;
        self.raw(s.as_bytes())
    }

    /// Writes the magic, the version and the two counts.
    pub fn header(&mut self, version: u32, n_tensors: u64, n_kv: u64) -> io::Result<()> {
        self.raw(b"GGUF")?;
        self.u32(version)?;
        self.u64(n_tensors)?;
        self.u64(n_kv)
    }

    /// Writes one metadata value without its type id. Array elements must share one type; an
    /// empty array is written as an array of u8.
    pub fn value(&mut self, value: &MetaValue) -> io::Result<()> {
        match value {
            MetaValue::U8(v) => self.raw(&v.to_le_bytes()),
            MetaValue::I8(v) => self.raw(&v.to_le_bytes()),
            MetaValue::U16(v) => self.raw(&v.to_le_bytes()),
            MetaValue::I16(v) => self.raw(&v.to_le_bytes()),
            MetaValue::U32(v) => self.u32(*v),
            MetaValue::I32(v) => self.raw(&v.to_le_bytes()),
            MetaValue::F32(v) => self.raw(&v.to_le_bytes()),
            MetaValue::Bool(v) => self.raw(&[u8::from(*v)]),
            MetaValue::String(s) => self.string(s),
            MetaValue::Array(items) => self.array(items),
            MetaValue::U64(v) => self.u64(*v),
            MetaValue::I64(v) => self.raw(&v.to_le_bytes()),
            MetaValue::F64(v) => self.raw(&v.to_le_bytes()),
        }
    }

    fn array(&mut self, items: &[MetaValue]) -> io::Result<()> {
        let elem_type = items.first().map_or(0, MetaValue::type_id);
        if items.iter().any(|item| item.type_id() != elem_type) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "GGUF array elements must share one type",
            ));
        }
        self.u32(elem_type)?;
        self.u64(items.len() as u64)?;
        items.iter().try_for_each(|item| self.value(item))
    }

    /// Writes a metadata entry: key, type id, value.
    pub fn key_value(&mut self, key: &str, value: &MetaValue) -> io::Result<()> {
        self.string(key)?;
        self.u32(value.type_id())?;
        self.value(value)
    }

    /// Writes a tensor directory entry. `dims` are in GGUF order, `rel_offset` is relative to
    /// the start of the tensor data.
    pub fn tensor_entry(
        &mut self,
        name: &str,
        dims: &[u64],
        type_id: u32,
        rel_offset: u64,
    ) -> io::Result<()> {
        self.string(name)?;
        self.u32(dims.len() as u32)?;
        dims.iter().try_for_each(|&d| self.u64(d))?;
        self.u32(type_id)?;
        self.u64(rel_offset)
    }

    /// Writes zero bytes up to the next multiple of `alignment`.
    pub fn pad_to(&mut self, alignment: u64) -> io::Result<()> {
        let padding = self.position.next_multiple_of(alignment) - self.position;
        self.raw(&vec![0u8; padding as usize])
    }
}

/// A tensor to write: name, GGUF-order dimensions and type.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// Dimensions in GGUF order (row length first).
    pub dims: Vec<u64>,
    /// Storage type.
    pub dtype: GgmlDType,
}

impl TensorSpec {
    /// Bytes of data, or an error if the shape does not suit the type.
    pub fn n_bytes(&self) -> Result<u64> {
        tensor_byte_size(&self.dims, self.dtype).map_err(|reason| EngineError::BadTensor {
            name: self.name.clone(),
            reason,
        })
    }

    /// Number of rows (all dimensions but the first).
    pub fn n_rows(&self) -> u64 {
        self.dims.iter().skip(1).product()
    }
}

/// Writes a complete GGUF (version 3, default alignment) to `enc`: the header, then each
/// tensor's data as produced by `write_data`, which must write exactly the tensor's size.
/// `path` only names the output in error messages.
pub fn write_gguf<W: Write>(
    enc: &mut GgufEncoder<W>,
    path: &Path,
    metadata: &[(String, MetaValue)],
    tensors: &[TensorSpec],
    mut write_data: impl FnMut(usize, &TensorSpec, &mut GgufEncoder<W>) -> Result<()>,
) -> Result<()> {
    let io_err = |source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    };
    let sizes = tensors
        .iter()
        .map(TensorSpec::n_bytes)
        .collect::<Result<Vec<_>>>()?;
    enc.header(3, tensors.len() as u64, metadata.len() as u64)
        .map_err(io_err)?;
    for (key, value) in metadata {
        enc.key_value(key, value).map_err(io_err)?;
    }
    let mut rel_offset = 0u64;
    for (spec, size) in tensors.iter().zip(&sizes) {
        let type_id = ggml_dtype_id(spec.dtype);
        enc.tensor_entry(&spec.name, &spec.dims, type_id, rel_offset)
            .map_err(io_err)?;
        rel_offset = (rel_offset + size).next_multiple_of(DEFAULT_ALIGNMENT);
    }
    enc.pad_to(DEFAULT_ALIGNMENT).map_err(io_err)?;
    for (i, (spec, size)) in tensors.iter().zip(&sizes).enumerate() {
        let start = enc.position();
        write_data(i, spec, enc)?;
        let written = enc.position() - start;
        if written != *size {
            return Err(EngineError::BadTensor {
                name: spec.name.clone(),
                reason: format!("{written} bytes were written for its {size} bytes of data"),
            });
        }
        enc.pad_to(DEFAULT_ALIGNMENT).map_err(io_err)?;
    }
    Ok(())
}

/// The shapes of a synthetic model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SynthShape {
    /// Transformer blocks.
    pub n_layer: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Feed-forward inner size.
    pub n_ff: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_head_kv: usize,
    /// Size of one attention head.
    pub head_dim: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Trained context length.
    pub context_length: usize,
}

/// The synthetic models `smoldesk synth` can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthPreset {
    /// The shapes of SmolLM3-3B (36 layers, hidden 2048, FFN 11008, 16/4 heads of 128).
    SmolLm3,
    /// The shapes of the tiny test fixture (8 layers, hidden 256, FFN 512, 4/2 heads of 64).
    Tiny,
}

impl SynthPreset {
    /// The preset's shapes.
    pub fn shape(self) -> SynthShape {
        match self {
            Self::SmolLm3 => SynthShape {
                n_layer: 36,
                n_embd: 2048,
                n_ff: 11008,
                n_head: 16,
                n_head_kv: 4,
                head_dim: 128,
                rope_theta: 5e6,
                rms_eps: 1e-6,
                context_length: 65536,
            },
            Self::Tiny => SynthShape {
                n_layer: 8,
                n_embd: 256,
                n_ff: 512,
                n_head: 4,
                n_head_kv: 2,
                head_dim: 64,
                rope_theta: 5e6,
                rms_eps: 1e-6,
                context_length: 4096,
            },
        }
    }

    /// The `general.name` written into the file.
    pub fn model_name(self) -> &'static str {
        match self {
            Self::SmolLm3 => "SmolLM3-3B synthetic (random weights)",
            Self::Tiny => "tiny-smollm3 synthetic (random weights)",
        }
    }
}

/// llama.cpp's `use_more_bits`: which of `n` layers get more bits in the K-quant mixes.
pub fn use_more_bits(i: usize, n: usize) -> bool {
    let first = n / 8;
    if i < first || i >= 7 * n / 8 {
        return true;
    }
    (i - first) % 3 == 2
}

/// The type llama.cpp's Q4_K_M recipe gives a tensor of a model with `n_layer` layers: Q6_K for
/// the embedding/output and for `attn_v`/`ffn_down` on the layers [`use_more_bits`] picks, F32
/// for norms and other vectors, Q4_K for the rest.
pub fn q4_k_m_type(name: &str, n_dims: usize, n_layer: usize) -> GgmlDType {
    if n_dims < 2 {
        return GgmlDType::F32;
    }
    if name == "token_embd.weight" || name == "output.weight" {
        return GgmlDType::Q6K;
    }
    let mut parts = name.split('.');
    let (Some("blk"), Some(layer), Some(kind)) = (parts.next(), parts.next(), parts.next()) else {
        return GgmlDType::Q4K;
    };
    let layer = layer.parse::<usize>().unwrap_or(0);
    if matches!(kind, "attn_v" | "ffn_down") && use_more_bits(layer, n_layer) {
        GgmlDType::Q6K
    } else {
        GgmlDType::Q4K
    }
}

/// The hyper-parameters of a synthetic model with this vocabulary size.
fn synth_hparams(shape: &SynthShape, vocab_size: usize) -> HParams {
    HParams {
        n_layer: shape.n_layer,
        n_embd: shape.n_embd,
        n_ff: shape.n_ff,
        n_head: shape.n_head,
        n_head_kv: shape.n_head_kv,
        head_dim: shape.head_dim,
        rms_eps: shape.rms_eps.into(),
        rope_theta: shape.rope_theta.into(),
        context_length: shape.context_length,
        vocab_size,
        no_rope_layer_interval: 4,
    }
}

/// The tensors of a synthetic SmolLM3 (tied embeddings) with llama.cpp's Q4_K_M types.
pub fn synth_tensor_specs(shape: &SynthShape, vocab_size: usize) -> Vec<TensorSpec> {
    expected_tensors(&synth_hparams(shape, vocab_size), true)
        .into_iter()
        .map(|(name, dims)| TensorSpec {
            dtype: q4_k_m_type(&name, dims.len(), shape.n_layer),
            name,
            dims,
        })
        .collect()
}

/// The metadata of a synthetic SmolLM3: the tokenizer and every other key of `vocab` except its
/// architecture's hyper-parameters, plus SmolLM3 hyper-parameters for `shape`.
pub fn synth_metadata(
    shape: &SynthShape,
    vocab: &GgufFile,
    model_name: &str,
) -> Result<Vec<(String, MetaValue)>> {
    let vocab_size = vocab.get_str_array("tokenizer.ggml.tokens")?.len();
    let source_arch = vocab.get_str("general.architecture").unwrap_or("smollm3");
    let own_prefixes = [format!("{source_arch}."), "smollm3.".to_string()];
    let replaced = [
        "general.architecture",
        "general.name",
        "general.file_type",
        "general.quantization_version",
        "general.alignment",
    ];
    let as_u32 = |v: usize| MetaValue::U32(u32::try_from(v).unwrap_or(u32::MAX));
    let mut metadata = vec![
        (
            "general.architecture".to_string(),
            MetaValue::String("smollm3".into()),
        ),
        (
            "general.name".to_string(),
            MetaValue::String(model_name.into()),
        ),
        (
            "general.file_type".to_string(),
            MetaValue::U32(FILE_TYPE_Q4_K_M),
        ),
        (
            "general.quantization_version".to_string(),
            MetaValue::U32(2),
        ),
    ];
    let hparams = [
        ("context_length", as_u32(shape.context_length)),
        ("embedding_length", as_u32(shape.n_embd)),
        ("feed_forward_length", as_u32(shape.n_ff)),
        ("block_count", as_u32(shape.n_layer)),
        ("attention.head_count", as_u32(shape.n_head)),
        ("attention.head_count_kv", as_u32(shape.n_head_kv)),
        ("rope.freq_base", MetaValue::F32(shape.rope_theta)),
        (
            "attention.layer_norm_rms_epsilon",
            MetaValue::F32(shape.rms_eps),
        ),
        ("rope.dimension_count", as_u32(shape.head_dim)),
        ("vocab_size", as_u32(vocab_size)),
    ];
    metadata.extend(hparams.map(|(k, v)| (format!("smollm3.{k}"), v)));
    metadata.extend(
        vocab
            .metadata
            .iter()
            .filter(|(k, _)| !replaced.contains(&k.as_str()))
            .filter(|(k, _)| !own_prefixes.iter().any(|p| k.starts_with(p.as_str())))
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    Ok(metadata)
}

/// SplitMix64: a tiny, fast, seedable generator (quality is ample for random weights).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn next_unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Normally distributed with mean 0 and standard deviation `std` (Box-Muller).
    fn next_normal(&mut self, std: f32) -> f32 {
        let (u, v) = (self.next_unit(), self.next_unit());
        let z = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
        (z * f64::from(std)) as f32
    }

    /// Uniform in `0..n` (`n` > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Quantized blocks of random weights, reused to fill every tensor of one type.
struct BlockPool {
    bytes: Vec<u8>,
    block_bytes: usize,
    n_blocks: usize,
}

impl BlockPool {
    fn new(dtype: GgmlDType, n_blocks: usize, rng: &mut SplitMix64) -> Result<Self> {
        let n_elems = n_blocks * dtype.block_size();
        let values: Vec<f32> = (0..n_elems).map(|_| rng.next_normal(WEIGHT_STD)).collect();
        let tensor = Tensor::from_vec(values, (n_blocks, dtype.block_size()), &Device::Cpu)?;
        let bytes = QTensor::quantize(&tensor, dtype)?.data()?.into_owned();
        Ok(Self {
            block_bytes: dtype.type_size(),
            n_blocks,
            bytes,
        })
    }

    /// `n` consecutive blocks starting at a random block.
    fn random_run(&self, n: usize, rng: &mut SplitMix64) -> &[u8] {
        let start = rng.below((self.n_blocks - n + 1) as u64) as usize;
        &self.bytes[start * self.block_bytes..(start + n) * self.block_bytes]
    }
}

/// Writes the data of one synthetic tensor: norms near 1, matrices from the pool of their type.
fn write_tensor_data<W: Write>(
    spec: &TensorSpec,
    pools: &[(GgmlDType, BlockPool)],
    rng: &mut SplitMix64,
    enc: &mut GgufEncoder<W>,
) -> io::Result<()> {
    if spec.dtype == GgmlDType::F32 {
        let values: Vec<u8> = (0..spec.dims.iter().product::<u64>())
            .flat_map(|_| (1.0 + rng.next_normal(WEIGHT_STD)).to_le_bytes())
            .collect();
        return enc.raw(&values);
    }
    let Some((_, pool)) = pools.iter().find(|(dtype, _)| *dtype == spec.dtype) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("no random blocks of the type of {}", spec.name),
        ));
    };
    let blocks_per_row = spec.dims.first().copied().unwrap_or(0) as usize / spec.dtype.block_size();
    for _ in 0..spec.n_rows() {
        enc.raw(pool.random_run(blocks_per_row, rng))?;
    }
    Ok(())
}

/// Writes a synthetic SmolLM3 model with random weights and llama.cpp's Q4_K_M types to `out`,
/// taking the tokenizer and the other metadata from `vocab`. The file appears only once it is
/// complete. `progress` receives the fraction written. Returns the file's size.
pub fn write_synthetic_model(
    out: &Path,
    vocab: &GgufFile,
    preset: SynthPreset,
    seed: u64,
    progress: &mut dyn FnMut(f32),
) -> Result<u64> {
    let shape = preset.shape();
    let metadata = synth_metadata(&shape, vocab, preset.model_name())?;
    let vocab_size = vocab.get_str_array("tokenizer.ggml.tokens")?.len();
    let specs = synth_tensor_specs(&shape, vocab_size);
    let mut rng = SplitMix64(seed);
    let pool_blocks = specs
        .iter()
        .map(|s| s.dims.first().copied().unwrap_or(0) as usize / s.dtype.block_size())
        .max()
        .unwrap_or(0)
        .max(POOL_BLOCKS);
    let pools = [GgmlDType::Q4K, GgmlDType::Q6K]
        .into_iter()
        .map(|dtype| Ok((dtype, BlockPool::new(dtype, pool_blocks, &mut rng)?)))
        .collect::<Result<Vec<_>>>()?;

    let partial = partial_path(out);
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source: io::Error| EngineError::Io { path, source }
    };
    let file = File::create(&partial).map_err(io_err(&partial))?;
    let mut enc = GgufEncoder::new(BufWriter::with_capacity(8 << 20, file));
    let total_bytes: u64 = specs.iter().filter_map(|s| s.n_bytes().ok()).sum();
    let mut done_bytes = 0u64;
    let result = write_gguf(&mut enc, &partial, &metadata, &specs, |_, spec, enc| {
        write_tensor_data(spec, &pools, &mut rng, enc).map_err(io_err(&partial))?;
        done_bytes += spec.n_bytes()?;
        progress(done_bytes as f32 / total_bytes.max(1) as f32);
        Ok(())
    })
    .and_then(|()| {
        let size = enc.position();
        let file = enc.into_inner().into_inner().map_err(|e| e.into_error());
        file.and_then(|f| f.sync_all()).map_err(io_err(&partial))?;
        Ok(size)
    });
    match result {
        Ok(size) => {
            std::fs::rename(&partial, out).map_err(io_err(out))?;
            Ok(size)
        }
        Err(err) => {
            let _ = std::fs::remove_file(&partial);
            Err(err)
        }
    }
}

/// `model.gguf` → `model.gguf.part`.
fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".part");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ModelInfo;

    /// A vocabulary-only GGUF like `smollm3-vocab.gguf`, with a few tokens.
    fn vocab_file(dir: &Path) -> GgufFile {
        let tokens: Vec<MetaValue> = ["a", "b", "<think>", "</think>"]
            .iter()
            .map(|t| MetaValue::String(t.to_string()))
            .collect();
        let metadata = vec![
            (
                "general.architecture".to_string(),
                MetaValue::String("llama".into()),
            ),
            ("llama.block_count".to_string(), MetaValue::U32(99)),
            (
                "tokenizer.ggml.model".to_string(),
                MetaValue::String("gpt2".into()),
            ),
            (
                "tokenizer.ggml.tokens".to_string(),
                MetaValue::Array(tokens),
            ),
            (
                "tokenizer.chat_template".to_string(),
                MetaValue::String("{% if enable_thinking %}<think>{% endif %}".into()),
            ),
        ];
        let path = dir.join("vocab.gguf");
        let mut enc = GgufEncoder::new(File::create(&path).unwrap());
        write_gguf(&mut enc, &path, &metadata, &[], |_, _, _| Ok(())).unwrap();
        drop(enc);
        GgufFile::open(&path).unwrap()
    }

    #[test]
    fn q4_k_m_recipe_matches_llama_cpp() {
        let q6_layers = |n: usize| -> Vec<usize> {
            (0..n)
                .filter(|&i| q4_k_m_type(&format!("blk.{i}.attn_v.weight"), 2, n) == GgmlDType::Q6K)
                .collect()
        };
        assert_eq!(q6_layers(8), [0, 3, 6, 7]);
        assert_eq!(
            q6_layers(36),
            [
                0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 31, 32, 33, 34, 35
            ]
        );
        assert_eq!(q4_k_m_type("blk.3.ffn_down.weight", 2, 8), GgmlDType::Q6K);
        assert_eq!(q4_k_m_type("blk.3.ffn_up.weight", 2, 8), GgmlDType::Q4K);
        assert_eq!(q4_k_m_type("blk.1.attn_v.weight", 2, 8), GgmlDType::Q4K);
        assert_eq!(q4_k_m_type("blk.0.attn_norm.weight", 1, 8), GgmlDType::F32);
        assert_eq!(q4_k_m_type("token_embd.weight", 2, 8), GgmlDType::Q6K);
    }

    #[test]
    fn smollm3_3b_has_the_real_tensor_mix() {
        let specs = synth_tensor_specs(&SynthPreset::SmolLm3.shape(), 128_256);
        let count = |dtype| specs.iter().filter(|s| s.dtype == dtype).count();
        assert_eq!(count(GgmlDType::F32), 73);
        assert_eq!(count(GgmlDType::Q6K), 37);
        assert_eq!(count(GgmlDType::Q4K), 216);
        let bytes: u64 = specs.iter().map(|s| s.n_bytes().unwrap()).sum();
        assert!((1_850_000_000..1_950_000_000).contains(&bytes), "{bytes}");
    }

    #[test]
    fn metadata_replaces_the_source_hyper_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let vocab = vocab_file(dir.path());
        let metadata = synth_metadata(&SynthPreset::Tiny.shape(), &vocab, "t").unwrap();
        let get = |key: &str| metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        assert_eq!(get("llama.block_count"), None);
        assert_eq!(get("smollm3.block_count"), Some(&MetaValue::U32(8)));
        assert_eq!(get("smollm3.vocab_size"), Some(&MetaValue::U32(4)));
        assert_eq!(
            get("general.architecture"),
            Some(&MetaValue::String("smollm3".into()))
        );
        assert!(get("tokenizer.ggml.tokens").is_some());
    }

    #[test]
    fn writes_a_valid_model_with_small_finite_weights() {
        let dir = tempfile::tempdir().unwrap();
        let vocab = vocab_file(dir.path());
        let out = dir.path().join("tiny.gguf");
        let mut fractions = Vec::new();
        let size = write_synthetic_model(&out, &vocab, SynthPreset::Tiny, 7, &mut |f| {
            fractions.push(f)
        })
        .unwrap();
        assert!(!partial_path(&out).exists());
        assert_eq!(fractions.last().copied(), Some(1.0));

        let gguf = GgufFile::open(&out).unwrap();
        assert_eq!(gguf.file_size, size);
        let info = ModelInfo::from_gguf(&gguf).unwrap();
        assert_eq!(info.hparams.n_layer, 8);
        assert_eq!(info.hparams.vocab_size, 4);
        assert!(info.tied_embeddings && info.can_think);
        assert_eq!(info.file_type.as_deref(), Some("Q4_K_M"));

        let mut file = File::open(&out).unwrap();
        let mut scratch = Vec::new();
        for name in [
            "blk.2.ffn_up.weight",
            "blk.0.ffn_down.weight",
            "output_norm.weight",
        ] {
            let t = gguf.tensor_info(name).unwrap();
            let values = gguf
                .load_qtensor(&mut file, t, &mut scratch)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let n = values.len() as f32;
            let mean = values.iter().sum::<f32>() / n;
            let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n).sqrt();
            assert!(values.iter().all(|v| v.is_finite()), "{name}");
            assert!((0.01..0.03).contains(&std), "{name}: std {std}");
            let expected_mean = if name.contains("norm") { 1.0 } else { 0.0 };
            assert!((mean - expected_mean).abs() < 0.01, "{name}: mean {mean}");
        }
    }

    #[test]
    fn the_seed_decides_the_weights() {
        let dir = tempfile::tempdir().unwrap();
        let vocab = vocab_file(dir.path());
        let write = |name: &str, seed| {
            let out = dir.path().join(name);
            write_synthetic_model(&out, &vocab, SynthPreset::Tiny, seed, &mut |_| {}).unwrap();
            std::fs::read(out).unwrap()
        };
        let (a, b, c) = (write("a", 1), write("b", 1), write("c", 2));
        assert_eq!(a, b);
        assert_eq!(a.len(), c.len());
        assert_ne!(a, c);
    }

    #[test]
    fn write_gguf_checks_the_data_size() {
        let spec = TensorSpec {
            name: "x".into(),
            dims: vec![8],
            dtype: GgmlDType::F32,
        };
        let mut enc = GgufEncoder::new(Vec::new());
        let err = write_gguf(&mut enc, Path::new("x"), &[], &[spec], |_, _, enc| {
            enc.raw(&[0; 4]).map_err(|source| EngineError::Io {
                path: "x".into(),
                source,
            })
        })
        .unwrap_err();
        assert!(matches!(err, EngineError::BadTensor { .. }));
    }
}
