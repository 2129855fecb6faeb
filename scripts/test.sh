#!/usr/bin/env bash
# Sets everything up, then runs the test suite (11-14 minutes on 2 CPU cores); the slowest
# tests are listed at the end, to keep the suite within its ~15-minute budget.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest tests --durations=10 "$@"
