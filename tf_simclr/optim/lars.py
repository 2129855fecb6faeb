"""LARS (You et al. 2017) as a Keras 3 optimizer, with SimCLR's conventions."""

import keras
import tensorflow as tf


def _matches(variable, patterns):
  path = getattr(variable, "path", None) or variable.name
  return any(p in path for p in patterns)


@keras.saving.register_keras_serializable(package="tf_simclr")
class LARS(keras.optimizers.Optimizer):
  """Layer-wise adaptive rate scaling with classic (lr inside) momentum.

  Per variable w with gradient g:
   g <- g + weight_decay * w                   (unless excluded from decay)
   trust = eeta * ||w|| / ||g||  if both norms > 0, else 1
                         (1 if excluded from adaptation)
   v <- momentum * v + lr * trust * g
   w <- w - v   (nesterov: w - (momentum * v + lr * trust * g))

  Weight decay is the L2 term in the gradient used by the paper, not the
  decoupled decay of Keras' base class, so it is never passed to it.
  Exclusion patterns are substrings of `variable.path`.
  """

  def __init__(
    self,
    learning_rate,
    momentum=0.9,
    weight_decay=0.0,
    eeta=0.001,
    exclude_from_weight_decay=("gamma", "beta", "bias", "head_supervised"),
    exclude_from_layer_adaptation=None,
    nesterov=False,
    name="lars",
    **kwargs,
  ):
    super().__init__(learning_rate=learning_rate, name=name, **kwargs)
    self.momentum = float(momentum)
    self.l2_weight_decay = float(weight_decay)
    self.eeta = float(eeta)
    self.nesterov = bool(nesterov)
    self.wd_exclusions = tuple(exclude_from_weight_decay or ())
    # Kept as given (None included) so get_config round-trips.
    self._adaptation_exclusions_arg = (
      None if exclude_from_layer_adaptation is None
      else tuple(exclude_from_layer_adaptation))
    self.adaptation_exclusions = (
      self.wd_exclusions if exclude_from_layer_adaptation is None
      else self._adaptation_exclusions_arg)

  def build(self, variables):
    if self.built:
      return
    super().build(variables)
    self.momentums = self.add_optimizer_variables(variables, "momentum")
    # Decided here, because under MirroredStrategy update_step sees
    # per-replica components that carry no `.path`.
    self._decay_flags = [
      bool(self.l2_weight_decay) and not _matches(v, self.wd_exclusions)
      for v in variables
    ]
    self._adapt_flags = [
      not _matches(v, self.adaptation_exclusions) for v in variables
    ]

  def update_step(self, gradient, variable, learning_rate):
    index = self._get_variable_index(variable)
    dtype = variable.dtype
    lr = tf.cast(learning_rate, dtype)
    grad = tf.cast(gradient, dtype)
    weights = tf.convert_to_tensor(variable)
    if self._decay_flags[index]:
      grad = grad + tf.cast(self.l2_weight_decay, dtype) * weights
    if self._adapt_flags[index]:
      w_norm = tf.norm(weights)
      g_norm = tf.norm(grad)
      # The unselected branch may be 0/0; tf.where discards it.
      trust = tf.where(
        tf.logical_and(w_norm > 0, g_norm > 0),
        tf.cast(self.eeta, dtype) * w_norm / g_norm,
        tf.ones_like(w_norm))
      lr = lr * trust
    momentum = tf.cast(self.momentum, dtype)
    velocity = self.momentums[index]
    next_velocity = momentum * velocity + lr * grad
    self.assign(velocity, next_velocity)
    if self.nesterov:
      self.assign_sub(variable, momentum * next_velocity + lr * grad)
    else:
      self.assign_sub(variable, next_velocity)

  def get_config(self):
    config = super().get_config()
    config.update({
      "momentum": self.momentum,
      "weight_decay": self.l2_weight_decay,
      "eeta": self.eeta,
      "exclude_from_weight_decay": list(self.wd_exclusions),
      "exclude_from_layer_adaptation": (
        None if self._adaptation_exclusions_arg is None
        else list(self._adaptation_exclusions_arg)),
      "nesterov": self.nesterov,
    })
    return config
