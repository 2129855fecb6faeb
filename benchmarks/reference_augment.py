"""Our augmentations (tf_simclr.data.augment) beside the reference's own data_util.py.

Imports Google's SimCLRv2 `data_util` (github.com/google-research/simclr, tf2/, from
--reference_dir; none of its code is copied here). It needs only TensorFlow, so this runs in
the project's .venv, from the repo root:

  .venv/bin/python benchmarks/reference_augment.py --reference_dir=/tmp/simclr_ref/tf2

Checks, each printed with its numbers (the last line is one JSON object):
- eval_centre_crop: `preprocess_for_eval` of both on uint8 images whose centre crop is already
  224x224 (shorter side 256), so that no resampling happens and the outputs are equal iff the
  crops are the same pixels. Resampling itself is not compared.
- crop_<H>x<W>: the training crop's distribution. The reference's `crop_and_resize(image, S, S)`
  runs with `tf.image.resize` replaced by the identity, on an image holding each pixel's row
  and column, so its crop's size and offset can be read off; ours are `augment.crop_boxes`.
  Compared by two-sample Kolmogorov-Smirnov distance (D) and asymptotic p-value on the crop's
  area fraction, aspect ratio (w/h) and relative offsets, plus the whole-image fraction.
- colour_<path>: the pretraining colour distortion's distribution (strength 1.0): the
  reference's `random_color_jitter` (jitter p=0.8, grayscale p=0.2) per image, ours batched
  (`augment.photometric`) and per image (`augment.photometric_per_image`), without blur, on
  one fixed 32x32 image; KS on per-output mean of each channel, standard deviation and mean
  chroma (max - min over channels), and the grayscale fraction.
- blur, grayscale: the deterministic parts on the same inputs: `gaussian_blur` (fixed
  sigma, kernel from the image size as both draw it) and `to_grayscale`; max |difference|.
Features are rounded to 1e-4 before the KS test: the distributions have atoms (discrete crop
sizes; the 16% of colour outputs left unchanged), which float rounding of 1e-7 (float32 vs
float64 ratios; the batched path's identity HSV round trip) would otherwise split into two
values and count as a difference of the atom's whole mass. A distribution check fails when a
p-value is below --alpha; a deterministic one when the difference exceeds 1e-5. Our draws and
the reference's colour draws are seeded; its crop draws are not reproducible (TF's crop
sampler without an op seed), so the crop p-values vary from run to run.
"""

import contextlib
import json
import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tf_simclr

flags.DEFINE_string("reference_dir", None, "Directory of the reference's tf2 modules.")
flags.DEFINE_integer("crops", 20000, "Crops drawn per side and image size.")
flags.DEFINE_integer("colour_samples", 4000, "Colour distortions drawn per side and path.")
flags.DEFINE_float("alpha", 1e-3, "Significance level of the distribution checks.")
FLAGS = flags.FLAGS


def ks(a, b):
  """Two-sample Kolmogorov-Smirnov distance and its asymptotic p-value."""
  a, b = np.sort(a), np.sort(b)
  grid = np.concatenate([a, b])
  d = float(np.abs(np.searchsorted(a, grid, "right") / len(a)
                   - np.searchsorted(b, grid, "right") / len(b)).max())
  lam = d * np.sqrt(len(a) * len(b) / (len(a) + len(b)))
  if lam < 0.2:
    return d, 1.0
  k = np.arange(1, 101)
  p = 2.0 * np.sum((-1.0) ** (k - 1) * np.exp(-2.0 * (k * lam) ** 2))
  return d, float(min(max(p, 0.0), 1.0))


def compare(name, ref, ours, scalars=None):
  """KS per feature, on values rounded to 1e-4 (see the module docstring); `scalars`:
  {feature: (ref, ours)} reported beside."""
  ref = {k: np.round(np.asarray(v, np.float64), 4) for k, v in ref.items()}
  ours = {k: np.round(np.asarray(v, np.float64), 4) for k, v in ours.items()}
  stats = {k: ks(ref[k], ours[k]) for k in ref}
  ok = all(p >= FLAGS.alpha for _, p in stats.values())
  print(f"{name}: {'OK' if ok else 'DIFFERS'} (n = {len(next(iter(ref.values())))} per side)")
  for k, (d, p) in stats.items():
    q = lambda x: " ".join(f"{v:.3f}" for v in np.quantile(x, [0.1, 0.5, 0.9]))
    print(f"  {k:14s} KS D {d:.4f} p {p:.3f}   deciles 10/50/90: reference {q(ref[k])}, "
          f"ours {q(ours[k])}")
  for k, (r, o) in (scalars or {}).items():
    print(f"  {k:14s} reference {r:.4f}, ours {o:.4f}")
  return {"ok": ok, "ks": {k: {"D": d, "p": p} for k, (d, p) in stats.items()},
          **{k: {"reference": r, "ours": o} for k, (r, o) in (scalars or {}).items()}}


@contextlib.contextmanager
def identity_resize(tf_module):
  """The reference's `tf.image.resize` (its module object) as the identity, for a while."""
  resize = tf_module.image.resize
  tf_module.image.resize = lambda images, size, method=None: images
  try:
    yield
  finally:
    tf_module.image.resize = resize


def check_eval(tf, ref, augment):
  errors = {}
  rng = np.random.default_rng(0)
  for h, w in [(256, 256), (256, 301), (301, 256), (256, 400)]:
    image = tf.constant(rng.integers(0, 256, (h, w, 3), np.uint8))
    theirs = ref.preprocess_for_eval(tf.image.convert_image_dtype(image, tf.float32), 224, 224,
                                     crop=True)
    ours = augment.preprocess_for_eval(image, 224)
    errors[f"{h}x{w}"] = float(np.abs(theirs.numpy() - ours.numpy()).max())
  ok = max(errors.values()) <= 1e-5
  print(f"eval_centre_crop: {'OK' if ok else 'DIFFERS'}; max |difference| per image size "
        f"(224 output): {errors}")
  return {"ok": ok, "max_abs_diff": errors}


def crop_features(h, w, y0, x0, height, width):
  return {"area_fraction": h * w / (height * width), "aspect_w_h": w / h,
          "rel_offset_y": np.where(h < height, y0 / np.maximum(height - h, 1), 0.5),
          "rel_offset_x": np.where(w < width, x0 / np.maximum(width - w, 1), 0.5)}


def check_crops(tf, ref, augment, height, width, size):
  n = FLAGS.crops
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  coords = tf.constant(np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.float32))

  def one(_):
    crop = ref.crop_and_resize(coords, size, size)
    return tf.stack([tf.cast(tf.shape(crop)[0], tf.float32),
                     tf.cast(tf.shape(crop)[1], tf.float32), crop[0, 0, 0], crop[0, 0, 1]])

  tf.random.set_seed(1)
  with identity_resize(ref.tf):
    ds = tf.data.Dataset.range(n).map(one).batch(n)  # sequential: reproducible draws
    h, w, y0, x0 = next(iter(ds)).numpy().T
  theirs = crop_features(h, w, y0, x0, height, width)

  u = tf.random.stateless_uniform([n, augment.CROP.draws], seed=[7, 7])
  boxes = augment.crop_boxes(u, tf.fill([n], float(height)), tf.fill([n], float(width))).numpy()
  y1, x1, y2, x2 = (boxes * [height - 1, width - 1, height - 1, width - 1]).T
  oh, ow = np.round(y2 - y1) + 1, np.round(x2 - x1) + 1
  ours = crop_features(oh, ow, np.round(y1), np.round(x1), height, width)
  whole = (np.mean((h == height) & (w == width)), np.mean((oh == height) & (ow == width)))
  return compare(f"crop_{height}x{width}", theirs, ours, {"whole_image": whole})


def colour_features(x):
  return {"mean_r": x[..., 0].mean((1, 2)), "mean_g": x[..., 1].mean((1, 2)),
          "mean_b": x[..., 2].mean((1, 2)), "std": x.std((1, 2, 3)),
          "chroma": (x.max(-1) - x.min(-1)).mean((1, 2))}


def check_colour(tf, ref, augment, image):
  from tf_simclr.config import DataConfig  # pylint: disable=import-outside-toplevel
  cfg = DataConfig(color_jitter_strength=1.0, use_blur=False)
  n = FLAGS.colour_samples
  tf.random.set_seed(2)
  ds = tf.data.Dataset.range(n).map(
      lambda _: tf.clip_by_value(ref.random_color_jitter(image, strength=1.0), 0.0, 1.0)
  ).batch(n)
  theirs = next(iter(ds)).numpy()
  u = tf.random.stateless_uniform([n, augment.DRAWS_PER_VIEW], seed=[8, 8])
  images = tf.repeat(image[None], n, 0)
  ours = {
      "batched": augment.photometric(images, u, cfg, contrastive=True).numpy(),
      "per_image": tf.data.Dataset.from_tensor_slices((images, u)).map(
          lambda x, r: augment.photometric_per_image(x[None], r[None], cfg, contrastive=True)[0],
          num_parallel_calls=2).batch(n).get_single_element().numpy(),
  }
  gray = lambda x: float(np.mean((x.max(-1) - x.min(-1)).max((1, 2)) < 1e-6))
  return {path: compare(f"colour_{path}", colour_features(theirs), colour_features(x),
                        {"grayscale": (gray(theirs), gray(x))})
          for path, x in ours.items()}


def check_deterministic(tf, ref, augment):
  rng = np.random.default_rng(3)
  blur = {}
  for size in (224, 32):
    image = tf.constant(rng.random((size, size, 3), np.float32))
    for sigma in (0.1, 1.0, 2.0):
      theirs = ref.gaussian_blur(image, kernel_size=size // 10, sigma=sigma, padding="SAME")
      ours = augment.gaussian_blur(image[None], tf.constant([sigma]), size // 10)[0]
      blur[f"{size}px_sigma{sigma}"] = float(np.abs(theirs.numpy() - ours.numpy()).max())
  image = tf.constant(rng.random((64, 64, 3), np.float32))
  gray = float(np.abs(ref.to_grayscale(image).numpy()
                      - augment.grayscale(image[None])[0].numpy()).max())
  ok = max(blur.values()) <= 1e-5 and gray <= 1e-5
  print(f"blur: max |difference| {max(blur.values()):.2e} over {list(blur)}; grayscale: "
        f"{gray:.2e} -> {'OK' if ok else 'DIFFERS'}")
  return {"ok": ok, "blur_max_abs_diff": blur, "grayscale_max_abs_diff": gray}


def main(_):
  if not FLAGS.reference_dir:
    raise app.UsageError("--reference_dir is required (see the module docstring)")
  import tensorflow as tf
  sys.path.insert(0, os.path.abspath(FLAGS.reference_dir))
  import data_util as ref  # pylint: disable=import-outside-toplevel
  from tf_simclr.data import augment  # pylint: disable=import-outside-toplevel

  results = {"eval_centre_crop": check_eval(tf, ref, augment)}
  for height, width, size in [(375, 500, 224), (32, 32, 32)]:
    results[f"crop_{height}x{width}"] = check_crops(tf, ref, augment, height, width, size)
  yy, xx = np.meshgrid(np.linspace(0, 1, 32), np.linspace(0, 1, 32), indexing="ij")
  image = tf.constant(np.stack([yy, xx, 0.5 + 0.4 * np.sin(6 * (yy + xx))], -1), tf.float32)
  for path, result in check_colour(tf, ref, augment, image).items():
    results[f"colour_{path}"] = result
  results["deterministic"] = check_deterministic(tf, ref, augment)
  results["all_ok"] = all(r["ok"] for r in results.values())
  print(f"tensorflow {tf.__version__}")
  print(json.dumps(results), flush=True)


if __name__ == "__main__":
  app.run(main)
