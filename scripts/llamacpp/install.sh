#!/usr/bin/env bash
# Makes scripts/llamacpp/*.py usable: builds llama.cpp's shared libraries from the llama-cpp-python
# 0.3.36 sdist (scripts/llamacpp/build.sh, cached in /var/tmp/llamacpp) and installs the pure-Python
# dependencies of its ctypes bindings. The bindings themselves are imported from the unpacked sdist
# (common.py points LLAMA_CPP_LIB_PATH at the build), so nothing is compiled by pip. Idempotent.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/build.sh" "$@" >/dev/null
python3 -c "import numpy, diskcache, jinja2, typing_extensions" 2>/dev/null ||
  python3 -m pip install --quiet numpy diskcache jinja2 typing-extensions
