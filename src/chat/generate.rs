//! The generation loop: prompt, prefill with KV reuse, sampling, stopping, thinking split.
