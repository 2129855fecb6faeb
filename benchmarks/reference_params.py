"""Trainable parameter counts of the reference implementation's models, to check ours against.

Builds Google's SimCLRv2 model (github.com/google-research/simclr, tf2/, imported from
--reference_dir; none of its code is copied here) for each of --configs and prints its
counts per part, with the keys of `python -m tf_simclr.summary --json`. Runs in the second
venv of benchmarks/reference_step.py (its docstring has the setup), from the repo root:

  /tmp/refvenv/bin/python benchmarks/reference_params.py --reference_dir=/tmp/simclr_ref/tf2
  for c in 50:1:0 50:1:0.0625 ...; do IFS=: read d w s i n <<< "$c"   # ours (docs/MODEL.md)
    .venv/bin/python -m tf_simclr.summary --resnet_depth=$d --width_multiplier=$w \
        --sk_ratio=$s --image_size=${i:-224} --num_classes=${n:-1000} --json | tail -1; done

A config is DEPTH:WIDTH:SK_RATIO[:IMAGE_SIZE[:CLASSES]] (defaults 224 and 1000; an image
size <= 32 selects the CIFAR stem, as in the reference's model.py). Counts are taken as
tf_simclr.summary takes them: the reference model pretraining with the linear-eval head
(every layer trainable; its supervised head reads the trunk's output, ft_proj_selector=0),
built by one inference call on one image of at most 64x64 (the counts do not depend on the
input size). BN is plain Keras BN (global_bn defaults to False here, as summary's; same
variables as synchronized BN).

As benchmarks/reference_step.py, the absl flags the reference modules read are defined here
with the names and defaults of its run.py, and lars_optimizer (imported by model.py) gets the
same shim. The last line printed is a JSON list, one object per config.
"""

import gc
import json
import os
import sys

from absl import app, flags

# Before TensorFlow is imported: makes tf.keras the Keras 2 (tf_keras) the reference needs.
os.environ["TF_USE_LEGACY_KERAS"] = "1"

# The SimCLRv2 paper's model table (ResNet-50/101/152, 1x/2x, with and without SK, 152 3x SK)
# and the CIFAR ResNet-18 of benchmarks/reference_step.py.
DEFAULT_CONFIGS = [f"{d}:{w}:{s}" for d in (50, 101, 152) for w in (1, 2) for s in (0, 0.0625)]
DEFAULT_CONFIGS += ["152:3:0.0625", "18:1:0:32:10"]

flags.DEFINE_string("reference_dir", None,
                    "Directory of the reference's tf2 modules (resnet.py, model.py, ...).")
flags.DEFINE_list("configs", DEFAULT_CONFIGS, "DEPTH:WIDTH:SK_RATIO[:IMAGE_SIZE[:CLASSES]].")

# Read by the reference modules when building; names and defaults as its run.py. The
# architecture ones are set per config.
flags.DEFINE_integer("resnet_depth", 50, "Depth of ResNet (set per config).")
flags.DEFINE_integer("width_multiplier", 1, "Width multiplier (set per config).")
flags.DEFINE_float("sk_ratio", 0., "Selective kernel ratio (set per config).")
flags.DEFINE_integer("image_size", 224, "Input size (set per config; <= 32: CIFAR stem).")
flags.DEFINE_float("se_ratio", 0., "If it is bigger than 0, it will enable SE.")
flags.DEFINE_enum("train_mode", "pretrain", ["pretrain", "finetune"], "Training mode.")
flags.DEFINE_bool("lineareval_while_pretraining", True,
                  "Whether to finetune supervised head while pretraining.")
flags.DEFINE_integer("fine_tune_after_block", -1, "Layers trained in finetuning (-1: all).")
flags.DEFINE_enum("proj_head_mode", "nonlinear", ["none", "linear", "nonlinear"],
                  "How the head projection is done.")
flags.DEFINE_integer("proj_out_dim", 128, "Number of head projection dimension.")
flags.DEFINE_integer("num_proj_layers", 3, "Number of non-linear head layers.")
flags.DEFINE_integer("ft_proj_selector", 0, "Projection layer feeding the finetuning head.")
flags.DEFINE_bool("global_bn", False, "Synchronized BN (no effect on the counts).")
flags.DEFINE_float("batch_norm_decay", 0.9, "Batch norm decay parameter.")
flags.DEFINE_bool("use_blur", True, "Read by the model in training calls only.")
FLAGS = flags.FLAGS


def import_reference(reference_dir):
  """The reference's model module, imported from `reference_dir` (shim as reference_step)."""
  import tensorflow.compat.v2 as tf
  sys.path.insert(0, os.path.abspath(reference_dir))  # its modules import each other by name
  optimizers = tf.keras.optimizers
  optimizer_new = optimizers.Optimizer
  optimizers.Optimizer = optimizers.legacy.Optimizer
  try:
    import model as model_lib  # pylint: disable=import-outside-toplevel
  finally:
    optimizers.Optimizer = optimizer_new
  return model_lib


def parse_config(spec):
  fields = spec.split(":")
  if not 3 <= len(fields) <= 5:
    raise app.UsageError(f"config {spec!r} is not DEPTH:WIDTH:SK_RATIO[:IMAGE_SIZE[:CLASSES]]")
  fields += ["224", "1000"][len(fields) - 3:]
  return dict(resnet_depth=int(fields[0]), width_multiplier=int(fields[1]),
              sk_ratio=float(fields[2]), image_size=int(fields[3]), num_classes=int(fields[4]))


def main(_):
  import numpy as np
  import tensorflow.compat.v2 as tf
  import tf_keras

  if not FLAGS.reference_dir:
    raise app.UsageError("--reference_dir is required (see the module docstring)")
  model_lib = import_reference(FLAGS.reference_dir)

  def count(variables):
    return int(sum(np.prod(v.shape) for v in variables))

  results = []
  for spec in FLAGS.configs:
    cfg = parse_config(spec)
    for name in ("resnet_depth", "width_multiplier", "sk_ratio", "image_size"):
      FLAGS[name].value = cfg[name]
    tf.keras.backend.clear_session()
    model = model_lib.Model(cfg["num_classes"])
    size = min(cfg["image_size"], 64)
    model(tf.zeros([1, size, size, 3]), training=False)
    counts = {
        "trunk_params": count(model.resnet_model.trainable_variables),
        # pylint: disable-next=protected-access
        "projection_head_params": count(model._projection_head.trainable_variables),
        "supervised_head_params": count(model.supervised_head.trainable_variables),
        "non_trainable_params": count(model.non_trainable_variables),
    }
    counts["total_params"] = (counts["trunk_params"] + counts["projection_head_params"]
                              + counts["supervised_head_params"])
    assert counts["total_params"] == count(model.trainable_variables)
    results.append({"config": spec, **cfg, **counts})
    print(f"reference ResNet-{cfg['resnet_depth']} {cfg['width_multiplier']}x"
          f"{' SK' if cfg['sk_ratio'] > 0 else ''} {cfg['image_size']}px "
          f"{cfg['num_classes']} classes: trunk {counts['trunk_params']:,}, projection head "
          f"{counts['projection_head_params']:,}, supervised head "
          f"{counts['supervised_head_params']:,}, non-trainable "
          f"{counts['non_trainable_params']:,}", flush=True)
    del model
    gc.collect()
  print(f"tensorflow {tf.__version__}, tf_keras {tf_keras.__version__}")
  print(json.dumps(results), flush=True)


if __name__ == "__main__":
  app.run(main)
