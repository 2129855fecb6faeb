"""SimCLRv2's third stage (section 2.3): a frozen teacher's softened predictions on the
unlabelled images train a student, mixed with the labelled loss as the paper's eq. 3:
alpha * distillation + (1 - alpha) * cross-entropy on the labelled subset."""

import tensorflow as tf

from tf_simclr import losses
from tf_simclr.objectives.base import Objective, accuracy, supervised_terms


class Distill(Objective):

  def __init__(self, spec, teacher=None):
    """`teacher`: a built, frozen SimCLRModel; default: loaded from the DistillConfig."""
    super().__init__(spec)
    cfg = spec.distill_cfg
    self.temperature = cfg.distill_temperature
    self.alpha = cfg.distill_alpha
    self.teacher = teacher if teacher is not None else load_teacher(spec)

  @property
  def metric_names(self):
    names = ("distill_loss", "teacher_agreement")
    return names + (("supervised_loss", "supervised_acc") if self.labelled_stream else ())

  @property
  def labelled_stream(self):
    return self.alpha < 1

  def loss(self, model, batch, labelled_batch=None):
    images = batch["image"]
    teacher_logits = self.teacher(images, training=False)["logits_sup"]
    logits = model(images, training=True)["logits_sup"]
    loss = losses.distillation_loss(teacher_logits, logits, self.temperature)
    metrics = {"distill_loss": loss,
               "teacher_agreement": accuracy(tf.argmax(teacher_logits, -1), logits)}
    if self.labelled_stream:
      sup, sup_metrics = supervised_terms(model, labelled_batch["image"], labelled_batch["label"])
      metrics.update(sup_metrics)
      loss = self.alpha * loss + (1 - self.alpha) * sup
    return loss, metrics

  def eval_sums(self, images, logits, labels, mask):
    from tf_simclr.train.evaluation import top_k_correct
    t_logits = tf.cast(self.teacher(images, training=False)["logits_sup"], tf.float32)
    agree = tf.cast(tf.equal(tf.argmax(t_logits, -1), tf.argmax(logits, -1)), tf.float32)
    return {"eval/teacher_top_1_accuracy": tf.reduce_sum(mask * top_k_correct(labels, t_logits, 1)),
            "eval/teacher_student_agreement": tf.reduce_sum(mask * agree)}


def load_teacher(spec):
  """The frozen teacher of the run's DistillConfig (tf_simclr.pretrained.load_teacher)."""
  from tf_simclr import pretrained
  from tf_simclr.train.callbacks import log
  cfg = spec.distill_cfg
  teacher = pretrained.load_teacher(cfg.teacher_checkpoint, spec.model_cfg, cfg.teacher_overrides,
                                    spec.strategy)
  log(f"Teacher: ResNet-{teacher.cfg.resnet_depth} {teacher.cfg.width_multiplier:g}x "
      f"from {teacher.prefix}")
  return teacher.model
