"""SavedModel export: serving, hub-style fine-tuning and Keras reuse, checked in a new process
(the exporting process still has the Python gradient registry, which hides missing
gradients), plus export_run's rotation/atomicity, restore from a SavedModel and the CLI."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import tf_simclr  # noqa: F401
from tf_simclr import export, pretrained
from tf_simclr.config import ModelConfig
from tf_simclr.models.simclr import OUTPUT_NAMES, build_model
from tf_simclr.train import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Synchronized BN: the export must still reload and fine-tune without custom-gradient trouble.
CFG = ModelConfig(resnet_depth=10, width_multiplier=0.125, image_size=32, num_classes=10,
                  proj_out_dim=16, global_bn=True)


def _randomize_bn(model, seed=0):
  """BN as after training: moving statistics that restore and inference-mode checks see, and
  no zero-initialised gamma (which would zero the gradients of its residual branch)."""
  rng = np.random.default_rng(seed)
  for v in model.weights:
    name = v.path.rsplit("/", 1)[-1]
    if name in ("gamma", "moving_variance"):
      v.assign(rng.uniform(0.5, 2.0, v.shape).astype(np.float32))
    elif name == "moving_mean":
      v.assign(rng.uniform(-0.3, 0.3, v.shape).astype(np.float32))


def _run(args, timeout=300):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable] + args, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("export")
  model = build_model(CFG)
  _randomize_bn(model)
  images = np.random.default_rng(1).uniform(0, 1, (8, 32, 32, 3)).astype(np.float32)
  path = export.export_run(model, str(tmp / "run"), CFG, step=5)
  expected = {k: np.asarray(v) for k, v in model(images, training=False).items()}
  np.savez(tmp / "expected.npz", images=images, **expected)
  return model, path, tmp


# Runs in a fresh interpreter: loads the SavedModel and reports every reuse check as JSON.
RELOAD_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    import keras
    import tf_simclr
    from tf_simclr.export import TrainableTFSMLayer
    from tf_simclr.optim.lars import LARS

    path, npz, out = sys.argv[1:]
    data = np.load(npz)
    images = tf.constant(data["images"])
    labels = tf.constant(np.arange(8) % 10)
    xent = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    result = {}

    def max_diff(outputs):
      return max(float(np.abs(np.asarray(outputs[k]) - data[k]).max()) for k in data.files
                 if k != "images")

    loaded = tf.saved_model.load(path)
    result["names"] = sorted(loaded(images).keys())
    result["call_default"] = max_diff(loaded(images))
    result["call_false"] = max_diff(loaded(images, trainable=False))
    result["serving_default"] = max_diff(loaded.signatures["serving_default"](images=images))
    result["signatures"] = sorted(loaded.signatures.keys())
    result["odd_size"] = list(loaded(tf.zeros([2, 45, 37, 3]))["block_group4"].shape)

    # Hub-style: gradients of a training-mode call reach every trainable variable.
    trainable = list(loaded.trainable_variables)
    with tf.GradientTape() as tape:
      outputs = loaded(images, trainable=True)
      loss = sum(tf.reduce_mean(tf.square(v)) for v in outputs.values())
    grads = tape.gradient(loss, trainable)
    result["num_trainable"] = len(trainable)
    result["missing_grads"] = [v.name for v, g in zip(trainable, grads)
                               if g is None or not np.any(np.asarray(g))]

    # BN statistics move in training mode only.
    means = [v for v in loaded.variables if "moving_mean" in v.name]
    before = [v.numpy() for v in means]
    loaded(images, trainable=False)
    result["bn_static_in_inference"] = all(np.array_equal(b, v.numpy())
                                           for b, v in zip(before, means))
    loaded(images, trainable=True)
    result["bn_updated_in_training"] = all(not np.array_equal(b, v.numpy())
                                           for b, v in zip(before, means))

    # Full fine-tuning through __call__ with Keras optimizers on the SavedModel's variables.
    for name, opt in (("momentum", keras.optimizers.SGD(0.05, momentum=0.9)),
                      ("lars", LARS(0.5, momentum=0.9, weight_decay=1e-6))):
      losses = []
      for _ in range(4):
        with tf.GradientTape() as tape:
          loss = xent(labels, loaded(images, trainable=True)["logits_sup"])
        opt.apply_gradients(zip(tape.gradient(loss, trainable), trainable))
        losses.append(float(loss))
      result[f"call_finetune_{name}"] = losses

    # Keras 3: TFSMLayer endpoints; a new head on frozen features; full fine-tuning.
    # TFSMLayer loads its own copy: the fine-tuning above changed only `loaded`.
    layer = keras.layers.TFSMLayer(path, call_endpoint="serve",
                                   call_training_endpoint="training", trainable=False)
    result["tfsm_serve"] = max_diff(layer(images))
    result["tfsm_training_differs"] = float(np.abs(
        np.asarray(layer(images, training=True)["final_avg_pool"])
        - data["final_avg_pool"]).max())

    frozen = TrainableTFSMLayer(path, trainable=False)
    weights_before = [w.numpy() for w in frozen.weights]
    inputs = keras.Input((32, 32, 3))
    head = keras.layers.Dense(10)
    probe = keras.Model(inputs, head(frozen(inputs)["final_avg_pool"]))
    probe.compile(keras.optimizers.Adam(0.01), xent)
    result["new_head"] = probe.fit(images, labels, epochs=10, verbose=0).history["loss"]
    result["frozen_unchanged"] = all(np.array_equal(b, w.numpy())
                                     for b, w in zip(weights_before, frozen.weights))

    for name, opt in (("momentum", keras.optimizers.SGD(0.05, momentum=0.9)),
                      ("lars", LARS(0.5, momentum=0.9, weight_decay=1e-6))):
      layer = TrainableTFSMLayer(path)
      inputs = keras.Input((32, 32, 3))
      model = keras.Model(inputs, layer(inputs)["logits_sup"])
      model.compile(opt, xent)
      result[f"keras_finetune_{name}"] = model.fit(images, labels, epochs=4,
                                                   verbose=0).history["loss"]
    with open(out, "w") as f:
      json.dump(result, f)
""")


@pytest.fixture(scope="module")
def reloaded(exported):
  _, path, tmp = exported
  script = tmp / "reload.py"
  script.write_text(RELOAD_SCRIPT)
  out = tmp / "reload.json"
  proc = _run([str(script), path, str(tmp / "expected.npz"), str(out)])
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(out.read_text()), proc.stderr


def test_reload_outputs_equal_keras_model(reloaded):
  result, _ = reloaded
  assert result["names"] == sorted(OUTPUT_NAMES)
  for key in ("call_default", "call_false", "serving_default", "tfsm_serve"):
    assert result[key] < 1e-5, key
  assert {"serve", "training", "serving_default"} <= set(result["signatures"])
  assert result["odd_size"][0] == 2 and result["odd_size"][-1] == 64


def test_reload_prints_no_custom_gradient_warnings(reloaded):
  _, stderr = reloaded
  assert "custom gradient" not in stderr.lower()
  assert "no gradient defined" not in stderr.lower()


def test_gradients_reach_every_trainable_variable(exported, reloaded):
  model, _, _ = exported
  result, _ = reloaded
  assert result["num_trainable"] == len(model.trainable_variables)
  assert result["missing_grads"] == []


def test_bn_statistics_update_in_training_mode_only(reloaded):
  result, _ = reloaded
  assert result["bn_static_in_inference"]
  assert result["bn_updated_in_training"]
  assert result["tfsm_training_differs"] > 1e-4


def test_new_head_trains_on_frozen_features(reloaded):
  result, _ = reloaded
  assert result["new_head"][-1] < result["new_head"][0]
  assert result["frozen_unchanged"]


@pytest.mark.parametrize("how", ["call", "keras"])
@pytest.mark.parametrize("optimizer", ["momentum", "lars"])
def test_full_finetuning_lowers_loss(reloaded, how, optimizer):
  losses = reloaded[0][f"{how}_finetune_{optimizer}"]
  assert all(np.isfinite(losses))
  assert losses[-1] < losses[0]


def test_saved_model_restores_into_keras_model(exported):
  model, path, _ = exported
  prefix = checkpoints.resolve_weights(path)
  assert prefix == os.path.join(path, "variables", "variables")
  fresh = build_model(CFG)
  checkpoints.restore_model(prefix, fresh)
  for a, b in zip(model.weights, fresh.weights):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
  assert pretrained.read_model_config(path) == pretrained.read_model_config(prefix) == CFG
  assert checkpoints.checkpoint_num_classes(prefix) == 10
  # Another architecture is refused, naming the variable.
  with pytest.raises(checkpoints.ArchitectureMismatchError, match="stem_conv/conv/kernel"):
    checkpoints.restore_model(prefix, build_model(dataclasses.replace(CFG,
                                                                      width_multiplier=0.25)))


def test_export_run_keeps_last_n_and_is_atomic(tmp_path, monkeypatch):
  cfg = dataclasses.replace(CFG, global_bn=False)
  model = build_model(cfg)
  run = str(tmp_path / "run")
  for step in (1, 2):
    export.export_run(model, run, cfg, step, keep_hub_module_max=1)
  assert export.list_exports(run) == [2]
  assert sorted(os.listdir(os.path.join(run, "saved_model"))) == ["2"]

  def crash(model, export_dir, model_cfg, step=None):
    os.makedirs(os.path.join(export_dir, "variables"))
    with open(os.path.join(export_dir, "saved_model.pb"), "w") as f:
      f.write("half")
    raise OSError("disk full")

  monkeypatch.setattr(export, "export_saved_model", crash)
  with pytest.raises(checkpoints.StorageError, match="could not write SavedModel .*: disk full"):
    export.export_run(model, run, cfg, 3, keep_hub_module_max=1)
  assert sorted(os.listdir(os.path.join(run, "saved_model"))) == ["2"]
  assert export.list_exports(run) == [2]


def test_cli_exports_from_checkpoint(tmp_path):
  cfg = dataclasses.replace(CFG, num_classes=7)
  model = build_model(cfg)
  _randomize_bn(model, seed=3)
  run = tmp_path / "run"
  manager = tf.train.CheckpointManager(
      tf.train.Checkpoint(model=model, global_step=tf.Variable(12, dtype=tf.int64)), str(run),
      max_to_keep=1, checkpoint_name=checkpoints.CHECKPOINT_PREFIX)
  manager.save(checkpoint_number=12)
  pretrained.write_model_config(str(run), cfg)
  proc = _run(["-m", "tf_simclr.export", f"--model_dir={run}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  path = run / "saved_model" / "12"
  assert pretrained.read_model_config(str(path)) == cfg
  fresh = build_model(cfg)
  checkpoints.restore_model(checkpoints.resolve_weights(str(path)), fresh)
  for a, b in zip(model.weights, fresh.weights):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
