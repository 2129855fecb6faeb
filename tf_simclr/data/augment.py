"""SimCLR augmentations, each declared once, driven by pre-drawn uniform random numbers.

Every augmentation is an `Augmentation` that declares how many uniforms in [0, 1) it reads
per view and provides its forms; `AUGMENTATIONS` lists them in the order they apply, which
is also the order of their columns in a view's row of uniforms (`COLUMNS`,
`DRAWS_PER_VIEW`, computed from the declarations). The pipeline draws those rows
statelessly from the example's position in the stream, so an example's augmentation does
not depend on which batch, replica or input pipeline processes it.

Geometric augmentations (crop, flip) move or mirror each view's crop box before the
resampling (`view_boxes`), the same on every path. Photometric ones (colour jitter,
grayscale, blur) change the resampled views and come in two forms with the same
distribution: batched (`photometric`: every one on every view of a batch, blended by the
draws, in one XLA-compiled pass, for small images) and per image (`photometric_per_image`:
tf.image's kernels behind `tf.cond`s, for large ones), chosen by image size.

Semantics follow SimCLR's appendix A and the reference `data_util.py`: the crop sampler
follows `tf.image.sample_distorted_bounding_box`'s algorithm (aspect ratio uniform, integer
crop height uniform between the area bounds, at least 10% of the image covered, offsets
uniform in [0, H - h), whole image when every attempt fails); crops and the eval centre crop
are resampled bicubically on pixel centres and clipped to [0, 1] (`tf.image.resize`'s
BICUBIC), or optionally bilinearly with aligned corners (cheaper, not the reference's);
colour jitter applies multiplicative brightness ("simclrv2"), contrast, saturation and hue
in a random order with a clip after each; blur is a separable Gaussian with 'SAME' zero
padding.
"""

import dataclasses
import functools
import itertools
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from tf_simclr.config import RESIZE_METHODS, DataConfig

CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
# The reference passes min_object_covered=0.1 with the whole image as the box, which
# rejects crops below 10% of the image even though the area range starts at 8%.
CROP_MIN_COVERED = 0.1
# The reference asks TF for 100; one attempt fails with p <= 9% (measured with TF's op on
# images from 10x10 to 2:1), so all of 10 fail with p < 1e-10.
CROP_ATTEMPTS = 10
EVAL_CROP_PROPORTION = 0.875
# Smaller eval images are not cropped, as the reference evaluates CIFAR.
EVAL_CROP_MIN_SIZE = 33
JITTER_PROB = 0.8
GRAYSCALE_PROB = 0.2
BLUR_PROB = 0.5
BLUR_SIGMA_RANGE = (0.1, 2.0)


def _lerp(u, lo, hi):
  return lo + u * (hi - lo)


def check_resize_method(method):
  """Raises a one-line ValueError for an unknown resampling."""
  if method not in RESIZE_METHODS:
    raise ValueError(f"resize_method={method!r} is not one of {RESIZE_METHODS}")


def crop_boxes(u, height, width, area_range=(DataConfig.crop_min_area, 1.0)):
  """Random crop boxes, as `tf.image.crop_and_resize` expects them.

  Draws what `tf.image.sample_distorted_bounding_box` draws with the reference's arguments
  (the whole image as the box), by its algorithm: per attempt an aspect ratio, an integer
  height uniform between the rounded heights of the area bounds, the width rounded, a
  one-pixel fix-up when rounding left the area range; the first attempt covering
  CROP_MIN_COVERED of the image wins, else the whole image; offsets uniform in [0, H - h)
  (0 when h == H).

  Args:
    u: [b, >= 2 * CROP_ATTEMPTS + 2] uniforms.
    height, width: [b] float32 sizes of the source images in pixels.
    area_range: (min, max) crop area as a fraction of the image's.

  Returns:
    [b, 4] float32 boxes (y1, x1, y2, x2), normalised so that 0 and 1 are the centres of
    the first and last pixel. Crops cover whole pixels, as the reference's do.
  """
  height = tf.cast(height, tf.float32)[:, None]
  width = tf.cast(width, tf.float32)[:, None]
  aspect = _lerp(u[:, 0:2 * CROP_ATTEMPTS:2], *CROP_ASPECT_RANGE)  # width / height
  min_area = area_range[0] * width * height
  max_area = area_range[1] * width * height
  min_h = tf.round(tf.sqrt(min_area / aspect))
  max_h = tf.round(tf.sqrt(max_area / aspect))
  # The tallest height whose rounded width fits in the image.
  max_h = tf.where(tf.round(max_h * aspect) > width, tf.floor((width + 0.5) / aspect), max_h)
  max_h = tf.where(tf.round(max_h * aspect) > width, max_h - 1.0, max_h)
  max_h = tf.minimum(max_h, height)
  min_h = tf.minimum(min_h, max_h)
  crop_h = min_h + tf.floor(u[:, 1:2 * CROP_ATTEMPTS:2] * (max_h - min_h + 1.0))
  crop_w = tf.round(crop_h * aspect)
  crop_h = tf.where(crop_h * crop_w < min_area, crop_h + 1.0, crop_h)
  crop_w = tf.round(crop_h * aspect)
  crop_h = tf.where(crop_h * crop_w > max_area, crop_h - 1.0, crop_h)
  crop_w = tf.round(crop_h * aspect)
  area = crop_h * crop_w
  ok = ((area >= min_area) & (area <= max_area) & (crop_h >= 1.0) & (crop_w >= 1.0) &
        (crop_h <= height) & (crop_w <= width) & (area / (height * width) >= CROP_MIN_COVERED))
  # First successful attempt per example; the whole image when none succeeded.
  first = tf.argmax(tf.cast(ok, tf.int32), axis=1)
  found = tf.reduce_any(ok, axis=1)[:, None]
  pick = lambda t: tf.gather(t, first, axis=1, batch_dims=1)[:, None]
  crop_h = tf.where(found, pick(crop_h), height)
  crop_w = tf.where(found, pick(crop_w), width)
  y0 = tf.floor(u[:, 2 * CROP_ATTEMPTS:2 * CROP_ATTEMPTS + 1] * (height - crop_h))
  x0 = tf.floor(u[:, 2 * CROP_ATTEMPTS + 1:2 * CROP_ATTEMPTS + 2] * (width - crop_w))
  return pixel_boxes(y0, x0, crop_h, crop_w, height, width)


def pixel_boxes(y0, x0, crop_h, crop_w, height, width):
  """Boxes covering pixels [y0, y0 + crop_h) x [x0, x0 + crop_w) in crop_and_resize units."""
  # crop_and_resize maps 0 and 1 to the first and last pixel centres; shift the box edges
  # by half a pixel inwards so a crop of the whole image at its own size is the identity.
  ny = tf.maximum(height - 1.0, 1.0)
  nx = tf.maximum(width - 1.0, 1.0)
  return tf.concat([y0 / ny, x0 / nx, (y0 + crop_h - 1.0) / ny, (x0 + crop_w - 1.0) / nx], axis=1)


def _box_pixels(boxes, height, width):
  """Inverse of `pixel_boxes`: [n, 4] first/last pixel indices (y1, x1, y2, x2), float32;
  x1 > x2 for a mirrored box."""
  ny = tf.maximum(tf.cast(height, tf.float32) - 1.0, 1.0)
  nx = tf.maximum(tf.cast(width, tf.float32) - 1.0, 1.0)
  return tf.round(boxes * tf.stack([ny, nx, ny, nx]))


def flip_boxes(boxes, u):
  """Mirrors the boxes of examples with u < 0.5 (crop_and_resize reads x2 -> x1)."""
  y1, x1, y2, x2 = tf.unstack(boxes, axis=1)
  flip = u < 0.5
  return tf.stack([y1, tf.where(flip, x2, x1), y2, tf.where(flip, x1, x2)], axis=1)


def crop_and_resize(images, boxes, size, box_indices=None, method="bicubic"):
  """Crops `boxes` (whole pixels, as `crop_boxes` makes them; mirrored ones are flipped) out
  of `images` ([n, H, W, C], any dtype) to float32 [b, size, size, 3] in [0, 1], for a whole
  batch in one pass: what `crop_and_resize_views` gives per image."""
  check_resize_method(method)
  if box_indices is None:
    box_indices = tf.range(tf.shape(boxes)[0])
  if method == "bilinear":
    # Sampling points of a box edge on the image border can round past the last pixel
    # centre, where crop_and_resize writes 0: a black row or column in ~2% of 32x32 crops.
    boxes = tf.clip_by_value(boxes, 2.0**-20, 1.0 - 2.0**-20)
    out = tf.image.crop_and_resize(images, boxes, box_indices, [size, size])
  else:
    out = _bicubic_crops(images, boxes, size, box_indices)
  return _unit_rgb(out, images.dtype, method)


def _keys_table(a=-0.5, steps=1024):
  """TF's bicubic weight table: Keys' kernel at t and 1 + t for t = i / steps, i = 0..steps."""
  t = np.arange(steps + 1) / steps
  near = ((a + 2) * t - (a + 3)) * t * t + 1
  far = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
  return near.astype(np.float32), far.astype(np.float32)


_KEYS_NEAR, _KEYS_FAR = _keys_table()


def _cubic_taps(start, length, size):
  """Source indices and weights (4 of each, [n, size]) of a bicubic resampling (Keys, a = -0.5,
  pixel centres) of pixels start .. start + length - 1 ([n] float32) of an axis to `size`
  samples, computed as TF's ResizeBicubic kernel does: weights read from its table of 1024
  steps per pixel; taps outside the crop get weight 0 and the rest are renormalised."""
  scale = length / float(size)
  loc = (tf.range(size, dtype=tf.float32) + 0.5) * scale[:, None] - 0.5
  base = tf.floor(loc)
  step = tf.cast(tf.round((loc - base) * float(len(_KEYS_NEAR) - 1)), tf.int32)
  back = len(_KEYS_NEAR) - 1 - step
  weights = [tf.gather(_KEYS_FAR, step), tf.gather(_KEYS_NEAR, step), tf.gather(_KEYS_NEAR, back),
             tf.gather(_KEYS_FAR, back)]
  last = (length - 1.0)[:, None]
  taps = [base + k for k in (-1.0, 0.0, 1.0, 2.0)]
  weights = [tf.where((t >= 0.0) & (t <= last), w, 0.0) for t, w in zip(taps, weights)]
  norm = 1.0 / (weights[0] + weights[1] + weights[2] + weights[3])
  index = [tf.cast(start[:, None] + tf.clip_by_value(t, 0.0, last), tf.int32) for t in taps]
  return index, [w * norm for w in weights]


def _bicubic_crops(images, boxes, size, box_indices):
  """[n, size, size, C] float32 bicubic resamplings of box i of images[box_indices[i]] (pixel
  values)."""
  shape = tf.shape(images)
  height, width, channels = shape[1], shape[2], images.shape[-1]
  n = tf.shape(boxes)[0]
  y1, x1, y2, x2 = tf.unstack(_box_pixels(boxes, height, width), axis=1)
  rows, row_w = _cubic_taps(y1, y2 - y1 + 1.0, size)
  cols, col_w = _cubic_taps(tf.minimum(x1, x2), tf.abs(x2 - x1) + 1.0, size)
  # A mirrored box reads its columns right to left: the flip of the resampled crop.
  flip = (x1 > x2)[:, None]
  cols, col_w = ([tf.where(flip, tf.reverse(t, [1]), t) for t in ts] for ts in (cols, col_w))
  # Rows first, then columns, as TF's kernel sums. Gathers of whole rows of the flattened
  # batch are the fastest; the row pass reads each view's rows straight from its source
  # image (views of one image share it), the column pass runs on its transpose.
  x = tf.reshape(tf.cast(images, tf.float32), [-1, width * channels])
  x = _sum_taps(x, rows, row_w, tf.cast(box_indices, tf.int32)[:, None] * height)
  first = tf.range(n)[:, None]
  x = tf.transpose(tf.reshape(x, [n, size, width, channels]), [0, 2, 1, 3])
  x = _sum_taps(tf.reshape(x, [n * width, size * channels]), cols, col_w, first * width)
  return tf.transpose(tf.reshape(x, [n, size, size, channels]), [0, 2, 1, 3])


def _sum_taps(rows, index, weight, offset):
  """[n, size, L]: the left-to-right sum over the 4 taps of weight * rows[offset + index]
  (rows [m, L]; index, weight [n, size]). Elementwise, so the result does not depend on
  the batch size."""
  terms = [tf.gather(rows, i + offset) * w[:, :, None] for i, w in zip(index, weight)]
  return terms[0] + terms[1] + terms[2] + terms[3]


def _resize(images, size, method):
  """One crop per image ([n, h, w, C], any dtype) resampled to [n, size, size, C] float32
  pixel values: `tf.image.resize` BICUBIC (the reference's) or bilinear with aligned
  corners (the same sampling points as `tf.image.crop_and_resize`)."""
  if method == "bilinear":
    return tf.raw_ops.ResizeBilinear(images=images, size=[size, size], align_corners=True)
  return tf.image.resize(images, [size, size], method="bicubic")


def crop_and_resize_views(image, boxes, size, method="bicubic"):
  """`crop_and_resize` of one image ([H, W, C]) for each of `boxes` ([V, 4] on whole pixels,
  as `crop_boxes` makes them), as a slice and a resize per view: at about a third of
  `tf.image.crop_and_resize`'s cost for bilinear, the reference's own ops for bicubic."""
  check_resize_method(method)
  shape = tf.shape(image)
  pixels = tf.cast(_box_pixels(boxes, shape[0], shape[1]), tf.int32)
  views = []
  for y1, x1, y2, x2 in (tf.unstack(pixels[v]) for v in range(boxes.shape[0])):
    crop = image[y1:y2 + 1, tf.minimum(x1, x2):tf.maximum(x1, x2) + 1]
    view = _resize(crop[None], size, method)[0]
    views.append(tf.cond(x1 > x2, lambda view=view: tf.reverse(view, [1]), lambda view=view: view))
  return _unit_rgb(tf.stack(views), image.dtype, method)


def preprocess_for_eval(image, size, *, resize_method="bicubic"):
  """The view evaluation feeds the model: float32 [size, size, 3] in [0, 1] of one image
  ([H, W, C], uint8 or float in [0, 1]).

  For size >= EVAL_CROP_MIN_SIZE, the centred square keeping EVAL_CROP_PROPORTION of the
  shorter side (the reference's centre crop: side rounded, offsets (H - side + 1) // 2);
  the whole image below. Then resampled to `size` (see `RESIZE_METHODS`). The eval
  pipeline calls this per example.
  """
  check_resize_method(resize_method)
  if size >= EVAL_CROP_MIN_SIZE:
    hw = tf.shape(image)[:2]
    short = tf.cast(tf.reduce_min(hw), tf.float32)
    side = tf.cast(tf.round(EVAL_CROP_PROPORTION * short), tf.int32)
    y0, x0 = tf.unstack((hw - side + 1) // 2)
    image = image[y0:y0 + side, x0:x0 + side]
  return _unit_rgb(_resize(image[None], size, resize_method), image.dtype, resize_method)[0]


def _unit_rgb(images, dtype, method):
  """Resampled `dtype` images to float32 RGB in [0, 1]. Bicubic weights go negative, so
  its outputs overshoot at sharp edges and are clipped, as the reference clips them;
  bilinear outputs are convex combinations of inputs, which float rounding cannot leave."""
  if dtype == tf.uint8:
    images = images / 255.0
  if method == "bicubic":
    images = tf.clip_by_value(images, 0.0, 1.0)
  if images.shape[-1] == 1:
    images = tf.tile(images, [1, 1, 1, 3])
  return images


def _per_example(v):
  return v[:, None, None, None]


# Columns of the colour jitter's uniforms.
_JITTER_APPLY, _JITTER_ORDER, _JITTER_FACTORS = 0, slice(1, 5), slice(5, 9)


def color_jitter(images, u, cfg):
  """Brightness, contrast, saturation, hue in a per-example random order, applied with p=0.8,
  strength cfg.color_jitter_strength. Batched form (u [n, 9]).

  At each of the four steps every example runs all four operations, three of them with
  identity parameters (factor 1, delta 0): one vectorised pass per step, which XLA fuses.
  """
  strength = float(cfg.color_jitter_strength)
  b = 0.8 * strength
  factors = u[:, _JITTER_FACTORS]
  brightness = _lerp(factors[:, 0], max(1.0 - b, 0.0), 1.0 + b)
  contrast = _lerp(factors[:, 1], 1.0 - b, 1.0 + b)
  saturation = _lerp(factors[:, 2], 1.0 - b, 1.0 + b)
  hue = _lerp(factors[:, 3], -0.2 * strength, 0.2 * strength)
  # argsort of 4 uniforms is a uniformly random order; 4 marks "jitter not applied".
  order = tf.argsort(u[:, _JITTER_ORDER], axis=1)
  order = tf.where((u[:, _JITTER_APPLY] < JITTER_PROB)[:, None], order, 4)
  x = images
  for step in range(4):
    op = order[:, step]
    x = tf.clip_by_value(x * _per_example(tf.where(op == 0, brightness, 1.0)), 0.0, 1.0)
    mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
    x = tf.clip_by_value((x - mean) * _per_example(tf.where(op == 1, contrast, 1.0)) + mean, 0.0, 1.0)
    # Saturation and hue share one HSV round trip: an example does at most one per step.
    hsv = tf.image.rgb_to_hsv(x)
    h = tf.math.floormod(hsv[..., :1] + _per_example(tf.where(op == 3, hue, 0.0)), 1.0)
    s = tf.clip_by_value(hsv[..., 1:2] * _per_example(tf.where(op == 2, saturation, 1.0)), 0.0, 1.0)
    x = tf.clip_by_value(tf.image.hsv_to_rgb(tf.concat([h, s, hsv[..., 2:]], axis=-1)), 0.0, 1.0)
  return x


def _color_jitter_per_image(image, u, cfg):
  """`color_jitter` of one view (u [9]): tf.image's kernels in the drawn order, skipped by a
  `tf.cond` when not drawn, as the reference does it."""
  strength = float(cfg.color_jitter_strength)
  b = 0.8 * strength

  def jitter(x):
    factors = u[_JITTER_FACTORS]
    ops = [
        lambda x: x * _lerp(factors[0], max(1.0 - b, 0.0), 1.0 + b),
        lambda x: tf.image.adjust_contrast(x, _lerp(factors[1], 1.0 - b, 1.0 + b)),
        lambda x: tf.image.adjust_saturation(x, _lerp(factors[2], 1.0 - b, 1.0 + b)),
        lambda x: tf.image.adjust_hue(x, _lerp(factors[3], -0.2 * strength, 0.2 * strength)),
    ]
    order = tf.argsort(u[_JITTER_ORDER])
    for step in range(4):
      # Default bound per step: the lambdas must not capture the loop's changing `x`.
      x = tf.switch_case(order[step], [lambda op=op, x=x: op(x) for op in ops])
      x = tf.clip_by_value(x, 0.0, 1.0)
    return x

  return tf.cond(u[_JITTER_APPLY] < JITTER_PROB, lambda: jitter(image), lambda: image)


def grayscale(images):
  """tf.image.rgb_to_grayscale's weights, 3 channels kept."""
  gray = tf.reduce_sum(images * tf.constant([0.2989, 0.5870, 0.1140]), axis=-1, keepdims=True)
  return tf.broadcast_to(gray, tf.shape(images))


def random_grayscale(images, u, cfg):  # pylint: disable=unused-argument
  """Grayscale with p=0.2. Batched form (u [n, 1])."""
  chosen = _per_example(tf.cast(u[:, 0] < GRAYSCALE_PROB, images.dtype))
  return images + chosen * (grayscale(images) - images)


def _grayscale_per_image(image, u, cfg):  # pylint: disable=unused-argument
  return tf.cond(u[0] < GRAYSCALE_PROB, lambda: grayscale(image), lambda: image)


def gaussian_blur(images, sigma, kernel_size):
  """Separable Gaussian blur with a per-example sigma ([b]); kernel of 2*(kernel_size//2)+1 taps.

  Written as a sum of shifted copies (XLA fuses it into one loop per direction) rather
  than a convolution: a depthwise convolution needs the batch folded into channels, and its
  rounding then depends on the batch size, which would break replica invariance.
  """
  radius = kernel_size // 2
  if radius == 0:
    return images
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-tf.square(x)[None, :] / (2.0 * tf.square(sigma)[:, None]))
  kernel /= tf.reduce_sum(kernel, axis=1, keepdims=True)
  height, width = images.shape[1], images.shape[2]
  # Zero padding, as a 'SAME' convolution (and the reference) does.
  out = tf.pad(images, [[0, 0], [0, 0], [radius, radius], [0, 0]])
  out = sum(_per_example(kernel[:, t]) * out[:, :, t:t + width] for t in range(2 * radius + 1))
  out = tf.pad(out, [[0, 0], [radius, radius], [0, 0], [0, 0]])
  return sum(_per_example(kernel[:, t]) * out[:, t:t + height] for t in range(2 * radius + 1))


@tf.function(jit_compile=True)
def _blur(images, u):
  """Blur, kernel ~10% of the side, sigma uniform in BLUR_SIGMA_RANGE (u [n])."""
  return gaussian_blur(images, _lerp(u, *BLUR_SIGMA_RANGE), images.shape[1] // 10)


def random_blur(images, u, cfg):  # pylint: disable=unused-argument
  """`_blur` with p=0.5. Batched form (u [n, 2]: whether, sigma)."""
  chosen = _per_example(tf.cast(u[:, 0] < BLUR_PROB, images.dtype))
  return images + chosen * (_blur(images, u[:, 1]) - images)


def _blur_per_image(image, u, cfg):  # pylint: disable=unused-argument
  # Inputs in [0, 1] stay there through jitter (it clips) and grayscale (it averages); only
  # the blur's sums of rounded products need a clip.
  return tf.cond(u[0] < BLUR_PROB,
                 lambda: tf.clip_by_value(_blur(image[None], u[None, 1])[0], 0.0, 1.0),
                 lambda: image)


# ----------------------------------------------------------------------------------------
# Declarations.

@dataclasses.dataclass(frozen=True)
class Augmentation:
  """One augmentation of a training view.

  `draws`: how many uniforms it reads per view; each form gets only its own columns.
  Geometric (`boxes` set): `boxes(boxes, u, height, width, cfg)` maps the views' crop boxes
  ([n, 4], as `crop_and_resize` reads them; the whole image before the first) given u
  [n, draws] and the source sizes ([n] float32). Photometric (`batched` and `per_image`
  set): `batched(images, u, cfg)` on views [n, S, S, 3] in [0, 1] with u [n, draws], run
  inside one XLA-compiled function, the result clipped once at the end; `per_image(image,
  u, cfg)` on one view [S, S, 3] with u [draws], in [0, 1], with the batched form's
  distribution. It runs where `enabled`: in every training stream, or with
  `contrastive_only` in contrastive views only, and while the DataConfig bool `switch` (if
  any) is True; `fields`: the other DataConfig fields its forms read.
  """
  name: str
  draws: int
  boxes: Optional[Callable] = None
  batched: Optional[Callable] = None
  per_image: Optional[Callable] = None
  contrastive_only: bool = False
  switch: Optional[str] = None
  fields: tuple = ()

  @property
  def geometric(self) -> bool:
    return self.boxes is not None

  def enabled(self, cfg: DataConfig, contrastive: bool) -> bool:
    return ((contrastive or not self.contrastive_only)
            and (self.switch is None or getattr(cfg, self.switch)))


# The crop draws its box within the whole image, which is what the boxes before it hold.
CROP = Augmentation(
    "crop", 2 * CROP_ATTEMPTS + 2, fields=("crop_min_area",),
    boxes=lambda boxes, u, height, width, cfg: crop_boxes(u, height, width,
                                                          (cfg.crop_min_area, 1.0)))
FLIP = Augmentation("flip", 1,
                    boxes=lambda boxes, u, height, width, cfg: flip_boxes(boxes, u[:, 0]))
COLOR_JITTER = Augmentation("color_jitter", 9, batched=color_jitter,
                            per_image=_color_jitter_per_image, contrastive_only=True,
                            fields=("color_jitter_strength",))
GRAYSCALE = Augmentation("grayscale", 1, batched=random_grayscale, per_image=_grayscale_per_image,
                         contrastive_only=True)
BLUR = Augmentation("blur", 2, batched=random_blur, per_image=_blur_per_image,
                    contrastive_only=True, switch="use_blur")

# In the order they apply (geometric ones first) and their columns are laid out.
AUGMENTATIONS = (CROP, FLIP, COLOR_JITTER, GRAYSCALE, BLUR)
_ENDS = list(itertools.accumulate(a.draws for a in AUGMENTATIONS))
COLUMNS = {a.name: slice(end - a.draws, end) for a, end in zip(AUGMENTATIONS, _ENDS)}
# Padded to a multiple of 4: Philox yields 4 numbers per counter step, which lets the
# pipeline address position p's numbers by counter offset alone. Declaring more draws than
# the padding holds changes every position's numbers, hence every seed's data stream.
DRAWS_PER_VIEW = (_ENDS[-1] + 3) // 4 * 4
# The DataConfig fields the augmentations read (switches first), e.g. for command lines.
CONFIG_FIELDS = tuple(dict.fromkeys(
    [a.switch for a in AUGMENTATIONS if a.switch] + [f for a in AUGMENTATIONS for f in a.fields]))
# Side from which `photometric_per_image` beats the batched `photometric` (measured on a
# 2-core CPU): on large images the work per pixel dominates, so running only the
# operations a view drew, with TF's fused kernels, wins over fusing all of them.
PER_IMAGE_MIN_SIZE = 96


def active(cfg: DataConfig, contrastive: bool, geometric: bool):
  """The enabled geometric (or photometric) augmentations, in order."""
  return tuple(a for a in AUGMENTATIONS if a.geometric == geometric and a.enabled(cfg, contrastive))


def view_boxes(u, height, width, cfg: DataConfig, *, contrastive: bool):
  """[n, 4] crop boxes of n views (u [n, DRAWS_PER_VIEW]; height, width [n] of their source
  images): the enabled geometric augmentations in order, from the whole image."""
  height, width = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  zero = tf.zeros_like(height)[:, None]
  boxes = pixel_boxes(zero, zero, height[:, None], width[:, None], height[:, None], width[:, None])
  for a in active(cfg, contrastive, geometric=True):
    boxes = a.boxes(boxes, u[:, COLUMNS[a.name]], height, width, cfg)
  return boxes


def photometric(images, u, cfg: DataConfig, *, contrastive: bool):
  """The enabled photometric augmentations of a batch of views ([n, S, S, 3] in [0, 1], u
  [n, DRAWS_PER_VIEW]), clipped to [0, 1]: every one on every view, blended by the draws,
  fused by XLA (1.5-2x faster than op by op on CPU); the fastest form for small images."""
  ops = active(cfg, contrastive, geometric=False)
  if not ops:
    return images
  return tf.clip_by_value(_fused(ops, cfg)(images, u), 0.0, 1.0)


@functools.lru_cache(maxsize=16)
def _fused(ops, cfg):
  """The batched forms of `ops` as one XLA-compiled function, made once per (ops, cfg) for
  every pipeline built with them."""
  @tf.function(jit_compile=True)
  def fused(images, u):
    for a in ops:
      images = a.batched(images, u[:, COLUMNS[a.name]], cfg)
    return images
  return fused


def photometric_per_image(views, u, cfg: DataConfig, *, contrastive: bool):
  """`photometric`'s distribution for one example's views ([V, S, S, 3], u [V,
  DRAWS_PER_VIEW]), one view at a time, running only what each view drew. For the
  per-example stage of an input pipeline."""
  ops = active(cfg, contrastive, geometric=False)

  def one(x, row):
    for a in ops:
      x = a.per_image(x, row[COLUMNS[a.name]], cfg)
    return x

  return tf.stack([one(views[v], u[v]) for v in range(views.shape[0])])
