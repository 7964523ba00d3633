#!/usr/bin/env bash
# Builds the Debian package: the release binary, the desktop entry (application menu, "Open
# with SmolDesk" for .gguf files), the .gguf MIME type and the icons, as listed in Cargo.toml's
# [package.metadata.deb]. Installs cargo-deb from crates.io when it is missing.
# The last line printed is the path of the .deb.
#   ./scripts/package-deb.sh && sudo apt install ./path/printed.deb
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "installing cargo-deb (cargo install cargo-deb --locked)…" >&2
    cargo install cargo-deb --locked >&2
fi

# The desktop entry as --install-desktop writes it, pointing at the installed binary.
mkdir -p target/deb-assets
sed 's|@EXEC@|smoldesk|' assets/smoldesk.desktop >target/deb-assets/smoldesk.desktop

cargo build --release --locked >&2
# cargo-deb prints the path of the package it wrote as its last line.
deb=$(cargo deb --no-build --locked | tail -n 1)
[ -f "$deb" ] || { echo "cargo deb did not report a package (got: $deb)" >&2; exit 1; }
realpath "$deb"
