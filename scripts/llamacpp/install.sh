#!/usr/bin/env bash
# Installs llama-cpp-python, which builds llama.cpp from source for this CPU (slow on 2 cores:
# about an hour, niced so it does not starve other work). Idempotent.
set -euo pipefail
if python3 -c "import llama_cpp" 2>/dev/null; then
  echo "llama-cpp-python already installed: $(python3 -c 'import llama_cpp; print(llama_cpp.__version__)')"
  exit 0
fi
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-1}"
export MAKEFLAGS="${MAKEFLAGS:--j1}"
nice -n 19 python3 -m pip install --no-cache-dir "llama-cpp-python>=0.3.14" numpy
