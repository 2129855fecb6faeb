"""Speed and memory of the reference implementation's training step, to run beside ours.

Times Google's SimCLRv2 code (github.com/google-research/simclr, its tf2/ directory, which
needs tf_keras = Keras 2) on the presets of benchmarks/train_step.py, so that both can be
measured side by side on one machine under the same load. None of the reference's code is
copied here: its modules are imported from --reference_dir. Setup (outside this repo; the
project's .venv stays on Keras 3, the second venv sees its packages through a .pth file) and
run, from the repo root:

  git clone https://github.com/google-research/simclr /tmp/simclr_ref
  python3 -m venv /tmp/refvenv
  .venv/bin/python -c "import site; print(site.getsitepackages()[0])" > \
      "$(/tmp/refvenv/bin/python -c 'import site; print(site.getsitepackages()[0])')/main.pth"
  /tmp/refvenv/bin/pip install --no-deps tf_keras==2.21.0
  /tmp/refvenv/bin/python benchmarks/reference_step.py --reference_dir=/tmp/simclr_ref/tf2 \
      --preset=cifar_r18 --train_mode=pretrain --steps=5 --json
  .venv/bin/python benchmarks/train_step.py --preset=cifar_r18 --train_mode=pretrain \
      --steps=5 --json                                                   # ours, same preset

The step is run.py's `single_step` (in its main()): the reference `model.Model` on the
batch, `objective.add_contrastive_loss` (NT-Xent, --hidden_norm, --temperature) on the
projection head, `objective.add_supervised_loss` on the supervised head (in pretraining the
linear-eval head on stop-gradient features, --lineareval_while_pretraining), plus
`model.add_weight_decay`; its gradients applied by `model.build_optimizer`'s LARS (weight decay
and exclusions as there) under `model.WarmUpAndCosineDecay`; run.py's training metrics updated.
It runs through `strategy.run` (OneDeviceStrategy on the CPU, as train_step.py; run.py's
MirroredStrategy is one replica here too) in one `tf.function`, on one random batch held in
memory (`tf.data.Dataset.from_tensors(...).repeat()`, labels one-hot as run.py's input
pipeline makes them): two views concatenated on channels ([B, S, S, 6]) in pretraining, one
in finetuning. Left out: run.py's `tf.summary.image`, a no-op without a summary writer.

One difference is the reference's own design and is kept: with --use_blur (on for the
ImageNet presets) its Model.__call__ blurs the views (`data_util.batch_random_blur`) when
pretraining, so blur is part of its step, while ours blurs in the input pipeline
(benchmarks/input_pipeline.py), outside train_step.py's timing. Its BN is never fused:
SyncBatchNormalization with --global_bn (the default, as ours), fused=False without.

The reference modules read absl flags that its run.py defines; those they need are defined
here with run.py's names and defaults. The preset sets resnet_depth, image_size, sk_ratio,
use_blur and train_batch_size (alias --batch_size) unless given on the command line.

Compatibility shim (the reference files are not edited): lars_optimizer.LARSOptimizer
subclasses `tf.keras.optimizers.Optimizer` with the optimizer API of TF < 2.11 (_set_hyper,
add_slot, _resource_apply_dense), which tf_keras >= 2.11 keeps as
`tf.keras.optimizers.legacy.Optimizer`; that name points there while the reference is imported.

With --json the last line printed is one JSON object with train_step.py's timing keys
(images_per_sec, step_time_s, peak_rss_mb, ...; images/s counts input images, not views) and
the reference's trainable parameter counts (trainable_params, trunk_params, ...), to check
against `python -m tf_simclr.summary` that both build the same network.
"""

import json
import os
import sys
import time

from absl import app, flags

# benchmarks/timing.py, next to this script.
from timing import peak_rss_mb, print_step_summary, step_summary

# Before TensorFlow is imported: makes tf.keras the Keras 2 (tf_keras) the reference needs,
# and our package's environment defaults (oneDNN's kernels on x86, as in our runs), so both
# sides of a comparison run the same kernels; tf_simclr/__init__.py imports no TensorFlow.
os.environ["TF_USE_LEGACY_KERAS"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tf_simclr  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import

PRESETS = {
    # name: (reference flag values, classes, training examples); the models and batches of
    # benchmarks/train_step.py. Blur off on CIFAR, as the reference's CIFAR-10 recipe.
    "cifar_r18": (dict(resnet_depth=18, image_size=32, sk_ratio=0.0, use_blur=False,
                       train_batch_size=256), 10, 50_000),
    "imagenet_r50": (dict(resnet_depth=50, image_size=224, sk_ratio=0.0, use_blur=True,
                          train_batch_size=32), 1000, 1_281_167),
    "imagenet_r50_sk": (dict(resnet_depth=50, image_size=224, sk_ratio=0.0625, use_blur=True,
                             train_batch_size=32), 1000, 1_281_167),
}

flags.DEFINE_string("reference_dir", None,
                    "Directory of the reference's tf2 modules (resnet.py, model.py, ...).")
flags.DEFINE_enum("preset", "cifar_r18", list(PRESETS), "Model and batch of the benchmark.")
flags.DEFINE_integer("steps", 5, "Timed steps.")
flags.DEFINE_integer("warmup_steps", 1, "Untimed steps after the tracing call.")
flags.DEFINE_bool("json", False, "Print a JSON summary as the last line.")

# Read by the reference modules; names and defaults as its run.py, preset ones None.
flags.DEFINE_enum("train_mode", "pretrain", ["pretrain", "finetune"],
                  "pretrain: NT-Xent on two views (+ linear eval head); finetune: one view, "
                  "supervised head only.")
flags.DEFINE_integer("resnet_depth", None, "Depth of ResNet (default: the preset's).")
flags.DEFINE_integer("image_size", None, "Input size (default: the preset's).")
flags.DEFINE_float("sk_ratio", None, "Selective kernel ratio (default: the preset's).")
flags.DEFINE_bool("use_blur", None, "Blur the views inside the pretraining step "
                  "(default: the preset's).")
flags.DEFINE_integer("train_batch_size", None, "Global batch size (default: the preset's).")
flags.DEFINE_alias("batch_size", "train_batch_size")
flags.DEFINE_integer("width_multiplier", 1, "Multiplier to change width of network.")
flags.DEFINE_float("se_ratio", 0., "If it is bigger than 0, it will enable SE.")
flags.DEFINE_bool("lineareval_while_pretraining", True,
                  "Whether to finetune supervised head while pretraining.")
flags.DEFINE_integer("fine_tune_after_block", -1, "Layers trained in finetuning (-1: all).")
flags.DEFINE_enum("proj_head_mode", "nonlinear", ["none", "linear", "nonlinear"],
                  "How the head projection is done.")
flags.DEFINE_integer("proj_out_dim", 128, "Number of head projection dimension.")
flags.DEFINE_integer("num_proj_layers", 3, "Number of non-linear head layers.")
flags.DEFINE_integer("ft_proj_selector", 0, "Projection layer feeding the finetuning head.")
flags.DEFINE_bool("global_bn", True, "Synchronized BN (as the reference recipe and ours).")
flags.DEFINE_float("batch_norm_decay", 0.9, "Batch norm decay parameter.")
flags.DEFINE_float("temperature", 0.1, "Temperature parameter for contrastive loss.")
flags.DEFINE_bool("hidden_norm", True, "L2-normalize projections in the contrastive loss.")
flags.DEFINE_enum("optimizer", "lars", ["momentum", "adam", "lars"], "Optimizer to use.")
flags.DEFINE_float("momentum", 0.9, "Momentum parameter.")
flags.DEFINE_float("weight_decay", 1e-6, "Amount of weight decay to use.")
flags.DEFINE_float("learning_rate", 0.3, "Initial learning rate per batch size of 256.")
flags.DEFINE_enum("learning_rate_scaling", "linear", ["linear", "sqrt"],
                  "How to scale the learning rate as a function of batch size.")
flags.DEFINE_float("warmup_epochs", 10, "Number of epochs of warmup.")
flags.DEFINE_integer("train_epochs", 100, "Number of epochs to train for.")
flags.DEFINE_integer("train_steps", 0, "Steps to train for; overrides train_epochs if set.")
FLAGS = flags.FLAGS


def import_reference(reference_dir):
  """The reference's (model, objective, metrics) modules, imported from `reference_dir`."""
  import tensorflow.compat.v2 as tf
  sys.path.insert(0, os.path.abspath(reference_dir))  # its modules import each other by name
  optimizers = tf.keras.optimizers
  optimizer_new = optimizers.Optimizer
  optimizers.Optimizer = optimizers.legacy.Optimizer  # the shim: see the module docstring
  try:
    import metrics  # pylint: disable=import-outside-toplevel
    import model as model_lib  # pylint: disable=import-outside-toplevel
    import objective as obj_lib  # pylint: disable=import-outside-toplevel
  finally:
    optimizers.Optimizer = optimizer_new
  return model_lib, obj_lib, metrics


def main(_):
  import numpy as np
  import tensorflow.compat.v2 as tf
  import tf_keras

  if not FLAGS.reference_dir:
    raise app.UsageError("--reference_dir is required (see the module docstring)")
  model_lib, obj_lib, metrics = import_reference(FLAGS.reference_dir)

  preset_flags, num_classes, num_examples = PRESETS[FLAGS.preset]
  for name, value in preset_flags.items():
    if FLAGS[name].value is None:
      FLAGS[name].value = value
  batch_size, size = FLAGS.train_batch_size, FLAGS.image_size
  pretrain = FLAGS.train_mode == "pretrain"
  views = 2 if pretrain else 1

  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  tf.keras.utils.set_random_seed(0)
  with strategy.scope():
    # As run.py's main(): model, schedule, optimizer and metrics built in the scope.
    model = model_lib.Model(num_classes)
    learning_rate = model_lib.WarmUpAndCosineDecay(FLAGS.learning_rate, num_examples)
    optimizer = model_lib.build_optimizer(learning_rate)
    names = ["weight_decay", "total_loss"]
    if pretrain:
      names += ["contrast_loss", "contrast_acc", "contrast_entropy"]
    if not pretrain or FLAGS.lineareval_while_pretraining:
      names += ["supervised_loss", "supervised_acc"]
    mean = {n: tf.keras.metrics.Mean("train/" + n) for n in names}

  def single_step(features, labels):
    """run.py's single_step, without its summary image."""
    with tf.GradientTape() as tape:
      projection_head_outputs, supervised_head_outputs = model(features, training=True)
      loss = 0.
      if projection_head_outputs is not None:
        con_loss, logits_con, labels_con = obj_lib.add_contrastive_loss(
            projection_head_outputs, hidden_norm=FLAGS.hidden_norm,
            temperature=FLAGS.temperature, strategy=strategy)
        loss += con_loss
        metrics.update_pretrain_metrics_train(
            mean["contrast_loss"], mean["contrast_acc"], mean["contrast_entropy"], con_loss,
            logits_con, labels_con)
      if supervised_head_outputs is not None:
        l = labels["labels"]
        if pretrain and FLAGS.lineareval_while_pretraining:
          l = tf.concat([l, l], 0)
        sup_loss = obj_lib.add_supervised_loss(labels=l, logits=supervised_head_outputs)
        loss += sup_loss
        metrics.update_finetune_metrics_train(
            mean["supervised_loss"], mean["supervised_acc"], sup_loss, l,
            supervised_head_outputs)
      weight_decay = model_lib.add_weight_decay(model, adjust_per_optimizer=True)
      mean["weight_decay"].update_state(weight_decay)
      loss += weight_decay
      mean["total_loss"].update_state(loss)
      loss = loss / strategy.num_replicas_in_sync
      grads = tape.gradient(loss, model.trainable_variables)
      optimizer.apply_gradients(zip(grads, model.trainable_variables))

  rng = np.random.default_rng(0)
  images = tf.constant(rng.random((batch_size, size, size, 3 * views), np.float32))
  labels = tf.one_hot(rng.integers(0, num_classes, batch_size), num_classes)
  iterator = iter(strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensors((images, labels)).repeat()))

  @tf.function
  def train_step(iterator):
    features, labels = next(iterator)
    strategy.run(single_step, (features, {"labels": labels}))

  losses = []

  def run():
    """Runs one step; returns its time. The loss is read (and reset) after the clock stops."""
    start = time.perf_counter()
    train_step(iterator)
    optimizer.iterations.numpy()  # waits for the step to finish
    elapsed = time.perf_counter() - start
    losses.append(float(mean["total_loss"].result()))
    mean["total_loss"].reset_state()
    return elapsed

  with strategy.scope():
    first_call_s = run()
    for _ in range(FLAGS.warmup_steps):
      run()
    rss_before_timing = peak_rss_mb()
    times = [run() for _ in range(FLAGS.steps)]

  def count(variables):
    return int(sum(np.prod(v.shape) for v in variables))

  projection_head = model._projection_head  # pylint: disable=protected-access
  supervised_head = getattr(model, "supervised_head", None)
  result = {
      "preset": FLAGS.preset, "train_mode": FLAGS.train_mode, "batch_size": batch_size,
      "image_size": size, "resnet_depth": FLAGS.resnet_depth, "sk_ratio": FLAGS.sk_ratio,
      "width_multiplier": FLAGS.width_multiplier, "use_blur": FLAGS.use_blur,
      "global_bn": FLAGS.global_bn, "optimizer": FLAGS.optimizer, "steps": len(times),
      **step_summary(times, batch_size),
      "first_call_s": first_call_s, "rss_before_timing_mb": rss_before_timing,
      "loss": losses[-1], "losses": losses,
      "trainable_params": count(model.trainable_variables),
      "trunk_params": count(model.resnet_model.trainable_variables),
      "projection_head_params": count(projection_head.trainable_variables),
      "supervised_head_params": count(supervised_head.trainable_variables
                                      if supervised_head is not None else []),
      "tensorflow_version": tf.__version__, "tf_keras_version": tf_keras.__version__,
      "load_average": list(os.getloadavg()), "cpu_count": os.cpu_count(),
      "peak_rss_mb": peak_rss_mb(),
  }

  r = result
  print(f"reference {FLAGS.preset} {FLAGS.train_mode}: batch {batch_size} of {size}x{size} "
        f"({views} view(s), blur {'on' if FLAGS.use_blur and pretrain else 'off'}), "
        f"{r['steps']} timed steps")
  print_step_summary(r)
  print(f"  params     {r['trainable_params']:,} trainable (trunk {r['trunk_params']:,}, "
        f"projection head {r['projection_head_params']:,}, supervised head "
        f"{r['supervised_head_params']:,})")
  print(f"  loss       {' '.join(f'{x:.4f}' for x in losses)} (every call, first to last)")
  print(f"  load avg   {' '.join(f'{x:.2f}' for x in r['load_average'])} on {os.cpu_count()} CPUs")
  if FLAGS.json:
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
