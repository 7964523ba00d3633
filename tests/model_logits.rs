//! The SmolLM3 forward pass against llama.cpp's logits on the tiny fixture models.

mod common;

use serde_json::Value;
use smoldesk::engine::ModelInfo;
use smoldesk::engine::attention::SumOrder;
use smoldesk::engine::gguf::GgufFile;
use smoldesk::engine::model::{Model, argmax};

/// Loads a fixture with the KV cache precision its reference was computed with (the f32
/// model's reference used an f32 cache, the quantized one llama.cpp's default f16).
fn load(name: &str) -> Model {
    let gguf = GgufFile::open(common::fixture(name)).expect("open fixture");
    let info = ModelInfo::from_gguf(&gguf).expect("model info");
    let mut model = Model::load(&gguf, &info, 4096, &mut |_| true).expect("load model");
    model.set_kv_cache_f32(name.contains("f32"));
    model
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("token array")
        .iter()
        .map(|t| t.as_u64().expect("token id") as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("float array")
        .iter()
        .map(|x| x.as_f64().expect("float") as f32)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "vocabulary sizes differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Per-position comparison of our logits against the reference rows.
struct Comparison {
    positions: usize,
    argmax_equal: usize,
    max_diff: f32,
}

impl Comparison {
    fn new() -> Self {
        Self {
            positions: 0,
            argmax_equal: 0,
            max_diff: 0.0,
        }
    }

    fn add_row(&mut self, ours: &[f32], reference: &[f32]) {
        self.max_diff = self.max_diff.max(max_abs_diff(ours, reference));
        self.add_argmax(argmax(ours), argmax(reference));
    }

    fn add_argmax(&mut self, ours: u32, reference: u32) {
        self.positions += 1;
        if ours == reference {
            self.argmax_equal += 1;
        }
    }

    fn argmax_share(&self) -> f64 {
        self.argmax_equal as f64 / self.positions as f64
    }
}

/// Runs every reference sequence plus the long one through `model`.
fn compare(model: &mut Model, reference: &Value) -> Comparison {
    let mut cmp = Comparison::new();
    for seq in reference["logits"].as_array().expect("logits cases") {
        let tokens = ids(&seq["tokens"]);
        model.clear_cache();
        let rows = model.forward(&tokens, true).expect("forward");
        let expected = seq["all_positions"].as_array().expect("rows");
        assert_eq!(rows.len(), expected.len());
        for (ours, theirs) in rows.iter().zip(expected) {
            cmp.add_row(ours, &floats(theirs));
        }
    }
    let long = &reference["long"];
    let tokens = ids(&long["tokens"]);
    model.clear_cache();
    let rows = model.forward(&tokens, true).expect("long forward");
    let expected_argmax = ids(&long["argmax_per_position"]);
    assert_eq!(rows.len(), expected_argmax.len());
    for (row, &want) in rows.iter().zip(&expected_argmax) {
        cmp.add_argmax(argmax(row), want);
    }
    let last = rows.last().expect("long rows");
    cmp.max_diff = cmp
        .max_diff
        .max(max_abs_diff(last, &floats(&long["last_logits"])));
    cmp
}

#[test]
fn f32_model_matches_llama_cpp_logits() {
    let reference = common::read_json("tiny-smollm3-f32.ref.json");
    let mut model = load("tiny-smollm3-f32.gguf");
    let cmp = compare(&mut model, &reference);
    eprintln!(
        "f32: {} positions, argmax equal {}, max |diff| {:.5}",
        cmp.positions, cmp.argmax_equal, cmp.max_diff
    );
    assert!(cmp.max_diff < 0.01, "max logit diff {}", cmp.max_diff);
    assert_eq!(
        cmp.argmax_equal, cmp.positions,
        "argmax must match everywhere"
    );
}

#[test]
fn q4_k_m_model_matches_llama_cpp_within_tolerance() {
    let reference = common::read_json("tiny-smollm3-q4_k_m.ref.json");
    let mut model = load("tiny-smollm3-q4_k_m.gguf");
    let cmp = compare(&mut model, &reference);
    eprintln!(
        "q4_k_m: {} positions, argmax equal {} ({:.1}%), max |diff| {:.3}",
        cmp.positions,
        cmp.argmax_equal,
        100.0 * cmp.argmax_share(),
        cmp.max_diff
    );
    assert!(
        cmp.argmax_share() >= 0.85,
        "argmax agreement {:.3}",
        cmp.argmax_share()
    );
    assert!(cmp.max_diff <= 4.0, "max logit diff {}", cmp.max_diff);
}

#[test]
fn f32_model_greedy_tokens_match_llama_cpp() {
    let reference = common::read_json("tiny-smollm3-f32.ref.json");
    let mut model = load("tiny-smollm3-f32.gguf");
    for case in reference["greedy"].as_array().expect("greedy cases") {
        model.clear_cache();
        let prompt = ids(&case["prompt_tokens"]);
        let expected = ids(&case["generated"]);
        let mut logits = model.forward(&prompt, false).expect("prefill").remove(0);
        let mut generated = Vec::new();
        for _ in 0..expected.len() {
            let next = argmax(&logits);
            generated.push(next);
            logits = model.forward(&[next], false).expect("decode").remove(0);
        }
        assert_eq!(generated, expected);
    }
}

fn assert_rows_close(a: &[f32], b: &[f32], what: &str) {
    let diff = max_abs_diff(a, b);
    assert!(diff < 1e-3, "{what}: max diff {diff}");
}

/// The KV cache reproduces a prefill exactly. With llama.cpp's summation order a single token
/// rounds differently from a prompt row (llama.cpp's own prefill and decode differ the same
/// way), which the random quantized model amplifies, so that model is checked with one order for
/// every row; the float model is checked in both orders.
#[test]
fn incremental_decoding_matches_one_prefill_and_survives_truncation() {
    for (name, order) in [
        ("tiny-smollm3-f32.gguf", SumOrder::LlamaCpp),
        ("tiny-smollm3-f32.gguf", SumOrder::SameForEveryRow),
        ("tiny-smollm3-q4_k_m.gguf", SumOrder::SameForEveryRow),
    ] {
        let mut model = load(name);
        model.set_attention_order(order);
        let name = format!("{name} ({order:?})");
        let tokens: Vec<u32> = (0..40).map(|i| (i * 97 + 13) % 4000).collect();
        let full = model.forward(&tokens, true).expect("full prefill");

        // Prefill a prefix, then one token at a time.
        model.clear_cache();
        let prefix = 9;
        let first = model.forward(&tokens[..prefix], true).expect("prefix");
        for i in 0..prefix {
            assert_rows_close(&first[i], &full[i], &format!("{name} prefix position {i}"));
        }
        for (i, &t) in tokens.iter().enumerate().skip(prefix) {
            let row = model.forward(&[t], false).expect("decode").remove(0);
            assert_rows_close(&row, &full[i], &format!("{name} decode position {i}"));
        }

        // Truncate back to a prefix and continue with a multi-token chunk, then decode.
        model.truncate_cache(17);
        assert_eq!(model.cache_len(), 17);
        let rows = model
            .forward(&tokens[17..30], true)
            .expect("after truncate");
        for (j, row) in rows.iter().enumerate() {
            assert_rows_close(
                row,
                &full[17 + j],
                &format!("{name} re-prefill position {}", 17 + j),
            );
        }
        let row = model
            .forward(&[tokens[30]], false)
            .expect("decode")
            .remove(0);
        assert_rows_close(&row, &full[30], &format!("{name} decode after truncation"));
    }
}

#[test]
fn prompt_longer_than_context_is_a_clean_error() {
    let gguf = GgufFile::open(common::fixture("tiny-smollm3-f32.gguf")).expect("open");
    let info = ModelInfo::from_gguf(&gguf).expect("info");
    let mut model = Model::load(&gguf, &info, 32, &mut |_| true).expect("load");
    let tokens: Vec<u32> = (0..33).collect();
    let err = model.forward(&tokens, false).expect_err("must not fit");
    assert!(err.to_string().contains("context"), "{err}");
    // The model stays usable.
    assert_eq!(model.forward(&tokens[..8], false).expect("fits").len(), 1);
}

#[test]
fn cancelled_load_stops_early() {
    let gguf = GgufFile::open(common::fixture("tiny-smollm3-q4_k_m.gguf")).expect("open");
    let info = ModelInfo::from_gguf(&gguf).expect("info");
    let mut calls = 0;
    let result = Model::load(&gguf, &info, 64, &mut |_| {
        calls += 1;
        calls < 3
    });
    assert!(matches!(
        result,
        Err(smoldesk::engine::EngineError::Cancelled)
    ));
    assert_eq!(calls, 3);
}

#[test]
fn a_prefill_stopped_inside_any_layer_resumes_to_the_same_logits() {
    let mut model = load("tiny-smollm3-q4_k_m.gguf");
    let layers = model.hparams().n_layer;
    let tokens: Vec<u32> = (0..40).map(|i| 100 + 37 * i).collect();
    let whole = model.forward(&tokens, false).expect("whole prompt");
    model.clear_cache();

    let checks = std::cell::Cell::new(0usize);
    model
        .forward_cancellable(&tokens, false, &|| {
            checks.set(checks.get() + 1);
            false
        })
        .expect("not cancelled");
    let per_chunk = checks.get();
    assert!(
        per_chunk >= 5 * layers,
        "Stop is asked between the matrix products of every layer: {per_chunk} checks for {layers} layers"
    );

    for stop_at in [1, 2, 3, per_chunk / 2, per_chunk - 1] {
        model.clear_cache();
        let seen = std::cell::Cell::new(0usize);
        let stopped = model.forward_cancellable(&tokens, false, &|| {
            seen.set(seen.get() + 1);
            seen.get() >= stop_at
        });
        assert!(
            matches!(stopped, Err(smoldesk::engine::EngineError::Cancelled)),
            "stopped at check {stop_at}"
        );
        assert_eq!(model.cache_len(), 0, "a stopped chunk is not kept");
        let again = model.forward(&tokens, false).expect("after the stop");
        assert_eq!(again, whole, "stopped at check {stop_at}, then run again");
    }
}
