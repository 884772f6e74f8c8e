#!/usr/bin/env bash
# The test suite: set up, lint, type-check, then every test (CPU, Gloo, real processes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
echo "== ruff"; python3 -m ruff check trgl_dist tests benchmarks
echo "== mypy"; python3 -m mypy
echo "== pytest"; python3 -m pytest -q "$@"
