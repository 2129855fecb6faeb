"""Timing and memory figures shared by the benchmarks (no TensorFlow import)."""

import json
import resource
import statistics
import time


def cpu_seconds():
  """User + system CPU time of this process so far (all threads)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


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


def define_pipeline_flags(flags):
  """The command line of the input pipeline benchmarks (ours and the reference's)."""
  flags.DEFINE_string("dataset", "cifar10", "TFDS name.")
  flags.DEFINE_integer("image_size", 32, "Output image side.")
  flags.DEFINE_integer("batch_size", 256, "Global batch size.")
  flags.DEFINE_bool("use_blur", False, "Gaussian blur (pretrain only).")
  flags.DEFINE_float("color_jitter_strength", 0.5, "Colour distortion strength.")
  flags.DEFINE_enum("train_mode", "pretrain", ["pretrain", "finetune", "distill"],
                    "Augmentation mode.")
  flags.DEFINE_integer("mock_examples", 2048, "Number of mock examples.")
  flags.DEFINE_integer("warmup_batches", 10, "Batches discarded before timing.")
  flags.DEFINE_integer("num_batches", 50, "Timed batches.")
  flags.DEFINE_bool("json", False, "Print a JSON summary as the last line.")


def time_pipeline(batches, flag_values, what, mock_data, resize_method, augment_on="host",
                  shipped="views"):
  """Times `num_batches` images (from the iterator `batches`) after `warmup_batches`, prints
  images/s, and with --json a JSON object (key `images_per_sec`) as the last line.
  `resize_method`: the crops' resampling; `augment_on`: where the photometric augmentations
  run ("device": not in this pipeline); `shipped`: what the batches hold ("views", or
  "source" images the training step crops); all reported."""
  f = flag_values
  for _ in range(f.warmup_batches):
    next(batches)
  start, cpu_start = time.perf_counter(), cpu_seconds()
  for _ in range(f.num_batches):
    images = next(batches)
  images.numpy()
  seconds = time.perf_counter() - start
  # The targets are per core: pipelines may keep different numbers of cores busy.
  cpu = cpu_seconds() - cpu_start
  timed = f.num_batches * f.batch_size
  rate, per_cpu_second, cores_busy = timed / seconds, timed / cpu, cpu / seconds
  print(f"{rate:.1f} images/s ({what}, {f.dataset}, {f.image_size}x{f.image_size}, "
        f"batch {f.batch_size}, {f.train_mode}, blur={f.use_blur}, {resize_method}, "
        f"photometric on {augment_on}, ships {shipped}); "
        f"{per_cpu_second:.1f} images per CPU second, {cores_busy:.2f} cores busy")
  if f.json:
    print(json.dumps({
        "images_per_sec": rate, "dataset": f.dataset, "image_size": f.image_size,
        "batch_size": f.batch_size, "train_mode": f.train_mode, "use_blur": f.use_blur,
        "color_jitter_strength": f.color_jitter_strength, "resize_method": resize_method,
        "augment_on": augment_on, "shipped": shipped, "mock_data": mock_data,
        "num_batches": f.num_batches, "warmup_batches": f.warmup_batches, "seconds": seconds,
        "cpu_seconds": cpu, "cores_busy": cores_busy, "images_per_cpu_sec": per_cpu_second,
        "image_shape": list(images.shape), "image_dtype": images.dtype.name}))
