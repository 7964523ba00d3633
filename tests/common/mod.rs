//! Helpers shared by the integration tests: where the fixtures and test models are.
#![allow(dead_code)]

pub mod golden;

use std::path::PathBuf;

/// The read-only fixtures folder (`shared/fixtures` beside the checkout).
pub fn fixtures_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SMOLDESK_FIXTURES") {
        return PathBuf::from(dir);
    }
    let beside = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    if beside.is_dir() {
        return beside;
    }
    PathBuf::from("/work/shared/fixtures")
}

/// A file in the fixtures folder.
pub fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// The real SmolLM2-135M-Instruct model fetched by `scripts/fetch-test-model.sh`.
pub fn smollm2_path() -> PathBuf {
    if let Ok(p) = std::env::var("SMOLDESK_SMOLLM2") {
        return PathBuf::from(p);
    }
    let local =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if local.is_file() {
        return local;
    }
    PathBuf::from("/work/main/models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Reads and parses a JSON fixture.
pub fn read_json(name: &str) -> serde_json::Value {
    let path = fixture(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON in {}: {e}", path.display()))
}

/// SmolLM2-135M-Instruct requantized to Q4_K_M by llama.cpp's `llama-quantize` (made by
/// `scripts/fetch-test-model.sh`): real weights in Q4_K, Q6_K, Q5_0 and Q8_0.
pub fn smollm2_q4km_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_K_M.gguf")
}

/// SmolLM2-135M-Instruct requantized to Q4_0 by `llama-quantize` (made by
/// `scripts/fetch-test-model.sh`): real weights in Q4_0, the embedding in Q8_0.
pub fn smollm2_q4_0_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_0.gguf")
}

/// SmolLM2-135M-Instruct requantized to Q5_K_M by `llama-quantize` (made by
/// `scripts/fetch-test-model.sh`): real weights in Q5_1 (rows of 576), Q5_K, Q6_K and Q8_0.
pub fn smollm2_q5km_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q5_K_M.gguf")
}

/// SmolLM2-135M-Instruct requantized by `llama-quantize`'s Q2_K run with the odd layers' `ffn_down`
/// in Q2_K (made by `scripts/fetch-test-model.sh`; not a llama-quantize preset): real weights in
/// Q2_K and Q3_K (`ffn_down`, rows of 1536), Q4_0 (rows of 576) and Q8_0 (the embedding).
pub fn smollm2_q2k_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q2_K-mix.gguf")
}

/// Reads and parses a JSON file of the repository's own `tests/fixtures/`.
pub fn read_repo_json(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON in {}: {e}", path.display()))
}
