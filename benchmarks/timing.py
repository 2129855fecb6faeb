"""Timing and memory figures shared by the step benchmarks (no TensorFlow import)."""

import resource
import statistics


def peak_rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def step_summary(times, batch_size):
  """Median/min/max step time and images/s of per-step `times` (seconds)."""
  median = statistics.median(times)
  return {"step_time_s": median, "step_time_min_s": min(times), "step_time_max_s": max(times),
          "step_times_s": times, "images_per_sec": batch_size / median,
          "images_per_sec_min": batch_size / max(times),
          "images_per_sec_max": batch_size / min(times)}
