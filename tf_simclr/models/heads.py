"""SimCLRv2's heads: the projection head g(.) and the supervised (linear) head."""

import keras
from keras import layers, ops

from tf_simclr.config import ModelConfig
from tf_simclr.models.resnet import batch_norm


class LinearLayer(layers.Layer):
  """Dense, optionally followed by BN. With BN, the dense layer has no bias: BN's beta (when
  `use_bias`) plays that role, as in the reference. `units=None` keeps the input width."""

  def __init__(self, cfg: ModelConfig, units=None, use_bias=True, use_bn=False, **kwargs):
    super().__init__(**kwargs)
    self.cfg = cfg
    self.units = units
    self.use_bias = use_bias
    self.use_bn = use_bn

  def build(self, input_shape):
    self.dense = layers.Dense(
        self.units or input_shape[-1], use_bias=self.use_bias and not self.use_bn,
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01), name="dense")
    self.bn = batch_norm(self.cfg, "bn", center=self.use_bias) if self.use_bn else None

  def call(self, inputs, training=None):
    x = self.dense(inputs)
    return x if self.bn is None else self.bn(x, training=training)


class ProjectionHead(layers.Layer):
  """Maps trunk features to the space where NT-Xent is applied.

  Returns every hidden layer: hiddens[0] is the head's input, hiddens[-1] its output.
  SimCLRv2 fine-tunes from hiddens[ft_proj_selector] (1 = the middle of a 3-layer head).
  """

  def __init__(self, cfg: ModelConfig, **kwargs):
    super().__init__(**kwargs)
    if cfg.proj_head_mode == "none":
      self.num_layers = 0
    elif cfg.proj_head_mode == "linear":
      self.num_layers = 1
    else:
      self.num_layers = cfg.num_proj_layers
    for j in range(self.num_layers):
      last = j == self.num_layers - 1
      # Hidden layers keep the input width and have bias + ReLU; the output layer has neither.
      setattr(self, f"layer_{j}", LinearLayer(
          cfg, units=cfg.proj_out_dim if last else None, use_bias=not last, use_bn=True,
          name=f"layer_{j}"))

  def call(self, inputs, training=None):
    hiddens = [inputs]
    for j in range(self.num_layers):
      x = getattr(self, f"layer_{j}")(hiddens[-1], training=training)
      hiddens.append(x if j == self.num_layers - 1 else ops.relu(x))
    return hiddens


def supervised_head(cfg: ModelConfig):
  """The linear classifier; its name is what weight decay and LARS exclusions match."""
  return LinearLayer(cfg, units=cfg.num_classes, use_bias=True, name="head_supervised")
