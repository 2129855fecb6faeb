"""SimCLRv2 in TensorFlow 2 / Keras 3: pretrain, finetune, distill and evaluate.

  python run.py --flagfile=flags/fashion_mnist_pretrain.cfg --model_dir=runs/pretrain

Flag names and meanings follow the reference implementation (google-research/simclr) so
its and the paper's recipes run unchanged as flagfiles (see flags/). This is the only
module that reads absl FLAGS: it turns them into the config dataclasses of tf_simclr.config.
"""

import json
import os
import re
import sys

import tf_simclr  # noqa: F401  (quiets TensorFlow's start-up logging)
from absl import app, flags, logging

from tf_simclr import model_flags, objectives
from tf_simclr.config import (DataConfig, DistillConfig, ModelConfig, TrainConfig,
                              resolve_recompute_block_groups)

# --------------------------------------------------------------------------- flags

flags.DEFINE_enum("mode", "train", ["train", "eval", "train_then_eval"],
                  "train, evaluate every checkpoint of model_dir, or both.")
flags.DEFINE_enum("train_mode", "pretrain", list(objectives.names()),
                  "SimCLRv2 stage: contrastive pretraining, supervised fine-tuning, or "
                  "distillation from a teacher on unlabelled data.")
flags.DEFINE_string("model_dir", None, "Where checkpoints, summaries, results and exports go.")
flags.DEFINE_integer("seed", 0, "Seed of initial weights, data order and augmentations.")
flags.DEFINE_bool("deterministic", False,
                  "Deterministic TF ops (bit-exact reruns and resumes; somewhat slower).")
flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16", "mixed_float16", "auto"],
                  "Compute precision; losses, softmax and BN statistics stay float32. auto: "
                  "mixed_bfloat16 where the hardware has native bf16 (TPU, Ampere+ GPU, CPU "
                  "with AVX512_BF16/AMX), mixed_float16 on older tensor-core GPUs, else float32.")

# Data.
flags.DEFINE_string("dataset", "imagenet2012",
                    "A TFDS image classification dataset (e.g. cifar10, fashion_mnist, "
                    "imagenet2012_subset/1pct) or folder:/path with one subfolder per class.")
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
flags.DEFINE_string("train_split", "train", "Training split (TFDS slicing allowed).")
flags.DEFINE_string("eval_split", "validation", "Evaluation split.")
flags.DEFINE_bool("cache_dataset", False, "Cache the decoded dataset in memory.")
flags.DEFINE_float("train_label_fraction", 1.0,
                   "Class-balanced seeded fraction of the training labels used by finetune "
                   "(the paper's 1%/10% protocol).")
flags.DEFINE_integer("train_labels_per_class", 0,
                     "Instead of --train_label_fraction: this many labelled examples per class "
                     "(class-balanced, seeded; ImageNet's 1%/10% have ~13/~128 per class).")
flags.DEFINE_float("color_jitter_strength", 1.0, "Strength s of the colour distortion.")
flags.DEFINE_bool("use_blur", True, "Gaussian blur in pretraining augmentation.")
flags.DEFINE_float("crop_min_area", 0.08,
                   "Smallest share of the image a random training crop covers (the paper's "
                   "Inception crop: 0.08; 1 keeps the whole image, flip only).")
flags.DEFINE_string("resize_method", "bicubic",
                    "Resampling of training crops and eval views: bicubic (the reference's) or "
                    "bilinear (aligned corners, a faster input pipeline).")
flags.DEFINE_enum("augment_on", "auto", ["host", "device", "auto"],
                  "Where colour distortion and blur run: in the input pipeline (host), or in "
                  "the training step on the replicas' devices after the host's crops (device; "
                  "in-memory same-size images are cropped there too); auto: device on GPUs and "
                  "TPUs, host on CPUs (docs/DATA.md).")

# Model: --resnet_depth, --width_multiplier, --sk_ratio, --se_ratio, --image_size (also the
# data's), --proj_head_mode, --proj_out_dim, --num_proj_layers, --ft_proj_selector.
for _name in model_flags.define_architecture_flags():  # run.py's own: --help, flags.json
  flags.declare_key_flag(_name)
flags.DEFINE_float("batch_norm_decay", 0.9, "BN moving average decay.")
flags.DEFINE_bool("global_bn", True, "Synchronize BN statistics across replicas.")
flags.DEFINE_integer("fine_tune_after_block", -1,
                     "Fine-tune only after this block (-1: all; 0: after the stem; "
                     "4: only the heads).")
flags.DEFINE_bool("update_frozen_bn", None,
                  "BN of the blocks frozen by --fine_tune_after_block normalises with batch "
                  "statistics and updates its moving ones (true; the reference's tf2 code) or "
                  "runs in inference mode (false). Unset: the reference's TF1 code, behind the "
                  "paper's numbers: inference mode only with --fine_tune_after_block=4.")
flags.DEFINE_integer("recompute_block_groups", -1,
                     "Keep only each block's input in block groups 1..k and recompute their "
                     "activations in the backward pass: less memory for about one more forward "
                     "of those groups (0: keep everything; -1: 1 in float32, 0 under mixed "
                     "precision; docs/PERFORMANCE.md).")
flags.DEFINE_bool("zero_init_logits_layer", False,
                  "Zero-initialise the supervised head when initialising from --checkpoint.")

# Optimisation.
flags.DEFINE_integer("train_batch_size", 512, "Global training batch size.")
flags.DEFINE_integer("train_epochs", 100, "Training epochs (unless --train_steps).")
flags.DEFINE_integer("train_steps", 0, "Training steps; overrides --train_epochs when > 0.")
flags.DEFINE_integer("eval_batch_size", 256, "Global evaluation batch size.")
flags.DEFINE_integer("eval_steps", 0, "Evaluation steps; 0 evaluates the whole split.")
flags.DEFINE_float("learning_rate", 0.3, "Base learning rate (scaled by batch size).")
flags.DEFINE_enum("learning_rate_scaling", "linear", ["linear", "sqrt"],
                  "linear: lr * B / 256; sqrt: lr * sqrt(B).")
flags.DEFINE_float("warmup_epochs", 10, "Linear warmup epochs before cosine decay.")
flags.DEFINE_float("weight_decay", 1e-6, "Weight decay (in LARS; L2 in the loss otherwise).")
flags.DEFINE_enum("optimizer", "lars", ["lars", "momentum", "adam"], "Optimizer.")
flags.DEFINE_float("momentum", 0.9, "Momentum of lars and momentum optimizers.")
flags.DEFINE_float("temperature", 0.1, "NT-Xent temperature.")
flags.DEFINE_bool("hidden_norm", True, "L2-normalise projections in NT-Xent.")
flags.DEFINE_integer("memory_size", 0,
                     "SimCLRv2's memory: this many buffered negatives (both views of earlier "
                     "global batches, from a moving-average copy of the network); 0: none.")
flags.DEFINE_float("memory_momentum", 0.999, "EMA rate of the memory network's weights.")
flags.DEFINE_bool("knn_monitor", False,
                  "At every evaluation, weighted kNN top-1 of the trunk's pooled features (eval "
                  "split against the unaugmented training split): eval/knn_top_1_accuracy.")
flags.DEFINE_integer("knn_k", 200, "Neighbours of the kNN monitor.")
flags.DEFINE_float("knn_temperature", 0.1, "Temperature of the kNN monitor's weights.")
flags.DEFINE_bool("lineareval_while_pretraining", True,
                  "Train a linear head on stop-gradient features during pretraining.")
flags.DEFINE_string("checkpoint", None,
                    "Initialise a new run from this checkpoint, model_dir or tf_simclr "
                    "SavedModel (weights only).")
flags.DEFINE_integer("checkpoint_epochs", 1, "Checkpoint every this many epochs.")
flags.DEFINE_integer("checkpoint_steps", 0, "Checkpoint every this many steps (overrides epochs).")
flags.DEFINE_integer("keep_checkpoint_max", 5, "Checkpoints to keep.")
flags.DEFINE_integer("keep_hub_module_max", 1,
                     "SavedModel exports (<model_dir>/saved_model/<step>) to keep; 0: no export.")
flags.DEFINE_integer("steps_per_loop", 0, "Steps per tf.function call (0: automatic).")
flags.DEFINE_integer("train_summary_steps", 100,
                     "Write training summaries about every this many steps (0: never).")
flags.DEFINE_integer("eval_timeout_secs", 0,
                     "--mode=eval: wait this long for new checkpoints (0: only existing ones).")

# Distillation.
flags.DEFINE_string("teacher_checkpoint", None,
                    "Teacher of --train_mode=distill: a tf_simclr model_dir, checkpoint or "
                    "SavedModel; its architecture is read from its tf_simclr_config.json.")
flags.DEFINE_float("distill_temperature", 1.0, "Temperature tau of teacher and student.")
flags.DEFINE_float("distill_alpha", 1.0,
                   "The paper's alpha: weight of the distillation loss; the labelled subset's "
                   "cross-entropy weighs 1 - alpha (1: pure distillation).")
# The teacher sees the student's images, so its image size is the student's.
TEACHER_OVERRIDES = tuple(name for name in model_flags.NAMES if name != "image_size")
for _name in model_flags.define_architecture_flags(names=TEACHER_OVERRIDES, override_of="teacher"):
  flags.declare_key_flag(_name)

# Distribution.
flags.DEFINE_enum("strategy", "auto", ["auto", "one_device", "mirrored", "multi_worker", "tpu"],
                  "tf.distribute strategy (auto picks from --tpu, TF_CONFIG and devices).")
flags.DEFINE_integer("num_cpu_replicas", 0, "Split the CPU into this many logical replicas.")
flags.DEFINE_string("tpu", None, "TPU name or address.")
flags.DEFINE_alias("tpu_name", "tpu")
flags.DEFINE_string("tpu_zone", None, "TPU zone.")
flags.DEFINE_string("gcp_project", None, "GCP project of the TPU.")
flags.DEFINE_bool("use_tpu", False, "Reference compatibility: same as --strategy=tpu.")

FLAGS = flags.FLAGS

# Flags that define what a model_dir holds: a second run into the same directory must agree.
RUN_IDENTITY = ("train_mode", "dataset", *model_flags.NAMES)


def model_config(num_classes) -> ModelConfig:
  return ModelConfig(
      **model_flags.architecture_from_flags(),
      batch_norm_decay=FLAGS.batch_norm_decay, global_bn=FLAGS.global_bn,
      num_classes=num_classes,
      fine_tune_after_block=(FLAGS.fine_tune_after_block if FLAGS.train_mode == "finetune"
                             else -1),
      update_frozen_bn=FLAGS.update_frozen_bn,
      recompute_block_groups=resolve_recompute_block_groups(
          FLAGS.recompute_block_groups, precision()))


def data_config() -> DataConfig:
  return DataConfig(
      dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, train_split=FLAGS.train_split,
      eval_split=FLAGS.eval_split, image_size=FLAGS.image_size,
      color_jitter_strength=FLAGS.color_jitter_strength, use_blur=FLAGS.use_blur,
      resize_method=FLAGS.resize_method, crop_min_area=FLAGS.crop_min_area,
      augment_on=FLAGS.augment_on,
      cache_dataset=FLAGS.cache_dataset, train_label_fraction=FLAGS.train_label_fraction,
      train_labels_per_class=FLAGS.train_labels_per_class,
      seed=FLAGS.seed)


def precision() -> str:
  """--precision, with auto resolved for the devices this run will use."""
  if FLAGS.precision != "auto":
    return FLAGS.precision
  from tf_simclr import precision as precision_lib
  return precision_lib.native_precision(tpu=FLAGS.strategy == "tpu" or FLAGS.use_tpu
                                        or bool(FLAGS.tpu))


def train_config() -> TrainConfig:
  names = [f.name for f in TrainConfig.__dataclass_fields__.values() if f.name != "precision"]
  return TrainConfig(precision=precision(), **{name: getattr(FLAGS, name) for name in names})


def distill_config() -> DistillConfig:
  overrides = {name: getattr(FLAGS, f"teacher_{name}") for name in TEACHER_OVERRIDES
               if getattr(FLAGS, f"teacher_{name}") is not None}
  return DistillConfig(teacher_checkpoint=FLAGS.teacher_checkpoint or "",
                       teacher_overrides=overrides,
                       distill_temperature=FLAGS.distill_temperature,
                       distill_alpha=FLAGS.distill_alpha)


def validate_flags():
  """Flag combinations that cannot work: one clear line each, before any heavy work."""
  if not FLAGS.model_dir:
    raise app.UsageError("--model_dir is required")
  for name in ("num_cpu_replicas", "eval_timeout_secs"):
    if getattr(FLAGS, name) < 0:
      raise app.UsageError(f"--{name} must be >= 0, got {getattr(FLAGS, name)}")
  if FLAGS.knn_k <= 0 or FLAGS.knn_temperature <= 0:
    raise app.UsageError(f"--knn_k and --knn_temperature must be > 0, got {FLAGS.knn_k} and "
                         f"{FLAGS.knn_temperature}")
  if FLAGS.train_mode == "pretrain" and FLAGS.fine_tune_after_block != -1:
    raise app.UsageError("--fine_tune_after_block freezes layers, which pretraining does not "
                         "support: use it with --train_mode=finetune")
  if FLAGS.train_mode != "distill" and FLAGS.teacher_checkpoint:
    raise app.UsageError("--teacher_checkpoint is only used with --train_mode=distill")
  # The configs check their own values, one line each.
  try:
    model_config(num_classes=1).validate()
    data_config().validate()
    train_config().validate(num_replicas=max(FLAGS.num_cpu_replicas, 1))
    if FLAGS.train_mode == "distill":
      distill_config().validate()
  except ValueError as e:
    raise usage_error(e)


def usage_error(e):
  """A config's ValueError as a usage error. Config messages start with the field's name,
  which is also the flag's: say it as a flag."""
  message = str(e)
  name = re.match(r"\w+", message)
  if name and name.group(0) in FLAGS:
    message = f"--{message}"
  return app.UsageError(message)


def check_model_dir(model_dir, flag_values):
  """model_dir must be writable and, if it holds a run, a run of this mode/architecture."""
  import tensorflow as tf
  try:
    tf.io.gfile.makedirs(model_dir)
    probe = os.path.join(model_dir, f".write_test_{os.getpid()}")
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("")
    tf.io.gfile.remove(probe)
  except (OSError, tf.errors.OpError) as e:
    raise app.UsageError(f"--model_dir={model_dir} is not writable: {e}")
  path = os.path.join(model_dir, "flags.json")
  if not tf.io.gfile.exists(path):
    return
  with tf.io.gfile.GFile(path) as f:
    previous = json.load(f)
  for name in RUN_IDENTITY:
    if name in previous and previous[name] != flag_values[name]:
      raise app.UsageError(
          f"--model_dir={model_dir} holds a run with {name}={previous[name]!r}, not "
          f"{flag_values[name]!r}: use another --model_dir (or the same flags to resume)")


def main(argv):
  from tf_simclr.train import callbacks, checkpoints, loop
  try:
    run(argv)
  except (app.UsageError, checkpoints.ArchitectureMismatchError, checkpoints.StorageError,
          FileNotFoundError) as e:
    # One line, not absl's page of flag help: the flags are one --helpshort away.
    hint = " (run.py --helpshort lists the flags)" if isinstance(e, app.UsageError) else ""
    print(f"run.py: {e}{hint}", file=sys.stderr, flush=True)
    sys.exit(1)
  except (callbacks.NonFiniteLossError, loop.Interrupted) as e:
    print(f"run.py: {e}", file=sys.stderr, flush=True)
    sys.exit(2 if isinstance(e, callbacks.NonFiniteLossError) else 3)


def run(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Progress goes to stdout; TFDS's per-call INFO lines would drown it.
  logging.set_verbosity(logging.WARNING)
  validate_flags()
  # This run's own flags (not absl's): what flags.json records.
  flag_values = {f.name: f.value for f in FLAGS.get_key_flags_for_module(sys.argv[0])}
  check_model_dir(FLAGS.model_dir, flag_values)

  from tf_simclr import files, strategy as strategy_lib
  from tf_simclr.data import datasets
  from tf_simclr.train import callbacks, checkpoints, loop

  try:
    strategy = strategy_lib.build_strategy(
        "tpu" if FLAGS.use_tpu and FLAGS.strategy == "auto" else FLAGS.strategy,
        FLAGS.num_cpu_replicas, FLAGS.tpu, FLAGS.tpu_zone, FLAGS.gcp_project)
  except ValueError as e:  # e.g. --num_cpu_replicas with another strategy, bad TF_CONFIG
    raise app.UsageError(str(e))

  if FLAGS.precision == "auto":
    print(f"Precision: auto -> {precision()}", flush=True)
  data_cfg = data_config()
  try:
    # The eval split is checked before training when the run evaluates, never otherwise.
    info = datasets.dataset_info(data_cfg, with_eval=FLAGS.mode != "train")
  except ValueError as e:
    raise app.UsageError(str(e))
  is_chief = strategy_lib.is_chief(strategy)
  model_cfg = model_config(info.num_classes)
  if is_chief:
    files.write_json_atomic(os.path.join(FLAGS.model_dir, "flags.json"), flag_values)

  def export_fn(model, step):
    from tf_simclr import export
    path = export.export_run(model, FLAGS.model_dir, model_cfg, step, FLAGS.keep_hub_module_max)
    print(f"Exported SavedModel {path}", flush=True)

  spec = loop.RunSpec(
      strategy=strategy, model_dir=FLAGS.model_dir, model_cfg=model_cfg, data_cfg=data_cfg,
      train_cfg=train_config(), distill_cfg=distill_config(), is_chief=is_chief)
  run_callbacks = callbacks.default_callbacks(
      FLAGS.model_dir, is_chief=is_chief, summary_steps=FLAGS.train_summary_steps,
      export_fn=export_fn if FLAGS.keep_hub_module_max > 0 else None,
      knn_monitor=(callbacks.KnnMonitor(FLAGS.knn_k, FLAGS.knn_temperature)
                   if FLAGS.knn_monitor else None))
  try:
    trainer = loop.Trainer(spec, callbacks=run_callbacks, info=info)
  except ValueError as e:  # batch sizes that do not fit the data or the replicas, a teacher
    raise usage_error(e)  # that does not fit the data

  if FLAGS.mode in ("train", "train_then_eval"):
    step = trainer.restore_or_initialize()
    if step == 0 and FLAGS.checkpoint:
      trainer.initialize_from(checkpoints.resolve_weights(FLAGS.checkpoint))
    trainer.train(step)
    if FLAGS.mode == "train_then_eval":
      trainer.evaluate()
  elif FLAGS.mode == "eval":
    evaluate_checkpoints(trainer, FLAGS.model_dir, FLAGS.eval_timeout_secs)


def evaluate_checkpoints(trainer, model_dir, timeout_secs):
  """Evaluates every checkpoint of model_dir in step order, then (with a timeout) each new one
  until the final step, like the reference's eval mode."""
  import tensorflow as tf
  state = tf.train.get_checkpoint_state(model_dir)
  pending = list(state.all_model_checkpoint_paths) if state else []
  if not pending and not timeout_secs:
    raise app.UsageError(f"no checkpoint to evaluate in --model_dir={model_dir}")
  evaluated = set()
  step = -1
  for prefix in pending:
    step = trainer.evaluate(prefix)["global_step"]
    evaluated.add(prefix)
  if timeout_secs and step < trainer.total_steps:
    for prefix in tf.train.checkpoints_iterator(model_dir, min_interval_secs=1,
                                                timeout=timeout_secs):
      if prefix not in evaluated:
        evaluated.add(prefix)
        if trainer.evaluate(prefix)["global_step"] >= trainer.total_steps:
          break

if __name__ == "__main__":
  flags.mark_flag_as_required("model_dir")
  app.run(main)
