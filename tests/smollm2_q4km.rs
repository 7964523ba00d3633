//! Real weights: SmolLM2-135M-Instruct requantized by llama.cpp to Q4_K_M (Q4_K, Q6_K, Q5_0 and
//! Q8_0 tensors), to Q4_0 (Q4_0, Q8_0), to Q5_K_M (Q5_1, Q5_K, Q6_K, Q8_0) and to "Q2_K-mix"
//! (llama-quantize's Q2_K run, whose only k-quant here is Q3_K `ffn_down`, with the odd layers'
//! `ffn_down` in Q2_K instead: Q2_K, Q3_K, Q4_0, Q8_0), against llama.cpp's own greedy replies on
//! this kind of CPU (`tests/fixtures/smollm2-*.ref.json`, made by
//! `scripts/llamacpp/make-smollm2-q4km-ref.sh [q4_0|q5km|q2k]`). The replies must be the same
//! token for token: the kernels round as llama.cpp's do.

mod common;

use smoldesk::engine::model::argmax;
use smoldesk::engine::session::{Engine, LoadOptions};

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn greedy_reply(engine: &mut Engine, prompt: &[u32], max: usize, eos: u32) -> Vec<u32> {
    engine.reset();
    let mut logits = engine.prefill(prompt).expect("prefill").logits;
    let mut generated = Vec::new();
    while generated.len() < max {
        let next = argmax(&logits);
        generated.push(next);
        if next == eos {
            break;
        }
        logits = engine.decode(next).expect("decode");
    }
    generated
}

/// Checks every reply of the reference file `reference` on the model at `model`.
fn greedy_replies_equal(reference: &str, model: &std::path::Path) {
    let reference = common::read_repo_json(reference);
    let options = LoadOptions {
        threads: 2,
        ..LoadOptions::default()
    };
    let mut engine = Engine::load(model, &options, &mut |_| true).expect("load");
    let eos = reference["eos"].as_u64().expect("eos") as u32;
    let mut compared = 0;
    for case in reference["cases"].as_array().expect("cases") {
        let question = case["question"].as_str().expect("question");
        let prompt = ids(&case["prompt_tokens"]);
        let encoded = engine
            .tokenizer()
            .encode_prompt(case["prompt"].as_str().expect("prompt"))
            .expect("tokenize");
        assert_eq!(encoded, prompt, "prompt tokens of {question:?}");
        let expected = ids(&case["generated"]);
        let generated = greedy_reply(&mut engine, &prompt, expected.len(), eos);
        let same = generated
            .iter()
            .zip(&expected)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!("{question:?}: {same}/{} tokens equal", expected.len());
        assert_eq!(
            generated, expected,
            "{question:?}: reply differs from llama.cpp's"
        );
        compared += 1;
    }
    assert!(compared >= 6, "only {compared} reference replies");
}

#[test]
fn q4_k_m_greedy_replies_equal_llama_cpps_token_for_token() {
    greedy_replies_equal("smollm2-q4km.ref.json", &common::smollm2_q4km_path());
}

#[test]
fn q4_0_greedy_replies_equal_llama_cpps_token_for_token() {
    greedy_replies_equal("smollm2-q4_0.ref.json", &common::smollm2_q4_0_path());
}

#[test]
fn q5_k_m_greedy_replies_equal_llama_cpps_token_for_token() {
    greedy_replies_equal("smollm2-q5km.ref.json", &common::smollm2_q5km_path());
}

#[test]
fn q2_k_mix_greedy_replies_equal_llama_cpps_token_for_token() {
    greedy_replies_equal("smollm2-q2k.ref.json", &common::smollm2_q2k_path());
}
