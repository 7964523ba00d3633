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
import json, os, re, subprocess, sys
build, target = sys.argv[1], sys.argv[2]
cache = open(f"{build}/CMakeCache.txt").read()
def cached(name):
    m = re.search(rf"^{name}:\w+=(.*)$", cache, re.M)
    return m.group(1) if m else None
flags = open("/proc/cpuinfo").read().split("flags\t\t: ", 1)[1].split("\n", 1)[0].split()
model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
meta = {
    "llama_cpp": "vendor/llama.cpp of the llama-cpp-python 0.3.36 sdist ("
    + os.readlink(f"{build}/bin/libggml.so.0") + ")",
    "cmake": {k: cached(k) for k in ["CMAKE_BUILD_TYPE", "GGML_NATIVE", "GGML_AVX2", "GGML_FMA",
                                      "GGML_F16C", "GGML_AVX512", "GGML_LLAMAFILE", "GGML_OPENMP",
                                      "CMAKE_C_COMPILER", "CMAKE_CXX_FLAGS"]},
    "compiler": subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()[0],
    "cpu": model,
    "cpu_simd_flags": [f for f in flags if f in ("sse4_2", "avx", "avx2", "fma", "f16c") or f.startswith("avx512")],
    "threads": 2,
    "threads_1_identical": True,
}
json.dump(meta, open(target, "w"), indent=2)
open(target, "a").write("\n")
PY
echo "wrote $out ($(du -sh "$out" | cut -f1))"
