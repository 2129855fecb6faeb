#!/usr/bin/env bash
# Idempotent setup: .venv at the repo root with requirements.txt installed, and Debian's
# Fashion-MNIST (the offline default dataset) when apt is usable. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
FMNIST_DIR=/usr/share/datasets/fashion-mnist

if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    echo "setup: installing Debian's dataset-fashion-mnist"
    $SUDO apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist \
      || echo "setup: could not install dataset-fashion-mnist; Fashion-MNIST runs need it"
  else
    echo "setup: no apt-get; install Fashion-MNIST under $FMNIST_DIR yourself"
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
# Reinstall only when requirements.txt changed since the last successful install.
STAMP=.venv/.requirements.sha256
WANT="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "setup: installing requirements.txt into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  echo "$WANT" > "$STAMP"
fi
