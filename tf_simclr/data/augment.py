"""SimCLR augmentations driven by pre-drawn uniform random numbers.

Every function takes its randomness as an explicit float tensor `u` of uniforms in [0, 1)
with one row per view, instead of calling a random op. The pipeline draws those rows
statelessly from the example's position in the stream, so an example's augmentation does
not depend on which batch, replica or input pipeline processes it. The colour distortion
comes in two forms with the same distribution: batched (`photometric`, one vectorised pass
per batch, for small images) and per image (`photometric_per_image`, the reference's
`tf.cond`s, for large ones), chosen by image size.

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

import numpy as np
import tensorflow as tf

CROP_AREA_RANGE = (0.08, 1.0)
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
# The first is the reference's and the default.
RESIZE_METHODS = ("bicubic", "bilinear")
JITTER_PROB = 0.8
GRAYSCALE_PROB = 0.2
BLUR_PROB = 0.5
BLUR_SIGMA_RANGE = (0.1, 2.0)

# Columns of one view's row of uniforms.
_CROP = slice(0, 2 * CROP_ATTEMPTS + 2)
_FLIP = 2 * CROP_ATTEMPTS + 2
_JITTER = _FLIP + 1
_ORDER = slice(_JITTER + 1, _JITTER + 5)
_FACTORS = slice(_JITTER + 5, _JITTER + 9)
_GRAY = _JITTER + 9
_BLUR = _JITTER + 10
_SIGMA = _JITTER + 11
# Padded to a multiple of 4: Philox yields 4 numbers per counter step, which lets the
# pipeline address position p's numbers by counter offset alone.
DRAWS_PER_VIEW = (_SIGMA + 1 + 3) // 4 * 4


def _lerp(u, lo, hi):
  return lo + u * (hi - lo)


def check_resize_method(method):
  """Raises a one-line ValueError for an unknown resampling."""
  if method not in RESIZE_METHODS:
    raise ValueError(f"resize_method={method!r} is not one of {RESIZE_METHODS}")


def crop_boxes(u, height, width):
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

  Returns:
    [b, 4] float32 boxes (y1, x1, y2, x2), normalised so that 0 and 1 are the centres of
    the first and last pixel. Crops cover whole pixels, as the reference's do.
  """
  height = tf.cast(height, tf.float32)[:, None]
  width = tf.cast(width, tf.float32)[:, None]
  aspect = _lerp(u[:, 0:2 * CROP_ATTEMPTS:2], *CROP_ASPECT_RANGE)  # width / height
  min_area = CROP_AREA_RANGE[0] * width * height
  max_area = CROP_AREA_RANGE[1] * width * height
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
  return _pixel_boxes(y0, x0, crop_h, crop_w, height, width)


def _pixel_boxes(y0, x0, crop_h, crop_w, height, width):
  """Boxes covering pixels [y0, y0 + crop_h) x [x0, x0 + crop_w) in crop_and_resize units."""
  # crop_and_resize maps 0 and 1 to the first and last pixel centres; shift the box edges
  # by half a pixel inwards so a crop of the whole image at its own size is the identity.
  ny = tf.maximum(height - 1.0, 1.0)
  nx = tf.maximum(width - 1.0, 1.0)
  return tf.concat([y0 / ny, x0 / nx, (y0 + crop_h - 1.0) / ny, (x0 + crop_w - 1.0) / nx], axis=1)


def _box_pixels(boxes, height, width):
  """Inverse of `_pixel_boxes`: [n, 4] first/last pixel indices (y1, x1, y2, x2), float32;
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
    out = _bicubic_crops(tf.gather(images, box_indices), boxes, size)
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


def _bicubic_crops(images, boxes, size):
  """[n, size, size, C] float32 bicubic resamplings of box i of images[i] (pixel values)."""
  shape = tf.shape(images)
  n, height, width, channels = shape[0], shape[1], shape[2], images.shape[-1]
  y1, x1, y2, x2 = tf.unstack(_box_pixels(boxes, height, width), axis=1)
  rows, row_w = _cubic_taps(y1, y2 - y1 + 1.0, size)
  cols, col_w = _cubic_taps(tf.minimum(x1, x2), tf.abs(x2 - x1) + 1.0, size)
  # A mirrored box reads its columns right to left: the flip of the resampled crop.
  flip = (x1 > x2)[:, None]
  cols, col_w = ([tf.where(flip, tf.reverse(t, [1]), t) for t in ts] for ts in (cols, col_w))
  # Rows first, then columns, as TF's kernel sums. Gathers of whole rows of the flattened
  # batch are the fastest; the column pass runs on the transpose.
  first = tf.range(n)[:, None]
  x = tf.reshape(tf.cast(images, tf.float32), [n * height, width * channels])
  x = _sum_taps(x, rows, row_w, first * height)
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


def color_jitter(images, u, strength):
  """Brightness, contrast, saturation, hue in a per-example random order, applied with p=0.8.

  At each of the four steps every example runs all four operations, three of them with
  identity parameters (factor 1, delta 0): one vectorised pass per step, which XLA fuses
  (see `photometric`).
  """
  b = 0.8 * strength
  factors = u[:, _FACTORS]
  brightness = _lerp(factors[:, 0], max(1.0 - b, 0.0), 1.0 + b)
  contrast = _lerp(factors[:, 1], 1.0 - b, 1.0 + b)
  saturation = _lerp(factors[:, 2], 1.0 - b, 1.0 + b)
  hue = _lerp(factors[:, 3], -0.2 * strength, 0.2 * strength)
  # argsort of 4 uniforms is a uniformly random order; 4 marks "jitter not applied".
  order = tf.argsort(u[:, _ORDER], axis=1)
  order = tf.where((u[:, _JITTER] < JITTER_PROB)[:, None], order, 4)
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


def grayscale(images):
  """tf.image.rgb_to_grayscale's weights, 3 channels kept."""
  gray = tf.reduce_sum(images * tf.constant([0.2989, 0.5870, 0.1140]), axis=-1, keepdims=True)
  return tf.broadcast_to(gray, tf.shape(images))


def random_grayscale(images, u):
  """Grayscale with p=0.2."""
  chosen = _per_example(tf.cast(u[:, _GRAY] < GRAYSCALE_PROB, images.dtype))
  return images + chosen * (grayscale(images) - images)


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
  """Blur, kernel ~10% of the side, sigma uniform in [0.1, 2.0]."""
  return gaussian_blur(images, _lerp(u[:, _SIGMA], *BLUR_SIGMA_RANGE), images.shape[1] // 10)


@tf.function(jit_compile=True)
def random_blur(images, u):
  """`_blur` with p=0.5."""
  chosen = _per_example(tf.cast(u[:, _BLUR] < BLUR_PROB, images.dtype))
  return images + chosen * (_blur(images, u) - images)


@tf.function(jit_compile=True)
def _jitter_and_grayscale(images, u, strength):
  # XLA fuses the ~40 elementwise ops into a few loops: 1.5-2x faster than op-by-op on CPU.
  return random_grayscale(color_jitter(images, u, strength), u)


def photometric(images, u, *, color_jitter_strength, use_blur):
  """The pretraining colour distortion (jitter, grayscale) and optional blur of a batch of
  views ([b, S, S, 3], u [b, K]), clipped to [0, 1]: every operation on every view, then
  blended by the draws, fused by XLA; the fastest form for small images."""
  x = _jitter_and_grayscale(images, u, float(color_jitter_strength))
  if use_blur:
    x = random_blur(x, u)
  return tf.clip_by_value(x, 0.0, 1.0)


# Side from which `photometric_per_image` beats the batched `photometric` (measured on a
# 2-core CPU): on large images the work per pixel dominates, so running only the
# operations a view drew, with TF's fused kernels, wins over fusing all of them.
PER_IMAGE_MIN_SIZE = 96


def photometric_per_image(views, u, *, color_jitter_strength, use_blur):
  """`photometric`'s distribution for one example's views ([V, S, S, 3], u [V, K]), one image
  at a time, as the reference does it: tf.image's kernels in the drawn order, and a
  `tf.cond` skips what was not drawn. For the per-example stage of an input pipeline."""
  strength = float(color_jitter_strength)
  b = 0.8 * strength

  def jitter(x, row):
    factors = row[_FACTORS]
    ops = [
        lambda x: x * _lerp(factors[0], max(1.0 - b, 0.0), 1.0 + b),
        lambda x: tf.image.adjust_contrast(x, _lerp(factors[1], 1.0 - b, 1.0 + b)),
        lambda x: tf.image.adjust_saturation(x, _lerp(factors[2], 1.0 - b, 1.0 + b)),
        lambda x: tf.image.adjust_hue(x, _lerp(factors[3], -0.2 * strength, 0.2 * strength)),
    ]
    order = tf.argsort(row[_ORDER])
    for step in range(4):
      # Default bound per step: the lambdas must not capture the loop's changing `x`.
      x = tf.switch_case(order[step], [lambda op=op, x=x: op(x) for op in ops])
      x = tf.clip_by_value(x, 0.0, 1.0)
    return x

  def one(x, row):
    # Inputs in [0, 1] stay there: jitter clips, grayscale averages; only the blur's sums of
    # rounded products need a clip.
    x = tf.cond(row[_JITTER] < JITTER_PROB, lambda: jitter(x, row), lambda: x)
    x = tf.cond(row[_GRAY] < GRAYSCALE_PROB, lambda: grayscale(x), lambda: x)
    if use_blur:
      x = tf.cond(row[_BLUR] < BLUR_PROB,
                  lambda: tf.clip_by_value(_blur(x[None], row[None])[0], 0.0, 1.0), lambda: x)
    return x

  return tf.stack([one(views[v], u[v]) for v in range(views.shape[0])])


def geometric_boxes(u, height, width):
  """Random crop + horizontal flip (p=0.5) boxes for one view."""
  return flip_boxes(crop_boxes(u[:, _CROP], height, width), u[:, _FLIP])
