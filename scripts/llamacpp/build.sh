#!/usr/bin/env bash
# Builds llama.cpp (the copy vendored in the llama-cpp-python 0.3.36 sdist) for the comparison and
# reference tools, into a cache directory outside the checkout. Idempotent: an up-to-date build
# does nothing; a partial one resumes.
#
#   scripts/llamacpp/build.sh                       # llama, llama-bench, llama-quantize, kernel-golden, requant
#   scripts/llamacpp/build.sh llama-quantize        # only the named targets
#   VARIANT=avx2 scripts/llamacpp/build.sh          # portable AVX2+FMA+F16C build (no -march=native)
#
# Environment: LLAMACPP_CACHE (default /var/tmp/llamacpp: sdist and builds), VARIANT (native|avx2),
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

variant_flags() {
  case "$variant" in
    native) echo "-DGGML_NATIVE=ON" ;;
    avx2) echo "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" ;;
    *) log "unknown VARIANT '$variant' (native or avx2)"; exit 2 ;;
  esac
}

configure() {
  [ -f "$build/CMakeCache.txt" ] && return
  ensure_cmake
  local generator=()
  command -v ninja >/dev/null && generator=(-G Ninja)
  log "configuring $build ($variant)"
  # shellcheck disable=SC2046  # variant_flags is a list of words
  cmake -S "$src" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
    $(variant_flags) -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
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
