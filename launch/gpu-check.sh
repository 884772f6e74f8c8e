#!/usr/bin/env bash
# The GPU check: set up, then seven checks of the GPU path (e2e, parallel, a 4-stage pipeline,
# FIFO pipeline = parallel, throughput, memory, a killed rank) on the GPUs this machine has
# (1 to 8), within 8 minutes. --cpu runs the same checks on CPU with Gloo. Exit 0 only if every
# check passed. Options go to benchmarks/gpu/check.py (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export TRGL_GPU_CHECK_COMMAND="bash launch/gpu-check.sh${*:+ $*}"
exec python3 benchmarks/gpu/check.py "$@"
