#!/usr/bin/env bash
# The main job: set up, then a 4-stage pipeline (one process per stage) trains on
# Fashion-MNIST and prints the per-module report. Extra flags go to trgl_dist.train.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export OMP_NUM_THREADS=1
exec torchrun --standalone --nproc_per_node=4 -m trgl_dist.train \
  --dataset fashion-mnist --model resnet-small --modules 8 --method trgl \
  --epochs 1 --train-size 30000 "$@"
