"""The ResNet trunk of SimCLRv2: post-activation ResNets with selective kernels and SE.

Layer structure, initialisers and padding follow the reference implementation
(google-research/simclr, tf2/resnet.py) so that parameter counts match it exactly and its
published weights map one to one onto ours (see `tf_simclr/convert.py`).

Sublayers are plain attributes (never Python lists): Keras 3 does not make list members
checkpoint dependencies, which would silently drop BN moving statistics from checkpoints.
"""

import keras
import tensorflow as tf
from keras import layers, ops

from tf_simclr.config import ModelConfig
from tf_simclr.models import recompute

BATCH_NORM_EPSILON = 1e-5

# depth -> (block type, blocks per group). Depth 10 is not in the paper: it is a small
# trunk for CPU-sized experiments (one basic block per group).
BLOCKS = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}

# Outputs of the trunk, in network order (the export contract relies on these names).
TRUNK_OUTPUTS = ("initial_conv", "initial_max_pool", "block_group1", "block_group2",
                 "block_group3", "block_group4", "final_avg_pool")


def scaled_width(channels, width_multiplier):
  """Channels of a layer at a width multiplier; integer multipliers give the paper's widths."""
  return max(1, int(channels * width_multiplier))


class BatchNorm(layers.BatchNormalization):
  """Keras BN computed with TF's fused kernel where it can be.

  Keras 3's BN on the TF backend normalises with separate element-wise ops and, under
  mixed_bfloat16, round-trips every activation through float32: a profiled ResNet-50 step
  spent about half its time there (docs/PERFORMANCE.md). The fused kernel takes bfloat16
  activations with float32 statistics directly. Same variables and values as Keras' BN.

  Synchronized BN over several replicas, and dtypes the kernel lacks (float64 checks),
  compute two-pass moments (the mean, then the mean of squared deviations): Keras' one-pass
  E[x^2] - E[x]^2 loses digits when |mean| >> std (23% of the output at mean/std = 1000,
  tests/test_model.py).

  `update_when_frozen`: a non-trainable (frozen) BN still uses batch statistics in training
  and updates its moving ones, as Keras 2 BN did under the reference's tf2 code.
  """

  def __init__(self, update_when_frozen=False, **kwargs):
    super().__init__(**kwargs)
    self.update_when_frozen = update_when_frozen

  def get_config(self):
    return {**super().get_config(), "update_when_frozen": self.update_when_frozen}

  def call(self, inputs, training=None, mask=None):
    x = inputs
    if len(inputs.shape) == 2:
      x = tf.reshape(x, [-1, 1, 1, inputs.shape[-1]])
    ones = tf.ones_like(self.moving_mean)
    gamma = tf.convert_to_tensor(self.gamma) if self.scale else ones
    beta = tf.convert_to_tensor(self.beta) if self.center else tf.zeros_like(ones)
    fused = inputs.dtype in (tf.float16, tf.bfloat16, tf.float32)
    if training and (self.trainable or self.update_when_frozen):
      ctx = tf.distribute.get_replica_context()
      if self.synchronized and ctx is not None and ctx.num_replicas_in_sync > 1:
        y, mean, variance = self._two_pass(x, gamma, beta, ctx)
      elif not fused:
        y, mean, variance = self._two_pass(x, gamma, beta, None)
      else:
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, gamma, beta, epsilon=self.epsilon, is_training=True)
        # The kernel returns the unbiased variance; Keras' moving variance uses the biased one.
        n = tf.cast(tf.size(x) // x.shape[-1], tf.float32)
        variance = variance * (n - 1) / n
      # A block recomputed in the backward pass updated the statistics in its first forward.
      if not recompute.is_recomputing():
        self.moving_mean.assign(
            self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
    elif fused:
      y, _, _ = tf.compat.v1.nn.fused_batch_norm(
          x, gamma, beta, mean=self.moving_mean, variance=self.moving_variance,
          epsilon=self.epsilon, is_training=False)
    else:
      y = self._normalize(x, self.moving_mean, self.moving_variance, gamma, beta)
    if len(inputs.shape) == 2:
      y = tf.reshape(y, tf.shape(inputs))
    return tf.cast(y, self.compute_dtype)

  def _two_pass(self, x, gamma, beta, ctx):
    """Training-mode BN with two-pass moments over this batch, or all replicas' with ctx."""
    x = tf.cast(x, self.moving_mean.dtype)  # float32 statistics under mixed precision
    total = (lambda t: ctx.all_reduce("SUM", t)) if ctx is not None else (lambda t: t)
    axes = [0, 1, 2]
    count = total(tf.cast(tf.size(x) // x.shape[-1], x.dtype))
    mean = total(tf.reduce_sum(x, axes)) / count
    variance = total(tf.reduce_sum(tf.square(x - mean), axes)) / count
    return self._normalize(x, mean, variance, gamma, beta), mean, variance

  def _normalize(self, x, mean, variance, gamma, beta):
    return (x - mean) * (gamma * tf.math.rsqrt(variance + self.epsilon)) + beta


def batch_norm(cfg: ModelConfig, name, init_zero=False, center=True):
  return BatchNorm(
      momentum=cfg.batch_norm_decay, epsilon=BATCH_NORM_EPSILON, center=center,
      gamma_initializer="zeros" if init_zero else "ones",
      synchronized=cfg.global_bn, update_when_frozen=cfg.frozen_bn_updates, name=name)


class Conv2dFixedPadding(layers.Layer):
  """Convolution whose padding does not depend on the input size (pad, then VALID) when strided."""

  def __init__(self, filters, kernel_size, strides, **kwargs):
    super().__init__(**kwargs)
    self.pad = None
    if strides > 1:
      begin = (kernel_size - 1) // 2
      end = kernel_size - 1 - begin
      self.pad = layers.ZeroPadding2D(((begin, end), (begin, end)), name="pad")
    self.conv = layers.Conv2D(
        filters, kernel_size, strides=strides, padding="same" if strides == 1 else "valid",
        use_bias=False, kernel_initializer=keras.initializers.VarianceScaling(), name="conv")

  def call(self, inputs):
    if self.pad is not None:
      inputs = self.pad(inputs)
    return self.conv(inputs)


class ConvBatchNorm(layers.Layer):
  """Conv2dFixedPadding -> BN -> optional ReLU, the unit every block is made of."""

  def __init__(self, cfg, filters, kernel_size, strides, relu=True, init_zero=False, **kwargs):
    super().__init__(**kwargs)
    self.relu = relu
    self.conv = Conv2dFixedPadding(filters, kernel_size, strides, name="conv")
    self.bn = batch_norm(cfg, "bn", init_zero=init_zero)

  def call(self, inputs, training=None):
    x = self.bn(self.conv(inputs), training=training)
    return ops.relu(x) if self.relu else x


class SelectiveKernel(layers.Layer):
  """SimCLRv2's selective kernel conv: two 3x3 streams (one conv, split) mixed by attention."""

  def __init__(self, cfg, filters, strides, min_dim=32, **kwargs):
    super().__init__(**kwargs)
    self.streams = ConvBatchNorm(cfg, 2 * filters, 3, strides, name="streams")
    init = keras.initializers.VarianceScaling()
    self.reduce = layers.Conv2D(max(int(filters * cfg.sk_ratio), min_dim), 1, use_bias=False,
                                kernel_initializer=init, name="reduce")
    self.reduce_bn = batch_norm(cfg, "reduce_bn")
    self.mixing = layers.Conv2D(2 * filters, 1, use_bias=False, kernel_initializer=init,
                                name="mixing")

  def call(self, inputs, training=None):
    streams = ops.stack(ops.split(self.streams(inputs, training=training), 2, axis=-1))
    context = ops.mean(ops.sum(streams, axis=0), axis=(1, 2), keepdims=True)
    context = ops.relu(self.reduce_bn(self.reduce(context), training=training))
    attention = ops.stack(ops.split(self.mixing(context), 2, axis=-1))
    attention = ops.softmax(attention, axis=0)
    return ops.sum(streams * attention, axis=0)


class SqueezeExcitation(layers.Layer):
  """Channel gating from globally pooled features (Hu et al.), sized as the reference."""

  def __init__(self, filters, se_ratio, **kwargs):
    super().__init__(**kwargs)
    self.filters = filters
    self.se_ratio = se_ratio

  def build(self, input_shape):
    init = keras.initializers.VarianceScaling()
    self.reduce = layers.Conv2D(max(1, int(self.filters * self.se_ratio)), 1,
                                kernel_initializer=init, name="reduce")
    self.expand = layers.Conv2D(input_shape[-1], 1, kernel_initializer=init, name="expand")

  def call(self, inputs):
    gate = ops.mean(inputs, axis=(1, 2), keepdims=True)
    gate = self.expand(ops.relu(self.reduce(gate)))
    return ops.sigmoid(gate) * inputs


class Shortcut(layers.Layer):
  """Projection shortcut. With selective kernels SimCLRv2 uses ResNet-D's: avg-pool, then 1x1."""

  def __init__(self, cfg, filters, strides, **kwargs):
    super().__init__(**kwargs)
    self.pool = None
    if cfg.sk_ratio > 0:
      if strides > 1:
        self.pool = keras.Sequential([
            layers.ZeroPadding2D(((0, 1), (0, 1))),
            layers.AveragePooling2D(2, strides=strides, padding="valid")], name="pool")
      else:
        self.pool = layers.AveragePooling2D(2, strides=1, padding="same", name="pool")
      strides = 1
    self.proj = ConvBatchNorm(cfg, filters, 1, strides, relu=False, name="proj")

  def call(self, inputs, training=None):
    if self.pool is not None:
      inputs = self.pool(inputs)
    return self.proj(inputs, training=training)


class BasicBlock(layers.Layer):
  """Two 3x3 convs (ResNet-18/34); the last BN starts at zero so the block starts as identity."""

  def __init__(self, cfg, filters, strides, use_projection, **kwargs):
    super().__init__(**kwargs)
    self.shortcut = Shortcut(cfg, filters, strides, name="shortcut") if use_projection else None
    self.conv_1 = ConvBatchNorm(cfg, filters, 3, strides, name="conv_1")
    self.conv_2 = ConvBatchNorm(cfg, filters, 3, 1, relu=False, init_zero=True, name="conv_2")
    self.se = SqueezeExcitation(filters, cfg.se_ratio, name="se") if cfg.se_ratio > 0 else None

  def call(self, inputs, training=None):
    shortcut = inputs if self.shortcut is None else self.shortcut(inputs, training=training)
    x = self.conv_2(self.conv_1(inputs, training=training), training=training)
    if self.se is not None:
      x = self.se(x)
    return ops.relu(x + shortcut)


class BottleneckBlock(layers.Layer):
  """1x1 reduce, 3x3 (or selective kernel), 1x1 expand x4 (ResNet-50 and deeper)."""

  def __init__(self, cfg, filters, strides, use_projection, **kwargs):
    super().__init__(**kwargs)
    self.shortcut = (Shortcut(cfg, 4 * filters, strides, name="shortcut")
                     if use_projection else None)
    self.conv_1 = ConvBatchNorm(cfg, filters, 1, 1, name="conv_1")
    if cfg.sk_ratio > 0:
      self.conv_2 = SelectiveKernel(cfg, filters, strides, name="conv_2")
    else:
      self.conv_2 = ConvBatchNorm(cfg, filters, 3, strides, name="conv_2")
    self.conv_3 = ConvBatchNorm(cfg, 4 * filters, 1, 1, relu=False, init_zero=True, name="conv_3")
    self.se = SqueezeExcitation(filters, cfg.se_ratio, name="se") if cfg.se_ratio > 0 else None

  def call(self, inputs, training=None):
    shortcut = inputs if self.shortcut is None else self.shortcut(inputs, training=training)
    x = self.conv_1(inputs, training=training)
    x = self.conv_3(self.conv_2(x, training=training), training=training)
    if self.se is not None:
      x = self.se(x)
    return ops.relu(x + shortcut)


class BlockGroup(layers.Layer):
  """A stage of blocks at one resolution; the first block changes width and stride."""

  def __init__(self, cfg, block_type, filters, num_blocks, strides, recompute_blocks=False,
               **kwargs):
    super().__init__(**kwargs)
    self.recompute_blocks = recompute_blocks
    block_cls = BasicBlock if block_type == "basic" else BottleneckBlock
    self.num_blocks = num_blocks
    for i in range(num_blocks):
      setattr(self, f"block_{i}", block_cls(cfg, filters, strides if i == 0 else 1,
                                            use_projection=i == 0, name=f"block_{i}"))

  def call(self, inputs, training=None):
    for i in range(self.num_blocks):
      block = getattr(self, f"block_{i}")
      if training and self.trainable and self.recompute_blocks:
        inputs = recompute.recomputed(lambda x, b=block: b(x, training=True), inputs)
      else:
        inputs = block(inputs, training=training)
    return inputs


def _stem(cfg: ModelConfig, images, trainable):
  """Returns (initial_conv, initial_max_pool) as the reference defines them."""
  width = scaled_width(64, cfg.width_multiplier)

  def conv_bn(x, filters, kernel_size, strides, name):
    conv = Conv2dFixedPadding(filters, kernel_size, strides, name=name)
    bn = batch_norm(cfg, name + "_bn")
    # The setter (unlike the constructor argument) also freezes sublayers.
    conv.trainable = bn.trainable = trainable
    out = conv(x)
    return out, ops.relu(bn(out))

  if cfg.cifar_stem:
    initial_conv, x = conv_bn(images, width, 3, 1, "stem_conv")
    return initial_conv, x
  if cfg.sk_ratio > 0:
    # ResNet-D stem: three 3x3 convs instead of one 7x7.
    _, x = conv_bn(images, width // 2, 3, 2, "stem_conv_1")
    _, x = conv_bn(x, width // 2, 3, 1, "stem_conv_2")
    initial_conv, x = conv_bn(x, width, 3, 1, "stem_conv_3")
  else:
    initial_conv, x = conv_bn(images, width, 7, 2, "stem_conv")
  x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_max_pool")(x)
  return initial_conv, x


def build_resnet(cfg: ModelConfig, name="resnet") -> keras.Model:
  """The trunk as a functional model: float images [B, H, W, 3] -> dict of named features.

  `cfg.fine_tune_after_block = k >= 0` stops gradients below block group k+1 (k = 0: after
  the stem, 4: after the last group) and marks those layers non-trainable, which in Keras
  also runs their BN in inference mode (statistics frozen).
  """
  cfg.validate()
  block_type, num_blocks = BLOCKS[cfg.resnet_depth]
  freeze_below = cfg.fine_tune_after_block

  images = keras.Input((None, None, 3), name="images")
  outputs = {}
  outputs["initial_conv"], x = _stem(cfg, images, trainable=freeze_below == -1)
  outputs["initial_max_pool"] = x
  for g in range(4):
    if freeze_below == g:
      x = ops.stop_gradient(x)
    group = BlockGroup(cfg, block_type, scaled_width(64 * 2**g, cfg.width_multiplier),
                       num_blocks[g], strides=1 if g == 0 else 2,
                       recompute_blocks=g < cfg.recompute_block_groups, name=f"block_group{g + 1}")
    group.trainable = freeze_below == -1 or freeze_below <= g
    x = group(x)
    outputs[f"block_group{g + 1}"] = x
  if freeze_below == 4:
    x = ops.stop_gradient(x)
  outputs["final_avg_pool"] = layers.GlobalAveragePooling2D(name="final_avg_pool")(x)
  return keras.Model(images, {k: outputs[k] for k in TRUNK_OUTPUTS}, name=name)
