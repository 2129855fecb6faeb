"""SimCLR's contrastive pretraining: NT-Xent between two augmented views of each image, with
every other view of the global batch as a negative (SimCLRv2 section 2); with a memory
(TrainConfig.memory_size > 0), also the memory network's projections of the last K
examples (SimCLRv2's MoCo-style memory, tf_simclr.memory)."""

import tensorflow as tf

from tf_simclr import losses, memory
from tf_simclr.objectives.base import Objective
from tf_simclr.objectives.linear_eval import LinearEvalHead


class Pretrain(Objective):
  views = 2
  contrastive_augmentation = True

  def __init__(self, spec):
    super().__init__(spec)
    cfg = spec.train_cfg
    self.temperature = cfg.temperature
    self.hidden_norm = cfg.hidden_norm
    self.head = LinearEvalHead() if cfg.lineareval_while_pretraining else None
    self.memory_size, self.memory_momentum = cfg.memory_size, cfg.memory_momentum
    self.memory = self.memory_network = None

  @property
  def metric_names(self):
    names = ("contrast_loss", "contrast_acc", "contrast_entropy")
    return names + (self.head.metric_names if self.head else ())

  @property
  def linear_eval_head(self):
    return self.head is not None

  def build(self, model):
    if not self.memory_size:
      return {}
    from tf_simclr.models.simclr import build_model
    self.memory_network = build_model(model.cfg, linear_eval_head=self.linear_eval_head)
    memory.copy_weights(self.memory_network.weights, model.weights)
    self.memory = memory.MemoryBuffer(self.memory_size, model.cfg.proj_out_dim,
                                      seed=self.spec.train_cfg.seed)
    # Checkpointed with the run (resume), never exported: not part of the model.
    return {"memory": self.memory, "memory_network": self.memory_network}

  def _views(self, batch):
    # The views are stacked on channels; the model sees them as one batch of 2n images.
    return tf.concat(tf.split(batch["image"], self.views, axis=-1), axis=0)

  def loss(self, model, batch, labelled_batch=None):
    outputs = model(self._views(batch), training=True)
    loss, logits_ab, labels = losses.contrastive_loss(
        outputs["proj_head_output"], hidden_norm=self.hidden_norm, temperature=self.temperature,
        memory=self.memory.memory_buffer if self.memory else None)
    metrics = {"contrast_loss": loss, **losses.contrastive_metrics(logits_ab, labels)}
    if self.head:
      sup, sup_metrics = self.head.loss(outputs, batch["label"], self.views)
      metrics.update(sup_metrics)
      loss += sup
    return loss, metrics

  def after_update(self, model, batch):
    if not self.memory:
      return
    # The memory network follows the weights just updated, then encodes this step's views
    # for the steps to come (tf_simclr.memory explains each choice).
    memory.ema_update(self.memory_network.trainable_variables, model.trainable_variables,
                      self.memory_momentum)
    keys = self.memory_network(self._views(batch), training=True)["proj_head_output"]
    self.memory.enqueue(memory.gather_views(tf.stop_gradient(keys)))
