#!/usr/bin/env bash
# Installs everything trgl_dist needs on a fresh machine: the package with its pinned
# torch/torchvision, the dev tools, and the offline Fashion-MNIST (Debian package).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Fashion-MNIST (apt package dataset-fashion-mnist)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST not found; run 'sudo apt-get install -y dataset-fashion-mnist'" \
         "or let torchvision download it (needs internet)" >&2
  fi
fi

extras=${TRGL_EXTRAS:-dev}
echo "setup: pip install -e .[$extras] (torch==2.14.1, torchvision==0.29.1)"
python3 -m pip install -q --disable-pip-version-check -e ".[$extras]" 2>&1 \
  | grep -v -e "Running pip as the 'root' user" -e "is ignored: it is neither" || true
python3 -c "import torch, torchvision, trgl_dist; print('setup: torch', torch.__version__, 'torchvision', torchvision.__version__)"
