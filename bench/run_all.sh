#!/usr/bin/env bash
# Rerun every benchmark table and rewrite docs/benchmarks.md (each script its own section).
# Needs the bench extra: pip install -e ".[bench,app]" (tensorly-torch, psutil). The soak test of
# the explorer's sessions is separate: python bench/soak_sessions.py (about 6 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
for script in versus_tltorch data_aware spectra_budget explorer_latency training_for_compression tensorized_layers data_in_parts latency; do
  echo "== bench/$script.py"
  start=$(date +%s)
  "$PY" "bench/$script.py" "$@"
  echo "== bench/$script.py: $(( $(date +%s) - start )) s"
done
