#!/usr/bin/env bash
# Sets everything up, then runs the test suite (10-12 minutes on 2 CPU cores); the slowest
# tests are listed at the end, to keep the suite within its ~15-minute budget.
# Two workers (most tests use one core at a time), each taking whole files, so a module's
# fixtures (tests/test_distributed.py's runs) are built once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest tests -n 2 --dist loadfile --durations=10 "$@"
