"""The compute precision a machine runs fastest: what run.py's `--precision=auto` resolves to.

Mixed bfloat16 only pays where the hardware multiplies bf16 natively: TPUs, NVIDIA GPUs from
Ampere (compute capability 8.0), and CPUs with bf16 instructions (x86 AVX512_BF16 or AMX,
Arm's BF16). Elsewhere TensorFlow emulates it: on an AVX2-only CPU the quickstart's step is
5.5x slower in mixed_bfloat16 than in float32 (docs/PERFORMANCE.md). Older GPUs with tensor
cores (compute capability 7.x) get mixed_float16, with loss scaling.
"""

import re

import tensorflow as tf

# /proc/cpuinfo words naming native bf16 arithmetic (x86 "flags", Arm "Features").
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
  """Whether the CPU lists native bf16 instructions (False where cpuinfo is unreadable)."""
  try:
    with open(cpuinfo) as f:
      text = f.read()
  except OSError:
    return False
  words = set()
  for line in re.findall(r"^(?:flags|Features)\s*:(.*)$", text, re.MULTILINE):
    words.update(line.split())
  return bool(words & CPU_BF16_FLAGS)


def native_precision(*, tpu: bool = False, cpuinfo: str = "/proc/cpuinfo") -> str:
  """"mixed_bfloat16", "mixed_float16" or "float32" for the devices a run will use: `tpu`, else
  the local GPUs (the oldest decides), else the CPU. Reads physical devices only, so it may
  run before the strategy splits the CPU."""
  if tpu:
    return "mixed_bfloat16"
  gpus = tf.config.list_physical_devices("GPU")
  if gpus:
    capability = min(tuple(tf.config.experimental.get_device_details(gpu).get(
        "compute_capability", (0, 0))) for gpu in gpus)
    if capability >= (8, 0):
      return "mixed_bfloat16"
    return "mixed_float16" if capability >= (7, 0) else "float32"
  return "mixed_bfloat16" if cpu_has_bf16(cpuinfo) else "float32"
