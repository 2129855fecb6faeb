"""Self-describing models: the config file beside a model's weights, and loading a model from
any path that holds one.

A model_dir (the trainer's, convert's output) and a SavedModel (tf_simclr.export) hold
`tf_simclr_config.json`: the ModelConfig of the weights beside it (an export adds the step it
holds). Its training-time fields are those of the run that wrote it; whoever loads the model
for another use sets them for that use (ModelConfig.training_fields()).

Runs from before config files hold only flags.json, the record of run.py's command line,
which the library reads only here, to write their config file:

  python -m tf_simclr.pretrained --upgrade=<model_dir>
"""

import collections
import contextlib
import dataclasses
import json
import os

import tensorflow as tf

from tf_simclr import files
from tf_simclr.config import ModelConfig
from tf_simclr.models.simclr import build_model
from tf_simclr.train import checkpoints

MODEL_CONFIG_FILE = "tf_simclr_config.json"
# The step an export holds: written beside the ModelConfig fields, not one of them.
_EXPORT_STEP = "global_step"
LEGACY_FLAGS_FILE = "flags.json"

Pretrained = collections.namedtuple("Pretrained", "model cfg prefix")


class NoModelConfigError(FileNotFoundError):
  """A path with no config file and no flags.json: a bare checkpoint."""


class ModelConfigError(ValueError):
  """A config file or overrides that describe no valid model, or a model unfit for its use."""


def write_model_config(directory, cfg: ModelConfig, global_step=None):
  """Writes `<directory>/tf_simclr_config.json` atomically (files.write_json_atomic)."""
  values = cfg.to_dict()
  if global_step is not None:
    values[_EXPORT_STEP] = int(global_step)
  files.write_json_atomic(os.path.join(directory, MODEL_CONFIG_FILE), values)


def _config_directory(path):
  """The directory whose config file describes `path`: a model_dir or SavedModel itself, the
  SavedModel of its variables prefix, or the directory of a checkpoint prefix."""
  path = path.rstrip("/")
  if tf.io.gfile.isdir(path):
    return path
  saved_model = os.path.dirname(os.path.dirname(path))
  if checkpoints.saved_model_variables(saved_model) == path:
    return saved_model
  return os.path.dirname(path)


def read_model_config(path: str) -> ModelConfig:
  """The ModelConfig of a model_dir, a checkpoint prefix in one, a SavedModel or its
  variables prefix. Raises NoModelConfigError for a path without a config file,
  FileNotFoundError saying how to upgrade a run that has only flags.json, and
  ModelConfigError for a config file that does not parse or has unknown fields."""
  directory = _config_directory(path)
  file = os.path.join(directory, MODEL_CONFIG_FILE)
  if not tf.io.gfile.exists(file):
    if tf.io.gfile.exists(os.path.join(directory, LEGACY_FLAGS_FILE)):
      raise FileNotFoundError(
          f"{directory} has no {MODEL_CONFIG_FILE}, only the {LEGACY_FLAGS_FILE} of a run from "
          f"before it: write it with `python -m tf_simclr.pretrained --upgrade={directory}`")
    raise NoModelConfigError(f"no {MODEL_CONFIG_FILE} in {directory} (is {path} a tf_simclr "
                             "model_dir or SavedModel?)")
  try:
    with tf.io.gfile.GFile(file) as f:
      values = json.load(f)
    values.pop(_EXPORT_STEP, None)
    return ModelConfig.from_dict(values)
  except ValueError as e:  # JSONDecodeError too
    raise ModelConfigError(f"{file}: {e}") from e


def load_pretrained(path, overrides=None, strategy=None, default=None) -> Pretrained:
  """The model at `path` (a model_dir, a checkpoint prefix, a SavedModel), built and restored:
  Pretrained(model, cfg, prefix) with the weights' checkpoint prefix.

  cfg is the path's config file with `overrides` (a dict of ModelConfig fields) applied: pass
  the training-time fields of the new use. A path without a config file (NoModelConfigError)
  is described by `default` with the classes of its checkpoint's supervised head; without a
  default that is an error. The model is built inside strategy.scope() when given. Raises
  ModelConfigError for overrides that make the config invalid and
  checkpoints.ArchitectureMismatchError naming the first variable that does not fit.
  """
  prefix = checkpoints.resolve_weights(path)
  try:
    cfg = read_model_config(path)
  except NoModelConfigError:
    if default is None:
      raise
    cfg = dataclasses.replace(default, num_classes=checkpoints.checkpoint_num_classes(prefix))
  cfg = dataclasses.replace(cfg, **(overrides or {}))
  try:
    cfg.validate()
  except ValueError as e:
    raise ModelConfigError(f"the model of {path}: {e}") from e
  with strategy.scope() if strategy else contextlib.nullcontext():
    model = build_model(cfg)
  checkpoints.restore_model(prefix, model)
  return Pretrained(model, cfg, prefix)


def load_teacher(path, student: ModelConfig, overrides=None, strategy=None) -> Pretrained:
  """The frozen distillation teacher at `path` for a student built from `student`.

  Its architecture is its own (its config file; for a bare checkpoint, the student's) with
  `overrides` (ModelConfig fields, e.g. from --teacher_<field> flags). It only runs inference,
  so how its own run trained does not matter: its training-time fields are the student's and
  it freezes no block. Raises ModelConfigError if it predicts another number of classes than
  the student.
  """
  fields = {name: getattr(student, name) for name in ModelConfig.training_fields()}
  fields.update(overrides or {}, fine_tune_after_block=-1)
  teacher = load_pretrained(path, fields, strategy, default=student)
  if teacher.cfg.num_classes != student.num_classes:
    raise ModelConfigError(f"the teacher {path} predicts {teacher.cfg.num_classes} classes but "
                           f"the dataset has {student.num_classes}")
  teacher.model.trainable = False
  return teacher


def upgrade(model_dir) -> ModelConfig:
  """Writes the config file of a run from before config files: the architecture fields of its
  flags.json (the only reader of that file), the classes of its latest checkpoint's head, and
  training-time fields at their defaults. Checks that the latest checkpoint fits first."""
  file = os.path.join(model_dir, MODEL_CONFIG_FILE)
  if tf.io.gfile.exists(file):
    raise FileExistsError(f"{file} exists: nothing to upgrade")
  legacy = os.path.join(model_dir, LEGACY_FLAGS_FILE)
  if not tf.io.gfile.exists(legacy):
    raise FileNotFoundError(f"{legacy} does not exist: is {model_dir} a tf_simclr run?")
  with tf.io.gfile.GFile(legacy) as f:
    flag_values = json.load(f)
  prefix = checkpoints.resolve_checkpoint(model_dir)
  fields = {name: flag_values[name] for name in ModelConfig.architecture_fields()
            if name in flag_values}
  cfg = ModelConfig(**dict(fields, num_classes=checkpoints.checkpoint_num_classes(prefix)))
  checkpoints.check_compatible(prefix, build_model(cfg))
  write_model_config(model_dir, cfg)
  return cfg


def main():
  from absl import app, flags

  flags.DEFINE_multi_string("upgrade", None, "A run directory from before "
                            f"{MODEL_CONFIG_FILE} (it has only {LEGACY_FLAGS_FILE}): write it.")
  flags.mark_flag_as_required("upgrade")

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    for model_dir in flags.FLAGS.upgrade:
      try:
        cfg = upgrade(model_dir)
      except (OSError, ValueError) as e:  # FileNotFoundError, ArchitectureMismatchError, ...
        raise app.UsageError(str(e))
      print(f"Wrote {os.path.join(model_dir, MODEL_CONFIG_FILE)} (ResNet-{cfg.resnet_depth} "
            f"{cfg.width_multiplier:g}x, {cfg.num_classes} classes)", flush=True)

  app.run(checkpoints.exit_on_storage_error(run))


if __name__ == "__main__":
  main()
