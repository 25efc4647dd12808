#!/usr/bin/env bash
# Set up (scripts/setup.sh), then serve the explorer on its built-in example (LeNet-5):
# http://localhost:5006/explorer. Extra arguments go to `panel serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
TENSORSCOPE_NO_BROWSER=1 TENSORSCOPE_EXTRAS="${TENSORSCOPE_EXTRAS:-app}" bash scripts/setup.sh
exec .venv/bin/python -m panel serve apps/explorer.py --websocket-max-message-size 104857600 "$@"
