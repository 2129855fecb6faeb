"""The linear evaluation head trained alongside pretraining (the reference's
lineareval_while_pretraining): a supervised head on stop-gradient features, so it reads the
representation without changing it."""

import tensorflow as tf

from tf_simclr import losses
from tf_simclr.objectives.base import accuracy


class LinearEvalHead:
  """A part of another objective: cross-entropy of the supervised head on the labels of the
  images the model already ran on (the model is built with stop-gradient head features)."""
  metric_names = ("supervised_loss", "supervised_acc")

  def loss(self, outputs, labels, views):
    labels = tf.concat([labels] * views, 0)
    loss = losses.supervised_loss(labels, outputs["logits_sup"])
    return loss, {"supervised_loss": loss, "supervised_acc": accuracy(labels, outputs["logits_sup"])}
