//! Mutation fuzzing of GGUF loading: a few thousand mutated files (byte flips, truncations,
//! huge lengths and counts, corrupt types, shapes and offsets, odd hyper-parameters) go through
//! the real loading path (`GgufFile::open`, `ModelInfo::from_gguf`, the tokenizer, and for the
//! small model the model load and a forward step). None may panic, abort or hang, and the peak
//! memory stays bounded.
//!
//! The cases run in a child process (this test binary, re-run on the ignored `fuzz_child`
//! test) under an address-space limit, so that an abort or a runaway allocation is caught and
//! reported with the case that caused it. `SMOLDESK_FUZZ_CASES` and `SMOLDESK_FUZZ_SEED` run
//! more or other cases.

mod common;

use std::io::Read as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use smoldesk::engine::ModelInfo;
use smoldesk::engine::gguf::{GgufFile, MetaValue};
use smoldesk::engine::session::{Engine, LoadOptions};
use smoldesk::engine::synth::{
    GgufEncoder, SynthShape, synth_metadata, synth_tensor_specs, write_gguf,
};
use smoldesk::engine::tokenizer::GgufTokenizer;

/// Mutants of the small synthetic model (whole loading path, model included).
const SMALL_CASES: usize = 2400;
/// Mutants of the tiny SmolLM3 fixture's header (metadata and tokenizer).
const FIXTURE_CASES: usize = 600;
/// The child's address-space limit (KiB): a huge allocation fails instead of filling memory.
const ADDRESS_SPACE_KIB: u64 = 8 << 20;
/// The most resident memory the child may ever have used.
const PEAK_RSS_LIMIT_KIB: u64 = 1 << 20;
/// The longest the whole run may take before it counts as a hang.
const HANG: Duration = Duration::from_secs(300);
/// The longest one case may take.
const SLOW_CASE: Duration = Duration::from_secs(5);

/// A deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// What a field of the file holds, for targeted mutations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldKind {
    /// A u64 count or length (header counts, string lengths, array lengths).
    Length,
    /// A u32 type id (metadata value type, array element type, tensor type).
    TypeId,
    /// A metadata number of 4 or 8 bytes.
    Number,
    /// A tensor's number of dimensions (u32).
    DimCount,
    /// A tensor dimension (u64).
    Dim,
    /// A tensor's data offset (u64).
    TensorOffset,
}

/// A field at a byte offset, with its width.
#[derive(Debug, Clone, Copy)]
struct Field {
    offset: usize,
    width: usize,
    kind: FieldKind,
}

/// Walks a well-formed GGUF's header and records where its fields are.
struct Walker<'a> {
    bytes: &'a [u8],
    pos: usize,
    fields: Vec<Field>,
}

impl Walker<'_> {
    fn take(&mut self, width: usize, kind: Option<FieldKind>) -> u64 {
        let mut value = [0u8; 8];
        value[..width].copy_from_slice(&self.bytes[self.pos..self.pos + width]);
        if let Some(kind) = kind {
            self.fields.push(Field {
                offset: self.pos,
                width,
                kind,
            });
        }
        self.pos += width;
        u64::from_le_bytes(value)
    }

    fn string(&mut self) {
        let len = self.take(8, Some(FieldKind::Length));
        self.pos += len as usize;
    }

    fn value(&mut self, type_id: u64) {
        match type_id {
            0 | 1 | 7 => self.pos += 1,
            2 | 3 => self.pos += 2,
            4..=6 => {
                self.take(4, Some(FieldKind::Number));
            }
            10..=12 => {
                self.take(8, Some(FieldKind::Number));
            }
            8 => self.string(),
            9 => {
                let elem = self.take(4, Some(FieldKind::TypeId));
                let count = self.take(8, Some(FieldKind::Length));
                // Record only the first few elements of long arrays.
                for i in 0..count {
                    if i < 4 {
                        self.value(elem);
                    } else {
                        let saved = self.fields.len();
                        self.value(elem);
                        self.fields.truncate(saved);
                    }
                }
            }
            other => panic!("the fixture has an unknown type {other}"),
        }
    }

    /// The fields of the header of a valid file.
    fn fields(bytes: &[u8]) -> Vec<Field> {
        let mut w = Walker {
            bytes,
            pos: 8,
            fields: Vec::new(),
        };
        let n_tensors = w.take(8, Some(FieldKind::Length));
        let n_kv = w.take(8, Some(FieldKind::Length));
        for _ in 0..n_kv {
            w.string();
            let type_id = w.take(4, Some(FieldKind::TypeId));
            w.value(type_id);
        }
        for _ in 0..n_tensors {
            w.string();
            let n_dims = w.take(4, Some(FieldKind::DimCount));
            for _ in 0..n_dims {
                w.take(8, Some(FieldKind::Dim));
            }
            w.take(4, Some(FieldKind::TypeId));
            w.take(8, Some(FieldKind::TensorOffset));
        }
        w.fields
    }
}

/// Values that break lengths, counts, shapes and offsets.
const HOSTILE_U64: &[u64] = &[
    0,
    1,
    u64::MAX,
    u64::MAX / 2,
    1 << 31,
    1 << 32,
    1 << 40,
    1 << 62,
    0x7FFF_FFFF_FFFF_FFFF,
    255,
    65_537,
];
/// Values that break type ids and 32-bit numbers.
const HOSTILE_U32: &[u32] = &[0, 1, 2, 8, 9, 12, 13, 30, 39, 1000, u32::MAX, 0x8000_0000];

/// Applies one random mutation; returns what it did.
fn mutate_once(bytes: &mut Vec<u8>, fields: &[Field], header_end: usize, rng: &mut Rng) -> String {
    let len = bytes.len();
    if len == 0 {
        return "nothing left to mutate".into();
    }
    match rng.below(10) {
        0 | 1 => {
            let whole = rng.below(4) == 0;
            let at = rng.below(if whole { len } else { header_end.min(len) });
            let mask = (rng.next() as u8) | 1;
            bytes[at] ^= mask;
            format!("flip byte {at} with {mask:#04x}")
        }
        2 => {
            let at = rng.below(len);
            bytes.truncate(at);
            format!("truncate to {at}")
        }
        3 => {
            let at = rng.below(header_end);
            let n = 1 + rng.below(16);
            let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            bytes.splice(at..at, junk);
            format!("insert {n} bytes at {at}")
        }
        4 => {
            let at = rng.below(header_end.min(len));
            let n = (1 + rng.below(16)).min(len - at);
            bytes.drain(at..at + n);
            format!("remove {n} bytes at {at}")
        }
        _ => {
            let field = fields[rng.below(fields.len())];
            if field.offset + field.width > len {
                return format!("skip a field beyond the end at {}", field.offset);
            }
            let value = match (field.kind, field.width) {
                (_, 8) if rng.below(3) == 0 => rng.next(),
                (FieldKind::TensorOffset, _) if rng.below(2) == 0 => {
                    let old = read_u64(bytes.as_slice(), field.offset);
                    old.wrapping_add(rng.pick(&[1, 32, 4096, u64::MAX]))
                }
                (_, 8) => rng.pick(HOSTILE_U64),
                (FieldKind::Number, _) if rng.below(3) == 0 => u64::from(
                    rng.pick(&[f32::NAN, f32::INFINITY, -1.0, 1e30, 0.0])
                        .to_bits(),
                ),
                _ => u64::from(rng.pick(HOSTILE_U32)),
            };
            bytes[field.offset..field.offset + field.width]
                .copy_from_slice(&value.to_le_bytes()[..field.width]);
            format!("set {:?} at {} to {value:#x}", field.kind, field.offset)
        }
    }
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(v)
}

/// GPT-2's byte alphabet: the character byte `b` is stored as in a byte-level vocabulary.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        char::from(b)
    } else {
        let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(0x100 + rank).unwrap()
    }
}

/// A small valid SmolLM3-architecture model: 2 layers of width 32, F32, a 264-token
/// byte-level vocabulary with a few merges and the chat specials.
fn small_model_bytes() -> Vec<u8> {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    let merged = ["he", "Ġt", "Ġthe"];
    tokens.extend(merged.iter().map(|s| s.to_string()));
    let specials = [
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<think>",
        "</think>",
    ];
    tokens.extend(specials.iter().map(|s| s.to_string()));
    let mut types = vec![1i32; 256 + merged.len()];
    types.extend([3, 3, 3, 4, 4]);
    let strings = |items: &[&str]| {
        MetaValue::Array(
            items
                .iter()
                .map(|s| MetaValue::String(s.to_string()))
                .collect(),
        )
    };
    let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let im_end = (256 + merged.len() + 1) as u32;
    let vocab_meta = [
        ("general.architecture", MetaValue::String("smollm3".into())),
        ("tokenizer.ggml.model", MetaValue::String("gpt2".into())),
        ("tokenizer.ggml.pre", MetaValue::String("smaug-bpe".into())),
        ("tokenizer.ggml.tokens", strings(&token_refs)),
        (
            "tokenizer.ggml.token_type",
            MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()),
        ),
        ("tokenizer.ggml.merges", strings(&["h e", "Ġ t", "Ġt he"])),
        ("tokenizer.ggml.bos_token_id", MetaValue::U32(im_end + 1)),
        ("tokenizer.ggml.eos_token_id", MetaValue::U32(im_end)),
        (
            "tokenizer.chat_template",
            MetaValue::String(smoldesk::chat::template::CHATML_TEMPLATE.into()),
        ),
    ];
    let vocab = GgufFile {
        path: "vocab.gguf".into(),
        file_size: 0,
        version: 3,
        metadata: vocab_meta
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        tensors: Vec::new(),
        tensor_index: Default::default(),
        alignment: 32,
        data_offset: 0,
    };
    let shape = SynthShape {
        n_layer: 2,
        n_embd: 32,
        n_ff: 64,
        n_head: 2,
        n_head_kv: 1,
        head_dim: 16,
        rope_theta: 10_000.0,
        rms_eps: 1e-6,
        context_length: 64,
    };
    let metadata = synth_metadata(&shape, &vocab, "fuzz").unwrap();
    let mut specs = synth_tensor_specs(&shape, tokens.len());
    for spec in &mut specs {
        spec.dtype = candle_core::quantized::GgmlDType::F32;
    }
    let mut enc = GgufEncoder::new(Vec::new());
    let mut seed = 1u32;
    write_gguf(
        &mut enc,
        Path::new("small.gguf"),
        &metadata,
        &specs,
        |_, spec, enc| {
            let n = spec.dims.iter().product::<u64>() as usize;
            let data: Vec<u8> = (0..n)
                .flat_map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    ((seed >> 8) as f32 / (1 << 24) as f32 * 0.1 - 0.05).to_le_bytes()
                })
                .collect();
            enc.raw(&data)
                .map_err(|source| smoldesk::engine::EngineError::Io {
                    path: "small.gguf".into(),
                    source,
                })
        },
    )
    .unwrap();
    enc.into_inner()
}

/// One base file to mutate.
struct Base {
    name: &'static str,
    bytes: Vec<u8>,
    fields: Vec<Field>,
    header_end: usize,
    /// The size the reader is told (the fixture's header is read from memory without its data).
    virtual_size: Option<u64>,
    cases: usize,
}

impl Base {
    fn new(name: &'static str, bytes: Vec<u8>, virtual_size: Option<u64>, cases: usize) -> Self {
        let gguf = GgufFile::read(
            bytes.as_slice(),
            virtual_size.unwrap_or(bytes.len() as u64),
            Path::new(name),
        )
        .expect("the base file is valid");
        let header_end = (gguf.data_offset as usize).min(bytes.len());
        Self {
            name,
            fields: Walker::fields(&bytes),
            bytes,
            header_end,
            virtual_size,
            cases,
        }
    }
}

/// The whole loading path for one mutant; errors are expected, panics are not.
fn load_everything(bytes: &[u8], virtual_size: Option<u64>, file: &Path) {
    let gguf = match virtual_size {
        Some(size) => GgufFile::read(bytes, size, file),
        None => {
            std::fs::write(file, bytes).unwrap();
            GgufFile::open(file)
        }
    };
    let Ok(gguf) = gguf else {
        return;
    };
    let info = ModelInfo::from_gguf(&gguf);
    if let Ok(tokenizer) = GgufTokenizer::from_gguf(&gguf) {
        if let Ok(ids) =
            tokenizer.encode_prompt("<|im_start|>user\nHello the <think>x</think>😀<|im_end|>")
        {
            let _ = tokenizer.decode(&ids);
        }
        let _ = tokenizer.contains_special_text("<|im_end|>");
    }
    if let Ok(info) = info {
        let _ = info.ram_estimate_bytes(4096);
        if virtual_size.is_none() {
            let options = LoadOptions {
                context_length: 32,
                threads: 1,
            };
            if let Ok(mut engine) = Engine::load(file, &options, &mut |_| true) {
                let _ = engine.prefill(&[1, 2, 3]);
            }
        }
    }
}

/// The peak resident memory of this process, from /proc/self/status (KiB).
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

/// The child side: runs every case, printing each before it runs.
#[test]
#[ignore = "run by gguf_loading_survives_mutations in a child process"]
fn fuzz_child() {
    let scale = env_number("SMOLDESK_FUZZ_CASES")
        .map_or(1.0, |n| n as f64 / (SMALL_CASES + FIXTURE_CASES) as f64);
    let seed = env_number("SMOLDESK_FUZZ_SEED").unwrap_or(0x005E_ED0F_6617);
    let fixture = std::fs::read(common::fixture("tiny-smollm3-q4_k_m.gguf")).unwrap();
    let fixture_size = fixture.len() as u64;
    let header_len = GgufFile::read(fixture.as_slice(), fixture_size, Path::new("fixture"))
        .unwrap()
        .data_offset as usize;
    let bases = [
        Base::new(
            "small model",
            small_model_bytes(),
            None,
            (SMALL_CASES as f64 * scale) as usize,
        ),
        Base::new(
            "tiny-smollm3 header",
            fixture[..header_len].to_vec(),
            Some(fixture_size),
            (FIXTURE_CASES as f64 * scale) as usize,
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mutant.gguf");
    // The unmutated small model loads completely (so the mutants reach the model load).
    let base = &bases[0];
    std::fs::write(&file, &base.bytes).unwrap();
    Engine::load(
        &file,
        &LoadOptions {
            context_length: 32,
            threads: 1,
        },
        &mut |_| true,
    )
    .expect("the small model loads");

    let mut rng = Rng(seed);
    let mut failures = Vec::new();
    let mut slowest = (Duration::ZERO, String::new());
    for base in &bases {
        for case in 0..base.cases {
            let mut bytes = base.bytes.clone();
            let n_mutations = 1 + rng.below(3);
            let what: Vec<String> = (0..n_mutations)
                .map(|_| {
                    let header_end = base.header_end.min(bytes.len()).max(1);
                    mutate_once(&mut bytes, &base.fields, header_end, &mut rng)
                })
                .collect();
            let label = format!("{} #{case}: {}", base.name, what.join(", "));
            println!("case {label}");
            let start = Instant::now();
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                load_everything(&bytes, base.virtual_size, &file)
            }));
            let elapsed = start.elapsed();
            if elapsed > slowest.0 {
                slowest = (elapsed, label.clone());
            }
            if outcome.is_err() {
                failures.push(format!("panic in {label}"));
            }
            if elapsed > SLOW_CASE {
                failures.push(format!("{label} took {elapsed:?}"));
            }
        }
    }
    let peak = peak_rss_kib().unwrap_or(0);
    println!("slowest case: {:?} ({})", slowest.0, slowest.1);
    println!("peak RSS: {} MiB", peak / 1024);
    assert!(peak < PEAK_RSS_LIMIT_KIB, "peak RSS {peak} KiB");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    println!("FUZZ OK");
}

#[test]
fn gguf_loading_survives_mutations() {
    let exe = std::env::current_exe().unwrap();
    let script = format!(
        "ulimit -v {ADDRESS_SPACE_KIB} && exec \"$0\" --exact fuzz_child --ignored --nocapture --test-threads 1"
    );
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(&exe)
        .env("RUST_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > HANG {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = stdout.join().unwrap();
    let err = stderr.join().unwrap();
    let tail = |text: &str| {
        text.lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    };
    eprintln!("{}", tail(&out));
    let Some(status) = status else {
        panic!(
            "the fuzzer hung after {HANG:?}; last output:\n{}",
            tail(&out)
        );
    };
    assert!(
        status.success() && out.contains("FUZZ OK"),
        "the fuzz run failed ({status}) after {:?}:\n{}\n{}",
        start.elapsed(),
        tail(&out),
        tail(&err)
    );
}
