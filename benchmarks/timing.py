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


def print_step_summary(r):
  """The images/s, step time and peak RSS lines of a benchmark result `r`."""
  print(f"  images/s   median {r['images_per_sec']:.2f}  min {r['images_per_sec_min']:.2f}  "
        f"max {r['images_per_sec_max']:.2f}")
  print(f"  step time  median {r['step_time_s']:.3f} s  min {r['step_time_min_s']:.3f} s  "
        f"max {r['step_time_max_s']:.3f} s  (first call incl. tracing {r['first_call_s']:.1f} s)")
  print(f"  peak RSS   {r['peak_rss_mb']:.0f} MB")
