"""Self-describing models: ModelConfig and SimCLRModel configs, the model config file read from
every kind of path, load_pretrained / load_teacher on real checkpoints and SavedModels, runs
from before config files, and the atomic writer."""

import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_simclr  # noqa: F401
from tf_simclr import export, files, pretrained
from tf_simclr.config import ModelConfig
from tf_simclr.models.simclr import SimCLRModel, build_model
from tf_simclr.train import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the teacher's run trained with: synchronized BN, its own decay, recomputation.
TEACHER = ModelConfig(resnet_depth=10, width_multiplier=0.125, image_size=16, num_classes=10,
                      proj_out_dim=16, ft_proj_selector=1, global_bn=True,
                      batch_norm_decay=0.99, recompute_block_groups=1)
STUDENT = ModelConfig(resnet_depth=10, width_multiplier=0.0625, image_size=16, num_classes=10,
                      proj_out_dim=8, global_bn=False, update_frozen_bn=False)
IMAGES = np.random.default_rng(0).uniform(0, 1, (4, 16, 16, 3)).astype(np.float32)


def _python(*args):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)


def _save_run(model, model_dir, step):
  """A model_dir as the trainer leaves it, without its config file: one checkpoint."""
  manager = tf.train.CheckpointManager(
      tf.train.Checkpoint(model=model, global_step=tf.Variable(step, dtype=tf.int64)),
      model_dir, max_to_keep=1, checkpoint_name=checkpoints.CHECKPOINT_PREFIX)
  return manager.save(checkpoint_number=step)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
  """A teacher's model_dir (checkpoint, config file, export) and its outputs on IMAGES."""
  model_dir = str(tmp_path_factory.mktemp("teacher"))
  model = build_model(TEACHER)
  for v in model.weights:  # BN statistics as after training, so that restores show
    if v.path.endswith("moving_mean"):
      v.assign(np.random.default_rng(1).uniform(-0.3, 0.3, v.shape).astype(np.float32))
  prefix = _save_run(model, model_dir, 7)
  pretrained.write_model_config(model_dir, TEACHER)
  saved_model = export.export_run(model, model_dir, TEACHER, step=7)
  logits = np.asarray(model(IMAGES, training=False)["logits_sup"])
  return model_dir, prefix, saved_model, logits


# --------------------------------------------------------------------------- configs

def test_model_config_round_trip_defaults_and_unknown_fields():
  assert ModelConfig.from_dict(TEACHER.to_dict()) == TEACHER
  assert json.loads(json.dumps(TEACHER.to_dict())) == TEACHER.to_dict()
  # A config written before a field existed: the field takes its default.
  assert ModelConfig.from_dict({"resnet_depth": 18}) == ModelConfig(resnet_depth=18)
  with pytest.raises(ValueError, match="unknown ModelConfig fields colour, depth"):
    ModelConfig.from_dict({"depth": 18, "colour": "red", "resnet_depth": 18})
  # Every field is either architecture or training-time.
  names = [f.name for f in dataclasses.fields(ModelConfig)]
  assert sorted(ModelConfig.architecture_fields() + ModelConfig.training_fields()) == sorted(names)
  assert set(ModelConfig.training_fields()) == {
      "batch_norm_decay", "global_bn", "fine_tune_after_block", "update_frozen_bn",
      "recompute_block_groups"}


def test_simclr_model_config_round_trip():
  model = build_model(STUDENT, linear_eval_head=True)
  config = model.get_config()
  assert config["model_config"] == STUDENT.to_dict() and config["linear_eval_head"]
  again = SimCLRModel.from_config(json.loads(json.dumps(config)))
  assert (again.cfg, again.linear_eval_head, again.name) == (STUDENT, True, model.name)
  # Keras' own serialization builds it: the same variables.
  revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
  assert isinstance(revived, SimCLRModel) and revived.cfg == STUDENT
  assert [v.shape for v in revived.weights] == [v.shape for v in model.weights]


def test_read_model_config_from_every_kind_of_path(teacher_run):
  model_dir, prefix, saved_model, _ = teacher_run
  # The export resets what only concerns its run's training.
  exported = dataclasses.replace(TEACHER, recompute_block_groups=0)
  paths = {model_dir: TEACHER, model_dir + "/": TEACHER, prefix: TEACHER,
           saved_model: exported, checkpoints.resolve_weights(saved_model): exported}
  for path, expected in paths.items():
    assert pretrained.read_model_config(path) == expected, path
  with open(os.path.join(saved_model, pretrained.MODEL_CONFIG_FILE)) as f:
    assert json.load(f)["global_step"] == 7


def test_config_file_errors_name_the_file(tmp_path):
  with pytest.raises(pretrained.NoModelConfigError,
                     match=f"no tf_simclr_config.json in {tmp_path}"):
    pretrained.read_model_config(str(tmp_path))
  file = tmp_path / pretrained.MODEL_CONFIG_FILE
  file.write_text(json.dumps({"resnet_depth": 18, "colour": "red"}))
  with pytest.raises(pretrained.ModelConfigError,
                     match=f"{file}: unknown ModelConfig fields colour"):
    pretrained.read_model_config(str(tmp_path))
  file.write_text('{"resnet_depth": 1')
  with pytest.raises(pretrained.ModelConfigError, match=str(file)):
    pretrained.read_model_config(str(tmp_path))


# --------------------------------------------------------------------------- loading

def test_load_pretrained_from_model_dir_checkpoint_and_saved_model(teacher_run):
  model_dir, prefix, saved_model, logits = teacher_run
  for path in (model_dir, prefix, saved_model):
    model, cfg, weights = pretrained.load_pretrained(path, {"recompute_block_groups": 0})
    assert cfg == dataclasses.replace(TEACHER, recompute_block_groups=0)
    assert weights == checkpoints.resolve_weights(path)
    np.testing.assert_allclose(model(IMAGES, training=False)["logits_sup"], logits, atol=1e-5)
  with pytest.raises(pretrained.ModelConfigError, match="ft_proj_selector=7 must be in -1..3"):
    pretrained.load_pretrained(model_dir, {"ft_proj_selector": 7})


def test_teacher_takes_its_architecture_the_overrides_and_the_students_training_fields(
    teacher_run):
  model_dir, _, _, logits = teacher_run
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  teacher = pretrained.load_teacher(model_dir, STUDENT, {"ft_proj_selector": 0}, strategy)
  student_training = {name: getattr(STUDENT, name) for name in ModelConfig.training_fields()}
  assert teacher.cfg == dataclasses.replace(TEACHER, ft_proj_selector=0, **student_training)
  assert not teacher.model.trainable_weights
  assert all(strategy.extended.variable_created_in_scope(v.value) for v in teacher.model.weights)
  # Without the override: the teacher's own selector, its own outputs.
  teacher = pretrained.load_teacher(model_dir, STUDENT)
  np.testing.assert_allclose(teacher.model(IMAGES, training=False)["logits_sup"], logits,
                             atol=1e-5)
  with pytest.raises(pretrained.ModelConfigError,
                     match=f"the teacher {model_dir} predicts 10 classes but the dataset has 3"):
    pretrained.load_teacher(model_dir, dataclasses.replace(STUDENT, num_classes=3))


def test_teacher_from_a_bare_checkpoint_is_described_by_the_student(teacher_run, tmp_path):
  _, prefix, _, logits = teacher_run
  for f in tf.io.gfile.glob(prefix + ".*"):
    tf.io.gfile.copy(f, str(tmp_path / os.path.basename(f)))
  bare = str(tmp_path / os.path.basename(prefix))
  with pytest.raises(pretrained.NoModelConfigError):
    pretrained.load_pretrained(bare)
  with pytest.raises(checkpoints.ArchitectureMismatchError,
                     match="does not fit the model: variable stem_conv/conv/kernel"):
    pretrained.load_teacher(bare, STUDENT)
  teacher = pretrained.load_teacher(
      bare, STUDENT, {"width_multiplier": 0.125, "proj_out_dim": 16, "ft_proj_selector": 1})
  assert teacher.cfg.num_classes == 10  # the checkpoint's head
  np.testing.assert_allclose(teacher.model(IMAGES, training=False)["logits_sup"], logits,
                             atol=1e-5)


# --------------------------------------------------------------------------- old runs

def test_run_with_only_flags_json_fails_in_one_line_until_upgraded(tmp_path):
  model_dir = str(tmp_path / "old")
  cfg = dataclasses.replace(TEACHER, global_bn=False, recompute_block_groups=0)
  model = build_model(cfg)
  _save_run(model, model_dir, 3)
  # run.py's flags.json of a finetune run: no num_classes, flag-only values such as -1.
  flag_values = {k: v for k, v in cfg.to_dict().items() if k != "num_classes"}
  flag_values.update(train_mode="finetune", dataset="fashion_mnist", recompute_block_groups=-1,
                     fine_tune_after_block=2, learning_rate=0.1)
  with open(os.path.join(model_dir, "flags.json"), "w") as f:
    json.dump(flag_values, f)
  upgrade = f"python -m tf_simclr.pretrained --upgrade={model_dir}"
  for path in (model_dir, tf.train.latest_checkpoint(model_dir)):
    with pytest.raises(FileNotFoundError, match=f"only the flags.json .*`{upgrade}`"):
      pretrained.read_model_config(path)
  # A student's architecture never stands in for an old run's own.
  with pytest.raises(FileNotFoundError, match="--upgrade"):
    pretrained.load_teacher(model_dir, STUDENT)
  out = _python("-m", "tf_simclr.export", f"--model_dir={model_dir}")
  lines = [line for line in out.stderr.splitlines() if upgrade in line]
  assert out.returncode != 0 and "Traceback" not in out.stderr and len(lines) == 1, out.stderr

  out = _python("-m", "tf_simclr.pretrained", f"--upgrade={model_dir}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "ResNet-10 0.125x, 10 classes" in out.stdout
  # The architecture from flags.json, the classes from the head, training fields at defaults.
  upgraded = pretrained.read_model_config(model_dir)
  assert upgraded == ModelConfig(**{k: getattr(cfg, k) for k in ModelConfig.architecture_fields()})
  out = _python("-m", "tf_simclr.export", f"--model_dir={model_dir}")
  assert out.returncode == 0, out.stderr[-3000:]
  loaded = pretrained.load_pretrained(os.path.join(model_dir, "saved_model", "3"))
  np.testing.assert_allclose(loaded.model(IMAGES)["logits_sup"], model(IMAGES)["logits_sup"],
                             atol=1e-5)
  out = _python("-m", "tf_simclr.pretrained", f"--upgrade={model_dir}")
  assert out.returncode != 0 and "exists: nothing to upgrade" in out.stderr


# --------------------------------------------------------------------------- atomic writes

def test_write_json_atomic_leaves_the_old_file_when_a_write_fails(tmp_path):
  path = str(tmp_path / "result.json")
  files.write_json_atomic(path, {"global_step": 1})
  with pytest.raises(TypeError):  # fails while the new version is being written
    files.write_json_atomic(path, {"global_step": 2, "bad": object()})
  assert os.listdir(tmp_path) == ["result.json"]
  with open(path) as f:
    assert json.load(f) == {"global_step": 1}
  files.write_json_atomic(path, {"global_step": 3})
  with open(path) as f:
    assert json.load(f) == {"global_step": 3}


def test_replacing_a_directory_is_all_or_nothing(tmp_path):
  path = str(tmp_path / "export")
  for version in ("old", "new"):
    with files.replacing(path) as tmp:
      os.makedirs(tmp)
      (tmp_path / os.path.basename(tmp) / "version").write_text(version)
  assert os.listdir(tmp_path) == ["export"]
  with pytest.raises(RuntimeError, match="crash"):
    with files.replacing(path) as tmp:
      os.makedirs(tmp)
      (tmp_path / os.path.basename(tmp) / "version").write_text("partial")
      raise RuntimeError("crash")
  assert os.listdir(tmp_path) == ["export"]
  assert (tmp_path / "export" / "version").read_text() == "new"
