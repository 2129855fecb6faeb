"""Time of one kNN monitor evaluation (tf_simclr.knn.knn_accuracy) on Fashion-MNIST.

  python benchmarks/knn_monitor.py [--num_cpu_replicas=2] [--precision=float32]

The model is the quickstart's (flags/fashion_mnist_base.cfg: ResNet-10, width 0.25, 28x28,
mixed bfloat16) with random weights: the time does not depend on what it has learned. The
bank is the whole training split (60,000) through the eval pipeline (unaugmented), the
queries the test split (10,000). Loading the splits into memory is timed apart.

`seconds` is the first evaluation, `second_seconds` a second one in the same process (as a
training run's later evaluations). With --breakdown, the three phases are then timed one by
one (bank features, query features, the chunked kNN), each with its own tracing. The last
line printed is one JSON object; `*seconds` are wall time, `*cpu_seconds` this process's
CPU time (all threads), steadier than wall time on a shared machine.
"""

import json
import os
import sys
import time

from absl import app, flags

# benchmarks/timing.py, next to this script.
from timing import cpu_seconds, peak_rss_mb

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tf_simclr import knn  # pylint: disable=g-import-not-at-top  (before TensorFlow)
import keras  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top
from tf_simclr.config import DataConfig, ModelConfig  # pylint: disable=g-import-not-at-top
from tf_simclr.data import pipeline  # pylint: disable=g-import-not-at-top
from tf_simclr.models.simclr import build_model  # pylint: disable=g-import-not-at-top
from tf_simclr.strategy import build_strategy  # pylint: disable=g-import-not-at-top

flags.DEFINE_string("data_dir", None, "TFDS data directory (default ~/tensorflow_datasets).")
flags.DEFINE_string("train_split", "train", "Split of the feature bank.")
flags.DEFINE_string("eval_split", "test", "Split of the queries.")
flags.DEFINE_integer("batch_size", 512, "Global batch of the feature passes.")
flags.DEFINE_integer("k", knn.DEFAULT_K, "Neighbours.")
flags.DEFINE_float("temperature", knn.DEFAULT_TEMPERATURE, "Temperature of the votes.")
flags.DEFINE_integer("query_batch", 512, "Queries classified at a time.")
flags.DEFINE_integer("num_cpu_replicas", 0, "> 1: MirroredStrategy over this many logical CPUs.")
flags.DEFINE_enum("precision", "mixed_bfloat16", ["float32", "mixed_bfloat16"],
                  "Keras global dtype policy (the quickstart's: mixed_bfloat16).")
flags.DEFINE_bool("breakdown", True, "Also time the phases one by one.")
FLAGS = flags.FLAGS


def timed(fn):
  """(fn(), wall seconds, process CPU seconds): the machine may be shared, so both."""
  start, cpu_start = time.perf_counter(), cpu_seconds()
  value = fn()
  return value, time.perf_counter() - start, cpu_seconds() - cpu_start


def main(_):
  strategy = build_strategy("auto", num_cpu_replicas=FLAGS.num_cpu_replicas)
  keras.mixed_precision.set_global_policy(FLAGS.precision)
  keras.utils.set_random_seed(0)  # the same random weights, so the same top_1, every run
  model_cfg = ModelConfig(resnet_depth=10, width_multiplier=0.25, image_size=28,
                          proj_out_dim=64, num_proj_layers=3, global_bn=False, num_classes=10)
  with strategy.scope():
    model = build_model(model_cfg)

  def model_fn(images):
    return model(images, training=False)["final_avg_pool"]

  def datasets():
    def split(name):
      cfg = DataConfig(dataset="fashion_mnist", data_dir=FLAGS.data_dir, eval_split=name,
                       image_size=28)
      return pipeline.build_eval_dataset(strategy, cfg, global_batch_size=FLAGS.batch_size)
    return split(FLAGS.train_split), split(FLAGS.eval_split)

  def evaluate():
    return knn.knn_accuracy(strategy, model_fn, train, test, 10, k=FLAGS.k,
                            temperature=FLAGS.temperature, query_batch=FLAGS.query_batch)

  (train, test), load_seconds, _ = timed(datasets)
  result, seconds, cpu = timed(evaluate)
  # A second evaluation, as a training run's next one: tf.data and TF runtime warm (tracing
  # is redone: every call builds its functions).
  second, second_seconds, second_cpu = timed(evaluate)
  assert second == result, (second, result)
  out = {"seconds": seconds, "cpu_seconds": cpu, "second_seconds": second_seconds,
         "second_cpu_seconds": second_cpu, "load_seconds": load_seconds,
         **result, "images_per_sec": (result["bank_size"] + result["num_queries"]) / seconds,
         "k": FLAGS.k, "temperature": FLAGS.temperature, "query_batch": FLAGS.query_batch,
         "batch_size": FLAGS.batch_size, "replicas": strategy.num_replicas_in_sync,
         "precision": FLAGS.precision}

  if FLAGS.breakdown:
    (bank, bank_labels), out["bank_seconds"], out["bank_cpu_seconds"] = timed(
        lambda: knn.build_feature_bank(strategy, model_fn, train))
    (queries, labels), out["query_features_seconds"], out["query_features_cpu_seconds"] = timed(
        lambda: knn.build_feature_bank(strategy, model_fn, test))

    def classify():
      predict = tf.function(knn.knn_predict, reduce_retracing=True)
      return sum(int(tf.reduce_sum(tf.cast(tf.equal(
          predict(queries[i:i + FLAGS.query_batch], bank, bank_labels, 10, FLAGS.k,
                  FLAGS.temperature)[0], labels[i:i + FLAGS.query_batch]), tf.int32)))
                 for i in range(0, int(queries.shape[0]), FLAGS.query_batch))

    hits, out["knn_seconds"], out["knn_cpu_seconds"] = timed(classify)
    out["breakdown_top_1"] = hits / int(queries.shape[0])
    out["feature_dim"] = int(bank.shape[1])
  out["peak_rss_mb"] = peak_rss_mb()
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  app.run(main)
