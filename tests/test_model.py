"""The SimCLRv2 model: outputs, parameter parity with the reference, freezing, checkpoints."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tf_simclr.config import ModelConfig
from tf_simclr.models.simclr import OUTPUT_NAMES, build_model
from tf_simclr.summary import parameter_counts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**kwargs):
  base = dict(resnet_depth=10, width_multiplier=0.25, image_size=32, num_classes=10,
              proj_out_dim=16, global_bn=False)
  base.update(kwargs)
  return ModelConfig(**base)


@pytest.mark.parametrize("kwargs, widths", [
    (dict(), (16, 32, 64, 128)),
    (dict(resnet_depth=18, width_multiplier=0.125), (8, 16, 32, 64)),
    (dict(resnet_depth=50, width_multiplier=0.125), (32, 64, 128, 256)),
    (dict(resnet_depth=50, width_multiplier=0.125, sk_ratio=0.0625), (32, 64, 128, 256)),
    (dict(resnet_depth=18, width_multiplier=0.125, se_ratio=0.25), (8, 16, 32, 64)),
])
def test_output_names_and_shapes(kwargs, widths):
  cfg = tiny(**kwargs)
  out = build_model(cfg)(np.random.rand(2, 32, 32, 3).astype("float32"), training=False)
  assert set(out) == set(OUTPUT_NAMES)
  # CIFAR stem: stride-1 3x3 conv, no max-pool, so group 1 keeps 32x32.
  stem_width = max(1, int(64 * cfg.width_multiplier))
  assert out["initial_conv"].shape == (2, 32, 32, stem_width)
  assert out["initial_max_pool"].shape == (2, 32, 32, stem_width)
  for g, (w, size) in enumerate(zip(widths, (32, 16, 8, 4))):
    assert out[f"block_group{g + 1}"].shape == (2, size, size, w)
  assert out["final_avg_pool"].shape == (2, widths[-1])
  assert out["proj_head_input"].shape == (2, widths[-1])
  assert out["proj_head_output"].shape == (2, 16)
  assert out["logits_sup"].shape == (2, 10)
  np.testing.assert_allclose(out["final_avg_pool"],
                             np.mean(out["block_group4"], axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_imagenet_stem_and_any_input_size():
  for sk in (0.0, 0.0625):
    model = build_model(tiny(image_size=64, sk_ratio=sk, resnet_depth=50,
                             width_multiplier=0.125))
    out = model(np.random.rand(1, 72, 72, 3).astype("float32"))
    assert out["initial_conv"].shape[1:3] == (36, 36)      # stride-2 stem conv
    assert out["initial_max_pool"].shape[1:3] == (18, 18)  # stride-2 max-pool
    assert out["block_group4"].shape[1:3] == (3, 3)


@pytest.mark.parametrize("mode, layers, selector, head_in", [
    ("nonlinear", 3, 0, 128), ("nonlinear", 3, 1, 128), ("nonlinear", 3, 3, 16),
    ("nonlinear", 2, 2, 16), ("linear", 1, 1, 16), ("none", 3, 0, 128), ("nonlinear", 3, -1, 16)])
def test_projection_head_and_selector(mode, layers, selector, head_in):
  cfg = tiny(proj_head_mode=mode, num_proj_layers=layers, ft_proj_selector=selector)
  model = build_model(cfg)
  out = model(np.random.rand(3, 32, 32, 3).astype("float32"))
  assert model.supervised_head.trainable_weights[0].shape == (head_in, 10)
  expected_out = 128 if mode == "none" else 16
  assert out["proj_head_output"].shape == (3, expected_out)
  if mode == "none":
    np.testing.assert_array_equal(out["proj_head_output"], out["final_avg_pool"])
  if selector == -1:  # the reference's -1: the head's output feeds the supervised head
    np.testing.assert_allclose(out["logits_sup"], model.supervised_head(out["proj_head_output"]),
                               rtol=1e-5, atol=1e-6)


def test_bad_selector_and_block_are_clear_errors():
  with pytest.raises(ValueError, match="ft_proj_selector=4 must be in -1..3"):
    tiny(ft_proj_selector=4).validate()
  with pytest.raises(ValueError, match="fine_tune_after_block=5 must be in -1..4"):
    tiny(fine_tune_after_block=5).validate()
  with pytest.raises(ValueError, match="recompute_block_groups=-2 must be in 0..4"):
    tiny(recompute_block_groups=-2).validate()
  with pytest.raises(ValueError, match="resnet_depth=20"):
    tiny(resnet_depth=20).validate()


# The reference's trunk counts (224x224), printed by benchmarks/reference_params.py (docs/MODEL.md).
REFERENCE_TRUNK_PARAMS = [
    (50, 1, 0.0, 23_508_032),
    (50, 1, 0.0625, 35_215_584),
    (101, 1, 0.0, 42_500_160),
]


@pytest.mark.parametrize("depth, width, sk, params", REFERENCE_TRUNK_PARAMS)
def test_parameter_counts_equal_reference(depth, width, sk, params):
  counts = parameter_counts(ModelConfig(resnet_depth=depth, width_multiplier=width,
                                        sk_ratio=sk, global_bn=False))
  assert counts["trunk_params"] == params
  assert counts["projection_head_params"] == 8_659_072
  assert counts["supervised_head_params"] == 2_049_000


def test_summary_cli_json_last_line():
  out = subprocess.run(
      [sys.executable, "-m", "tf_simclr.summary", "--resnet_depth=50", "--width_multiplier=2",
       "--sk_ratio=0.0625", "--json"], cwd=ROOT, capture_output=True, text=True, check=True)
  counts = json.loads(out.stdout.strip().splitlines()[-1])
  assert counts["trunk_params"] == 140_306_048
  assert counts["total_params"] == (counts["trunk_params"] + counts["projection_head_params"]
                                    + counts["supervised_head_params"])


@pytest.mark.parametrize("block", [0, 2, 4])
def test_fine_tune_after_block_freezes_below(block):
  model = build_model(tiny(fine_tune_after_block=block, update_frozen_bn=False))
  frozen_prefixes = ["stem"] + [f"block_group{g}/" for g in range(1, block + 1)]

  def frozen(v):
    return any(v.path.startswith(p) for p in frozen_prefixes)

  trainable = model.trainable_variables
  assert trainable and not any(frozen(v) for v in trainable)
  before = {v.path: v.numpy() for v in model.variables}
  images = np.random.rand(4, 32, 32, 3).astype("float32")
  # Watch every variable, frozen ones included, to see that no gradient reaches them.
  tf_vars = [v.value for v in model.variables]
  with tf.GradientTape() as tape:
    tape.watch(tf_vars)
    out = model(images, training=True)
    loss = tf.reduce_sum(out["logits_sup"]) + tf.reduce_sum(out["proj_head_output"])
  grads = tape.gradient(loss, tf_vars)
  for v, g in zip(model.variables, grads):
    if frozen(v) and "moving" not in v.path:
      assert g is None or not np.any(g), v.path
  for v in model.variables:
    if "moving" in v.path:
      changed = not np.array_equal(before[v.path], v.numpy())
      assert changed != frozen(v), v.path
  # Frozen BN on batch statistics: on request (the reference's tf2 code), and by default
  # unless the whole trunk is frozen (its TF1 code).
  for update in (True, None):
    updating = build_model(tiny(fine_tune_after_block=block, update_frozen_bn=update))
    updating.set_weights([before[v.path] for v in updating.variables])
    updating(images, training=True)
    expect_update = update or block < 4
    for v in updating.variables:
      if "moving" in v.path and frozen(v):
        assert (not np.array_equal(before[v.path], v.numpy())) == expect_update, v.path
  # Unfrozen trunk layers still learn (blocks above the boundary have gradients).
  if block < 4:
    above = [g for v, g in zip(model.variables, grads)
             if v.path.startswith(f"block_group{block + 1}/") and v.trainable]
    assert above and all(g is not None for g in above)


def test_checkpoint_round_trip_in_new_process(tmp_path):
  cfg = tiny(resnet_depth=18, width_multiplier=0.125, sk_ratio=0.0625, se_ratio=0.25)
  model = build_model(cfg)
  # Training-mode calls move BN statistics away from their initial values.
  for _ in range(2):
    model(np.random.rand(4, 32, 32, 3).astype("float32"), training=True)
  tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
  np.savez(tmp_path / "expected.npz", **{v.path: v.numpy() for v in model.variables})
  assert any("moving_mean" in v.path for v in model.variables)
  script = textwrap.dedent(f"""
      import numpy as np, tensorflow as tf
      from tf_simclr.config import ModelConfig
      from tf_simclr.models.simclr import build_model
      model = build_model(ModelConfig(**{cfg.__dict__!r}))
      tf.train.Checkpoint(model=model).read({str(tmp_path / 'ckpt')!r}).assert_consumed()
      expected = np.load({str(tmp_path / 'expected.npz')!r})
      assert len(expected.files) == len(model.variables)
      for v in model.variables:
        np.testing.assert_array_equal(v.numpy(), expected[v.path], err_msg=v.path)
      print("restored", len(model.variables))
  """)
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=ROOT))
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"restored {len(model.variables)}" in out.stdout


@pytest.mark.parametrize("shape", [(8, 5, 5, 6), (8, 6)])
def test_fused_batch_norm_equals_keras_batch_norm(shape):
  from keras import layers
  from tf_simclr.models.resnet import BatchNorm
  ours = BatchNorm(momentum=0.9, epsilon=1e-5)
  keras_bn = layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
  ours.build(shape)
  keras_bn.build(shape)
  for a, b in zip(ours.weights, keras_bn.weights):
    a.assign(np.random.rand(*a.shape) + 0.5)
    b.assign(a.numpy())
  x = tf.constant(np.random.randn(*shape) * 3 + 1, tf.float32)
  grads = []
  for layer in (ours, keras_bn):
    with tf.GradientTape() as tape:
      tape.watch(x)
      loss = tf.reduce_sum(layer(x, training=True) ** 2)
    grads.append(tape.gradient(loss, [x] + layer.trainable_weights))
  for g_ours, g_keras in zip(*grads):
    np.testing.assert_allclose(g_ours, g_keras, rtol=1e-4, atol=1e-4)
  for a, b in zip(ours.weights, keras_bn.weights):  # moving statistics after one update
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ours(x, training=False), keras_bn(x, training=False),
                             rtol=1e-5, atol=1e-5)


_BN_ACCURACY_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    import tensorflow as tf
    R = 4
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * R)
    from tf_simclr.models.resnet import BatchNorm

    rng = np.random.default_rng(3)
    # |mean| / std = 1000: E[x^2] - E[x]^2 in float32 would lose all but ~2 digits.
    x = (1000.0 + rng.normal(size=(128, 28, 28, 4))).astype(np.float32)
    w = rng.normal(size=x.shape).astype(np.float32)  # d loss / d y

    def run(strategy):
      with strategy.scope():
        bn = BatchNorm(momentum=0.5, epsilon=1e-5, synchronized=True)
        bn.build((None,) + x.shape[1:])
      def step(xs, ws):
        with tf.GradientTape() as tape:
          tape.watch(xs)
          loss = tf.reduce_sum(bn(xs, training=True) * ws)
        return [bn(xs, training=True)] + tape.gradient(loss, [xs, bn.gamma, bn.beta])
      n = R if isinstance(strategy, tf.distribute.MirroredStrategy) else 1
      data = tf.data.Dataset.from_tensors((x, w)).batch(1).map(lambda a, b: (a[0], b[0]))
      xs, ws = next(iter(strategy.experimental_distribute_dataset(data)))
      y, dx, dg, db = strategy.run(step, (xs, ws))
      cat = lambda t: np.concatenate([np.asarray(v) for v in strategy.experimental_local_results(t)])
      red = lambda t: np.asarray(strategy.reduce("SUM", t, axis=None))
      return {"y": cat(y).tolist(), "dx": cat(dx).tolist(), "dgamma": red(dg).tolist(),
              "dbeta": red(db).tolist(), "moving_mean": bn.moving_mean.numpy().tolist(),
              "moving_variance": bn.moving_variance.numpy().tolist(), "replicas": n}

    out = {"one": run(tf.distribute.get_strategy()),
           "mirrored": run(tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(R)]))}
    print(json.dumps(out))
""")


def test_batch_norm_statistics_are_accurate_when_the_mean_dominates():
  """Training BN synchronized over 4 replicas (two-pass moments) and on one device (fused
  kernel) against float64 math, on activations whose mean is 1000x their spread."""
  out = subprocess.run([sys.executable, "-c", _BN_ACCURACY_SCRIPT], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=ROOT))
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  rng = np.random.default_rng(3)
  x = (1000.0 + rng.normal(size=(128, 28, 28, 4))).astype(np.float32).astype(np.float64)
  w = rng.normal(size=x.shape).astype(np.float32).astype(np.float64)
  axes = (0, 1, 2)
  mean, var = x.mean(axes), x.var(axes)
  xhat = (x - mean) / np.sqrt(var + 1e-5)
  # gamma = 1, beta = 0; loss = sum(y * w).
  expected = {
      "y": xhat,
      "dx": (w - w.mean(axes) - xhat * (w * xhat).mean(axes)) / np.sqrt(var + 1e-5),
      "dgamma": (w * xhat).sum(axes), "dbeta": w.sum(axes),
      # The step calls BN twice: two updates from (0, 1) with momentum 0.5.
      "moving_mean": 0.75 * mean, "moving_variance": 0.25 + 0.75 * var}
  # Keras' one-pass synchronized moments are 23% off here. The fused kernel accumulates the
  # mean naively: ~1e-3 of the output over these 100k values per channel.
  tolerance = {"mirrored": 1e-3, "one": 1e-2}
  for name, got in results.items():
    assert got["replicas"] == (4 if name == "mirrored" else 1)
    for key, want in expected.items():
      err = np.abs(np.asarray(got[key]) - want).max() / np.abs(want).max()
      assert err < tolerance[name], (name, key, err)


@pytest.mark.parametrize("kwargs, groups", [
    (dict(resnet_depth=18), 2),
    (dict(resnet_depth=50, width_multiplier=0.125, sk_ratio=0.0625), 1),
])
def test_recomputed_blocks_give_the_same_step(kwargs, groups):
  """Recomputing block groups 1..k in the backward pass gives the same loss, gradients and
  BN moving statistics (updated once, not again by the recomputation), and really runs
  those groups' convolutions twice."""
  import keras
  x = tf.constant(np.random.default_rng(0).random((8, 32, 32, 3)), tf.float32)
  results = []
  for k in (0, groups):
    model = build_model(tiny(recompute_block_groups=k, **kwargs))
    model(x[:1])
    if results:  # the same initial weights
      for target, source in zip(model.weights, results[0]["init"]):
        target.assign(source)
    init = [w.numpy() for w in model.weights]
    stats_before = [w.numpy() for w in model.non_trainable_weights]

    @tf.function
    def step(images, model=model):
      with tf.GradientTape() as tape:
        out = model(images, training=True)
        loss = sum(tf.reduce_sum(tf.square(out[name])) for name in OUTPUT_NAMES)
      return loss, tape.gradient(loss, model.trainable_weights)

    loss, grads = step(x)
    ops = step.get_concrete_function(x).graph.get_operations()
    group_convs = sum(isinstance(layer, keras.layers.Conv2D)
                      for g in range(1, k + 1)
                      for layer in model.resnet.get_layer(f"block_group{g}")._flatten_layers())
    results.append({"init": init, "loss": loss.numpy(), "grads": [g.numpy() for g in grads],
                    "stats_before": stats_before,
                    "stats": [w.numpy() for w in model.non_trainable_weights],
                    "convs": sum(op.type == "Conv2D" for op in ops), "group_convs": group_convs})
  plain, recomputed = results
  assert recomputed["group_convs"] > 0
  assert recomputed["convs"] == plain["convs"] + recomputed["group_convs"]
  assert recomputed["loss"] == pytest.approx(plain["loss"], rel=1e-6)
  for a, b in zip(plain["grads"], recomputed["grads"]):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max())
  for a, b, before in zip(plain["stats"], recomputed["stats"], recomputed["stats_before"]):
    assert not np.array_equal(b, before)
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
