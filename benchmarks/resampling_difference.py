"""How much the two resamplings (DataConfig.resize_method) change the pipeline's outputs.

  python benchmarks/resampling_difference.py --dataset=fashion_mnist --eval_split=test \
      --image_size=28 [--saved_model=<run>/saved_model/<step>] [--image=photo.jpg]

On the eval split (in memory): the eval views (`augment.preprocess_for_eval`) and one
training crop + flip per image (the same draws for both methods, before colour distortion),
bicubic against bilinear: max and mean absolute difference of pixel values in [0, 1]. With
--saved_model (a tf_simclr export), the top-1 agreement of its `logits_sup` on the two
versions of each, and its accuracy on each. With --image (one photo, e.g. 224x224 views of
a larger JPEG): the same pixel figures on --num_crops training crops and its eval view.
Prints one JSON object.
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from tf_simclr.config import DataConfig  # pylint: disable=g-import-not-at-top
from tf_simclr.data import augment, datasets  # pylint: disable=g-import-not-at-top

flags.DEFINE_string("dataset", "fashion_mnist", "TFDS name or folder:/path.")
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
flags.DEFINE_string("eval_split", "test", "Split whose images are compared.")
flags.DEFINE_integer("image_size", 28, "Output side for the dataset's images.")
flags.DEFINE_string("saved_model", None, "tf_simclr SavedModel whose predictions are compared.")
flags.DEFINE_string("image", None, "A photo whose views are compared too.")
flags.DEFINE_integer("photo_size", 224, "Output side for --image.")
flags.DEFINE_integer("num_crops", 256, "Training crops of --image.")
flags.DEFINE_integer("seed", 0, "Seed of the crop draws.")
FLAGS = flags.FLAGS
METHODS = augment.RESIZE_METHODS


def difference(a, b):
  d = np.abs(a - b)
  return {"max_abs": float(d.max()), "mean_abs": float(d.mean())}


def uniforms(n):
  return tf.random.stateless_uniform([n, augment.DRAWS_PER_VIEW], seed=[FLAGS.seed, 0])


def train_boxes(n, h, w, cfg):
  """n training crop + flip boxes of an h x w image."""
  return augment.view_boxes(uniforms(n), tf.fill([n], float(h)), tf.fill([n], float(w)), cfg,
                            contrastive=False)


def dataset_views(images, size, cfg):
  """{method: (eval views, training crops)} of in-memory pixels [N, H, W, C]."""
  n, h, w = images.shape[:3]
  boxes = train_boxes(n, h, w, cfg)
  out = {}
  for method in METHODS:
    ds = tf.data.Dataset.from_tensor_slices(images).map(
        lambda x, m=method: augment.preprocess_for_eval(x, size, resize_method=m))
    evals = np.concatenate([x.numpy() for x in ds.batch(1000)])
    crops = np.concatenate([augment.crop_and_resize(images[i:i + 1000], boxes[i:i + 1000], size,
                                                    method=method).numpy()
                            for i in range(0, n, 1000)])
    out[method] = (evals, crops)
  return out


def predictions(model, views):
  return np.concatenate([np.argmax(model.signatures["serve"](images=tf.constant(views[i:i + 500]))
                                   ["logits_sup"], -1) for i in range(0, len(views), 500)])


def main(_):
  result = {}
  cfg = DataConfig(dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, eval_split=FLAGS.eval_split,
                   image_size=FLAGS.image_size)
  source = datasets.load_eval(cfg)
  if source.kind != "pixels":
    raise app.UsageError("the eval split must be held as a pixel array (a TFDS dataset of "
                         "fixed-size images under 2 GiB)")
  views = dataset_views(source.images, FLAGS.image_size, cfg)
  result["dataset"] = {"eval_views": difference(views["bicubic"][0], views["bilinear"][0]),
                       "train_crops": difference(views["bicubic"][1], views["bilinear"][1])}
  if FLAGS.saved_model:
    model = tf.saved_model.load(FLAGS.saved_model)
    for i, kind in enumerate(("eval_views", "train_crops")):
      pred = {m: predictions(model, views[m][i]) for m in METHODS}
      result["dataset"][kind].update(
          top1_agreement=float(np.mean(pred["bicubic"] == pred["bilinear"])),
          **{f"accuracy_{m}": float(np.mean(pred[m] == source.labels)) for m in METHODS})
  if FLAGS.image:
    photo = datasets.decode_image(tf.io.read_file(FLAGS.image))
    boxes = train_boxes(FLAGS.num_crops, *photo.shape[:2], cfg)
    size = FLAGS.photo_size
    crops = {m: np.concatenate([augment.crop_and_resize_views(photo, boxes[i:i + 8], size, m)
                                for i in range(0, FLAGS.num_crops, 8)]) for m in METHODS}
    evals = {m: augment.preprocess_for_eval(photo, size, resize_method=m).numpy() for m in METHODS}
    result["image"] = {"shape": list(photo.shape), "size": size,
                       "eval_view": difference(evals["bicubic"], evals["bilinear"]),
                       "train_crops": difference(crops["bicubic"], crops["bilinear"])}
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
