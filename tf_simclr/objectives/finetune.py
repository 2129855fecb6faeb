"""Supervised fine-tuning on the labelled subset (SimCLRv2's second stage; with
--fine_tune_after_block=4, linear evaluation of a frozen trunk)."""

from tf_simclr.objectives.base import Objective, supervised_terms


class Finetune(Objective):
  subset = "labelled"
  metric_names = ("supervised_loss", "supervised_acc")

  def loss(self, model, batch, labelled_batch=None):
    return supervised_terms(model, batch["image"], batch["label"])
