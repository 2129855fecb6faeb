"""SimCLRv2 in TensorFlow 2 / Keras 3: pretrain, finetune, distill and evaluate.

  python run.py --flagfile=flags/fashion_mnist_pretrain.cfg --model_dir=runs/pretrain

Flag names and meanings follow the reference implementation (google-research/simclr) so
its and the paper's recipes run unchanged as flagfiles (see flags/). This is the only
module that reads absl FLAGS: it turns them into the config dataclasses of tf_simclr.config.
"""

import json
import os
import sys

import tf_simclr  # noqa: F401  (quiets TensorFlow's start-up logging)
from absl import app, flags, logging

from tf_simclr import model_flags
from tf_simclr.config import (DataConfig, DistillConfig, ModelConfig, TrainConfig,
                              resolve_recompute_block_groups)

# --------------------------------------------------------------------------- flags

flags.DEFINE_enum("mode", "train", ["train", "eval", "train_then_eval"],
                  "train, evaluate every checkpoint of model_dir, or both.")
flags.DEFINE_enum("train_mode", "pretrain", ["pretrain", "finetune", "distill"],
                  "SimCLRv2 stage: contrastive pretraining, supervised fine-tuning, or "
                  "distillation from a teacher on unlabelled data.")
flags.DEFINE_string("model_dir", None, "Where checkpoints, summaries, results and exports go.")
flags.DEFINE_integer("seed", 0, "Seed of initial weights, data order and augmentations.")
flags.DEFINE_bool("deterministic", False,
                  "Deterministic TF ops (bit-exact reruns and resumes; somewhat slower).")
flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16", "mixed_float16"],
                  "Compute precision; losses, softmax and BN statistics stay float32.")

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
flags.DEFINE_string("resize_method", "bicubic",
                    "Resampling of training crops and eval views: bicubic (the reference's) or "
                    "bilinear (aligned corners, a faster input pipeline).")

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
                    "SavedModel; its architecture is read from the teacher run's flags.json "
                    "(or the SavedModel's config).")
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


def model_config(num_classes, overrides=None) -> ModelConfig:
  values = dict(
      **model_flags.architecture_from_flags(),
      batch_norm_decay=FLAGS.batch_norm_decay, global_bn=FLAGS.global_bn,
      num_classes=num_classes,
      fine_tune_after_block=(FLAGS.fine_tune_after_block if FLAGS.train_mode == "finetune"
                             else -1),
      update_frozen_bn=FLAGS.update_frozen_bn,
      recompute_block_groups=resolve_recompute_block_groups(
          FLAGS.recompute_block_groups, FLAGS.precision))
  values.update(overrides or {})
  return ModelConfig(**values)


def data_config() -> DataConfig:
  return DataConfig(
      dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, train_split=FLAGS.train_split,
      eval_split=FLAGS.eval_split, image_size=FLAGS.image_size,
      color_jitter_strength=FLAGS.color_jitter_strength, use_blur=FLAGS.use_blur,
      resize_method=FLAGS.resize_method,
      cache_dataset=FLAGS.cache_dataset, train_label_fraction=FLAGS.train_label_fraction,
      train_labels_per_class=FLAGS.train_labels_per_class,
      seed=FLAGS.seed)


def train_config() -> TrainConfig:
  names = [f.name for f in TrainConfig.__dataclass_fields__.values()]
  return TrainConfig(**{name: getattr(FLAGS, name) for name in names})


def validate_flags():
  """Flag combinations that cannot work: one clear line each, before any heavy work."""
  if not FLAGS.model_dir:
    raise app.UsageError("--model_dir is required")
  positive = ("train_batch_size", "eval_batch_size", "keep_checkpoint_max", "image_size",
              "proj_out_dim", "num_proj_layers")
  for name in positive:
    if getattr(FLAGS, name) <= 0:
      raise app.UsageError(f"--{name} must be > 0, got {getattr(FLAGS, name)}")
  non_negative = ("train_epochs", "train_steps", "eval_steps", "checkpoint_steps",
                  "checkpoint_epochs", "steps_per_loop", "warmup_epochs", "weight_decay",
                  "learning_rate", "num_cpu_replicas", "eval_timeout_secs",
                  "train_summary_steps")
  for name in non_negative:
    if getattr(FLAGS, name) < 0:
      raise app.UsageError(f"--{name} must be >= 0, got {getattr(FLAGS, name)}")
  if FLAGS.train_steps == 0 and FLAGS.train_epochs == 0 and FLAGS.mode != "eval":
    raise app.UsageError("one of --train_steps or --train_epochs must be > 0")
  if FLAGS.checkpoint_steps == 0 and FLAGS.checkpoint_epochs == 0:
    raise app.UsageError("one of --checkpoint_steps or --checkpoint_epochs must be > 0")
  if FLAGS.temperature <= 0 or FLAGS.distill_temperature <= 0:
    raise app.UsageError("--temperature and --distill_temperature must be > 0")
  if not 0 < FLAGS.train_label_fraction <= 1:
    raise app.UsageError(f"--train_label_fraction must be in (0, 1], got "
                         f"{FLAGS.train_label_fraction}")
  if not 0 <= FLAGS.distill_alpha <= 1:
    raise app.UsageError(f"--distill_alpha must be in [0, 1], got {FLAGS.distill_alpha}")
  if FLAGS.train_mode == "distill" and FLAGS.distill_alpha == 0:
    # The old meaning (weight of the labelled loss, 0 = pure distillation) was reversed.
    raise app.UsageError("--distill_alpha=0 gives the teacher no weight: distill_alpha is the "
                         "paper's alpha, the weight of the distillation loss (pure distillation "
                         "is --distill_alpha=1, which older tf_simclr flagfiles wrote as 0)")
  if FLAGS.train_mode == "pretrain" and FLAGS.fine_tune_after_block != -1:
    raise app.UsageError("--fine_tune_after_block freezes layers, which pretraining does not "
                         "support: use it with --train_mode=finetune")
  if FLAGS.train_mode == "distill" and not FLAGS.teacher_checkpoint:
    raise app.UsageError("--train_mode=distill needs --teacher_checkpoint")
  if FLAGS.train_mode != "distill" and FLAGS.teacher_checkpoint:
    raise app.UsageError("--teacher_checkpoint is only used with --train_mode=distill")
  replicas = max(FLAGS.num_cpu_replicas, 1)
  if FLAGS.train_batch_size % replicas:
    raise app.UsageError(f"--train_batch_size={FLAGS.train_batch_size} is not divisible by "
                         f"--num_cpu_replicas={FLAGS.num_cpu_replicas}")
  try:
    model_config(num_classes=1).validate()
  except ValueError as e:
    raise app.UsageError(str(e))


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


def load_teacher(strategy, num_classes):
  """The frozen teacher of distillation, restored inside the strategy scope."""
  from tf_simclr.models.simclr import build_model
  from tf_simclr.train import checkpoints
  path = FLAGS.teacher_checkpoint
  prefix = checkpoints.resolve_weights(path)
  try:
    overrides = checkpoints.read_model_config(path)
  except FileNotFoundError:
    overrides = {}  # the student's architecture flags then describe the teacher too
  # How the teacher's BN was run in its own training does not matter for inference here.
  for name in ("global_bn", "batch_norm_decay", "num_classes"):
    overrides.pop(name, None)
  for name in TEACHER_OVERRIDES:
    if getattr(FLAGS, f"teacher_{name}") is not None:
      overrides[name] = getattr(FLAGS, f"teacher_{name}")
  teacher_classes = checkpoints.checkpoint_num_classes(prefix)
  if teacher_classes != num_classes:
    raise app.UsageError(f"the teacher {path} predicts {teacher_classes} classes but "
                         f"--dataset={FLAGS.dataset} has {num_classes}")
  cfg = model_config(num_classes, dict(overrides, fine_tune_after_block=-1))
  with strategy.scope():
    teacher = build_model(cfg)
  # A teacher with another number of classes fails here, naming the head's variable.
  checkpoints.restore_model(prefix, teacher)
  teacher.trainable = False
  print(f"Teacher: ResNet-{cfg.resnet_depth} {cfg.width_multiplier:g}x from {prefix}", flush=True)
  return teacher


def main(argv):
  from tf_simclr.train import checkpoints, loop
  try:
    run(argv)
  except (app.UsageError, checkpoints.ArchitectureMismatchError, checkpoints.StorageError,
          FileNotFoundError) as e:
    # One line, not absl's page of flag help: the flags are one --helpshort away.
    hint = " (run.py --helpshort lists the flags)" if isinstance(e, app.UsageError) else ""
    print(f"run.py: {e}{hint}", file=sys.stderr, flush=True)
    sys.exit(1)
  except (loop.NonFiniteLossError, loop.Interrupted) as e:
    print(f"run.py: {e}", file=sys.stderr, flush=True)
    sys.exit(2 if isinstance(e, loop.NonFiniteLossError) else 3)


def run(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Progress goes to stdout; TFDS's per-call INFO lines would drown it.
  logging.set_verbosity(logging.WARNING)
  validate_flags()
  # This run's own flags (not absl's): what flags.json records and distill reads back.
  flag_values = {f.name: f.value for f in FLAGS.get_key_flags_for_module(sys.argv[0])}
  check_model_dir(FLAGS.model_dir, flag_values)

  import keras
  import tensorflow as tf
  from tf_simclr import strategy as strategy_lib
  from tf_simclr.data import datasets
  from tf_simclr.train import checkpoints, loop

  try:
    strategy = strategy_lib.build_strategy(
        "tpu" if FLAGS.use_tpu and FLAGS.strategy == "auto" else FLAGS.strategy,
        FLAGS.num_cpu_replicas, FLAGS.tpu, FLAGS.tpu_zone, FLAGS.gcp_project)
  except ValueError as e:  # e.g. --num_cpu_replicas with another strategy, bad TF_CONFIG
    raise app.UsageError(str(e))
  keras.utils.set_random_seed(FLAGS.seed)
  if FLAGS.deterministic:
    tf.config.experimental.enable_op_determinism()
  if FLAGS.precision != "float32":
    keras.mixed_precision.set_global_policy(FLAGS.precision)

  data_cfg = data_config()
  try:
    # The eval split is checked before training when the run evaluates, never otherwise.
    info = datasets.dataset_info(data_cfg, with_eval=FLAGS.mode != "train")
  except ValueError as e:
    raise app.UsageError(str(e))
  is_chief = strategy_lib.is_chief(strategy)
  if is_chief:
    loop.write_json_atomic(os.path.join(FLAGS.model_dir, "flags.json"), flag_values)

  teacher = load_teacher(strategy, info.num_classes) if FLAGS.train_mode == "distill" else None
  model_cfg = model_config(info.num_classes)

  def export_fn(model, step):
    from tf_simclr import export
    path = export.export_run(model, FLAGS.model_dir, model_cfg, step, FLAGS.keep_hub_module_max)
    print(f"Exported SavedModel {path}", flush=True)

  spec = loop.RunSpec(
      strategy=strategy, model_dir=FLAGS.model_dir, model_cfg=model_cfg,
      export_fn=export_fn if FLAGS.keep_hub_module_max > 0 else None,
      data_cfg=data_cfg, train_cfg=train_config(),
      distill_cfg=DistillConfig(teacher_checkpoint=FLAGS.teacher_checkpoint or "",
                                distill_temperature=FLAGS.distill_temperature,
                                distill_alpha=FLAGS.distill_alpha),
      is_chief=is_chief)
  try:
    trainer = loop.Trainer(spec, teacher=teacher, info=info)
  except ValueError as e:  # batch sizes that do not fit the data or the replicas
    raise app.UsageError(str(e))

  if FLAGS.mode in ("train", "train_then_eval"):
    step = trainer.restore_or_initialize()
    if step == 0 and FLAGS.checkpoint:
      trainer.initialize_from(checkpoints.resolve_weights(FLAGS.checkpoint),
                              FLAGS.zero_init_logits_layer)
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
