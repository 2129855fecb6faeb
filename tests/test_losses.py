import math
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.isolated import run_script
from tf_simclr.losses import (contrastive_loss, contrastive_metrics, distillation_loss,
                              supervised_loss, weight_decay_loss)



def numpy_nt_xent(hidden, hidden_norm, temperature, memory=None):
  """Textbook NT-Xent over all 2N rows: each row's positive is its other view,
  every row except itself is a candidate, and so is every memory row."""
  z = np.asarray(hidden, np.float64)
  if hidden_norm:
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
  two_n = z.shape[0]
  n = two_n // 2
  sim = z @ z.T / temperature
  if memory is not None:
    memory_sim = z @ np.asarray(memory, np.float64).T / temperature
  per_row = np.empty(two_n)
  for i in range(two_n):
    pos = (i + n) % two_n
    others = np.delete(sim[i], i)
    if memory is not None:
      others = np.concatenate([others, memory_sim[i]])
    m = others.max()
    per_row[i] = -(sim[i, pos] - m - np.log(np.exp(others - m).sum()))
  # Mean over view-1 rows plus mean over view-2 rows.
  return per_row[:n].mean() + per_row[n:].mean()


@pytest.mark.parametrize("n,d,temperature,hidden_norm", [
    (1, 3, 0.1, True), (2, 4, 0.5, True), (5, 8, 0.1, True), (16, 32, 0.07, True),
    (4, 6, 1.0, False), (7, 3, 2.0, False),
])
def test_contrastive_loss_matches_numpy(n, d, temperature, hidden_norm):
  rng = np.random.default_rng(n * 100 + d)
  hidden = rng.normal(size=(2 * n, d)).astype(np.float32)
  if not hidden_norm:
    hidden *= 0.3  # keep unnormalised logits moderate for float32
  loss, logits_ab, labels = contrastive_loss(
      tf.constant(hidden), hidden_norm=hidden_norm, temperature=temperature)
  np.testing.assert_allclose(
      loss.numpy(), numpy_nt_xent(hidden, hidden_norm, temperature), rtol=1e-5, atol=1e-5)
  assert logits_ab.shape == (n, n)
  assert labels.shape == (n, 2 * n)
  np.testing.assert_array_equal(np.argmax(labels.numpy(), 1), np.arange(n))


def test_contrastive_loss_hand_computed_n2():
  # a1=b1=e1, a2=b2=e2, tau=1: for every row the positive has similarity 1 and
  # both negatives 0, so each row's CE is log(1 + 2/e); two directions -> 2x.
  hidden = tf.constant([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
  loss, _, _ = contrastive_loss(hidden, hidden_norm=True, temperature=1.0)
  assert loss.numpy() == pytest.approx(2 * math.log(1 + 2 / math.e), rel=1e-6)


def test_contrastive_loss_hand_computed_n1_scaling():
  # n=1: the positive is the only candidate (self is masked) -> zero loss
  # whatever the vectors or temperature.
  hidden = tf.constant([[3.0, 1.0], [-1.0, 2.0]])
  loss, _, _ = contrastive_loss(hidden, hidden_norm=True, temperature=0.1)
  assert loss.numpy() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_identical_projections_give_2n_minus_2_negatives(n):
  # All logits equal -> CE = log(#candidates) = log(1 + (2N-2)).
  hidden = tf.ones([2 * n, 4])
  loss, _, _ = contrastive_loss(hidden, temperature=0.5)
  assert loss.numpy() == pytest.approx(2 * math.log(2 * n - 1), abs=1e-5)


def test_contrastive_loss_float32_under_bfloat16_inputs():
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(8, 16)).astype(np.float32)
  loss, logits_ab, _ = contrastive_loss(tf.constant(hidden, tf.bfloat16))
  assert loss.dtype == tf.float32 and logits_ab.dtype == tf.float32
  rounded = tf.cast(tf.constant(hidden, tf.bfloat16), tf.float32).numpy()
  np.testing.assert_allclose(loss.numpy(), numpy_nt_xent(rounded, True, 0.1), rtol=1e-5)


def unit_rows(rng, k, d):
  rows = rng.normal(size=(k, d))
  return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("n,d,k,temperature,hidden_norm", [
    (1, 3, 1, 0.1, True), (2, 4, 5, 0.5, True), (5, 8, 64, 0.1, True), (8, 16, 300, 0.07, True),
    (4, 6, 3, 1.0, False), (7, 3, 40, 2.0, False),
])
def test_contrastive_loss_with_memory_matches_numpy(n, d, k, temperature, hidden_norm):
  rng = np.random.default_rng(n * 1000 + d * 10 + k)
  hidden = rng.normal(size=(2 * n, d)).astype(np.float32)
  if not hidden_norm:
    hidden *= 0.3
  memory = unit_rows(rng, k, d)
  loss, logits_ab, labels = contrastive_loss(
      tf.constant(hidden), hidden_norm=hidden_norm, temperature=temperature,
      memory=tf.constant(memory))
  np.testing.assert_allclose(
      loss.numpy(), numpy_nt_xent(hidden, hidden_norm, temperature, memory), rtol=1e-5, atol=1e-5)
  # The returned logits and targets stay the in-batch ones (metrics independent of K).
  _, plain_logits, plain_labels = contrastive_loss(
      tf.constant(hidden), hidden_norm=hidden_norm, temperature=temperature)
  np.testing.assert_array_equal(logits_ab.numpy(), plain_logits.numpy())
  np.testing.assert_array_equal(labels.numpy(), plain_labels.numpy())


def test_memory_adds_k_negatives():
  # All projections and memory rows equal: CE = log(1 + (2N-2) + K) per row, twice.
  n, k = 3, 10
  loss, _, _ = contrastive_loss(tf.ones([2 * n, 4]), temperature=0.5,
                                memory=tf.fill([k, 4], 0.5))
  assert loss.numpy() == pytest.approx(2 * math.log(2 * n - 1 + k), abs=1e-5)


def test_empty_memory_is_no_memory_and_memory_gets_no_gradient():
  rng = np.random.default_rng(1)
  hidden = tf.constant(rng.normal(size=(10, 8)), tf.float32)
  plain = contrastive_loss(hidden)[0]
  empty = contrastive_loss(hidden, memory=tf.zeros([0, 8]))[0]
  np.testing.assert_array_equal(empty.numpy(), plain.numpy())
  memory = tf.constant(unit_rows(rng, 6, 8))
  with tf.GradientTape() as tape:
    tape.watch([hidden, memory])
    loss = contrastive_loss(hidden, memory=memory)[0]
  grad_hidden, grad_memory = tape.gradient(loss, [hidden, memory])
  assert grad_memory is None
  assert np.abs(grad_hidden.numpy()).max() > 1e-3
  # Under bfloat16 inputs the memory term is float32 as well.
  mixed = contrastive_loss(tf.cast(hidden, tf.bfloat16), memory=tf.cast(memory, tf.bfloat16))[0]
  assert mixed.dtype == tf.float32


def test_contrastive_metrics():
  logits = tf.constant([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0], [1.0, 1.0, 1.0]])
  labels = tf.one_hot([0, 1, 2], 6)  # width 2N as returned by contrastive_loss
  metrics = contrastive_metrics(logits, labels)
  assert set(metrics) == {"contrast_acc", "contrast_entropy"}
  # Row 0 correct, row 1 wrong, row 2 a tie resolved to index 0 -> wrong.
  assert metrics["contrast_acc"].numpy() == pytest.approx(1 / 3)
  p = np.exp([[2, 0, 0], [0, 0, 5], [1, 1, 1]])
  p = p / p.sum(1, keepdims=True)
  entropy = -(p * np.log(p + 1e-8)).sum(1).mean()
  assert metrics["contrast_entropy"].numpy() == pytest.approx(entropy, rel=1e-5)


def test_metrics_from_loss_outputs_perfect_alignment():
  hidden = tf.constant(np.concatenate([np.eye(4), np.eye(4)]), tf.float32)
  _, logits_ab, labels = contrastive_loss(hidden)
  assert contrastive_metrics(logits_ab, labels)["contrast_acc"].numpy() == 1.0


def test_supervised_loss():
  logits = tf.constant([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
  labels = tf.constant([0, 1])
  lse = np.log(np.exp([[2, 0, -1], [0.5, 0.5, 3]]).sum(1))
  per = np.array([lse[0] - 2.0, lse[1] - 0.5])
  assert supervised_loss(labels, logits).numpy() == pytest.approx(per.mean(), rel=1e-6)
  weighted = supervised_loss(labels, logits, weights=tf.constant([1.0, 3.0]))
  assert weighted.numpy() == pytest.approx((per[0] + 3 * per[1]) / 4, rel=1e-6)
  bf16 = supervised_loss(labels, tf.cast(logits, tf.bfloat16))
  assert bf16.dtype == tf.float32


def test_distillation_loss_hand_math_and_teacher_frozen():
  teacher = tf.constant([[1.0, 3.0], [0.0, -2.0]])
  student = tf.constant([[0.5, 0.0], [2.0, 1.0]])
  tau = 2.0

  def softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)

  t = softmax(teacher.numpy() / tau)
  log_s = np.log(softmax(student.numpy() / tau))
  expected = -(t * log_s).sum(1).mean()
  with tf.GradientTape(persistent=True) as tape:
    tape.watch([teacher, student])
    loss = distillation_loss(teacher, student, temperature=tau)
  assert loss.numpy() == pytest.approx(expected, rel=1e-6)
  assert tape.gradient(loss, teacher) is None
  # d/ds of CE with tempered softmax: (softmax(s/tau) - t) / tau / batch.
  np.testing.assert_allclose(tape.gradient(loss, student).numpy(),
                             (np.exp(log_s) - t) / tau / 2, rtol=1e-5)
  # tau matters: at tau=1 the value differs.
  assert distillation_loss(teacher, student).numpy() != pytest.approx(expected, rel=1e-3)


def _model_for_decay():
  inp = keras.Input((2,))
  x = keras.layers.Dense(2, name="conv")(inp)
  x = keras.layers.BatchNormalization(name="stem_bn")(x)
  out = keras.layers.Dense(2, name="head_supervised")(x)
  model = keras.Model(inp, out, name="simclr")
  for v in model.trainable_variables:
    v.assign(np.full(v.shape, {"conv": 1.0, "stem_bn": 5.0, "head_supervised": 2.0}[
        v.path.split("/")[0]], np.float32) + (0.5 if v.name == "bias" else 0.0))
  return model


def test_weight_decay_loss_selection():
  model = _model_for_decay()
  wd = 1e-2
  variables = model.trainable_variables
  # LARS: head kernel only (4 entries of 2.0).
  lars = weight_decay_loss(variables, wd, "lars")
  assert lars.numpy() == pytest.approx(wd * 0.5 * 4 * 4.0, rel=1e-6)
  # Others: every kernel and bias (conv: 4x1 + 2x1.5^2, head: 4x4 + 2x2.5^2), no BN.
  expected = wd * 0.5 * (4 * 1.0 + 2 * 2.25 + 4 * 4.0 + 2 * 6.25)
  for name in ("momentum", "adam"):
    assert weight_decay_loss(variables, wd, name).numpy() == pytest.approx(expected, rel=1e-6)
  assert weight_decay_loss(variables, 0.0, "momentum").numpy() == 0.0


def test_weight_decay_loss_gradient():
  model = _model_for_decay()
  head_kernel = [v for v in model.trainable_variables if v.path == "head_supervised/kernel"][0]
  with tf.GradientTape() as tape:
    loss = weight_decay_loss(model.trainable_variables, 0.1, "lars")
  grads = tape.gradient(loss, model.trainable_variables)
  for v, g in zip(model.trainable_variables, grads):
    if v is head_kernel:
      np.testing.assert_allclose(g.numpy(), 0.1 * v.numpy(), rtol=1e-6)
    else:
      assert g is None


_DISTRIBUTED_SCRIPT = textwrap.dedent("""
  import json, math
  import numpy as np
  import tensorflow as tf
  R = 4
  cpu = tf.config.list_physical_devices("CPU")[0]
  tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * R)
  from tf_simclr.losses import contrastive_loss

  n, d = 3, 5
  rng = np.random.default_rng(7)
  strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(R)])
  out = {}
  memory = rng.normal(size=(11, d))
  memory = tf.constant(memory / np.linalg.norm(memory, axis=1, keepdims=True), tf.float32)
  cases = {"norm": (True, 0.1, rng.normal(size=(2 * R * n, d)), None),
           "raw": (False, 0.7, 0.3 * rng.normal(size=(2 * R * n, d)), None),
           "same": (True, 0.5, np.ones((2 * R * n, d)), None),
           "memory": (True, 0.2, rng.normal(size=(2 * R * n, d)), memory),
           "memory_raw": (False, 0.7, 0.3 * rng.normal(size=(2 * R * n, d)), memory)}
  for key, (hidden_norm, temperature, hidden, memory) in cases.items():
    hidden = tf.constant(hidden, tf.float32)
    with tf.GradientTape() as tape:
      tape.watch(hidden)
      single = contrastive_loss(hidden, hidden_norm, temperature, memory)[0]
    single_grad = tape.gradient(single, hidden).numpy()
    view1, view2 = np.split(hidden.numpy(), 2)

    def shard(ctx):
      r = ctx.replica_id_in_sync_group
      return tf.constant(np.concatenate([view1[r * n:(r + 1) * n], view2[r * n:(r + 1) * n]]))

    local = strategy.experimental_distribute_values_from_function(shard)

    @tf.function
    def step(h):
      with tf.GradientTape() as tape:
        tape.watch(h)
        loss, logits_ab, labels = contrastive_loss(h, hidden_norm, temperature, memory)
        scaled = loss / R
      return loss, tape.gradient(scaled, h), tf.shape(logits_ab), tf.argmax(labels, 1)

    loss, grad, shape, pos = strategy.run(step, args=(local,))
    losses = [t.numpy() for t in strategy.experimental_local_results(loss)]
    grads = [t.numpy() for t in strategy.experimental_local_results(grad)]
    # Reassemble per-replica [view1_r; view2_r] gradients into the global layout.
    g1 = np.concatenate([g[:n] for g in grads]); g2 = np.concatenate([g[n:] for g in grads])
    out[key] = {
        "single": float(single), "mean": float(np.mean(losses)),
        "grad_err": float(np.abs(np.concatenate([g1, g2]) - single_grad).max()),
        "grad_scale": float(np.abs(single_grad).max()),
        "shapes": [t.numpy().tolist() for t in strategy.experimental_local_results(shape)],
        "positives": [t.numpy().tolist() for t in strategy.experimental_local_results(pos)],
    }
  out["expected_same"] = 2 * math.log(2 * R * n - 1)
  print("RESULT" + json.dumps(out))
""")


def test_global_negatives_under_mirrored_strategy():
  out = run_script(_DISTRIBUTED_SCRIPT)
  R, n = 4, 3
  for key in ("norm", "raw", "same", "memory", "memory_raw"):
    res = out[key]
    assert res["mean"] == pytest.approx(res["single"], abs=1e-5), key
    assert res["grad_err"] < 1e-5, (key, res)
    assert res["shapes"] == [[n, R * n]] * R
    assert res["positives"] == [[r * n + i for i in range(n)] for r in range(R)]
  assert out["norm"]["grad_scale"] > 1e-2  # the gradient check is not vacuous
  # Identical projections: 2N-2 negatives from the GLOBAL batch N = R*n.
  assert out["same"]["single"] == pytest.approx(out["expected_same"], abs=1e-5)
