"""--precision=auto: mixed bfloat16 only where the hardware has native bf16."""

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
