"""kNN monitor: knn_predict against a brute-force numpy statement (ties, k above a class's
size and above the bank), the feature bank and kNN accuracy from eval-pipeline datasets on
one device and on 2 logical CPUs of a MirroredStrategy."""

import math
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tests.isolated import run_script
from tf_simclr import knn
from tf_simclr.config import DataConfig
from tf_simclr.data import augment, datasets, pipeline



def numpy_knn(queries, bank, labels, num_classes, k, temperature):
  """Brute force: cosine similarities; the k most similar bank rows, equal similarities in
  bank order; each votes exp(sim / t) for its class, summed in neighbour order; the first
  class of maximal score."""
  q = np.asarray(queries, np.float64)
  b = np.asarray(bank, np.float64)
  sim = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1,
                                                                              keepdims=True)).T
  scores = np.zeros((len(q), num_classes))
  for i in range(len(q)):
    for j in np.argsort(-sim[i], kind="stable")[:k]:
      scores[i, labels[j]] += math.exp(sim[i, j] / temperature)
  predictions = [int(np.flatnonzero(row == row.max())[0]) for row in scores]
  return np.array(predictions), scores


def tf_knn(queries, bank, labels, num_classes, k, temperature):
  predictions, scores = knn.knn_predict(tf.constant(queries, tf.float32),
                                        tf.constant(bank, tf.float32), tf.constant(labels),
                                        num_classes, k=k, temperature=temperature)
  assert predictions.dtype == tf.int32 and scores.dtype == tf.float32
  return predictions.numpy(), scores.numpy()


@pytest.mark.parametrize("k,temperature", [(1, 0.1), (7, 0.1), (200, 0.1), (20, 0.5),
                                           (500, 0.05)])
def test_knn_matches_numpy_on_random_features(k, temperature):
  rng = np.random.default_rng(k)
  bank = rng.normal(size=(300, 16))
  labels = rng.integers(0, 10, size=300)
  queries = rng.normal(size=(40, 16)) * rng.uniform(0.1, 5, size=(40, 1))  # norms differ
  predictions, scores = tf_knn(queries, bank, labels, 10, k, temperature)
  expected_predictions, expected_scores = numpy_knn(queries, bank, labels, 10, k, temperature)
  np.testing.assert_allclose(scores, expected_scores, rtol=2e-5)
  np.testing.assert_array_equal(predictions, expected_predictions)


def lattice_features(rng, n, d=8):
  """Rows of four entries +-0.5 and zeros elsewhere: unit norm and dot products in multiples
  of 1/4, all exact in float32, so equal similarities are exactly equal."""
  rows = np.zeros((n, d))
  for row in rows:
    row[rng.choice(d, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
  return rows


@pytest.mark.parametrize("k", [1, 3, 10, 25, 60, 1000])
def test_knn_exact_ties_and_small_classes(k):
  rng = np.random.default_rng(3)
  bank = lattice_features(rng, 60)
  bank[30:40] = bank[20:30]  # duplicated rows: equal similarities for every query
  # Unbalanced classes: class 3 has 2 examples (k larger than it), class 4 none.
  labels = np.concatenate([np.zeros(25), np.ones(20), np.full(13, 2), [3, 3]]).astype(np.int32)
  labels = labels[rng.permutation(60)]
  queries = np.concatenate([lattice_features(rng, 40), bank[:5]])
  predictions, scores = tf_knn(queries, bank, labels, 5, k, 0.1)
  expected_predictions, expected_scores = numpy_knn(queries, bank, labels, 5, k, 0.1)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-5)
  np.testing.assert_array_equal(predictions, expected_predictions)
  assert np.all(scores[:, 4] == 0)


def test_tie_rules_by_hand():
  e1, e2 = [1.0, 0.0], [0.0, 1.0]
  bank = np.array([e2, e1, e1, e1])
  # k=2 among three equally similar rows: bank rows 1 and 2 (lower indices), classes 2 and 1
  # with equal weight: the lower class wins.
  predictions, scores = tf_knn([e1], bank, np.array([0, 2, 1, 0]), 3, 2, 0.1)
  np.testing.assert_allclose(scores, [[0, math.exp(10), math.exp(10)]], rtol=1e-6)
  assert predictions.tolist() == [1]
  # k above the bank: every row votes (e2 with similarity 0: weight 1).
  predictions, scores = tf_knn([e1], bank, np.array([0, 2, 1, 0]), 3, 200, 0.1)
  np.testing.assert_allclose(scores, [[1 + math.exp(10), math.exp(10), math.exp(10)]],
                             rtol=1e-6)
  assert predictions.tolist() == [0]


def test_knn_argument_checks():
  with pytest.raises(ValueError, match="k > 0"):
    knn.knn_predict(tf.ones([1, 2]), tf.ones([3, 2]), tf.zeros([3], tf.int32), 2, k=0)
  with pytest.raises(ValueError, match="temperature > 0"):
    knn.knn_predict(tf.ones([1, 2]), tf.ones([3, 2]), tf.zeros([3], tf.int32), 2,
                    temperature=0.0)


def synthetic_examples(n, seed, num_classes=4, size=8):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
  return datasets.Examples(images, rng.integers(0, num_classes, size=n).astype(np.int32),
                           "pixels")


def distributed_eval_dataset(strategy, examples, global_batch):
  """What pipeline.build_eval_dataset makes, from examples in memory."""
  cfg = DataConfig(image_size=8)

  def input_fn(ctx):
    return pipeline.eval_dataset(
        examples, cfg, global_batch_size=global_batch,
        per_replica_batch=ctx.get_per_replica_batch_size(global_batch),
        num_pipelines=ctx.num_input_pipelines, pipeline_id=ctx.input_pipeline_id)

  return strategy.distribute_datasets_from_function(input_fn)


def eval_views(examples):
  return np.stack([augment.preprocess_for_eval(tf.constant(image), 8).numpy()
                   for image in examples.images])


def test_bank_and_accuracy_on_one_device():
  strategy = tf.distribute.get_strategy()
  projection = tf.constant(np.random.default_rng(0).normal(size=(8 * 8 * 3, 5)), tf.float32)

  def model_fn(images):
    return tf.matmul(tf.reshape(images, [tf.shape(images)[0], -1]), projection)

  train, test = synthetic_examples(45, 1), synthetic_examples(21, 2)
  # 45 = 5 full batches of 8 and a padded one: 3 padding rows dropped.
  features, labels = knn.build_feature_bank(strategy, model_fn,
                                            distributed_eval_dataset(strategy, train, 8))
  expected = eval_views(train).reshape(45, -1) @ projection.numpy()
  np.testing.assert_allclose(features.numpy(), expected, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(labels.numpy(), train.labels)

  for k, query_batch in ((3, 4), (200, 512)):
    result = knn.knn_accuracy(strategy, model_fn, distributed_eval_dataset(strategy, train, 8),
                              distributed_eval_dataset(strategy, test, 6), 4, k=k,
                              temperature=0.1, query_batch=query_batch)
    predictions, _ = numpy_knn(eval_views(test).reshape(21, -1) @ projection.numpy(), expected,
                               train.labels, 4, k, 0.1)
    assert result == {"top_1": float(np.mean(predictions == test.labels)), "num_queries": 21,
                      "bank_size": 45}


_MIRRORED_SCRIPT = textwrap.dedent("""
  import json
  import keras
  import numpy as np
  import tensorflow as tf
  R = 2
  cpu = tf.config.list_physical_devices("CPU")[0]
  tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * R)
  from tf_simclr import knn
  from tests.test_knn import distributed_eval_dataset, synthetic_examples

  def make_model():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv")(inp)
    out = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inp, out)

  train, test = synthetic_examples(45, 1), synthetic_examples(21, 2)
  mirrored = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(R)])
  one = tf.distribute.OneDeviceStrategy("/cpu:0")
  weights = None
  out = {}
  for name, strategy in (("one", one), ("mirrored", mirrored)):
    with strategy.scope():
      model = make_model()
    if weights is None:
      weights = [np.random.default_rng(i).normal(size=v.shape) for i, v in enumerate(model.weights)]
    for v, w in zip(model.weights, weights):
      v.assign(w)
    model_fn = lambda images: model(images, training=False)
    features, labels = knn.build_feature_bank(strategy, model_fn,
                                              distributed_eval_dataset(strategy, train, 8))
    result = knn.knn_accuracy(strategy, model_fn, distributed_eval_dataset(strategy, train, 8),
                              distributed_eval_dataset(strategy, test, 6), 4, k=5,
                              query_batch=8)
    out[name] = {"features": features.numpy().tolist(), "labels": labels.numpy().tolist(),
                 "result": result}
  print("RESULT" + json.dumps(out))
""")


def test_bank_under_mirrored_strategy_equals_one_device():
  out = run_script(_MIRRORED_SCRIPT)
  one, mirrored = out["one"], out["mirrored"]
  assert len(one["features"]) == 45 and len(one["features"][0]) == 6
  np.testing.assert_allclose(mirrored["features"], one["features"], rtol=1e-5, atol=1e-6)
  assert mirrored["labels"] == one["labels"] == synthetic_examples(45, 1).labels.tolist()
  assert mirrored["result"] == one["result"]
  assert one["result"]["num_queries"] == 21 and one["result"]["bank_size"] == 45
