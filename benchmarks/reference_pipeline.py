"""Throughput of the reference implementation's input pipeline, to run beside ours.

Runs the per-image augmentation of Google's SimCLRv2 tf2 code (`data_util.preprocess_image`,
imported from --reference_dir, nothing copied) the way its `data.py` uses it: in pretraining
two independently augmented views per image concatenated on channels, `map` with AUTOTUNE
parallelism, batch, prefetch. Its blur is not in its input pipeline (its `Model.__call__`
blurs the batch inside the training step); `--use_blur` adds `data_util.batch_random_blur` on
each batch after batching, so that the figure covers the same work as ours with blur.
The images are the TFDS mock data of benchmarks/input_pipeline.py (same count, same policy),
held encoded in memory and decoded per example, as our pipeline holds them (and as the
reference's TFDS pipeline decodes every example it reads).

  /tmp/refvenv/bin/python benchmarks/reference_pipeline.py --reference_dir=/tmp/simclr_ref/tf2 \
      --dataset=imagenet2012 --image_size=224 --batch_size=32 --use_blur \
      --color_jitter_strength=1.0 --json
  .venv/bin/python benchmarks/input_pipeline.py --dataset=imagenet2012 --image_size=224 \
      --batch_size=32 --use_blur --color_jitter_strength=1.0 --mock_data --json   # ours

Setup of /tmp/refvenv and /tmp/simclr_ref: benchmarks/reference_step.py. With --json the last
line is one JSON object with input_pipeline.py's keys (`images_per_sec`, ...).
"""

import os
import sys

from absl import app, flags

# Our package's environment defaults before TensorFlow loads (oneDNN's kernels on x86, as in
# our runs), so both sides of a comparison run the same kernels; it imports no TensorFlow.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tf_simclr  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import
import tensorflow as tf  # pylint: disable=g-import-not-at-top
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

# benchmarks/timing.py, next to this script.
from timing import define_pipeline_flags, time_pipeline  # pylint: disable=g-import-not-at-top

define_pipeline_flags(flags)  # color_jitter_strength is also the flag the reference reads
flags.DEFINE_string("reference_dir", None, "Directory of the reference's tf2 modules.")
flags.mark_flag_as_required("reference_dir")
FLAGS = flags.FLAGS


def main(_):
  sys.path.insert(0, os.path.abspath(FLAGS.reference_dir))
  import data_util  # pylint: disable=import-outside-toplevel
  size = FLAGS.image_size
  pretrain = FLAGS.train_mode == "pretrain"

  def augment(example):
    image = tf.io.decode_image(example["image"], channels=3, expand_animations=False)
    # As the reference's data.get_preprocess_fn: colour distortion in pretraining only.
    views = [data_util.preprocess_image(
                 image, size, size, is_training=True,
                 color_jitter_strength=FLAGS.color_jitter_strength if pretrain else 0.0)
             for _ in range(2 if pretrain else 1)]
    return tf.concat(views, -1)

  def blur(images):
    return tf.concat(data_util.batch_random_blur(tf.split(images, 2, axis=-1), size, size), -1)

  with tfds.testing.mock_data(num_examples=FLAGS.mock_examples,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    ds = tfds.load(FLAGS.dataset, split="train",
                   decoders={"image": tfds.decode.SkipDecoding()}).take(FLAGS.mock_examples).cache()
    for _ in ds:  # fill the cache while the mock is active
      pass
  ds = ds.shuffle(FLAGS.mock_examples).repeat()
  ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(FLAGS.batch_size, drop_remainder=True)
  if FLAGS.use_blur and pretrain:
    ds = ds.map(blur, num_parallel_calls=tf.data.AUTOTUNE)
  time_pipeline(iter(ds.prefetch(tf.data.AUTOTUNE)), FLAGS, "reference pipeline", True, "bicubic")


if __name__ == "__main__":
  app.run(main)
