#!/usr/bin/env bash
# Sets everything up, then runs the main job: SimCLRv2's semi-supervised result on
# Fashion-MNIST, end to end, into runs/quickstart/ (about 20 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m tf_simclr.quickstart --out=runs/quickstart "$@"
