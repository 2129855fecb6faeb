"""Throughput of the training input pipeline, in images per second.

  python benchmarks/input_pipeline.py --dataset=cifar10 --image_size=32 --batch_size=256 \
      --nouse_blur --mock_data --json

With --json the last line printed is one JSON object; `images_per_sec` is the steady-state
rate (after --warmup_batches). An image is one training example: two views in pretraining.
"""

import contextlib
import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # pylint: disable=g-import-not-at-top
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

from tf_simclr.config import DataConfig  # pylint: disable=g-import-not-at-top
from tf_simclr.data import pipeline  # pylint: disable=g-import-not-at-top

flags.DEFINE_string("dataset", "cifar10", "TFDS name or folder:/path.")
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
flags.DEFINE_string("train_split", "train", "Training split.")
flags.DEFINE_integer("image_size", 32, "Output image side.")
flags.DEFINE_integer("batch_size", 256, "Global batch size.")
flags.DEFINE_bool("use_blur", False, "Gaussian blur (pretrain only).")
flags.DEFINE_float("color_jitter_strength", 0.5, "Colour distortion strength.")
flags.DEFINE_enum("train_mode", "pretrain", ["pretrain", "finetune", "distill"], "Augmentation mode.")
flags.DEFINE_bool("mock_data", False, "TFDS mock data of the dataset's shape (no files needed).")
flags.DEFINE_integer("mock_examples", 2048, "Number of mock examples.")
flags.DEFINE_integer("warmup_batches", 10, "Batches discarded before timing.")
flags.DEFINE_integer("num_batches", 50, "Timed batches.")
flags.DEFINE_bool("json", False, "Print a JSON summary as the last line.")
FLAGS = flags.FLAGS


def main(_):
  cfg = DataConfig(dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, train_split=FLAGS.train_split,
                   image_size=FLAGS.image_size, use_blur=FLAGS.use_blur,
                   color_jitter_strength=FLAGS.color_jitter_strength)
  mock = (tfds.testing.mock_data(num_examples=FLAGS.mock_examples,
                                 policy=tfds.testing.MockPolicy.USE_CODE)
          if FLAGS.mock_data else contextlib.nullcontext())
  # In-memory sources are fully loaded here, so the mock is only needed while building.
  with mock:
    ds = pipeline.build_train_dataset(tf.distribute.get_strategy(), cfg,
                                      global_batch_size=FLAGS.batch_size,
                                      train_mode=FLAGS.train_mode)
  it = iter(ds)
  for _ in range(FLAGS.warmup_batches):
    next(it)
  start = time.perf_counter()
  for _ in range(FLAGS.num_batches):
    batch = next(it)
  batch["image"].numpy()
  seconds = time.perf_counter() - start
  rate = FLAGS.num_batches * FLAGS.batch_size / seconds
  print(f"{rate:.1f} images/s ({FLAGS.dataset}, {FLAGS.image_size}x{FLAGS.image_size}, "
        f"batch {FLAGS.batch_size}, {FLAGS.train_mode}, blur={FLAGS.use_blur})")
  if FLAGS.json:
    print(json.dumps({
        "images_per_sec": rate, "dataset": FLAGS.dataset, "image_size": FLAGS.image_size,
        "batch_size": FLAGS.batch_size, "train_mode": FLAGS.train_mode,
        "use_blur": FLAGS.use_blur, "color_jitter_strength": FLAGS.color_jitter_strength,
        "mock_data": FLAGS.mock_data, "num_batches": FLAGS.num_batches,
        "warmup_batches": FLAGS.warmup_batches, "seconds": seconds,
        "image_shape": list(batch["image"].shape)}))


if __name__ == "__main__":
  app.run(main)
