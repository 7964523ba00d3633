#!/usr/bin/env bash
# Builds llama.cpp (the copy vendored in the llama-cpp-python 0.3.36 sdist) for the comparison and
# reference tools, into a cache directory outside the checkout. Idempotent: an up-to-date build
# does nothing; a partial one resumes.
#
#   scripts/llamacpp/build.sh                       # llama, llama-bench, llama-quantize, kernel-golden, requant
#   scripts/llamacpp/build.sh llama-quantize        # only the named targets
#   VARIANT=avx2 scripts/llamacpp/build.sh          # portable AVX2+FMA+F16C build (no -march=native)
#   VARIANT=native-noamx scripts/llamacpp/build.sh  # -march=native without AMX (see variant_flags)
#
# Environment: LLAMACPP_CACHE (default /var/tmp/llamacpp: sdist and builds), VARIANT
# (native|native-noamx|avx2),
# BUILD_DIR (default $LLAMACPP_CACHE/build-$VARIANT), JOBS (default 2).
# Prints nothing on stdout but the build directory's bin/ path on its last line.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version=0.3.36
cache="${LLAMACPP_CACHE:-/var/tmp/llamacpp}"
variant="${VARIANT:-native}"
build="${BUILD_DIR:-$cache/build-$variant}"
jobs="${JOBS:-2}"
sdist="$cache/llama_cpp_python-$version"
src="$sdist/vendor/llama.cpp"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(llama llama-bench llama-quantize kernel-golden requant)

log() { echo "build.sh: $*" >&2; }

# A fresh machine has a C++ compiler but maybe no CMake: PyPI ships one. The sdist's download
# needs it too (pip prepares its metadata with scikit-build-core, which looks for CMake).
ensure_cmake() {
  command -v cmake >/dev/null && return
  python3 -m pip install --quiet cmake >&2
  if command -v pyenv >/dev/null; then pyenv rehash; fi
}

fetch_sdist() {
  [ -f "$src/CMakeLists.txt" ] && return
  ensure_cmake
  mkdir -p "$cache"
  local tarball="$cache/llama_cpp_python-$version.tar.gz"
  if [ ! -s "$tarball" ]; then
    log "downloading the llama-cpp-python $version sdist from PyPI"
    python3 -c "import scikit_build_core" 2>/dev/null ||
      python3 -m pip install --quiet scikit-build-core >&2
    python3 -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
      -d "$cache" "llama-cpp-python==$version" >&2
  fi
  tar -xzf "$tarball" -C "$cache"
}

# Sets the array `flags` to the CMake options of $variant.
variant_flags() {
  case "$variant" in
    native) flags=(-DGGML_NATIVE=ON) ;;
    # On a CPU with AMX (Sapphire Rapids and later), -march=native also compiles ggml's AMX matmul.
    # Built by GCC 12, that path dies at its first prompt on the 2-core Xeon of session 17 (a
    # general protection fault on `ldtilecfg` with a tile configuration of uninitialised bytes),
    # so this is the native build that runs there: every other native instruction, AMX off.
    native-noamx)
      local no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
      flags=(-DGGML_NATIVE=ON "-DCMAKE_C_FLAGS=$no_amx" "-DCMAKE_CXX_FLAGS=$no_amx")
      ;;
    avx2) flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON) ;;
    *) log "unknown VARIANT '$variant' (native, native-noamx or avx2)"; exit 2 ;;
  esac
}

configure() {
  [ -f "$build/CMakeCache.txt" ] && return
  ensure_cmake
  local generator=()
  command -v ninja >/dev/null && generator=(-G Ninja)
  local flags=()
  variant_flags
  log "configuring $build ($variant)"
  cmake -S "$src" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
    "${flags[@]}" -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON \
    >"$build.configure.log" 2>&1 || { cat "$build.configure.log" >&2; exit 1; }
}

# A helper tool of this folder (TOOL.cpp, with _ for -) linked against this build's ggml libraries:
# kernel-golden (golden vectors of the CPU kernels), requant (llama-quantize replay, ggml-base only).
build_tool() {
  local tool="$1" exe="$build/bin/$1" source="$here/${1//-/_}.cpp" libs=(-lggml-base)
  [ "$tool" = kernel-golden ] && libs=(-lggml -lggml-base -lggml-cpu)
  [ -x "$exe" ] && [ "$exe" -nt "$source" ] && [ "$exe" -nt "$build/bin/libggml-base.so" ] && return
  log "compiling $tool"
  nice -n 10 g++ -std=c++17 -O2 -Wall -Wextra -o "$exe" "$source" \
    -I"$src/ggml/include" -L"$build/bin" "${libs[@]}" -Wl,-rpath,"$build/bin"
}

fetch_sdist
mkdir -p "$build"
configure
cmake_targets=()
for t in "${targets[@]}"; do
  case "$t" in
    kernel-golden) cmake_targets+=(ggml) ;;
    requant) cmake_targets+=(ggml-base) ;;
    *) cmake_targets+=("$t") ;;
  esac
done
start=$(date +%s)
nice -n 10 cmake --build "$build" -j "$jobs" --target "${cmake_targets[@]}" >&2
for t in "${targets[@]}"; do
  case "$t" in kernel-golden | requant) build_tool "$t" ;; esac
done
log "built ${targets[*]} in $(($(date +%s) - start)) s"
echo "$build/bin"
