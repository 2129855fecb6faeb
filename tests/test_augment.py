"""Augmentations: the declarations and their two forms, crop sampler against TF's, resampling
against independent computations, statistics of the colour distortion."""

import numpy as np
import pytest
import tensorflow as tf

from tf_simclr.config import DataConfig
from tf_simclr.data import augment

K = augment.DRAWS_PER_VIEW
CFG = DataConfig(color_jitter_strength=1.0, use_blur=True)


def uniforms(n, seed=0):
  return tf.random.stateless_uniform([n, K], seed=[seed, 1])


def colourful(n, size=16, seed=0):
  return tf.random.stateless_uniform([n, size, size, 3], seed=[seed, 2])


def crop_geometry(boxes, h, w):
  y1, x1, y2, x2 = np.moveaxis(boxes.numpy(), 1, 0)
  crop_h = (y2 - y1) * (h - 1) + 1
  crop_w = np.abs(x2 - x1) * (w - 1) + 1
  return crop_h, crop_w


def crop_windows(boxes, h, w):
  """[n, 5] int (y0, x0, crop_h, crop_w, flipped) of boxes on whole pixels."""
  y1, x1, y2, x2 = np.moveaxis(np.round(boxes.numpy() * [h - 1, w - 1, h - 1, w - 1]), 1, 0)
  windows = [y1, np.minimum(x1, x2), y2 - y1 + 1, np.abs(x2 - x1) + 1, x1 > x2]
  return np.stack(windows, 1).astype(int)


def keys_matrix(n, size, a=-0.5):
  """[size, n] bicubic resampling of n pixels to `size` on pixel centres, from Keys' kernel
  (exact weights; taps outside the n pixels dropped and the rest renormalised)."""
  def kernel(d):
    d = np.abs(d)
    return np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                    np.where(d < 2, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a, 0.0))
  loc = (np.arange(size) + 0.5) * n / size - 0.5
  m = kernel(loc[:, None] - np.arange(n)[None, :])
  return m / m.sum(axis=1, keepdims=True)


def keys_resize(crop, size):
  """Bicubic resampling of one crop [h, w, C] (float64) to [size, size, C] with numpy."""
  return np.einsum("ih,hwc,jw->ijc", keys_matrix(crop.shape[0], size), crop,
                   keys_matrix(crop.shape[1], size))


def ks_statistic(a, b):
  """Two-sample Kolmogorov-Smirnov statistic: the largest gap between empirical CDFs."""
  a, b = np.sort(a), np.sort(b)
  x = np.concatenate([a, b])
  cdf = lambda sample: np.searchsorted(sample, x, "right") / len(sample)
  return np.abs(cdf(a) - cdf(b)).max()


def test_columns_are_laid_out_from_the_declarations():
  # Consecutive columns in declaration order (today's: crop 0-21, flip 22, jitter 23-31,
  # grayscale 32, blur 33-34), padded to Philox's 4 numbers.
  assert [a.name for a in augment.AUGMENTATIONS] == ["crop", "flip", "color_jitter", "grayscale",
                                                      "blur"]
  start = 0
  for a in augment.AUGMENTATIONS:
    assert augment.COLUMNS[a.name] == slice(start, start + a.draws)
    start += a.draws
  assert augment.DRAWS_PER_VIEW == 36 and start <= 36
  assert set(augment.CONFIG_FIELDS) <= set(DataConfig.__dataclass_fields__)


def test_which_augmentations_run():
  names = lambda cfg, contrastive, geometric: [
      a.name for a in augment.active(cfg, contrastive, geometric=geometric)]
  for contrastive in (False, True):
    assert names(CFG, contrastive, True) == ["crop", "flip"]
  assert names(CFG, False, False) == []
  assert names(CFG, True, False) == ["color_jitter", "grayscale", "blur"]
  assert names(DataConfig(use_blur=False), True, False) == ["color_jitter", "grayscale"]
  x = colourful(4)
  assert augment.photometric(x, uniforms(4), CFG, contrastive=False) is x


@pytest.mark.parametrize("op", augment.AUGMENTATIONS, ids=lambda a: a.name)
def test_per_image_form_matches_batched_form(op):
  """Every declared augmentation alone, per image and batched, on the same draws.

  Geometric ones have one form (boxes); their views are resampled per image (a slice and a
  resize) and per batch (`crop_and_resize`). Photometric ones: `per_image` on each view
  against `batched` on all of them, clipped as `photometric` clips (HSV conversions differ
  in rounding: 2e-3)."""
  n = 48
  u = uniforms(n, 23)[:, augment.COLUMNS[op.name]]
  assert u.shape == (n, op.draws)
  if op.geometric:
    h, w, size = 40, 30, 24
    image = tf.cast(tf.random.stateless_uniform([h, w, 3], [9, 9]) * 255.0, tf.uint8)
    boxes = op.boxes(tf.tile(whole_box(h, w), [n, 1]), u, tf.fill([n], float(h)),
                     tf.fill([n], float(w)), CFG)
    per_image = augment.crop_and_resize_views(image, boxes, size)
    batched = augment.crop_and_resize(image[None], boxes, size, tf.zeros([n], tf.int32))
    whole = augment.crop_and_resize_views(image, whole_box(h, w), size)
    atol = 1e-5
  else:
    views = colourful(n, 24, seed=6)
    per_image = tf.stack([op.per_image(views[i], u[i], CFG) for i in range(n)])
    batched = tf.clip_by_value(op.batched(views, u, CFG), 0.0, 1.0)
    whole = views
    atol = 2e-3
  np.testing.assert_allclose(per_image, batched, atol=atol)
  # Not vacuous: some views changed, each by its own draws.
  changed = np.abs(np.asarray(per_image) - np.asarray(whole)).max(axis=(1, 2, 3)) > 1e-3
  assert 0 < changed.sum()


# A 60x30 image holds at most a 30x40 crop of aspect >= 3/4: 67% of its area.
@pytest.mark.parametrize("h,w,large", [(32, 32, 0.8), (60, 30, 0.45)])
def test_crop_area_and_aspect_ranges(h, w, large):
  n = 20000
  boxes = augment.crop_boxes(uniforms(n), tf.fill([n], float(h)), tf.fill([n], float(w)))
  b = boxes.numpy()
  assert b.min() >= -1e-6 and b.max() <= 1 + 1e-6
  crop_h, crop_w = crop_geometry(boxes, h, w)
  # Whole pixels: offsets and sizes are integers.
  for x in (crop_h, crop_w, b[:, 0] * (h - 1), np.minimum(b[:, 1], b[:, 3]) * (w - 1)):
    np.testing.assert_allclose(x, np.round(x), atol=1e-3)
  area = crop_h * crop_w / (h * w)
  aspect = crop_w / crop_h
  whole = np.isclose(area, 1.0)
  assert area.min() >= augment.CROP_MIN_COVERED - 1e-4 and area.max() <= 1 + 1e-4
  # The width is rounded to whole pixels: the aspect ratio is off by at most half a pixel.
  slack = 0.5 / crop_h[~whole] + 1e-4
  assert np.all((aspect[~whole] >= 0.75 - slack) & (aspect[~whole] <= 4 / 3 + slack))
  # The whole range is used: small and large crops both occur.
  assert (area < 0.15).mean() > 0.01 and (area > large).mean() > 0.05
  # Offsets in [0, H - h) as sample_distorted_bounding_box's (0 when h == H).
  y0, x0, crop_h, crop_w, _ = crop_windows(boxes, h, w).T
  assert np.all((y0 + crop_h < h) | ((y0 == 0) & (crop_h == h)))
  assert np.all((x0 + crop_w < w) | ((x0 == 0) & (crop_w == w)))


def tf_crops(h, w, n):
  """[n, 4] (y0, x0, crop_h, crop_w) from tf.image.sample_distorted_bounding_box with the
  reference's arguments (data_util.crop_and_resize: 100 attempts)."""
  @tf.function
  def draw(seeds):
    def one(seed):
      begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
          [h, w, 3], tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed, min_object_covered=0.1,
          aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=100,
          use_image_if_no_bounding_boxes=True)
      return tf.concat([begin[:2], size[:2]], 0)
    return tf.map_fn(one, seeds, fn_output_signature=tf.int32)
  return draw(tf.stack([tf.range(n), tf.fill([n], 5)], 1)).numpy()


# Small images, where the offsets' range matters most, and an image twice as tall as wide.
@pytest.mark.parametrize("h,w", [(10, 10), (32, 32), (60, 30)])
def test_crop_distribution_matches_sample_distorted_bounding_box(h, w):
  n = 5000
  boxes = augment.crop_boxes(uniforms(n, 21), tf.fill([n], float(h)), tf.fill([n], float(w)))
  ours = crop_windows(boxes, h, w)[:, :4]
  theirs = tf_crops(h, w, n)
  for name, f in [("area", lambda c: c[:, 2] * c[:, 3]), ("aspect", lambda c: c[:, 3] / c[:, 2]),
                  ("y0", lambda c: c[:, 0]), ("x0", lambda c: c[:, 1])]:
    # Two-sample KS at level 1e-3 / 12 (12 comparisons in this test), for n = m = 5000:
    # c(alpha) * sqrt(2 / n) with c = sqrt(-ln(alpha / 2) / 2) = 2.25, i.e. 0.045 (discrete
    # samples make the test conservative). The former offsets, one position too far, gave
    # 0.13-0.14 at 10x10 and 0.08 for x0 at 60x30.
    assert ks_statistic(f(ours), f(theirs)) < 2.25 * np.sqrt(2 / n), name


def test_crop_min_area():
  n, h, w = 5000, 32, 32
  u = uniforms(n, 4)[:, augment.COLUMNS["crop"]]
  height, width = tf.fill([n], float(h)), tf.fill([n], float(w))
  # The DataConfig default is the reference's range.
  np.testing.assert_array_equal(augment.crop_boxes(u, height, width),
                                augment.crop_boxes(u, height, width, (0.08, 1.0)))
  cfg = DataConfig(crop_min_area=0.5)
  boxes = augment.view_boxes(uniforms(n, 4), height, width, cfg, contrastive=False)
  crop_h, crop_w = crop_geometry(boxes, h, w)
  area = crop_h * crop_w / (h * w)
  # Attempts outside the range are rejected (the whole image is the fallback); the range's
  # low end is used.
  assert area.min() >= 0.5 - 1e-6 and (area < 0.6).mean() > 0.02


def test_flip_rate_is_half():
  n = 20000
  boxes = augment.view_boxes(uniforms(n, 3), tf.fill([n], 32.0), tf.fill([n], 32.0), CFG,
                             contrastive=False).numpy()
  assert abs((boxes[:, 1] > boxes[:, 3]).mean() - 0.5) < 0.02


def whole_box(h, w):
  one = lambda v: tf.fill([1, 1], float(v))
  return augment.pixel_boxes(one(0), one(0), one(h), one(w), one(h), one(w))


def image_and_boxes(dtype, h, w, n=64):
  """A random [h, w, 3] image, n random crop + flip boxes and the whole image's box."""
  image = tf.random.stateless_uniform([h, w, 3], [3, 3])
  image = tf.cast(image * 255.0, dtype) if dtype == tf.uint8 else image
  boxes = augment.view_boxes(uniforms(n, 17), tf.fill([n], float(h)), tf.fill([n], float(w)), CFG,
                             contrastive=False)
  return image, tf.concat([boxes, whole_box(h, w)], 0)


@pytest.mark.parametrize("method", augment.RESIZE_METHODS)
def test_crop_and_resize_identity_and_flip(method):
  image = tf.reshape(tf.range(8 * 8 * 3, dtype=tf.float32) / 192.0, [1, 8, 8, 3])
  whole = whole_box(8, 8)
  np.testing.assert_allclose(augment.crop_and_resize(image, whole, 8, method=method), image,
                             atol=1e-6)
  flipped = augment.flip_boxes(whole, tf.zeros([1]))
  np.testing.assert_allclose(augment.crop_and_resize(image, flipped, 8, method=method),
                             image[:, :, ::-1], atol=1e-6)
  gray = tf.cast(tf.fill([1, 8, 8, 1], 255), tf.uint8)
  out = augment.crop_and_resize(gray, whole, 16, method=method)
  assert out.shape == (1, 16, 16, 3) and np.allclose(out, 1.0)


@pytest.mark.parametrize("dtype,h,w,size", [(tf.uint8, 40, 30, 24), (tf.float32, 12, 20, 32)])
def test_bicubic_crops_resample_the_sliced_crop(dtype, h, w, size):
  # Both implementations (batched, per image) against the crop cut out with numpy and
  # resampled by tf.image.resize BICUBIC, flipped, scaled and clipped as the reference does.
  image, boxes = image_and_boxes(dtype, h, w)
  pixels = image.numpy().astype(np.float32) / (255.0 if dtype == tf.uint8 else 1.0)
  expected, exact = [], []
  for y0, x0, ch, cw, flipped in crop_windows(boxes, h, w):
    crop = pixels[y0:y0 + ch, x0:x0 + cw]
    view = tf.image.resize(crop, [size, size], method="bicubic").numpy()
    expected.append(np.clip(view[:, ::-1] if flipped else view, 0, 1))
    view = keys_resize(crop.astype(np.float64), size)
    exact.append(np.clip(view[:, ::-1] if flipped else view, 0, 1))
  batched = augment.crop_and_resize(image[None], boxes, size, tf.zeros([len(boxes)], tf.int32))
  per_image = augment.crop_and_resize_views(image, boxes, size)
  np.testing.assert_allclose(batched, expected, atol=1e-5)
  np.testing.assert_allclose(per_image, expected, atol=1e-5)
  # Pixel centres and Keys' kernel (a = -0.5) from first principles. TF reads the weights
  # from a table of 1024 steps per pixel: each weight is off by up to |K'| / 2048 < 1e-3.
  np.testing.assert_allclose(batched, exact, atol=3e-3)
  assert np.abs(np.array(batched) - np.array(exact)).mean() < 5e-4


@pytest.mark.parametrize("dtype,h,w,size", [(tf.uint8, 40, 30, 24), (tf.float32, 12, 20, 32)])
def test_bilinear_crops_resample_the_sliced_crop(dtype, h, w, size):
  # The bilinear option: the crop cut out with numpy, resized with aligned corners.
  image, boxes = image_and_boxes(dtype, h, w)
  pixels = image.numpy().astype(np.float32) / (255.0 if dtype == tf.uint8 else 1.0)
  expected = []
  for y0, x0, ch, cw, flipped in crop_windows(boxes, h, w):
    view = tf.raw_ops.ResizeBilinear(images=pixels[None, y0:y0 + ch, x0:x0 + cw],
                                     size=[size, size], align_corners=True)[0].numpy()
    expected.append(view[:, ::-1] if flipped else view)
  np.testing.assert_allclose(augment.crop_and_resize_views(image, boxes, size, method="bilinear"),
                             expected, atol=1e-6)
  # The batched path keeps boxes 2^-20 of the image inside the border (sampling points move
  # by at most 39 * 2^-20 < 4e-5 pixels) and crop_and_resize rounds differently (~1e-5);
  # a sampling point rounded outside the image would be 0, far off.
  batched = augment.crop_and_resize(image[None], boxes, size, tf.zeros([len(boxes)], tf.int32),
                                    method="bilinear")
  np.testing.assert_allclose(batched, expected, atol=1e-4)


def test_eval_view_is_the_centre_crop():
  # 256x320 at 224: the crop keeps 0.875 * 256 = 224 rows, offsets (256-224+1)//2 = 16 and
  # (320-224+1)//2 = 48, and needs no resampling: the view is those pixels.
  image = tf.cast(tf.random.stateless_uniform([256, 320, 3], [4, 4]) * 256.0, tf.uint8)
  expected = image.numpy()[16:240, 48:272] / 255.0
  for method in augment.RESIZE_METHODS:
    out = augment.preprocess_for_eval(image, 224, resize_method=method)
    assert out.dtype == tf.float32 and out.shape == (224, 224, 3)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_preprocess_for_eval_resamples_bicubically_by_default():
  # Float input, 50x40 at 36: a 35x35 centre crop from row 8, column 3, upsampled.
  image = tf.random.stateless_uniform([50, 40, 3], [5, 5])
  crop = image.numpy()[8:43, 3:38]
  out = augment.preprocess_for_eval(image, 36)
  resized = tf.image.resize(crop, [36, 36], method="bicubic")
  np.testing.assert_allclose(out, np.clip(resized, 0, 1), atol=1e-6)
  unclipped = keys_resize(crop.astype(np.float64), 36)
  np.testing.assert_allclose(out, np.clip(unclipped, 0, 1), atol=3e-3)
  # Bicubic overshoots at sharp edges (here, of random pixels): the view is clipped.
  assert unclipped.min() < -0.01 and unclipped.max() > 1.01
  assert out.numpy().min() == 0.0 and out.numpy().max() == 1.0
  bilinear = augment.preprocess_for_eval(image, 36, resize_method="bilinear")
  expected = tf.raw_ops.ResizeBilinear(images=crop[None], size=[36, 36], align_corners=True)[0]
  np.testing.assert_allclose(bilinear, expected, atol=1e-6)


def test_small_eval_images_are_not_cropped():
  # Below EVAL_CROP_MIN_SIZE the whole image is resampled (the reference's CIFAR setting);
  # at its own size that is the identity. uint8 input, one channel made RGB.
  image = tf.cast(tf.random.stateless_uniform([28, 28, 1], [6, 6]) * 256.0, tf.uint8)
  pixels = np.repeat(image.numpy() / 255.0, 3, axis=-1)
  np.testing.assert_allclose(augment.preprocess_for_eval(image, 28), pixels, atol=1e-6)
  np.testing.assert_allclose(augment.preprocess_for_eval(image, 32),
                             np.clip(keys_resize(pixels, 32), 0, 1), atol=3e-3)
  message = r"resize_method='area' is not one of \('bicubic', 'bilinear'\)"
  with pytest.raises(ValueError, match=message):
    augment.preprocess_for_eval(image, 28, resize_method="area")


def test_grayscale_rate_and_value_range():
  n = 4000
  x = augment.photometric(colourful(n, 8), uniforms(n, 5), CFG, contrastive=True).numpy()
  assert x.min() >= 0.0 and x.max() <= 1.0
  gray = np.all(np.isclose(x[..., 0], x[..., 1], atol=1e-5) & np.isclose(x[..., 1], x[..., 2], atol=1e-5),
                axis=(1, 2))
  assert abs(gray.mean() - augment.GRAYSCALE_PROB) < 0.025


def test_jitter_zero_strength_is_identity():
  x = colourful(64)
  u = uniforms(64, 7)
  gray = augment.COLUMNS["grayscale"].start  # the columns from grayscale's on: no gray, no blur
  u = tf.concat([u[:, :gray], tf.ones_like(u[:, gray:])], axis=1)
  out = augment.photometric(x, u, DataConfig(color_jitter_strength=0.0), contrastive=True)
  np.testing.assert_allclose(out, x, atol=2e-5)


def test_jitter_applied_with_probability_08():
  n = 2000
  x = colourful(n, 8)
  out = augment.color_jitter(x, uniforms(n, 9)[:, augment.COLUMNS["color_jitter"]], CFG)
  changed = np.abs((out - x).numpy()).max(axis=(1, 2, 3)) > 1e-4
  assert abs(changed.mean() - augment.JITTER_PROB) < 0.03


def test_batched_photometric_matches_per_image():
  # The fused batched version must follow tf.image's (the reference's) per-image semantics,
  # which the per-image version (large images) runs, with the same draws.
  x = colourful(48, 24, seed=4)
  u = uniforms(48, 11)
  batched = augment.photometric(x, u, CFG, contrastive=True)
  per_image = tf.concat([augment.photometric_per_image(x[i:i + 2], u[i:i + 2], CFG,
                                                       contrastive=True)
                         for i in range(0, 48, 2)], 0)
  np.testing.assert_allclose(batched, per_image, atol=2e-3)


def test_blur_preserves_constants_and_smooths():
  x = tf.concat([tf.fill([1, 40, 40, 3], 0.5),
                 tf.cast(tf.random.stateless_uniform([1, 40, 40, 3], [1, 1]) > 0.5, tf.float32)], 0)
  out = augment.gaussian_blur(x, tf.constant([1.5, 1.5]), 4).numpy()
  np.testing.assert_allclose(out[0, 5:-5, 5:-5], 0.5, atol=1e-5)
  assert out[1].std() < 0.7 * x[1].numpy().std()
  # Kernel ~10% of the side: images under 20 pixels have a one-tap kernel.
  small = colourful(2, 12)
  np.testing.assert_allclose(augment.gaussian_blur(small, tf.constant([2.0, 2.0]), 1), small)


def test_blur_rate_is_half():
  n = 400
  x = tf.cast(tf.random.stateless_uniform([n, 20, 20, 3], [2, 2]) > 0.5, tf.float32)
  out = augment.random_blur(x, uniforms(n, 13)[:, augment.COLUMNS["blur"]], CFG).numpy()
  blurred = np.abs(out - x.numpy()).max(axis=(1, 2, 3)) > 1e-3
  assert abs(blurred.mean() - augment.BLUR_PROB) < 0.08
