"""Learning-rate scaling and the warmup + cosine schedule of SimCLR."""

import math

import keras
import tensorflow as tf


def scaled_learning_rate(base_learning_rate, batch_size, scaling):
  """Batch-size scaled LR: 'linear' lr*B/256, 'sqrt' lr*sqrt(B) (the latter
  is what the paper prefers for small batches / long training)."""
  if scaling == "linear":
    return base_learning_rate * batch_size / 256.0
  if scaling == "sqrt":
    return base_learning_rate * math.sqrt(batch_size)
  raise ValueError(
    f"Unknown learning rate scaling {scaling!r}; choose 'linear' or 'sqrt'.")


def total_train_steps(num_examples, train_epochs, train_steps, batch_size):
  """`train_steps` if set, else epochs worth of steps plus one, as the reference."""
  return train_steps or num_examples * train_epochs // batch_size + 1


def warmup_steps(num_examples, warmup_epochs, batch_size):
  return int(round(warmup_epochs * num_examples // batch_size))


@keras.saving.register_keras_serializable(package="tf_simclr")
class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup from 0 to the scaled LR, then cosine decay to 0 at total_steps."""

  def __init__(self, base_learning_rate, batch_size, num_examples,
         warmup_epochs, total_steps, scaling="linear"):
    super().__init__()
    self.base_learning_rate = base_learning_rate
    self.batch_size = batch_size
    self.num_examples = num_examples
    self.warmup_epochs = warmup_epochs
    self.total_steps = total_steps
    self.scaling = scaling
    # Resolved eagerly so a bad `scaling` fails at construction time.
    self._peak = scaled_learning_rate(base_learning_rate, batch_size, scaling)
    self._warmup = warmup_steps(num_examples, warmup_epochs, batch_size)
    # Guard against a zero-length decay phase (warmup covering all steps).
    self._decay_steps = max(total_steps - self._warmup, 1)

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    peak = tf.constant(self._peak, tf.float32)
    if self._warmup:
      warm = step / float(self._warmup) * peak
    else:
      warm = peak
    progress = tf.minimum(step - self._warmup, self._decay_steps) / self._decay_steps
    cosine = 0.5 * peak * (1.0 + tf.cos(math.pi * progress))
    return tf.where(step < self._warmup, warm, cosine)

  def get_config(self):
    return {
      "base_learning_rate": self.base_learning_rate,
      "batch_size": self.batch_size,
      "num_examples": self.num_examples,
      "warmup_epochs": self.warmup_epochs,
      "total_steps": self.total_steps,
      "scaling": self.scaling,
    }
