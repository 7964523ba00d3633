//! Model descriptions of the fixtures and the real SmolLM2 model, through the library and
//! through `smoldesk info`; the synthetic models of `smoldesk synth`; and which kernels
//! `smoldesk bench` says it ran.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use smoldesk::engine::gguf::{GgufFile, dtype_name};
use smoldesk::engine::synth::{SynthPreset, write_synthetic_model};
use smoldesk::engine::{Architecture, ModelInfo};

fn describe(path: &Path) -> (GgufFile, ModelInfo) {
    let gguf = GgufFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let info = ModelInfo::from_gguf(&gguf).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (gguf, info)
}

/// Whether the real model at `path` is there; if not, says the test is skipped.
fn model_present(path: &Path) -> bool {
    let present = path.is_file();
    if !present {
        eprintln!(
            "skipped: {} is missing (scripts/fetch-test-model.sh)",
            path.display()
        );
    }
    present
}

fn smoldesk(args: &[&str]) -> Output {
    smoldesk_forcing(args, None)
}

/// `smoldesk ARGS` with `SMOLDESK_SIMD` set to `simd`, or unset.
fn smoldesk_forcing(args: &[&str], simd: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_smoldesk"));
    command.args(args).env_remove("SMOLDESK_SIMD");
    if let Some(level) = simd {
        command.env("SMOLDESK_SIMD", level);
    }
    command.output().expect("the binary runs")
}

fn stdout_json(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("stdout is JSON")
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|&(k, v)| (k.to_string(), v)).collect()
}

#[test]
fn describes_the_tiny_q4_k_m_fixture() {
    let (gguf, info) = describe(&common::fixture("tiny-smollm3-q4_k_m.gguf"));
    assert_eq!(info.architecture, Architecture::SmolLm3);
    assert_eq!(info.name.as_deref(), Some("tiny-smollm3"));
    let h = &info.hparams;
    assert_eq!(
        (
            h.n_layer,
            h.n_embd,
            h.n_ff,
            h.n_head,
            h.n_head_kv,
            h.head_dim
        ),
        (8, 256, 512, 4, 2, 64)
    );
    assert_eq!((h.context_length, h.vocab_size), (4096, 4352));
    assert_eq!(h.rope_theta, 5e6);
    assert!((h.rms_eps - 1e-6).abs() < 1e-12);
    assert_eq!(h.rope_layer_count(), 6);
    // 8 layers × 2 norms + the output norm; the embedding and attn_v/ffn_down on layers
    // 0, 3, 6, 7 as Q6_K; the other 48 matrices Q4_K.
    assert_eq!(
        info.tensor_types,
        counts(&[("F32", 17), ("Q4_K", 48), ("Q6_K", 9)])
    );
    assert_eq!(info.main_quantization(), Some("Q4_K"));
    assert_eq!(info.file_type.as_deref(), Some("Q4_K_M"));
    assert_eq!(info.quantization_label(), Some("Q4_K_M"));
    assert!(info.tied_embeddings);
    assert!(info.can_think);
    assert_eq!(info.chat_template.map(|t| t.chars().count()), Some(5498));
    assert_eq!(info.file_size, 3_944_032);
    let weights: u64 = gguf.tensors.iter().map(|t| t.n_bytes).sum();
    assert_eq!(info.weight_bytes, weights);
    assert!(weights < info.file_size && weights > info.file_size - gguf.data_offset - 4096);
    // Embedding + 8 × (attention 256·(256+128+128+256) + FFN 3·256·512 + 2 norms) + norm.
    let per_layer = 256 * (256 + 128 + 128 + 256) + 3 * 256 * 512 + 2 * 256;
    assert_eq!(info.n_params, 256 * 4352 + 8 * per_layer + 256);
}

#[test]
fn a_requantized_file_is_labelled_by_its_recipe_not_its_most_common_type() {
    let path = common::smollm2_q4km_path();
    if !model_present(&path) {
        return;
    }
    let (_, info) = describe(&path);
    // 576-wide rows are not whole 256-value k-quant blocks, so most matrices fell back to Q5_0.
    assert_eq!(info.main_quantization(), Some("Q5_0"));
    assert_eq!(info.quantization_label(), Some("Q4_K_M"));
    let summary = smoldesk::ui::model_panel::quantization_summary(&info);
    assert!(summary.starts_with("Q4_K_M: Q5_0 ("), "{summary}");
    assert!(
        summary.contains("Q6_K") && summary.contains("Q4_K"),
        "{summary}"
    );
}

#[test]
fn describes_the_f32_and_vocabulary_fixtures() {
    let (_, f32_info) = describe(&common::fixture("tiny-smollm3-f32.gguf"));
    assert_eq!(f32_info.tensor_types, counts(&[("F32", 74)]));
    assert_eq!(f32_info.main_quantization(), Some("F32"));
    assert_eq!(f32_info.file_type.as_deref(), Some("F32"));
    assert_eq!(f32_info.quantization_label(), Some("F32"));

    let (gguf, vocab) = describe(&common::fixture("smollm3-vocab.gguf"));
    assert!(gguf.tensors.is_empty());
    let h = &vocab.hparams;
    assert_eq!(
        (
            h.n_layer,
            h.n_embd,
            h.n_ff,
            h.n_head,
            h.n_head_kv,
            h.head_dim
        ),
        (36, 2048, 11008, 16, 4, 128)
    );
    assert_eq!((h.context_length, h.vocab_size), (65536, 128_256));
    assert_eq!(vocab.n_params, 0);
    assert!(vocab.tensor_types.is_empty());
    assert!(vocab.can_think);
}

#[test]
fn describes_the_real_smollm2_model() {
    let path = common::smollm2_path();
    if !model_present(&path) {
        return;
    }
    let (_, info) = describe(&path);
    assert_eq!(info.architecture, Architecture::Llama);
    let h = &info.hparams;
    assert_eq!(
        (
            h.n_layer,
            h.n_embd,
            h.n_ff,
            h.n_head,
            h.n_head_kv,
            h.head_dim
        ),
        (30, 576, 1536, 9, 3, 64)
    );
    assert_eq!((h.context_length, h.vocab_size), (8192, 49152));
    assert_eq!(h.rope_theta, 100_000.0);
    assert_eq!(h.rope_layer_count(), 30);
    assert_eq!(
        info.tensor_types,
        counts(&[("F32", 61), ("Q4_1", 210), ("Q8_0", 1)])
    );
    assert_eq!(info.main_quantization(), Some("Q4_1"));
    assert_eq!(info.file_type.as_deref(), Some("Q4_1"));
    assert!(info.tied_embeddings);
    assert!(!info.can_think);
    assert!(info.chat_template.is_some());
    // 134.5 M parameters: embedding 576·49152 + 30 layers + final norm.
    let per_layer = 576 * (576 + 192 + 192 + 576) + 3 * 576 * 1536 + 2 * 576;
    assert_eq!(info.n_params, 576 * 49152 + 30 * per_layer + 576);
}

#[test]
fn the_ram_estimate_grows_with_the_context() {
    let (_, info) = describe(&common::fixture("tiny-smollm3-q4_k_m.gguf"));
    // f16 keys and values (the cache's type): 2 × 8 layers × 2 heads × 64 × 2 bytes per token.
    assert_eq!(info.kv_cache_bytes(1), 4096);
    assert_eq!(info.kv_cache_bytes(4096), 4096 * 4096);
    let small = info.ram_estimate_bytes(512);
    let large = info.ram_estimate_bytes(4096);
    assert!(small > info.weight_bytes + info.kv_cache_bytes(512));
    assert!(large - small >= info.kv_cache_bytes(4096) - info.kv_cache_bytes(512));
}

#[test]
fn info_json_has_the_description_and_derived_fields() {
    let path = common::fixture("tiny-smollm3-q4_k_m.gguf");
    let path = path.to_str().unwrap();
    let json = stdout_json(&smoldesk(&["info", "-m", path, "--json"]));
    assert_eq!(json["architecture"], "smollm3");
    assert_eq!(json["name"], "tiny-smollm3");
    assert_eq!(json["hparams"]["n_layer"], 8);
    assert_eq!(json["hparams"]["vocab_size"], 4352);
    assert_eq!(json["tensor_types"]["Q6_K"], 9);
    assert_eq!(json["main_quantization"], "Q4_K");
    assert_eq!(json["file_type"], "Q4_K_M");
    assert_eq!(json["file_size"], 3_944_032);
    assert_eq!(json["can_think"], true);
    assert_eq!(json["has_chat_template"], true);
    assert_eq!(json["chat_template_chars"], 5498);
    assert_eq!(json["estimate_context"], 4096);
    assert!(json.get("chat_template").is_none());
    let (_, info) = describe(Path::new(path));
    assert_eq!(json["ram_estimate_bytes"], info.ram_estimate_bytes(4096));

    let with_template = stdout_json(&smoldesk(&["info", "-m", path, "--json", "--template"]));
    assert_eq!(
        with_template["chat_template"].as_str(),
        info.chat_template.as_deref()
    );
}

#[test]
fn info_text_names_the_essentials() {
    let path = common::fixture("tiny-smollm3-q4_k_m.gguf");
    let output = smoldesk(&["info", "--model", path.to_str().unwrap()]);
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    for expected in [
        "smollm3",
        "tiny-smollm3",
        "Q4_K_M (mostly Q4_K)",
        "Q6_K ×9",
        "4096 tokens",
        "on 6 of 8 layers",
        "4352 tokens",
        "can think     yes",
        "embedded (5498 characters)",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
    assert!(
        !text.contains("{%"),
        "the template is printed only with --template"
    );
}

/// Name, shape and type of every tensor, by name.
fn tensor_table(gguf: &GgufFile) -> BTreeMap<String, (Vec<u64>, &'static str)> {
    gguf.tensors
        .iter()
        .map(|t| (t.name.clone(), (t.dims.clone(), dtype_name(t.dtype))))
        .collect()
}

#[test]
fn the_tiny_synthetic_model_has_the_fixture_layout() {
    let fixture_path = common::fixture("tiny-smollm3-q4_k_m.gguf");
    let (fixture, fixture_info) = describe(&fixture_path);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("synth-tiny.gguf");
    write_synthetic_model(&out, &fixture, SynthPreset::Tiny, 3, &mut |_| {}).unwrap();
    let (synth, synth_info) = describe(&out);

    assert_eq!(tensor_table(&synth), tensor_table(&fixture));
    assert_eq!(synth_info.hparams, fixture_info.hparams);
    assert_eq!(synth_info.tensor_types, fixture_info.tensor_types);
    assert_eq!(synth_info.weight_bytes, fixture_info.weight_bytes);
    let keys = |g: &GgufFile| g.metadata.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&synth), keys(&fixture));
    for (key, value) in &fixture.metadata {
        if key.starts_with("tokenizer.") || key.starts_with("smollm3.") {
            assert_eq!(synth.get(key), Some(value), "{key}");
        }
    }
}

#[test]
fn synth_writes_a_model_that_info_describes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny.gguf");
    let vocab = common::fixture("tiny-smollm3-f32.gguf");
    let output = smoldesk(&[
        "synth",
        "--preset",
        "tiny",
        "--seed",
        "9",
        "--vocab",
        vocab.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json = stdout_json(&smoldesk(&["info", "-m", out.to_str().unwrap(), "--json"]));
    assert_eq!(json["architecture"], "smollm3");
    assert_eq!(json["file_type"], "Q4_K_M");
    assert_eq!(json["tensor_types"]["Q6_K"], 9);
    assert_eq!(json["tensor_types"]["Q4_K"], 48);
    assert_eq!(json["tensor_types"]["F32"], 17);
    assert_eq!(json["hparams"]["vocab_size"], 4352);

    let missing_vocab = smoldesk(&[
        "synth",
        "--vocab",
        dir.path().join("nope.gguf").to_str().unwrap(),
        "--out",
        dir.path().join("x.gguf").to_str().unwrap(),
    ]);
    assert!(!missing_vocab.status.success());
    assert!(!dir.path().join("x.gguf").exists());
}

#[test]
fn bench_names_the_kernels_it_ran_and_smoldesk_simd_lowers_them() {
    let model = common::fixture("tiny-smollm3-q4_k_m.gguf");
    let model = model.to_str().expect("a UTF-8 path");
    let args = [
        "bench",
        "-m",
        model,
        "--prompt-tokens",
        "2",
        "--gen-tokens",
        "2",
        "--threads",
        "1",
        "--json",
    ];
    let best = stdout_json(&smoldesk_forcing(&args, None));
    let expected_best = smoldesk::engine::cpu::detected_level().name();
    assert_eq!(best["simd"], expected_best, "{best}");
    let forced = stdout_json(&smoldesk_forcing(&args, Some("portable")));
    assert_eq!(forced["simd"], "portable", "{forced}");
}
