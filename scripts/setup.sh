#!/usr/bin/env bash
# Idempotent setup: .venv at the repo root with requirements.txt installed, and Debian's
# Fashion-MNIST (the offline default dataset) when apt is usable. Safe to run again.
# Each step that cannot do its part ends the setup with one line saying what to do.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
FMNIST_DIR=/usr/share/datasets/fashion-mnist

fail() { echo "setup: $*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
apt_install() {  # apt_install PACKAGE...: quiet on success, apt's own error otherwise
  command -v apt-get >/dev/null 2>&1 || return 1
  $SUDO apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
  echo "setup: installing Debian's dataset-fashion-mnist"
  apt_install dataset-fashion-mnist \
    || fail "could not install Debian's dataset-fashion-mnist (needs apt-get as root or sudo);" \
            "install it by hand (apt-get install dataset-fashion-mnist), or put Fashion-MNIST's" \
            "four .gz files in $FMNIST_DIR, then run this again"
fi

command -v "$PYTHON" >/dev/null 2>&1 \
  || fail "no $PYTHON on PATH: install Python 3.10-3.13 (or set PYTHON=/path/to/python3)"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  if ! "$PYTHON" -m venv .venv >/dev/null 2>&1; then
    rm -rf .venv
    # Debian's Python ships venv's pip bootstrap separately.
    version="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    apt_install "python$version-venv" && "$PYTHON" -m venv .venv \
      || fail "could not create .venv with $PYTHON: install python$version-venv" \
              "(apt-get install python$version-venv), then run this again"
  fi
fi
# Reinstall only when requirements.txt changed since the last successful install.
STAMP=.venv/.requirements.sha256
WANT="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "setup: installing requirements.txt into .venv"
  { .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -r requirements.txt; } \
    || fail "pip could not install requirements.txt into .venv (its error is above): check that" \
            "PyPI is reachable (proxy: PIP_INDEX_URL / HTTPS_PROXY) and that $PYTHON is 3.10-3.13," \
            "then run this again"
  echo "$WANT" > "$STAMP"
fi
