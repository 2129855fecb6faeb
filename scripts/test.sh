#!/usr/bin/env bash
# Sets everything up, then runs the test suite; the slowest tests are listed at the end, to
# keep the suite within its ~15-minute budget on an idle 2-core machine.
# Two workers (most tests use one core at a time), each taking whole files, so a module's
# fixtures (tests/test_distributed.py's runs) are built once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

# The suite sees what a newcomer's machine has: an empty HOME (so no prepared TFDS data in
# ~/tensorflow_datasets, no Keras or matplotlib caches) and an empty temp directory, both
# removed afterwards. Nothing outside the checkout and these is read.
FRESH="$(mktemp -d)"
trap 'rm -rf "$FRESH"' EXIT
mkdir -p "$FRESH/home" "$FRESH/tmp"
env -u TFDS_DATA_DIR -u KERAS_HOME -u MPLCONFIGDIR -u XDG_CACHE_HOME -u XDG_CONFIG_HOME \
  HOME="$FRESH/home" TMPDIR="$FRESH/tmp" \
  .venv/bin/python -m pytest tests -n 2 --dist loadfile --durations=10 -p no:cacheprovider "$@"
