"""tf_simclr: SimCLRv2 for TensorFlow 2 / Keras 3."""

import os
import platform

# TensorFlow's C++ start-up chatter (CUDA probes, CPU feature notes) hides our own output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# TensorFlow turns oneDNN's CPU kernels on by default only where it finds AVX-512 VNNI/BF16 or
# AMX; on an AVX2-only x86 CPU they make this project's training step 1.7x faster as well
# (docs/PERFORMANCE.md). Read when TensorFlow loads, so run.py and the benchmarks import
# tf_simclr first; TF_ENABLE_ONEDNN_OPTS=0 in the environment still turns them off.
if platform.machine().lower() in ("x86_64", "amd64"):
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
