"""What an objective declares to the training loop and the evaluation."""

import tensorflow as tf

from tf_simclr import losses


class Objective:
  """One training mode: the data it needs, its metrics, its loss and its extra eval figures.

  Built by the trainer (after the run's seed and precision are applied, before the model);
  `spec` is the run's tf_simclr.train.loop.RunSpec.
  """
  # Augmented views of each training image, stacked on channels ([B, H, W, 3 * views]), and
  # whether they get the contrastive colour distortion and blur (else crop and flip only).
  views = 1
  contrastive_augmentation = False
  # The training images it sees: "all" (labels unused) or the "labelled" subset.
  subset = "all"

  def __init__(self, spec):
    self.spec = spec

  @property
  def metric_names(self):
    """Names of the per-step scalars `loss` returns (the loop adds loss and weight_decay)."""
    return ()

  @property
  def linear_eval_head(self):
    """Whether the model's supervised head sees stop-gradient features."""
    return False

  @property
  def labelled_stream(self):
    """Whether each step also gets a batch of the labelled subset (`labelled_batch`)."""
    return False

  def build(self, model):
    """Creates state that depends on the model (inside the strategy's scope); returns the
    trackables to checkpoint with the run, by name."""
    return {}

  def loss(self, model, batch, labelled_batch=None):
    """(loss without weight decay, {metric: scalar}) for one replica's batch."""
    raise NotImplementedError

  def after_update(self, model, batch):
    """Runs in each replica after the optimizer's update, with the step's batch."""

  def eval_sums(self, images, logits, labels, mask):
    """Extra eval figures as {result key: sum over the batch's examples}; the evaluation
    divides each by the number of examples."""
    return {}


def accuracy(labels, logits):
  return tf.reduce_mean(tf.cast(
      tf.equal(tf.cast(labels, tf.int64), tf.argmax(logits, -1)), tf.float32))


def supervised_terms(model, images, labels):
  """Cross-entropy of the supervised head and its metrics (shared by every mode with labels)."""
  logits = model(images, training=True)["logits_sup"]
  loss = losses.supervised_loss(labels, logits)
  return loss, {"supervised_loss": loss, "supervised_acc": accuracy(labels, logits)}
