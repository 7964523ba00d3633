#!/usr/bin/env bash
# Regenerates tests/fixtures/smollm2-q4km.ref.json (or, with the argument `q4_0`, `q5km` or `q2k`,
# smollm2-q4_0.ref.json, smollm2-q5km.ref.json or smollm2-q2k.ref.json, the last on the Q2_K-mix
# model): llama.cpp's greedy replies on the requantized SmolLM2 test model
# (scripts/fetch-test-model.sh makes it) for the four questions of
# ../shared/fixtures/smollm2-135m-chat.ref.json plus three more, with 2 threads; checks that 1
# thread gives the same ids and margins, and records the build and CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-q4km}" in
  q4km)
    model=models/SmolLM2-135M-Instruct.Q4_K_M.gguf
    out=tests/fixtures/smollm2-q4km.ref.json
    simd_path="AVX2+FMA+F16C (-march=native, no AVX-512): Q4_K weights repacked to q4_K_8x8 \
(gemv/gemm_q4_K_8x8_q8_K), Q6_K vec_dot (tiled path from 8 rows), Q5_0/Q8_0 vec_dot for 1 row, \
llamafile tinyBLAS_Q0_AVX for more"
    ;;
  q4_0)
    model=models/SmolLM2-135M-Instruct.Q4_0.gguf
    out=tests/fixtures/smollm2-q4_0.ref.json
    simd_path="AVX2+FMA+F16C (-march=native, no AVX-512): Q4_0 weights repacked to q4_0_8x8 \
(gemv/gemm_q4_0_8x8_q8_0) for every batch size, Q8_0 (token_embd, the tied head) vec_dot for \
1 row, llamafile tinyBLAS_Q0_AVX for more"
    ;;
  q5km)
    model=models/SmolLM2-135M-Instruct.Q5_K_M.gguf
    out=tests/fixtures/smollm2-q5km.ref.json
    simd_path="AVX2+FMA+F16C (-march=native, no AVX-512): Q5_K and Q6_K vec_dot (tiled path \
from 8 rows), Q5_1 vec_dot, Q8_0 (token_embd, the tied head) vec_dot for 1 row, llamafile \
tinyBLAS_Q0_AVX for more"
    ;;
  q2k)
    model=models/SmolLM2-135M-Instruct.Q2_K-mix.gguf
    out=tests/fixtures/smollm2-q2k.ref.json
    simd_path="AVX2+FMA+F16C (-march=native, no AVX-512): Q2_K (odd layers' ffn_down) and Q3_K \
(even layers' ffn_down) not repacked (q2_K_8x8 needs AVX-512), vec_dot_q2_K_q8_K/q3_K_q8_K \
below 8 rows (every decode step, and the last layer's ffn_down in the prefill, which runs on the \
output row only), tiled K-quant path from 8 rows; Q4_0 weights repacked to q4_0_8x8 \
(gemv/gemm_q4_0_8x8_q8_0) for every batch size; Q8_0 (token_embd, the tied head) vec_dot for \
1 row, llamafile tinyBLAS_Q0_AVX for more"
    ;;
  *) echo "usage: $0 [q4km|q4_0|q5km|q2k]" >&2; exit 2 ;;
esac
questions=/work/shared/fixtures/smollm2-135m-chat.ref.json
[ -f "$questions" ] || questions=../shared/fixtures/smollm2-135m-chat.ref.json
scripts/fetch-test-model.sh >/dev/null
scripts/llamacpp/install.sh llama
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for threads in 2 1; do
  python3 scripts/llamacpp/replies.py "$model" --questions-from "$questions" \
    --question "Explain why the sky is blue in two sentences." \
    --question "List three fruits that are red." \
    --question "Write a short Python function that adds two numbers." \
    --threads "$threads" --out "$tmp/t$threads.json"
done
python3 - "$tmp/t2.json" "$tmp/t1.json" "$out" "$simd_path" <<'PY'
import json, sys
sys.path.insert(0, "scripts/llamacpp")
from buildinfo import build_info
two, one = (json.load(open(p)) for p in sys.argv[1:3])
target = sys.argv[3]
same = all(a["generated"] == b["generated"] and a["top2"] == b["top2"] for a, b in zip(two["cases"], one["cases"]))
two["llama_cpp_build"] = build_info("/var/tmp/llamacpp/build-native")
two["simd_path"] = sys.argv[4]
two["threads_1_identical"] = same
open(target, "w").write(json.dumps(two, indent=1, ensure_ascii=False) + "\n")
print(f"wrote {target}; 1 thread identical: {same}")
PY
