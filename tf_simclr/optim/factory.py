"""Optimizer selection by name, as the reference's --optimizer flag."""

import keras

from tf_simclr.optim.lars import LARS

OPTIMIZERS = ("lars", "momentum", "adam")


def build_optimizer(name, learning_rate, momentum=0.9, weight_decay=0.0):
  """Only LARS applies weight decay itself; for 'momentum' and 'adam' it is
  an L2 term in the loss (see losses.weight_decay_loss)."""
  if name == "lars":
    return LARS(learning_rate, momentum=momentum, weight_decay=weight_decay)
  if name == "momentum":
    return keras.optimizers.SGD(learning_rate, momentum=float(momentum), nesterov=True)
  if name == "adam":
    return keras.optimizers.Adam(learning_rate)
  raise ValueError(f"Unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}.")
