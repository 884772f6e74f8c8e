#!/usr/bin/env bash
# Installs everything trgl_dist needs on a fresh machine: the package with the tested
# torch/torchvision (launch/constraints.txt), the dev tools, iproute2 (the two-node test)
# and the offline Fashion-MNIST (Debian package).
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

if ! command -v ip >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "setup: installing iproute2 (the two-node test's network namespaces)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null
fi

extras=${TRGL_EXTRAS:-dev}
# The package asks for a torch range; the exact tested releases come from the constraints.
echo "setup: pip install -e .[$extras] -c launch/constraints.txt"
python3 -m pip install -q --disable-pip-version-check -e ".[$extras]" -c launch/constraints.txt 2>&1 \
  | grep -v -e "Running pip as the 'root' user" -e "is ignored: it is neither" || true
python3 -c "import torch, torchvision, trgl_dist; print('setup: torch', torch.__version__, 'torchvision', torchvision.__version__)"
