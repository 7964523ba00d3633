//! Writes synthetic GGUF models with random weights (SmolLM3-3B-shaped Q4_K_M for benchmarks).
