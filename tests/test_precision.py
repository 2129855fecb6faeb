"""What run.py picks for the hardware: --precision=auto (mixed bfloat16 only where the hardware
has native bf16) and oneDNN's CPU kernels on x86."""

import os
import platform
import subprocess
import sys

import pytest

from tf_simclr import precision

AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512_fp16 avx512bw\n\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx2 avx512f amx_tile amx_bf16 amx_int8\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU part\t: 0xd40\n"


@pytest.mark.parametrize("text, native", [
    (AVX2, False), (ZEN4, True), (SAPPHIRE_RAPIDS, True), (GRAVITON3, True),
    # Only whole flags count: "bf16" inside another name does not.
    ("flags\t: avx512_bf16x avx_vnni_bf16ish\n", False), ("", False)])
def test_cpu_bf16_flags(tmp_path, text, native):
  path = tmp_path / "cpuinfo"
  path.write_text(text)
  assert precision.cpu_has_bf16(str(path)) is native
  # This test machine has no GPU: the CPU decides, unless the run is on a TPU.
  assert precision.native_precision(cpuinfo=str(path)) == (
      "mixed_bfloat16" if native else "float32")
  assert precision.native_precision(tpu=True, cpuinfo=str(path)) == "mixed_bfloat16"


def test_unreadable_cpuinfo_means_float32(tmp_path):
  assert not precision.cpu_has_bf16(str(tmp_path / "missing"))


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 only")
@pytest.mark.parametrize("setting, enabled", [(None, True), ("0", False)])
def test_onednn_kernels_are_on_on_x86_unless_turned_off(setting, enabled):
  env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
  if setting is not None:
    env["TF_ENABLE_ONEDNN_OPTS"] = setting
  code = ("import tf_simclr; from tensorflow.python.util import _pywrap_util_port as port; "
          "print(port.IsMklEnabled())")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=root),
                       capture_output=True, text=True, check=True)
  assert out.stdout.split()[-1] == str(enabled)
