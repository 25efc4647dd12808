#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the whole test suite: library, CLI, explorer state,
# the explorer in headless Chromium, and the notebooks top to bottom. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the built-in examples are trained once into this cache and shared by every test
export TENSORSCOPE_CACHE_DIR="${TENSORSCOPE_CACHE_DIR:-$PWD/.cache/tensorscope}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
