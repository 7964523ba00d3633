#!/usr/bin/env python3
"""Prints JSON describing a llama.cpp build of scripts/llamacpp/build.sh and this CPU.

    python3 scripts/llamacpp/buildinfo.py /var/tmp/llamacpp/build-native
"""

import json
import os
import re
import subprocess
import sys

CMAKE_KEYS = ["CMAKE_BUILD_TYPE", "GGML_NATIVE", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_AVX512",
              "GGML_LLAMAFILE", "GGML_OPENMP", "BUILD_SHARED_LIBS"]
SIMD = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni")


def build_info(build):
    cache = open(os.path.join(build, "CMakeCache.txt")).read()

    def cached(name):
        m = re.search(rf"^{name}:\w+=(.*)$", cache, re.M)
        return m.group(1) if m else None

    cpuinfo = open("/proc/cpuinfo").read()
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M).group(1).split()
    model = re.search(r"^model name\s*:(.*)$", cpuinfo, re.M).group(1).strip()
    return {
        "llama_cpp": "vendor/llama.cpp of the llama-cpp-python 0.3.36 sdist ("
        + os.readlink(os.path.join(build, "bin", "libggml.so.0")) + ")",
        "build": build,
        "cmake": {k: cached(k) for k in CMAKE_KEYS},
        "compiler": subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()[0],
        "cpu": model,
        "cpu_simd_flags": [f for f in flags if f in SIMD or f.startswith("avx512")],
    }


if __name__ == "__main__":
    print(json.dumps(build_info(sys.argv[1] if len(sys.argv) > 1 else "/var/tmp/llamacpp/build-native"), indent=2))
