"""Smoke tests of benchmarks/train_step.py and input_pipeline.py: tiny settings, JSON keys on the
last line."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_benchmark_json():
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--preset=cifar_r18",
       "--train_mode=pretrain", "--resnet_depth=10", "--width_multiplier=0.125",
       "--image_size=16", "--batch_size=16", "--proj_out_dim=16", "--steps=2",
       "--warmup_steps=0", "--matmul_size=512", "--conv_batch=2", "--augment_on=device",
       "--json"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=ROOT))
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  for key in ("images_per_sec", "step_time_s", "peak_rss_mb", "gflops_per_sec",
              "matmul_peak_gflops", "precision_peak_gflops", "share_of_peak", "augment_seconds"):
    assert isinstance(result[key], float) and result[key] > 0, (key, result[key])
  assert result["precision_peak_gflops"] == max(result["precision_peaks_gflops"].values())
  assert result["share_of_peak"] == pytest.approx(
      result["gflops_per_sec"] / result["precision_peak_gflops"])
  assert result["augment_on"] == "device" and result["augment_seconds"] < result["step_time_s"]
  assert result["steps"] == 2 and result["batch_size"] == 16
  assert abs(result["images_per_sec"] * result["step_time_s"] - 16) < 1e-6
  # Counted FLOPs agree with the 3x-forward estimate (backward = 2x forward for convs).
  assert 0.5 < result["step_gflop"] / result["forward_gflop_x3"] < 1.5


@pytest.mark.parametrize("augment_on", ["host", "device"])
def test_input_pipeline_benchmark_json(augment_on):
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "input_pipeline.py"), "--dataset=cifar10",
       "--mock_data", "--mock_examples=64", "--image_size=16", "--batch_size=8",
       "--use_blur", "--warmup_batches=1", "--num_batches=20", f"--augment_on={augment_on}",
       "--json"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=ROOT))
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert isinstance(result["images_per_sec"], float) and result["images_per_sec"] > 0
  # Two views on channels, or CIFAR's own images (held in memory) for the step to crop.
  assert result["image_shape"] == ([8, 32, 32, 3] if augment_on == "device" else [8, 16, 16, 6])
  assert result["shipped"] == ("source" if augment_on == "device" else "views")
  assert result["mock_data"] and result["use_blur"] and result["num_batches"] == 20
  assert result["augment_on"] == augment_on
  assert result["image_dtype"] == ("uint8" if augment_on == "device" else "float32")
  assert abs(result["images_per_sec"] * result["seconds"] - 20 * 8) < 1e-6
  # Process CPU time (all threads) within the wall time the machine's cores allow.
  assert 0 < result["cpu_seconds"] <= result["seconds"] * os.cpu_count() * 1.05
  assert abs(result["cores_busy"] * result["seconds"] - result["cpu_seconds"]) < 1e-6
  assert abs(result["images_per_cpu_sec"] * result["cpu_seconds"] - 20 * 8) < 1e-6
