"""Speed and memory of the real training step (model + loss + optimizer) on in-memory tensors.

  python benchmarks/train_step.py --preset=cifar_r18 --train_mode=pretrain \
      --precision=mixed_bfloat16 --steps=5 --json

The step is exactly run.py's: a `tf_simclr.train.loop.Trainer` builds model, LARS (or the
preset's optimizer), metrics and the multi-step `tf.function` (`Trainer.make_train_loop`),
which then runs on one random batch held in memory (`tf.data.Dataset.from_tensors(...)
.repeat()`), so the input pipeline (augmentation, blur) is NOT part of the timing; see
benchmarks/input_pipeline.py for that. After tracing and --warmup_steps, every timed call runs
--steps_per_call steps; step times are per step.

--augment_on=device ships the batch as that placement's input pipeline does (CIFAR's uint8
images with their draws, which the step crops; at 224x224 uint8 views and their draws) and
times the step with the augmentations it then runs (the preset's: strength 0.5 without blur
for cifar_r18, 1.0 with blur at 224x224); `augment_seconds` is that augmentation alone,
timed on the same batch.

FLOPs are counted on the traced graph of one training step (forward, backward and optimizer):
Conv2D, Conv2DBackpropInput, Conv2DBackpropFilter, MatMul and BatchMatMul ops, 2 FLOPs per
multiply-add, from their static shapes. Element-wise ops (BN, ReLU, LARS) are not counted, so
the figure slightly understates the work. A 3x-forward analytical estimate is printed next to
it as a cross-check (3x the trained model's forward, plus 1x the teacher's forward when
distilling).

Peaks are measured in the same process: the float32 matmul (2048x2048, `matmul_peak_gflops`)
and, in the compute dtype of --precision, a matmul and a 3x3 convolution of a ResNet's first
block group (batch 64, 56x56, 64 channels); the better of those two is
`precision_peak_gflops`, and `share_of_peak` is the step's rate over it.

With --json the last line printed is one JSON object (keys: images_per_sec, step_time_s,
peak_rss_mb, gflops_per_sec, matmul_peak_gflops, precision_peak_gflops, share_of_peak, ...).
images/s counts input images, not views.
"""

import json
import os
import sys
import tempfile
import time

from absl import app, flags

# benchmarks/timing.py, next to this script.
from op_breakdown import breakdown, print_breakdown
from timing import peak_rss_mb, print_step_summary, step_summary

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tf_simclr import objectives  # noqa: E402  pylint: disable=wrong-import-position

PRESETS = {
    # name: (ModelConfig overrides, batch size, classes, training examples)
    "cifar_r18": (dict(resnet_depth=18, image_size=32), 256, 10, 50_000),
    "imagenet_r50": (dict(resnet_depth=50, image_size=224), 32, 1000, 1_281_167),
    "imagenet_r50_sk": (dict(resnet_depth=50, image_size=224, sk_ratio=0.0625), 32, 1000,
                        1_281_167),
}

flags.DEFINE_enum("preset", "cifar_r18", list(PRESETS), "Model and batch of the benchmark.")
flags.DEFINE_enum("train_mode", "pretrain", list(objectives.names()),
                  "Objective (distill: a frozen teacher of the same architecture).")
flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16", "mixed_float16"],
                  "Keras global dtype policy, set before the model is built (as run.py).")
flags.DEFINE_integer("steps", 5, "Timed steps.")
flags.DEFINE_integer("warmup_steps", 1, "Untimed steps after the tracing call.")
flags.DEFINE_integer("steps_per_call", 1, "Steps per call of the training tf.function.")
flags.DEFINE_integer("batch_size", 0, "Global batch size (0: the preset's).")
flags.DEFINE_integer("image_size", 0, "Override of the preset's image size (0: keep).")
flags.DEFINE_integer("resnet_depth", 0, "Override of the preset's depth (0: keep).")
flags.DEFINE_float("width_multiplier", 1.0, "Trunk width multiplier.")
flags.DEFINE_integer("proj_out_dim", 128, "Projection head output width.")
flags.DEFINE_enum("optimizer", "lars", ["lars", "momentum", "adam"], "Optimizer.")
flags.DEFINE_bool("lineareval_while_pretraining", True, "Linear eval head while pretraining.")
flags.DEFINE_integer("memory_size", 0, "Pretraining's memory buffer of negatives (0: none).")
flags.DEFINE_bool("global_bn", True, "Synchronized BN (as the reference recipe).")
flags.DEFINE_integer("recompute_block_groups", -1,
                     "Recompute block groups 1..k in the backward pass (less memory); -1: "
                     "run.py's default for --precision.")
flags.DEFINE_bool("count_flops", True, "Count the step's FLOPs on its traced graph.")
flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmuls of the peaks.")
flags.DEFINE_integer("conv_batch", 64, "Batch of the 3x3 convolution of the precision's peak.")
flags.DEFINE_enum("augment_on", "host", ["host", "device"],
                  "device: the step also runs the colour distortion and blur on the batch.")
flags.DEFINE_string("profile_dir", None, "Write a TF profiler trace of the timed steps here, and "
                    "add its breakdown by op class (benchmarks/op_breakdown.py).")
flags.DEFINE_bool("json", False, "Print a JSON summary as the last line.")
FLAGS = flags.FLAGS


def _best_seconds(fn, x, trials):
  fn(x).numpy()
  best = float("inf")
  for _ in range(trials):
    start = time.perf_counter()
    fn(x).numpy()
    best = min(best, time.perf_counter() - start)
  return best


def matmul_peak_gflops(tf, n, dtype="float32", reps=4, trials=3):
  """Best rate of `reps` chained n x n matmuls in `dtype` in one tf.function, over `trials`."""
  a = tf.cast(tf.random.normal((n, n)), dtype)
  b = tf.cast(tf.random.normal((n, n)) / float(n) ** 0.5, dtype)

  @tf.function
  def chain(x):
    for _ in range(reps):
      x = tf.matmul(x, b)
    return tf.reduce_sum(tf.cast(x, tf.float32))

  return 2.0 * n ** 3 * reps / _best_seconds(chain, a, trials) / 1e9


def conv_peak_gflops(tf, batch, dtype="float32", size=56, channels=64, reps=4, trials=3):
  """Best rate of `reps` chained 3x3 'SAME' convolutions (ResNet-50's first block group)."""
  x = tf.cast(tf.random.normal((batch, size, size, channels)), dtype)
  w = tf.cast(tf.random.normal((3, 3, channels, channels)) / (9.0 * channels) ** 0.5, dtype)

  @tf.function
  def chain(x):
    for _ in range(reps):
      x = tf.nn.conv2d(x, w, 1, "SAME")
    return tf.reduce_sum(tf.cast(x, tf.float32))

  flops = 2.0 * batch * size * size * channels * 9 * channels * reps
  return flops / _best_seconds(chain, x, trials) / 1e9


_MATMUL_LIKE = ("MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3")
_CONV_LIKE = ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter")


def _static(shape):
  dims = shape.as_list() if shape.rank is not None else None
  return None if dims is None or any(d is None for d in dims) else dims


def count_graph_flops(graph):
  """(FLOPs of Conv/MatMul ops by op type, {op type: dtypes}, ops with unknown shapes)."""
  import numpy as np
  flops, dtypes, unknown = {}, {}, 0
  for op in graph.get_operations():
    if op.type not in _CONV_LIKE + _MATMUL_LIKE:
      continue
    if not op.outputs[0].consumers():
      continue  # e.g. the unused gradient of the input images: pruned before running
    dtypes.setdefault(op.type, set()).add(op.get_attr("T").name)
    if op.type in _CONV_LIKE:
      # 2 * (output-side elements) * kh * kw * cin: the same count for the forward conv and
      # both backward convs, expressed through the forward conv's output and filter shapes.
      if op.type == "Conv2D":
        out, filt = _static(op.outputs[0].shape), _static(op.inputs[1].shape)
      elif op.type == "Conv2DBackpropInput":
        out, filt = _static(op.inputs[2].shape), _static(op.inputs[1].shape)
      else:
        out, filt = _static(op.inputs[2].shape), _static(op.outputs[0].shape)
      if out is None or filt is None:
        unknown += 1
        continue
      n = 2 * np.prod(out) * filt[0] * filt[1] * filt[2]
    else:
      a, b = _static(op.inputs[0].shape), _static(op.inputs[1].shape)
      if a is None or b is None:
        unknown += 1
        continue
      ta = op.get_attr("transpose_a") if op.type == "MatMul" else op.get_attr("adj_x")
      tb = op.get_attr("transpose_b") if op.type == "MatMul" else op.get_attr("adj_y")
      m, k = (a[-1], a[-2]) if ta else (a[-2], a[-1])
      cols = b[-2] if tb else b[-1]
      n = 2 * np.prod(a[:-2] or [1]) * m * k * cols
    flops[op.type] = flops.get(op.type, 0) + int(n)
  return flops, {k: sorted(v) for k, v in dtypes.items()}, unknown


def main(_):
  import numpy as np
  import keras
  import tensorflow as tf

  from tf_simclr import strategy as strategy_lib
  from tf_simclr.config import (DataConfig, DistillConfig, ModelConfig, TrainConfig,
                                resolve_recompute_block_groups)
  from tf_simclr.data import augment
  from tf_simclr.data.datasets import DatasetInfo
  from tf_simclr.models.simclr import build_model
  from tf_simclr.train import loop

  overrides, batch_size, num_classes, num_examples = PRESETS[FLAGS.preset]
  overrides = dict(overrides)
  if FLAGS.image_size:
    overrides["image_size"] = FLAGS.image_size
  if FLAGS.resnet_depth:
    overrides["resnet_depth"] = FLAGS.resnet_depth
  batch_size = FLAGS.batch_size or batch_size
  size = overrides["image_size"]

  peak = matmul_peak_gflops(tf, FLAGS.matmul_size)
  compute_dtype = {"float32": "float32", "mixed_bfloat16": "bfloat16",
                   "mixed_float16": "float16"}[FLAGS.precision]
  precision_peaks = {
      "matmul": (peak if compute_dtype == "float32"
                 else matmul_peak_gflops(tf, FLAGS.matmul_size, compute_dtype)),
      "conv3x3": conv_peak_gflops(tf, FLAGS.conv_batch, compute_dtype)}

  strategy = strategy_lib.build_strategy("one_device")
  keras.utils.set_random_seed(0)
  if FLAGS.precision != "float32":
    keras.mixed_precision.set_global_policy(FLAGS.precision)
  recompute = resolve_recompute_block_groups(FLAGS.recompute_block_groups, FLAGS.precision)
  model_cfg = ModelConfig(num_classes=num_classes, width_multiplier=FLAGS.width_multiplier,
                          proj_out_dim=FLAGS.proj_out_dim, global_bn=FLAGS.global_bn,
                          recompute_block_groups=recompute, **overrides)
  train_cfg = TrainConfig(
      train_mode=FLAGS.train_mode, train_batch_size=batch_size, train_steps=10**6,
      checkpoint_steps=10**6, optimizer=FLAGS.optimizer, precision=FLAGS.precision,
      lineareval_while_pretraining=FLAGS.lineareval_while_pretraining,
      memory_size=FLAGS.memory_size)
  teacher = None
  if FLAGS.train_mode == "distill":
    with strategy.scope():
      teacher = build_model(model_cfg)
    teacher.trainable = False
  model_dir = tempfile.mkdtemp(prefix="train_step_bench_")
  small = size <= 32  # the reference's CIFAR recipe: strength 0.5, no blur
  data_cfg = DataConfig(image_size=size, augment_on=FLAGS.augment_on,
                        color_jitter_strength=0.5 if small else 1.0, use_blur=not small)
  spec = loop.RunSpec(strategy=strategy, model_dir=model_dir, model_cfg=model_cfg,
                      data_cfg=data_cfg, train_cfg=train_cfg, distill_cfg=DistillConfig())
  info = DatasetInfo(num_classes, num_examples, num_examples, 10_000)
  objective = (objectives.get("distill")(spec, teacher=teacher) if teacher is not None
               else None)
  trainer = loop.Trainer(spec, objective=objective, info=info)

  views = trainer.objective.views
  rng = np.random.default_rng(0)
  batch = {"label": tf.constant(rng.integers(0, num_classes, batch_size), tf.int64)}
  augment_seconds = None
  if FLAGS.augment_on == "device":
    u = tf.constant(rng.random((batch_size, views, augment.DRAWS_PER_VIEW), np.float32))
    if small:  # CIFAR is held in memory: its images go uncropped, the step crops them
      batch.update(source=tf.constant(rng.integers(0, 256, (batch_size, size, size, 3), np.uint8)),
                   u=u)
    else:
      batch["image"] = tf.constant(rng.integers(0, 256, (batch_size, size, size, 3 * views),
                                                np.uint8))
      if trainer.objective.contrastive_augmentation:
        batch["u"] = u
    augment_fn = tf.function(lambda b: trainer.augmented(b)["image"])
    augment_seconds = _best_seconds(augment_fn, batch, 5)
  else:
    batch["image"] = tf.constant(rng.random((batch_size, size, size, 3 * views), np.float32))
  iterator = iter(strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensors(batch).repeat()))
  train_loop = trainer.make_train_loop()

  def run(num_steps):
    train_loop(iterator, None, tf.constant(num_steps))
    trainer.optimizer.iterations.numpy()  # waits for the steps to finish

  start = time.perf_counter()
  run(1)
  first_call_s = time.perf_counter() - start
  for _ in range(FLAGS.warmup_steps):
    run(1)
  rss_before_timing = peak_rss_mb()

  if FLAGS.profile_dir:
    tf.profiler.experimental.start(FLAGS.profile_dir)
  times = []
  calls = max(1, -(-FLAGS.steps // FLAGS.steps_per_call))
  for _ in range(calls):
    start = time.perf_counter()
    run(FLAGS.steps_per_call)
    times.append((time.perf_counter() - start) / FLAGS.steps_per_call)
  if FLAGS.profile_dir:
    tf.profiler.experimental.stop()
  loss = float(trainer.metrics["loss"].result())
  ops = breakdown(FLAGS.profile_dir, calls * FLAGS.steps_per_call) if FLAGS.profile_dir else None

  result = {
      "preset": FLAGS.preset, "train_mode": FLAGS.train_mode, "precision": FLAGS.precision,
      "batch_size": batch_size, "image_size": size, "resnet_depth": model_cfg.resnet_depth,
      "recompute_block_groups": recompute,
      "sk_ratio": model_cfg.sk_ratio, "optimizer": FLAGS.optimizer,
      "memory_size": FLAGS.memory_size,
      "steps": len(times) * FLAGS.steps_per_call, "steps_per_call": FLAGS.steps_per_call,
      **step_summary(times, batch_size),
      "first_call_s": first_call_s, "rss_before_timing_mb": rss_before_timing,
      "augment_on": FLAGS.augment_on, "augment_seconds": augment_seconds, "op_breakdown": ops,
      "matmul_peak_gflops": peak, "precision_peak_gflops": max(precision_peaks.values()),
      "precision_peaks_gflops": precision_peaks, "loss": loss,
      "compute_dtype": keras.mixed_precision.global_policy().compute_dtype,
      "variable_dtypes": sorted({v.dtype for v in trainer.model.variables}),
      "bn_moving_stat_dtypes": sorted({v.dtype for v in trainer.model.non_trainable_variables
                                       if "moving" in v.path}),
      "load_average": list(os.getloadavg()), "cpu_count": os.cpu_count(),
  }

  if FLAGS.count_flops:
    # One step, traced (not run) as the loop's body runs it; the graph also holds the
    # backward pass and the optimizer update.
    spec_in = {k: tf.TensorSpec(v.shape, v.dtype) for k, v in batch.items()}
    step_fn = tf.function(lambda b: strategy.run(trainer.train_step, args=(b, None)))
    graph = step_fn.get_concrete_function(spec_in).graph
    flops, op_dtypes, unknown = count_graph_flops(graph)
    total = sum(flops.values())
    fwd = tf.function(lambda x: trainer.model(x, training=True))
    x_spec = tf.TensorSpec((batch_size * views, size, size, 3), tf.float32)
    fwd_flops, _, _ = count_graph_flops(fwd.get_concrete_function(x_spec).graph)
    estimate = 3 * sum(fwd_flops.values())
    if teacher is not None:  # the frozen teacher only runs forward
      t_fwd = tf.function(lambda x: teacher(x, training=False))
      estimate += sum(count_graph_flops(t_fwd.get_concrete_function(x_spec).graph)[0].values())
    loss_ops = sorted({f"{op.type}:{op.get_attr('T').name}" for op in graph.get_operations()
                       if "Softmax" in op.type})
    result.update({
        "step_gflop": total / 1e9, "step_gflop_by_op": {k: v / 1e9 for k, v in flops.items()},
        "forward_gflop_x3": estimate / 1e9,
        "ops_with_unknown_shapes": unknown, "op_dtypes": op_dtypes, "loss_op_dtypes": loss_ops,
        "gflops_per_sec": total / 1e9 / result["step_time_s"],
    })
    result["fraction_of_matmul_peak"] = result["gflops_per_sec"] / peak
    result["share_of_peak"] = result["gflops_per_sec"] / result["precision_peak_gflops"]
  else:
    result["gflops_per_sec"] = result["share_of_peak"] = None
  result["peak_rss_mb"] = peak_rss_mb()

  r = result
  recomputed = f", block groups 1-{recompute} recomputed" if recompute else ""
  print(f"{FLAGS.preset} {FLAGS.train_mode} {FLAGS.precision}: batch {batch_size} of "
        f"{size}x{size} ({views} view(s)), {r['steps']} timed steps{recomputed}")
  print_step_summary(r)
  if FLAGS.count_flops:
    print(f"  FLOPs      {r['step_gflop']:.1f} GFLOP/step counted on the step graph "
          f"(3x forward estimate {r['forward_gflop_x3']:.1f}); "
          f"{r['gflops_per_sec']:.1f} GFLOP/s = {r['share_of_peak']:.0%} of the "
          f"{compute_dtype} peak {r['precision_peak_gflops']:.1f} GFLOP/s (matmul "
          f"{precision_peaks['matmul']:.1f}, 3x3 conv {precision_peaks['conv3x3']:.1f}); "
          f"fp32 matmul {peak:.1f}")
    print(f"  dtypes     compute {r['compute_dtype']}, conv/matmul {r['op_dtypes']}, "
          f"softmax/xent ops {r['loss_op_dtypes']}, BN moving stats {r['bn_moving_stat_dtypes']}")
  if augment_seconds is not None:
    what = "crops, colour distortion" if small else "colour distortion"
    print(f"  augment    {what}{' and blur' if data_cfg.use_blur else ''} on the device: "
          f"{augment_seconds:.3f} s of the step")
  if ops:
    print_breakdown(ops)
  print(f"  load avg   {' '.join(f'{x:.2f}' for x in r['load_average'])} on {os.cpu_count()} CPUs")
  if FLAGS.json:
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
