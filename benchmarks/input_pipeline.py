"""Throughput of the training input pipeline, in images per second.

  python benchmarks/input_pipeline.py --dataset=cifar10 --image_size=32 --batch_size=256 \
      --nouse_blur --mock_data --json [--resize_method=bilinear]

With --json the last line printed is one JSON object; `images_per_sec` is the steady-state
rate (after --warmup_batches). An image is one training example: two views in pretraining.
The views and augmentations are --train_mode's (its objective's); every DataConfig field the
declared augmentations read is a flag (augment.CONFIG_FIELDS, e.g. --crop_min_area).
--augment_on=device times what the host does when colour distortion and blur run in the
training step (decode, crop, flip, resize, uint8 views and their draws; for same-size images
held in memory, such as CIFAR's, only the gather of the uint8 images and their draws, the step
crops them: `shipped` is "source", else "views"); that step's cost is
benchmarks/train_step.py --augment_on=device. `images_per_cpu_sec` is the host's cost per
image whichever placement; `image_shape` and `image_dtype` describe what the host ships.
"""

import contextlib
import dataclasses
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tf_simclr import objectives  # pylint: disable=g-import-not-at-top  (before TensorFlow)
import tensorflow as tf  # pylint: disable=g-import-not-at-top
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

from timing import define_pipeline_flags, time_pipeline  # pylint: disable=g-import-not-at-top
from tf_simclr.config import AUGMENT_PLACEMENTS, DataConfig  # pylint: disable=g-import-not-at-top
from tf_simclr.data import augment, pipeline  # pylint: disable=g-import-not-at-top

define_pipeline_flags(flags)
_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}
for _field in dataclasses.fields(DataConfig):
  # Those the shared pipeline flags (timing.py) lack, with DataConfig's defaults.
  if _field.name in augment.CONFIG_FIELDS and _field.name not in flags.FLAGS:
    _DEFINE[type(_field.default)](_field.name, _field.default,
                                  f"DataConfig.{_field.name} (augmentations).")
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
flags.DEFINE_string("train_split", "train", "Training split.")
flags.DEFINE_bool("mock_data", False, "TFDS mock data of the dataset's shape (no files needed).")
flags.DEFINE_enum("resize_method", "bicubic", list(augment.RESIZE_METHODS),
                  "Resampling of the crops (DataConfig.resize_method).")
flags.DEFINE_enum("augment_on", "host", list(AUGMENT_PLACEMENTS),
                  "Where the photometric augmentations run (DataConfig.augment_on; auto "
                  "resolves for this process's devices).")
FLAGS = flags.FLAGS


def main(_):
  cfg = DataConfig(dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, train_split=FLAGS.train_split,
                   image_size=FLAGS.image_size, resize_method=FLAGS.resize_method,
                   **{name: FLAGS[name].value for name in augment.CONFIG_FIELDS})
  objective = objectives.get(FLAGS.train_mode)
  mock = (tfds.testing.mock_data(num_examples=FLAGS.mock_examples,
                                 policy=tfds.testing.MockPolicy.USE_CODE)
          if FLAGS.mock_data else contextlib.nullcontext())
  # In-memory sources are fully loaded here, so the mock is only needed while building.
  strategy = tf.distribute.get_strategy()
  augment_on = pipeline.augment_placement(FLAGS.augment_on, strategy)
  with mock:
    ds = pipeline.build_train_dataset(strategy, cfg,
                                      global_batch_size=FLAGS.batch_size, views=objective.views,
                                      contrastive=objective.contrastive_augmentation,
                                      on_device=augment_on == "device")
  # On the device placement in-memory images go uncropped ("source"), other sources' as views.
  key = "source" if "source" in ds.element_spec else "image"
  time_pipeline((batch[key] for batch in ds), FLAGS, "tf_simclr", FLAGS.mock_data,
                FLAGS.resize_method, augment_on, shipped="source" if key == "source" else "views")


if __name__ == "__main__":
  app.run(main)
