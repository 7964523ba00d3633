#!/usr/bin/env bash
# Regenerates tests/fixtures/kernels/ (format: its README.md): builds kernel-golden with
# scripts/llamacpp/build.sh, runs it with 2 threads, checks that 1 thread gives the same bytes,
# and records the build and CPU in meta.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=tests/fixtures/kernels
bin=$(scripts/llamacpp/build.sh kernel-golden | tail -n 1)
"$bin/kernel-golden" "$out" 2 2>/dev/null
one=$(mktemp -d)
trap 'rm -rf "$one"' EXIT
"$bin/kernel-golden" "$one" 1 >/dev/null 2>&1
python3 scripts/llamacpp/kernel_golden.py --same-as "$one" "$out"/*.bin >/dev/null
build="$(dirname "$bin")"
python3 - "$build" "$out/meta.json" <<'PY'
import json, sys
sys.path.insert(0, "scripts/llamacpp")
from buildinfo import build_info
meta = build_info(sys.argv[1])
meta.update(threads=2, threads_1_identical=True)
open(sys.argv[2], "w").write(json.dumps(meta, indent=2) + "\n")
PY
echo "wrote $out ($(du -sh "$out" | cut -f1))"
