"""Runs a test's script in a fresh Python process: logical CPU devices (a MirroredStrategy of
several replicas) must be configured before TensorFlow initialises, which the test process
has already done."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, timeout=300):
  """Runs `script` with the repo importable; returns the JSON of its last `RESULT<json>` line."""
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT"):])
