//! Hostile chat templates embedded in GGUF files: opening the model, chatting with it (the
//! worker's Generate) and counting tokens (the context meter) each end in the ChatML fallback
//! within a second, with no abort and no hang.

mod common;

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoldesk::chat::conversation::{ChatSettings, Message, Role};
use smoldesk::chat::template::PromptFormatter;
use smoldesk::engine::ModelInfo;
use smoldesk::engine::gguf::{GgufFile, MetaValue};
use smoldesk::engine::sampling::SamplingParams;
use smoldesk::engine::session::LoadOptions;
use smoldesk::engine::synth::GgufEncoder;
use smoldesk::engine::tokenizer::GgufTokenizer;
use smoldesk::ui::token_meter::{CountRequest, CountingModel, count_request};
use smoldesk::worker::WorkerHandle;
use smoldesk::worker::messages::{Command, Event, GenerateRequest};

/// What each hostile template must stay under, per stage.
const LIMIT: Duration = Duration::from_secs(1);
/// How long a test waits for a worker event before calling it a hang.
const HANG: Duration = Duration::from_secs(60);

/// Templates that try to abort (huge allocations) or hang (endless work) the app.
const HOSTILE: &[(&str, &str)] = &[
    (
        "huge tojson indent",
        "{{ messages | tojson(indent=100000000000) }}",
    ),
    ("huge indent filter", "{{ 'a\nb' | indent(100000000000) }}"),
    (
        "huge str.format width",
        "{{ '{:>100000000000}'.format(1) }}",
    ),
    ("huge string repeat", "{{ 'x' * 100000000000 }}"),
    (
        "nested loops of 99,999",
        "{% for i in range(99999) %}{% for j in range(99999) %}{{ '' }}{% endfor %}{% endfor %}",
    ),
    (
        "deep recursion",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    ),
    (
        "string doubling",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    ),
    (
        "self-containing namespace",
        "{% set ns = namespace() %}{% set ns.me = ns %}{{ ns | tojson }}",
    ),
    (
        "huge list repeat",
        "{{ (messages * 100000000) | join(',') }}",
    ),
    (
        "huge output",
        "{% for i in range(99999) %}{{ 'x' * 99999 }}{% endfor %}",
    ),
];

/// A template that is harmless until a message says "boom", then loops 99,999².
const TRIGGERED: &str = "{% for m in messages %}{% if 'boom' in m.content %}{% for i in range(99999) %}{% for j in range(99999) %}{{ '' }}{% endfor %}{% endfor %}{% endif %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Copies a GGUF file with its chat template replaced (metadata rewritten, tensor data copied).
fn gguf_with_template(source: &Path, template: &str, out: &Path) {
    let gguf = GgufFile::open(source).expect("open the fixture");
    let mut metadata = gguf.metadata.clone();
    metadata.insert(
        "tokenizer.chat_template".into(),
        MetaValue::String(template.to_string()),
    );
    let file = File::create(out).expect("create the copy");
    let mut enc = GgufEncoder::new(BufWriter::new(file));
    enc.header(3, gguf.tensors.len() as u64, metadata.len() as u64)
        .unwrap();
    for (key, value) in &metadata {
        enc.key_value(key, value).unwrap();
    }
    for tensor in &gguf.tensors {
        let type_id = smoldesk::engine::gguf::ggml_dtype_id(tensor.dtype);
        let rel_offset = tensor.offset - gguf.data_offset;
        enc.tensor_entry(&tensor.name, &tensor.dims, type_id, rel_offset)
            .unwrap();
    }
    enc.pad_to(gguf.alignment).unwrap();
    let mut data = File::open(source).unwrap();
    data.seek(SeekFrom::Start(gguf.data_offset)).unwrap();
    let mut bytes = Vec::new();
    data.read_to_end(&mut bytes).unwrap();
    enc.raw(&bytes).unwrap();
    enc.into_inner().flush().unwrap();
}

/// The small quantized SmolLM3 fixture with each hostile template, in a temporary folder.
fn hostile_models(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let fixture = common::fixture("tiny-smollm3-q4_k_m.gguf");
    HOSTILE
        .iter()
        .chain([&("triggered by a message", TRIGGERED)])
        .enumerate()
        .map(|(i, (name, template))| {
            let path = dir.join(format!("hostile-{i}.gguf"));
            gguf_with_template(&fixture, template, &path);
            (*name, path)
        })
        .collect()
}

fn settings() -> ChatSettings {
    ChatSettings {
        sampling: SamplingParams {
            max_tokens: 4,
            ..SamplingParams::greedy()
        },
        ..ChatSettings::default()
    }
}

/// The conversation sent: the triggered template explodes on it.
fn conversation() -> Vec<Message> {
    vec![Message::new(Role::User, "Say boom")]
}

/// Opens the model's metadata the way the worker and the model card do, builds the formatter.
fn open_formatter(path: &Path) -> (PromptFormatter, Arc<GgufTokenizer>) {
    let gguf = GgufFile::open(path).expect("the copy opens");
    let info = ModelInfo::from_gguf(&gguf).expect("model info");
    let tokenizer = Arc::new(GgufTokenizer::from_gguf(&gguf).expect("tokenizer"));
    (
        PromptFormatter::new(info.chat_template.as_deref(), None),
        tokenizer,
    )
}

#[test]
fn the_written_copy_keeps_the_model_and_replaces_the_template() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("copy.gguf");
    gguf_with_template(
        &common::fixture("tiny-smollm3-q4_k_m.gguf"),
        "{{ 'x' }}",
        &out,
    );
    let original = GgufFile::open(common::fixture("tiny-smollm3-q4_k_m.gguf")).unwrap();
    let copy = GgufFile::open(&out).unwrap();
    assert_eq!(
        copy.get("tokenizer.chat_template").and_then(|v| v.as_str()),
        Some("{{ 'x' }}")
    );
    assert_eq!(copy.tensors.len(), original.tensors.len());
    assert_eq!(
        copy.file_size - copy.data_offset,
        original.file_size - original.data_offset
    );
}

#[test]
fn hostile_templates_are_refused_when_the_model_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    for (name, path) in hostile_models(dir.path()) {
        let start = Instant::now();
        let (formatter, _) = open_formatter(&path);
        let elapsed = start.elapsed();
        eprintln!("open {name}: {} ms", elapsed.as_millis());
        assert!(elapsed < LIMIT, "{name}: opening took {elapsed:?}");
        if name == "triggered by a message" {
            assert!(
                formatter.fallback_reason().is_none(),
                "{name} is harmless at first"
            );
        } else {
            let reason = formatter
                .fallback_reason()
                .unwrap_or_else(|| panic!("{name}: no fallback"));
            assert!(reason.contains("chat template"), "{name}: {reason}");
        }
    }
}

#[test]
fn hostile_templates_count_tokens_with_chatml_quickly() {
    let dir = tempfile::tempdir().unwrap();
    for (name, path) in hostile_models(dir.path()) {
        let (formatter, tokenizer) = open_formatter(&path);
        let model = Arc::new(CountingModel {
            formatter,
            tokenizer: tokenizer.clone(),
            context_length: 1024,
        });
        let request = CountRequest {
            model,
            settings: settings(),
            history: vec![Message::new(Role::User, "Hello")],
            draft: "Say boom".into(),
        };
        let start = Instant::now();
        let count = count_request(&request).unwrap_or_else(|e| panic!("{name}: {e}"));
        let elapsed = start.elapsed();
        eprintln!("count {name}: {} ms", elapsed.as_millis());
        assert!(elapsed < LIMIT, "{name}: counting took {elapsed:?}");
        let chatml = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>user\nSay boom<|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(
            count.total,
            tokenizer.encode_prompt(chatml).unwrap().len(),
            "{name}"
        );
    }
}

#[test]
fn hostile_templates_chat_with_chatml_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let worker = WorkerHandle::spawn(Arc::new(|| {}));
    for (id, (name, path)) in (1..).zip(hostile_models(dir.path())) {
        worker.send(Command::LoadModel {
            id: 1000 + id,
            path: path.clone(),
            options: LoadOptions {
                context_length: 512,
                threads: 1,
            },
        });
        let start = Instant::now();
        loop {
            match worker.recv_timeout(HANG).expect("no hang while loading") {
                Event::LoadProgress { .. } => {}
                Event::Loaded { .. } => break,
                other => panic!("{name}: unexpected event while loading: {other:?}"),
            }
        }
        eprintln!("load {name}: {} ms", start.elapsed().as_millis());
        worker.send(Command::Generate(GenerateRequest {
            id,
            messages: conversation(),
            settings: settings(),
            conversation: None,
            resume: false,
        }));
        let start = Instant::now();
        let (prompt_text, fallback) = match worker.recv_timeout(HANG).expect("no hang") {
            Event::Started {
                prompt_text,
                template_fallback,
                ..
            } => (prompt_text, template_fallback),
            other => panic!("{name}: unexpected event: {other:?}"),
        };
        let elapsed = start.elapsed();
        eprintln!("chat {name}: {} ms to the prompt", elapsed.as_millis());
        assert!(
            elapsed < LIMIT,
            "{name}: building the prompt took {elapsed:?}"
        );
        assert!(fallback.is_some_and(|f| f.contains("ChatML") || f.contains("chat template")));
        assert_eq!(
            prompt_text, "<|im_start|>user\nSay boom<|im_end|>\n<|im_start|>assistant\n",
            "{name}"
        );
        loop {
            match worker.recv_timeout(HANG).expect("no hang while replying") {
                Event::Segment { .. } => {}
                Event::Finished { id: done, .. } if done == id => break,
                other => panic!("{name}: unexpected event while replying: {other:?}"),
            }
        }
    }
}
