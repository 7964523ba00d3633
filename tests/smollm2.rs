//! The real SmolLM2-135M-Instruct (Llama architecture) against llama.cpp's greedy replies.

mod common;

use std::process::Command;

use smoldesk::engine::model::argmax;
use smoldesk::engine::session::{Engine, LoadOptions};

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn prompt_tokens_and_greedy_tokens_match_llama_cpp() {
    let reference = common::read_json("smollm2-135m-chat.ref.json");
    let mut engine = Engine::load(
        &common::smollm2_path(),
        &LoadOptions::default(),
        &mut |_| true,
    )
    .expect("load");
    let eos = reference["eos"].as_u64().expect("eos") as u32;
    let mut full_matches = 0;
    for case in reference["cases"].as_array().expect("cases") {
        let question = case["question"].as_str().expect("question");
        let prompt = case["prompt"].as_str().expect("prompt");
        let expected_prompt = ids(&case["prompt_tokens"]);
        let expected = ids(&case["generated"]);

        let prompt_ids = engine.tokenizer().encode_prompt(prompt).expect("tokenize");
        assert_eq!(prompt_ids, expected_prompt, "prompt tokens of {question:?}");

        let mut logits = engine.prefill(&prompt_ids).expect("prefill").logits;
        let mut generated = Vec::new();
        let mut divergence_margin = None;
        while generated.len() < expected.len() {
            let next = argmax(&logits);
            let want = expected[generated.len()];
            if next != want && divergence_margin.is_none() {
                divergence_margin = Some(logits[next as usize] - logits[want as usize]);
            }
            generated.push(next);
            if next == eos {
                break;
            }
            logits = engine.decode(next).expect("decode");
        }
        let matching = generated
            .iter()
            .zip(&expected)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "{question:?}: {matching}/{} greedy tokens match llama.cpp (divergence margin {divergence_margin:?})",
            expected.len()
        );
        if matching >= expected.len().min(20) {
            full_matches += 1;
        } else {
            // Where we part ways the two candidates must be a near tie, not a wrong model.
            let margin = divergence_margin.unwrap_or(f32::INFINITY);
            assert!(
                margin < 0.05,
                "{question:?}: diverges after {matching} tokens with margin {margin}\nours:   {generated:?}\ntheirs: {expected:?}"
            );
        }
    }
    // At most one of the four replies may part ways (on a near tie) before 20 tokens.
    assert!(
        full_matches >= 3,
        "only {full_matches} replies match llama.cpp"
    );
}

#[test]
fn generate_command_answers_like_llama_cpp() {
    let reference = common::read_json("smollm2-135m-chat.ref.json");
    let case = &reference["cases"][0];
    let question = case["question"].as_str().expect("question");
    let output = Command::new(env!("CARGO_BIN_EXE_smoldesk"))
        .args(["generate", "-m"])
        .arg(common::smollm2_path())
        .args(["--prompt", question, "--temperature", "0", "--json"])
        .output()
        .expect("run smoldesk generate");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().expect("JSON line");
    let json: serde_json::Value = serde_json::from_str(last).expect("JSON result");
    assert_eq!(json["answer"].as_str(), case["text"].as_str());
    assert_eq!(json["thinking"].as_str(), Some(""));
    assert!(stdout.starts_with(case["text"].as_str().expect("text")));
}
