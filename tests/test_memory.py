"""MemoryBuffer (ring-buffer arithmetic against numpy, checkpointing) and the memory network's
copy / EMA updates, on one device and on 2 logical CPUs of a MirroredStrategy (replica and
cross-replica context: every replica's copy must be the same)."""

import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.isolated import run_script
from tf_simclr import memory
from tf_simclr.config import ModelConfig
from tf_simclr.models.simclr import build_model



def normalise(rows):
  rows = np.asarray(rows, np.float64)
  return rows / np.linalg.norm(rows, axis=1, keepdims=True)


class NumpyRing:
  """The buffer's statement: row j of the stream is stored at j mod K."""

  def __init__(self, initial):
    self.rows, self.position = np.array(initial, np.float64), 0

  def enqueue(self, rows):
    for row in normalise(rows):
      self.rows[self.position % len(self.rows)] = row
      self.position += 1


def test_initial_rows_are_seeded_unit_vectors():
  a, b, c = memory.MemoryBuffer(50, 8), memory.MemoryBuffer(50, 8), memory.MemoryBuffer(50, 8, 1)
  np.testing.assert_allclose(np.linalg.norm(a.memory_buffer.numpy(), axis=1), 1, rtol=1e-6)
  np.testing.assert_array_equal(a.memory_buffer.numpy(), b.memory_buffer.numpy())
  assert not np.allclose(a.memory_buffer.numpy(), c.memory_buffer.numpy())
  assert a.memory_position.dtype == tf.int64 and int(a.memory_position) == 0
  assert not a.trainable_variables and len(a.variables) == 2
  with pytest.raises(ValueError, match="must be > 0"):
    memory.MemoryBuffer(0, 8)


@pytest.mark.parametrize("compiled", [False, True])
def test_enqueue_wraps_like_numpy(compiled):
  k, d = 10, 3
  buffer = memory.MemoryBuffer(k, d)
  ring = NumpyRing(buffer.memory_buffer.numpy())
  enqueue = tf.function(buffer.enqueue) if compiled else buffer.enqueue
  rng = np.random.default_rng(0)
  # Partial fills, an exact wrap, an empty batch, a batch larger than the buffer.
  for size in (4, 4, 4, 8, 0, 13, 3, 10, 25):
    rows = rng.normal(size=(size, d)).astype(np.float32)
    enqueue(tf.constant(rows))
    ring.enqueue(rows)
    assert int(buffer.memory_position) == ring.position
    np.testing.assert_allclose(buffer.memory_buffer.numpy(), ring.rows, rtol=1e-6, atol=1e-7)


def test_enqueue_normalises_bfloat16_rows():
  buffer = memory.MemoryBuffer(4, 2)
  buffer.enqueue(tf.constant([[3.0, 4.0], [0.0, -2.0]], tf.bfloat16))
  np.testing.assert_allclose(buffer.memory_buffer.numpy()[:2], [[0.6, 0.8], [0.0, -1.0]],
                             rtol=1e-6)
  assert buffer.memory_buffer.dtype == tf.float32


def test_buffer_checkpoint_round_trip(tmp_path):
  buffer = memory.MemoryBuffer(6, 4)
  buffer.enqueue(tf.ones([9, 4]))
  path = tf.train.Checkpoint(memory=buffer).save(str(tmp_path / "ckpt"))
  names = [name for name, _ in tf.train.list_variables(path)]
  assert "memory/memory_buffer/.ATTRIBUTES/VARIABLE_VALUE" in names
  assert "memory/memory_position/.ATTRIBUTES/VARIABLE_VALUE" in names
  restored = memory.MemoryBuffer(6, 4, seed=5)
  tf.train.Checkpoint(memory=restored).restore(path).assert_consumed()
  np.testing.assert_array_equal(restored.memory_buffer.numpy(), buffer.memory_buffer.numpy())
  assert int(restored.memory_position) == 9


def test_gather_views_on_one_replica_is_identity():
  hidden = tf.constant(np.arange(12.0).reshape(4, 3))
  assert memory.gather_views(hidden) is hidden


def _tiny_config(**overrides):
  return ModelConfig(**{**dict(resnet_depth=10, width_multiplier=0.125, image_size=16,
                               proj_out_dim=8, num_classes=3), **overrides})


def test_copy_weights_and_ema_update_on_models():
  online, memory_model = build_model(_tiny_config()), build_model(_tiny_config())
  memory.copy_weights(memory_model.weights, online.weights)
  for target, source in zip(memory_model.weights, online.weights):
    np.testing.assert_array_equal(target.numpy(), source.numpy())
  images = np.random.default_rng(0).uniform(size=(2, 16, 16, 3)).astype(np.float32)
  np.testing.assert_array_equal(memory_model(images)["proj_head_output"].numpy(),
                                online(images)["proj_head_output"].numpy())

  rng = np.random.default_rng(1)
  for v in online.trainable_variables:
    v.assign(v.numpy() + rng.normal(size=v.shape).astype(np.float32))
  before = [v.numpy() for v in memory_model.weights]
  update = tf.function(lambda: memory.ema_update(memory_model.trainable_variables,
                                                 online.trainable_variables, 0.9))
  for _ in range(2):
    update()
  trainable = {id(v) for v in memory_model.trainable_variables}
  for target, source, old in zip(memory_model.weights, online.weights, before):
    # Two steps toward a fixed source: 0.81 * old + 0.19 * source; the rest unchanged.
    expected = 0.81 * old + 0.19 * source.numpy() if id(target) in trainable else old
    np.testing.assert_allclose(target.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_ema_update_plain_variables_and_momentum_bounds():
  target, source = tf.Variable([1.0, 2.0]), tf.Variable([3.0, -2.0])
  memory.ema_update([target], [source], momentum=0.75)
  np.testing.assert_allclose(target.numpy(), [1.5, 1.0])
  memory.ema_update([target], [source], momentum=1.0)
  np.testing.assert_allclose(target.numpy(), [1.5, 1.0])
  memory.ema_update([target], [source], momentum=0.0)
  np.testing.assert_allclose(target.numpy(), [3.0, -2.0])
  with pytest.raises(ValueError, match="momentum"):
    memory.ema_update([target], [source], momentum=1.5)


def test_mismatched_variables_are_refused():
  a, b = build_model(_tiny_config()), build_model(_tiny_config(proj_out_dim=16))
  with pytest.raises(ValueError, match="does not match"):
    memory.copy_weights(b.weights, a.weights)
  with pytest.raises(ValueError, match="target variables for"):
    memory.ema_update(a.trainable_variables, a.weights)
  x = keras.layers.Dense(2, name="x")
  y = keras.layers.Dense(2, name="y")
  x.build((None, 2))
  y.build((None, 2))
  with pytest.raises(ValueError, match="does not match"):
    memory.copy_weights(x.weights, y.weights)


_MIRRORED_SCRIPT = textwrap.dedent("""
  import json
  import keras
  import numpy as np
  import tensorflow as tf
  R = 2
  cpu = tf.config.list_physical_devices("CPU")[0]
  tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * R)
  from tf_simclr import memory

  K, D, n = 7, 3, 2  # 2n rows per replica, 2nR = 8 per step: every step wraps
  strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(R)])

  def make_model():
    inp = keras.Input((D,))
    x = keras.layers.Dense(4, name="dense")(inp)
    out = keras.layers.BatchNormalization(name="bn")(x)
    return keras.Model(inp, out, name="net")

  with strategy.scope():
    buffer = memory.MemoryBuffer(K, D)
    online, memory_model = make_model(), make_model()
  initial = buffer.memory_buffer.numpy()
  rng = np.random.default_rng(0)
  online_values = [rng.normal(size=v.shape) for v in online.weights]
  for v, value in zip(online.weights, online_values):
    v.assign(value)

  def copies(variable):
    return [t.numpy().tolist() for t in strategy.experimental_local_results(variable)]

  @tf.function
  def replica_step(local):
    def fn(local):
      buffer.enqueue(memory.gather_views(local))
      memory.ema_update(memory_model.trainable_variables, online.trainable_variables, 0.5)
    strategy.run(fn, args=(local,))

  @tf.function
  def cross_replica_step(rows):
    buffer.enqueue(rows)
    memory.copy_weights(memory_model.weights, online.weights)

  out = {"initial": initial.tolist(), "steps": []}
  before_ema = [v.numpy().tolist() for v in memory_model.weights]
  for step in range(3):
    rows = rng.normal(size=(2 * n * R, D)).astype(np.float32)  # [view 1 of all; view 2 of all]
    view1, view2 = np.split(rows, 2)

    def shard(ctx):
      r = ctx.replica_id_in_sync_group
      return tf.constant(np.concatenate([view1[r * n:(r + 1) * n], view2[r * n:(r + 1) * n]]))

    replica_step(strategy.experimental_distribute_values_from_function(shard))
    out["steps"].append({"rows": rows.tolist(), "buffer": copies(buffer.memory_buffer),
                         "position": copies(buffer.memory_position)})
  out["ema"] = [copies(v) for v in memory_model.weights]
  out["trainable"] = [v.trainable for v in memory_model.weights]
  out["before_ema"] = before_ema
  out["online"] = [v.tolist() for v in online_values]

  rows = rng.normal(size=(5, D)).astype(np.float32)
  with strategy.scope():
    cross_replica_step(tf.constant(rows))
  out["cross"] = {"rows": rows.tolist(), "buffer": copies(buffer.memory_buffer),
                  "position": copies(buffer.memory_position)}
  out["copied"] = [copies(v) for v in memory_model.weights]
  print("RESULT" + json.dumps(out))
""")


def test_buffer_and_memory_network_identical_on_every_replica():
  out = run_script(_MIRRORED_SCRIPT)
  ring = NumpyRing(out["initial"])
  for step in out["steps"]:
    ring.enqueue(np.array(step["rows"]))  # the single-device order of the global batch
    for copy in step["buffer"]:
      np.testing.assert_allclose(copy, ring.rows, rtol=1e-6, atol=1e-7)
    assert step["buffer"][0] == step["buffer"][1]
    assert step["position"] == [ring.position] * 2
  # Three EMA steps at momentum 0.5 toward the online weights (trainable ones only).
  for copies, trainable, old, source in zip(out["ema"], out["trainable"], out["before_ema"],
                                            out["online"]):
    expected = 0.125 * np.array(old) + 0.875 * np.array(source) if trainable else old
    for copy in copies:
      np.testing.assert_allclose(copy, expected, rtol=1e-5, atol=1e-6)
  assert any(out["trainable"]) and not all(out["trainable"])
  # Cross-replica context: the same rows written into both copies; weights copied everywhere.
  ring.enqueue(np.array(out["cross"]["rows"]))
  assert out["cross"]["buffer"][0] == out["cross"]["buffer"][1]
  np.testing.assert_allclose(out["cross"]["buffer"][0], ring.rows, rtol=1e-6, atol=1e-7)
  assert out["cross"]["position"] == [ring.position] * 2
  for copies, source in zip(out["copied"], out["online"]):
    for copy in copies:
      np.testing.assert_allclose(copy, source, rtol=1e-6)
