"""Statistics of the batched augmentations (not pixel-exact outputs)."""

import numpy as np
import pytest
import tensorflow as tf

from tf_simclr.data import augment

K = augment.DRAWS_PER_VIEW


def uniforms(n, seed=0):
  return tf.random.stateless_uniform([n, K], seed=[seed, 1])


def colourful(n, size=16, seed=0):
  return tf.random.stateless_uniform([n, size, size, 3], seed=[seed, 2])


def crop_geometry(boxes, h, w):
  y1, x1, y2, x2 = np.moveaxis(boxes.numpy(), 1, 0)
  crop_h = (y2 - y1) * (h - 1) + 1
  crop_w = np.abs(x2 - x1) * (w - 1) + 1
  return crop_h, crop_w


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


def test_flip_rate_is_half():
  n = 20000
  boxes = augment.geometric_boxes(uniforms(n, 3), tf.fill([n], 32.0), tf.fill([n], 32.0)).numpy()
  assert abs((boxes[:, 1] > boxes[:, 3]).mean() - 0.5) < 0.02


def test_crop_and_resize_identity_and_flip():
  image = tf.reshape(tf.range(8 * 8 * 3, dtype=tf.float32) / 192.0, [1, 8, 8, 3])
  whole = augment._pixel_boxes(tf.zeros([1, 1]), tf.zeros([1, 1]), tf.fill([1, 1], 8.0),
                               tf.fill([1, 1], 8.0), tf.fill([1, 1], 8.0), tf.fill([1, 1], 8.0))
  np.testing.assert_allclose(augment.crop_and_resize(image, whole, 8), image, atol=1e-6)
  flipped = augment.flip_boxes(whole, tf.zeros([1]))
  np.testing.assert_allclose(augment.crop_and_resize(image, flipped, 8), image[:, :, ::-1], atol=1e-6)
  gray = tf.cast(tf.fill([1, 8, 8, 1], 255), tf.uint8)
  out = augment.crop_and_resize(gray, whole, 16)
  assert out.shape == (1, 16, 16, 3) and np.allclose(out, 1.0)


@pytest.mark.parametrize("dtype,h,w,size", [(tf.uint8, 40, 30, 24), (tf.float32, 12, 20, 32)])
def test_per_image_crops_equal_crop_and_resize(dtype, h, w, size):
  n = 64
  image = tf.random.stateless_uniform([h, w, 3], [3, 3])
  image = tf.cast(image * 255.0, dtype) if dtype == tf.uint8 else image
  boxes = tf.concat([augment.geometric_boxes(uniforms(n, 17), tf.fill([n], float(h)), tf.fill([n], float(w))),
                     augment.center_crop_boxes(tf.constant([float(h)]), tf.constant([float(w)]))], 0)
  batched = augment.crop_and_resize(image[None], boxes, size, tf.zeros([n + 1], tf.int32))
  per_image = augment.crop_and_resize_views(image, boxes, size)
  np.testing.assert_allclose(per_image, batched, atol=1e-5)


def test_center_crop_keeps_0875_of_the_short_side():
  boxes = augment.center_crop_boxes(tf.constant([256.0]), tf.constant([320.0]))
  crop_h, crop_w = crop_geometry(boxes, 256, 320)
  np.testing.assert_allclose([crop_h[0], crop_w[0]], [224, 224], atol=1e-3)


def test_grayscale_rate_and_value_range():
  n = 4000
  x = augment.photometric(colourful(n, 8), uniforms(n, 5), color_jitter_strength=1.0,
                          use_blur=True).numpy()
  assert x.min() >= 0.0 and x.max() <= 1.0
  gray = np.all(np.isclose(x[..., 0], x[..., 1], atol=1e-5) & np.isclose(x[..., 1], x[..., 2], atol=1e-5),
                axis=(1, 2))
  assert abs(gray.mean() - augment.GRAYSCALE_PROB) < 0.025


def test_jitter_zero_strength_is_identity():
  x = colourful(64)
  u = uniforms(64, 7)
  u = tf.concat([u[:, :augment._GRAY], tf.ones_like(u[:, augment._GRAY:])], axis=1)  # no gray, no blur
  out = augment.photometric(x, u, color_jitter_strength=0.0, use_blur=True)
  np.testing.assert_allclose(out, x, atol=2e-5)


def test_jitter_applied_with_probability_08():
  n = 2000
  x = colourful(n, 8)
  out = augment.color_jitter(x, uniforms(n, 9), 1.0)
  changed = np.abs((out - x).numpy()).max(axis=(1, 2, 3)) > 1e-4
  assert abs(changed.mean() - augment.JITTER_PROB) < 0.03


def test_batched_photometric_matches_per_image():
  # The fused batched version must follow tf.image's (the reference's) per-image semantics,
  # which the per-image version (large images) runs, with the same draws.
  x = colourful(48, 24, seed=4)
  u = uniforms(48, 11)
  batched = augment.photometric(x, u, color_jitter_strength=1.0, use_blur=True)
  per_image = tf.concat([augment.photometric_per_image(x[i:i + 2], u[i:i + 2], color_jitter_strength=1.0,
                                                       use_blur=True) for i in range(0, 48, 2)], 0)
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
  out = augment.random_blur(x, uniforms(n, 13)).numpy()
  blurred = np.abs(out - x.numpy()).max(axis=(1, 2, 3)) > 1e-3
  assert abs(blurred.mean() - augment.BLUR_PROB) < 0.08
