#!/usr/bin/env bash
# Installs the x86 emulator that runs the AVX-512 kernel tests on CPUs without AVX-512
# (src/engine/cpu/emulator.rs): Bochs's CPU core from the PyPI package bochscpu-python 0.4.0,
# with two fixes, then writes DIR/run, the launcher the tests call (SMOLDESK_AVX512_EMULATOR).
#  - The wheel needs glibc 2.38 (__isoc23_strtoull, __isoc23_sscanf): shim.c supplies both.
#  - Its default CPU model is off by two entries in Bochs's CPU table: it emulates Cannon Lake,
#    which has AVX-512 F/BW/VL but no VNNI. Patching two immediates makes it Tiger Lake.
# Usage: scripts/emulator/setup.sh DIR   (idempotent; prints one line on success)
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$1"
dir="$(cd "$1" && pwd)"
fail() { echo "scripts/emulator/setup.sh: $*" >&2; exit 1; }

# The wheel is built for CPython 3.11 only.
python=""
for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null &&
        [ "$("$candidate" -c 'import sys; print(sys.version_info[:2] == (3, 11))')" = True ]; then
        python="$candidate"
        break
    fi
done
[ -n "$python" ] || fail "needs Python 3.11 (bochscpu-python 0.4.0 ships cp311 wheels only)"

venv="$dir/venv"
site="$venv/lib/python3.11/site-packages"
if [ ! -d "$site/bochscpu_python-0.4.0.dist-info" ]; then
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv" || fail "could not create $venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --root-user-action=ignore bochscpu-python==0.4.0 ||
        fail "pip could not install bochscpu-python==0.4.0"
fi

if [ ! -f "$dir/libshim.so" ] || [ "$here/shim.c" -nt "$dir/libshim.so" ]; then
    gcc -shared -fPIC -O2 -o "$dir/libshim.so.tmp" "$here/shim.c" ||
        fail "could not build the glibc shim"
    mv "$dir/libshim.so.tmp" "$dir/libshim.so"
fi

# The CPU model patch: at 0x44a6fc, `mov r8d, 28` (models in the table) and `mov r9d, 27` (the
# default) become 30 and 29, the real count and Tiger Lake's index.
"$venv/bin/python" - "$site/bochscpu/_bochscpu.cpython-311-x86_64-linux-gnu.so" <<'EOF' ||
import hashlib, os, sys
path = sys.argv[1]
ORIGINAL = "a872ef067d57b4d9de17370e1e26a41e2790960518729363627adb50fbd035fe"
PATCHED = "4ea5bef38e9254f01dd8f50b5179d0d285d659903c6c7b43927bde325221a365"
OFFSET = 0x44A6FC
BEFORE, AFTER = bytes.fromhex("41b81c00000041b91b000000"), bytes.fromhex("41b81e00000041b91d000000")
data = bytearray(open(path, "rb").read())
digest = hashlib.sha256(data).hexdigest()
if digest == PATCHED:
    sys.exit(0)
if digest != ORIGINAL:
    sys.exit(f"{path}: sha256 {digest} is not the bochscpu-python 0.4.0 build known; not patching")
if data[OFFSET:OFFSET + len(BEFORE)] != BEFORE:
    sys.exit(f"{path}: unexpected bytes at {OFFSET:#x}: {data[OFFSET:OFFSET + len(BEFORE)].hex()}")
data[OFFSET:OFFSET + len(AFTER)] = AFTER
assert hashlib.sha256(data).hexdigest() == PATCHED
open(path + ".tmp", "wb").write(data)
os.chmod(path + ".tmp", os.stat(path).st_mode)
os.replace(path + ".tmp", path)
EOF
    fail "could not patch the emulator's CPU model"

cat >"$dir/run.tmp" <<EOF
#!/bin/sh
# Written by scripts/emulator/setup.sh: runs calls in the emulator (see run_calls.py).
LD_PRELOAD="$dir/libshim.so\${LD_PRELOAD:+:\$LD_PRELOAD}" \\
    exec "$venv/bin/python" -B "$here/run_calls.py" "\$@"
EOF
chmod +x "$dir/run.tmp"
mv "$dir/run.tmp" "$dir/run"

# Self-check: the launcher exists, the extension loads, and the emulated CPU has VNNI.
[ -x "$dir/run" ] || fail "$dir/run was not written"
"$dir/run" --self-test >/dev/null || fail "the emulator's self-test failed"
echo "AVX-512 emulator ready: $dir/run"
