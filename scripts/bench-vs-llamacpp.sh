#!/usr/bin/env bash
# Speed of `smoldesk bench` and llama.cpp on the same synthetic SmolLM3-3B Q4_K_M, one after the
# other on the same machine (compare ratios, not absolute numbers). Needs llama-cpp-python
# (scripts/llamacpp/install.sh builds it). Usage: scripts/bench-vs-llamacpp.sh [MODEL.gguf]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/smoldesk-target}"
MODEL="${1:-/var/tmp/synth-smollm3-3b.gguf}"
PROMPT="${PROMPT_TOKENS:-512}"
GEN="${GEN_TOKENS:-128}"
THREADS="${THREADS:-2}"

cargo build --release --locked --bin smoldesk
BIN="$CARGO_TARGET_DIR/release/smoldesk"
[ -f "$MODEL" ] || "$BIN" synth --out "$MODEL" --preset smollm3-3b

echo "smoldesk:"
"$BIN" bench -m "$MODEL" --prompt-tokens "$PROMPT" --gen-tokens "$GEN" --threads "$THREADS" --json
echo "llama.cpp:"
python3 scripts/llamacpp/bench.py "$MODEL" --prompt-tokens "$PROMPT" --gen-tokens "$GEN" \
    --threads "$THREADS"
