//! Corrupt, truncated and hostile GGUF files must give a clean, typed error: never a panic, an
//! abort or a huge allocation.

mod common;

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;

use smoldesk::engine::gguf::{GgufFile, MetaValue};
use smoldesk::engine::synth::{GgufEncoder, TensorSpec, write_gguf};
use smoldesk::engine::{EngineError, ModelInfo};

const FIXTURE: &str = "tiny-smollm3-q4_k_m.gguf";

fn fixture_bytes() -> Vec<u8> {
    std::fs::read(common::fixture(FIXTURE)).expect("the tiny Q4_K_M fixture is readable")
}

/// What the app does before loading: parse the header, then describe and validate the model.
fn open_and_describe(path: &Path) -> Result<ModelInfo, EngineError> {
    ModelInfo::from_gguf(&GgufFile::open(path)?)
}

/// The same from bytes in memory (the code path of `open` without the file system).
fn describe_bytes(bytes: &[u8]) -> Result<ModelInfo, EngineError> {
    let gguf = GgufFile::read(bytes, bytes.len() as u64, Path::new("mem.gguf"))?;
    ModelInfo::from_gguf(&gguf)
}

fn write_temp(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("temp file is writable");
    path
}

/// A tiny deterministic generator for corrupt bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// The fixture as editable metadata and tensors (each with its original data).
struct Editable {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<(TensorSpec, Vec<u8>)>,
}

impl Editable {
    fn from_fixture() -> Self {
        let gguf = GgufFile::open(common::fixture(FIXTURE)).expect("fixture opens");
        let bytes = fixture_bytes();
        let tensors = gguf
            .tensors
            .iter()
            .map(|t| {
                let spec = TensorSpec {
                    name: t.name.clone(),
                    dims: t.dims.clone(),
                    dtype: t.dtype,
                };
                let data = bytes[t.offset as usize..t.end() as usize].to_vec();
                (spec, data)
            })
            .collect();
        Self {
            metadata: gguf.metadata.into_iter().collect(),
            tensors,
        }
    }

    fn set(&mut self, key: &str, value: MetaValue) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    fn remove_key(&mut self, key: &str) {
        self.metadata.retain(|(k, _)| k != key);
    }

    fn tensor(&mut self, name: &str) -> &mut (TensorSpec, Vec<u8>) {
        self.tensors
            .iter_mut()
            .find(|(spec, _)| spec.name == name)
            .expect("the fixture has this tensor")
    }

    /// Writes the file; data that no longer fits a changed shape is cut or zero-padded.
    fn save(&self, path: &Path) -> PathBuf {
        let specs: Vec<TensorSpec> = self.tensors.iter().map(|(s, _)| s.clone()).collect();
        let file = File::create(path).expect("temp file is writable");
        let mut enc = GgufEncoder::new(BufWriter::new(file));
        write_gguf(&mut enc, path, &self.metadata, &specs, |i, spec, enc| {
            let mut data = self.tensors[i].1.clone();
            data.resize(spec.n_bytes()? as usize, 0);
            enc.raw(&data).map_err(|source| EngineError::Io {
                path: path.to_path_buf(),
                source,
            })
        })
        .expect("the edited model is written");
        path.to_path_buf()
    }
}

/// Position just after the GGUF string `s` (its u64 length, then its bytes) in `bytes`.
fn after_string(bytes: &[u8], s: &str) -> usize {
    let mut needle = (s.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(s.as_bytes());
    let start = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .unwrap_or_else(|| panic!("{s} is in the fixture"));
    start + needle.len()
}

/// Byte position of the type id of tensor `name` in the directory (its offset follows it).
fn tensor_type_pos(bytes: &[u8], name: &str) -> usize {
    let pos = after_string(bytes, name);
    let n_dims = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
    pos + 4 + 8 * n_dims
}

fn patch_u32(bytes: &mut [u8], pos: usize, v: u32) {
    bytes[pos..pos + 4].copy_from_slice(&v.to_le_bytes());
}

fn patch_u64(bytes: &mut [u8], pos: usize, v: u64) {
    bytes[pos..pos + 8].copy_from_slice(&v.to_le_bytes());
}

fn read_u64(bytes: &[u8], pos: usize) -> u64 {
    u64::from_le_bytes(bytes[pos..pos + 8].try_into().unwrap())
}

fn is_truncation(err: &EngineError) -> bool {
    matches!(
        err,
        EngineError::Truncated { .. } | EngineError::ImplausibleCount { .. }
    )
}

#[test]
fn the_fixture_itself_is_valid() {
    let info = open_and_describe(&common::fixture(FIXTURE)).expect("fixture is valid");
    assert_eq!(info.hparams.n_layer, 8);
}

#[test]
fn truncation_anywhere_in_the_header_is_an_error() {
    let bytes = fixture_bytes();
    let gguf = GgufFile::open(common::fixture(FIXTURE)).unwrap();
    let header_end = gguf.data_offset as usize;
    // Every offset, except deep inside the repetitive parts (the three vocabulary arrays, the
    // chat template, the middle of the tensor directory), where a sample is enough: they repeat
    // the same few structures thousands of times, and each parse of a long prefix costs.
    let key_end = |key: &str| after_string(&bytes, key);
    let template = key_end("tokenizer.chat_template");
    let template_end = template + 12 + read_u64(&bytes, template + 4) as usize;
    let first_name = &gguf.tensors[0].name;
    let directory = key_end(first_name) - 8 - first_name.len();
    let repetitive = [
        (
            key_end("tokenizer.ggml.tokens"),
            key_end("tokenizer.ggml.token_type"),
            97,
        ),
        (
            key_end("tokenizer.ggml.token_type"),
            key_end("tokenizer.ggml.merges"),
            97,
        ),
        (
            key_end("tokenizer.ggml.merges"),
            key_end("tokenizer.ggml.bos_token_id"),
            97,
        ),
        (template, template_end, 29),
        (directory + 256, header_end - 256, 7),
    ];
    let skipped = |len: usize| {
        repetitive
            .iter()
            .any(|&(a, b, step)| len > a + 64 && len + 64 < b && !len.is_multiple_of(step))
    };
    let mut checked = 0;
    for len in 0..header_end {
        if skipped(len) {
            continue;
        }
        let err = describe_bytes(&bytes[..len]).expect_err("a truncated header is an error");
        if len < 4 {
            assert!(
                matches!(err, EngineError::NotGguf { .. }),
                "at {len}: {err}"
            );
        } else {
            assert!(is_truncation(&err), "at {len}: {err:?}");
        }
        checked += 1;
    }
    assert!(checked > 4_000, "{checked}");
}

#[test]
fn truncation_inside_the_tensor_data_is_caught_when_opening() {
    let bytes = fixture_bytes();
    let dir = tempfile::tempdir().unwrap();
    let gguf = GgufFile::open(common::fixture(FIXTURE)).unwrap();
    let data_end = gguf.tensors.iter().map(|t| t.end()).max().unwrap() as usize;
    assert_eq!(data_end, bytes.len(), "the last tensor ends the file");
    let step = (bytes.len() - gguf.data_offset as usize) / 37;
    let cuts = (gguf.data_offset as usize..bytes.len())
        .step_by(step)
        .chain([bytes.len() - 1]);
    for len in cuts {
        let path = write_temp(dir.path(), "cut.gguf", &bytes[..len]);
        match open_and_describe(&path) {
            Err(EngineError::Truncated { what, .. }) => {
                assert!(what.contains("tensor"), "at {len}: {what}")
            }
            other => panic!("at {len}: {other:?}"),
        }
    }
}

#[test]
fn truncation_after_opening_is_caught_when_loading() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_temp(dir.path(), "shrinking.gguf", &fixture_bytes());
    let gguf = GgufFile::open(&path).unwrap();
    ModelInfo::from_gguf(&gguf).unwrap();
    let victim = gguf.tensor_info("blk.4.ffn_gate.weight").unwrap().clone();
    let cut = victim.offset + victim.n_bytes / 2;
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(cut)
        .unwrap();

    let mut file = File::open(&path).unwrap();
    let mut scratch = Vec::new();
    for t in &gguf.tensors {
        let result = gguf.load_qtensor(&mut file, t, &mut scratch);
        if t.end() <= cut {
            assert!(result.is_ok(), "{} lies before the cut", t.name);
        } else {
            match result {
                Err(EngineError::Truncated { what, .. }) => assert!(what.contains(&t.name)),
                other => panic!("{}: {:?}", t.name, other.map(|q| q.shape().clone())),
            }
        }
    }
}

#[test]
fn a_text_file_renamed_gguf_is_not_a_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_temp(
        dir.path(),
        "notes.gguf",
        b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1780000000\n",
    );
    let err = open_and_describe(&path).unwrap_err();
    assert!(matches!(err, EngineError::NotGguf { .. }), "{err:?}");
    assert!(err.to_string().contains("not a GGUF model file"), "{err}");
    let empty = write_temp(dir.path(), "empty.gguf", b"");
    assert!(matches!(
        open_and_describe(&empty),
        Err(EngineError::NotGguf { .. })
    ));
    let folder = dir.path().join("folder.gguf");
    std::fs::create_dir(&folder).unwrap();
    assert!(matches!(
        open_and_describe(&folder),
        Err(EngineError::Io { .. })
    ));
}

#[test]
fn random_bytes_are_rejected_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x5eed);
    let path = write_temp(dir.path(), "random.gguf", &rng.bytes(1 << 20));
    assert!(matches!(
        open_and_describe(&path),
        Err(EngineError::NotGguf { .. })
    ));
    // Random bytes behind a valid magic and version exercise every later check.
    for round in 0..2000 {
        let len = (rng.next() % 600) as usize;
        let mut bytes = b"GGUF\x03\0\0\0".to_vec();
        if round % 2 == 0 {
            // Small counts make the parser go further before it fails.
            bytes.extend_from_slice(&(rng.next() % 4).to_le_bytes());
            bytes.extend_from_slice(&(rng.next() % 4).to_le_bytes());
        }
        bytes.extend(rng.bytes(len));
        let _ = describe_bytes(&bytes);
    }
}

#[test]
fn random_corruption_of_a_real_header_never_panics() {
    let original = fixture_bytes();
    let header_end = GgufFile::open(common::fixture(FIXTURE))
        .unwrap()
        .data_offset as usize;
    let mut rng = Rng(42);
    let mut errors = 0;
    for _ in 0..300 {
        let mut bytes = original[..header_end].to_vec();
        for _ in 0..1 + rng.next() % 4 {
            let pos = (rng.next() % header_end as u64) as usize;
            bytes[pos] = rng.next() as u8;
        }
        bytes.resize(original.len(), 0);
        errors += usize::from(describe_bytes(&bytes).is_err());
    }
    assert!(errors > 0);
}

#[test]
fn absurd_counts_and_lengths_are_rejected() {
    let original = fixture_bytes();
    let tokens = after_string(&original, "tokenizer.ggml.tokens");
    // Layout after the key: value type (9), element type (8), element count.
    let count_pos = tokens + 8;
    assert_eq!(read_u64(&original, count_pos), 4352);
    let cases: [(usize, u64); 6] = [
        (count_pos, u64::MAX),
        (count_pos, 1 << 40),
        (count_pos, 3_000_000),
        (count_pos + 8, u64::MAX - 3), // the length of the first token
        (8, u64::MAX / 2),             // the tensor count
        (16, 1 << 50),                 // the metadata count
    ];
    for (pos, value) in cases {
        let mut bytes = original.clone();
        patch_u64(&mut bytes, pos, value);
        match describe_bytes(&bytes) {
            Err(EngineError::ImplausibleCount { .. } | EngineError::LimitExceeded { .. }) => {}
            other => panic!("{value} at {pos}: {:?}", other.map(|i| i.hparams)),
        }
    }
}

#[test]
fn an_unknown_architecture_is_named_with_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Editable::from_fixture();
    model.set("general.architecture", MetaValue::String("qwen2".into()));
    let err = open_and_describe(&model.save(&dir.path().join("qwen.gguf"))).unwrap_err();
    assert!(
        matches!(&err, EngineError::UnsupportedArchitecture { found, .. } if found == "qwen2"),
        "{err:?}"
    );
    let message = err.to_string();
    for name in ["qwen2", "smollm3", "llama"] {
        assert!(message.contains(name), "{message}");
    }
}

#[test]
fn missing_or_mistyped_keys_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Editable::from_fixture();
    model.remove_key("smollm3.embedding_length");
    let err = open_and_describe(&model.save(&dir.path().join("a.gguf"))).unwrap_err();
    assert!(
        matches!(&err, EngineError::MissingKey(k) if k == "smollm3.embedding_length"),
        "{err:?}"
    );

    let mut model = Editable::from_fixture();
    model.set("smollm3.block_count", MetaValue::String("eight".into()));
    let err = open_and_describe(&model.save(&dir.path().join("b.gguf"))).unwrap_err();
    assert!(
        matches!(&err, EngineError::InvalidMetadata { key, .. } if key == "smollm3.block_count"),
        "{err:?}"
    );

    let mut model = Editable::from_fixture();
    model.set("smollm3.attention.head_count_kv", MetaValue::U32(3));
    let err = open_and_describe(&model.save(&dir.path().join("c.gguf"))).unwrap_err();
    assert!(
        matches!(err, EngineError::InvalidMetadata { .. }),
        "{err:?}"
    );

    let mut model = Editable::from_fixture();
    model.set("smollm3.expert_count", MetaValue::U32(8));
    let err = open_and_describe(&model.save(&dir.path().join("d.gguf"))).unwrap_err();
    assert!(matches!(err, EngineError::UnsupportedModel(_)), "{err:?}");
}

#[test]
fn a_missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Editable::from_fixture();
    model
        .tensors
        .retain(|(spec, _)| spec.name != "blk.5.ffn_up.weight");
    let err = open_and_describe(&model.save(&dir.path().join("m.gguf"))).unwrap_err();
    assert!(
        matches!(&err, EngineError::MissingTensor(name) if name == "blk.5.ffn_up.weight"),
        "{err:?}"
    );
}

#[test]
fn a_wrong_shape_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Editable::from_fixture();
    model.tensor("blk.2.attn_k.weight").0.dims = vec![256, 256];
    let err = open_and_describe(&model.save(&dir.path().join("s.gguf"))).unwrap_err();
    match err {
        EngineError::WrongShape {
            name,
            expected,
            found,
        } => {
            assert_eq!(name, "blk.2.attn_k.weight");
            assert_eq!(expected, [256, 128]);
            assert_eq!(found, [256, 256]);
        }
        other => panic!("{other:?}"),
    }

    // A vocabulary that does not match the embedding rows.
    let mut model = Editable::from_fixture();
    let tokens = (0..4000)
        .map(|i| MetaValue::String(format!("t{i}")))
        .collect();
    model.set("tokenizer.ggml.tokens", MetaValue::Array(tokens));
    let err = open_and_describe(&model.save(&dir.path().join("v.gguf"))).unwrap_err();
    assert!(
        matches!(&err, EngineError::WrongShape { name, .. } if name == "token_embd.weight"),
        "{err:?}"
    );
}

#[test]
fn an_unknown_quantization_type_is_named() {
    let mut bytes = fixture_bytes();
    let pos = tensor_type_pos(&bytes, "blk.0.attn_q.weight");
    assert_eq!(
        u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()),
        12
    );
    patch_u32(&mut bytes, pos, 23);
    let err = describe_bytes(&bytes).unwrap_err();
    assert!(
        matches!(&err, EngineError::UnknownQuantization { name, type_id: 23 } if name == "blk.0.attn_q.weight"),
        "{err:?}"
    );
    assert!(err.to_string().contains("IQ4_XS"), "{err}");

    patch_u32(&mut bytes, pos, 0xdead);
    assert!(matches!(
        describe_bytes(&bytes),
        Err(EngineError::UnknownQuantization {
            type_id: 0xdead,
            ..
        })
    ));
}

#[test]
fn duplicate_tensor_names_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Editable::from_fixture();
    model.tensor("blk.1.attn_k.weight").0.name = "blk.1.attn_v.weight".into();
    let err = open_and_describe(&model.save(&dir.path().join("d.gguf"))).unwrap_err();
    assert!(
        matches!(&err, EngineError::DuplicateTensor(name) if name == "blk.1.attn_v.weight"),
        "{err:?}"
    );
}

#[test]
fn misplaced_tensor_data_is_rejected() {
    let original = fixture_bytes();
    let gguf = GgufFile::open(common::fixture(FIXTURE)).unwrap();
    let rel = |name: &str| gguf.tensor_info(name).unwrap().offset - gguf.data_offset;
    let offset_pos = tensor_type_pos(&original, "blk.3.ffn_gate.weight") + 4;
    assert_eq!(
        read_u64(&original, offset_pos),
        rel("blk.3.ffn_gate.weight")
    );

    let with_offset = |offset: u64| {
        let mut bytes = original.clone();
        patch_u64(&mut bytes, offset_pos, offset);
        describe_bytes(&bytes)
    };
    assert!(matches!(
        with_offset(rel("blk.3.ffn_gate.weight") + 4),
        Err(EngineError::MisalignedTensor { alignment: 32, .. })
    ));
    assert!(matches!(
        with_offset(rel("blk.3.ffn_down.weight")),
        Err(EngineError::OverlappingTensors { .. })
    ));
    assert!(matches!(
        with_offset(rel("blk.3.ffn_gate.weight") + 64),
        Err(EngineError::OverlappingTensors { .. })
    ));
    for outside in [original.len() as u64 / 32 * 32, 1 << 62, u64::MAX / 32 * 32] {
        match with_offset(outside) {
            Err(EngineError::Truncated { what, .. }) => assert!(what.contains("ffn_gate")),
            other => panic!("{outside}: {:?}", other.map(|i| i.hparams)),
        }
    }
}

#[test]
fn a_context_whose_rope_tables_would_be_huge_is_refused_at_load() {
    use smoldesk::engine::session::{Engine, LoadOptions};
    let dir = tempfile::tempdir().unwrap();
    let mut model = Editable::from_fixture();
    // Heads of 64 over 8M positions: 2 GiB of tables, past the 1 GiB allowed.
    model.set("smollm3.context_length", MetaValue::U32(1 << 23));
    let path = model.save(&dir.path().join("long.gguf"));
    let load = |context_length| {
        let options = LoadOptions {
            context_length,
            threads: 1,
        };
        Engine::load(&path, &options, &mut |_| true)
    };
    match load(1 << 23) {
        Err(EngineError::ContextTooLarge {
            context, head_dim, ..
        }) => assert_eq!((context, head_dim), (1 << 23, 64)),
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("a 2 GiB RoPE table was built"),
    }
    let err = load(usize::MAX).err().expect("refused");
    assert!(err.to_string().contains("shorter context"), "{err}");
    // The longest context the settings offer still loads.
    let engine = load(131_072).expect("131,072 tokens load");
    assert_eq!(engine.context_length(), 131_072);
}

#[test]
fn info_on_a_bad_file_fails_with_the_message_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let text = write_temp(
        dir.path(),
        "readme.gguf",
        b"# Not a model\nJust some notes.\n",
    );
    let cut = write_temp(dir.path(), "cut.gguf", &fixture_bytes()[..100_000]);
    for (path, expected) in [(text, "not a GGUF model file"), (cut, "incomplete")] {
        let output = Command::new(env!("CARGO_BIN_EXE_smoldesk"))
            .args(["info", "-m"])
            .arg(&path)
            .output()
            .expect("the binary runs");
        assert!(!output.status.success());
        assert!(output.stdout.is_empty());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
