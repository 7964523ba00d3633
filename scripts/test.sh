#!/usr/bin/env bash
# The test command: fetches the small test model if missing, then runs every test.
# Model code is built optimised even in tests (see [profile.dev.package."*"] in Cargo.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-test-model.sh
# Conversation states saved by the tests go to a throwaway folder, not the user's cache.
if [ -z "${SMOLDESK_CACHE_DIR:-}" ]; then
    SMOLDESK_CACHE_DIR="$(mktemp -d)"
    export SMOLDESK_CACHE_DIR
    trap 'rm -rf "$SMOLDESK_CACHE_DIR"' EXIT
fi
# The AVX-512 kernels' tests run in an x86 emulator where this CPU lacks AVX-512 (scripts/emulator/),
# and fail rather than skip without one.
if [ "$(uname -sm)" = "Linux x86_64" ]; then
    if [ -z "${SMOLDESK_AVX512_EMULATOR:-}" ]; then
        emulator_dir="${CARGO_TARGET_DIR:-target}/avx512-emulator"
        ./scripts/emulator/setup.sh "$emulator_dir"
        SMOLDESK_AVX512_EMULATOR="$(cd "$emulator_dir" && pwd)/run"
        export SMOLDESK_AVX512_EMULATOR
    fi
    export SMOLDESK_REQUIRE_AVX512="${SMOLDESK_REQUIRE_AVX512:-1}"
fi
cargo test --locked "$@"
# The portable kernels on the whole forward pass (the suites above run the CPU's best level).
if [ $# -eq 0 ]; then
    SMOLDESK_SIMD=portable cargo test --locked --test model_logits
    # Q4_K products on the file's layout only (the model repacks in the background otherwise).
    SMOLDESK_REPACK=off cargo test --locked --test smollm2_q4km
fi
