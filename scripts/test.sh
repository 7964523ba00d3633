#!/usr/bin/env bash
# The test command: fetches the small test model if missing, then runs every test.
# Model code is built optimised even in tests (see [profile.dev.package."*"] in Cargo.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-test-model.sh
cargo test --locked "$@"
