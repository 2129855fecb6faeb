"""SimCLRModel: ResNet trunk + projection head + supervised head, with named outputs."""

import keras
import numpy as np
from keras import ops

from tf_simclr.config import ModelConfig
from tf_simclr.models.heads import ProjectionHead, supervised_head
from tf_simclr.models.resnet import build_resnet

# Every output of the model; export and the hub-style interface rely on these names.
OUTPUT_NAMES = ("initial_conv", "initial_max_pool", "block_group1", "block_group2",
                "block_group3", "block_group4", "final_avg_pool", "proj_head_input",
                "proj_head_output", "logits_sup")


@keras.saving.register_keras_serializable(package="tf_simclr")
class SimCLRModel(keras.Model):
  """Float images in [0, 1], [B, H, W, 3] -> dict of OUTPUT_NAMES.

  `linear_eval_head`: feed the supervised head stop-gradient features, so that linear
  evaluation during pretraining does not change the representation (the reference's
  lineareval_while_pretraining). Forward values do not depend on it.
  """

  def __init__(self, cfg: ModelConfig, linear_eval_head=False, name="simclr", **kwargs):
    super().__init__(name=name, **kwargs)
    cfg.validate()
    self.cfg = cfg
    self.linear_eval_head = linear_eval_head
    self.resnet = build_resnet(cfg)
    self.projection_head = ProjectionHead(cfg, name="head_contrastive")
    self.supervised_head = supervised_head(cfg)

  def call(self, images, training=False):
    outputs = dict(self.resnet(images, training=training))
    hiddens = self.projection_head(outputs["final_avg_pool"], training=training)
    head_input = hiddens[self.cfg.ft_proj_selector]
    if self.linear_eval_head:
      head_input = ops.stop_gradient(head_input)
    outputs["proj_head_input"] = hiddens[0]
    outputs["proj_head_output"] = hiddens[-1]
    outputs["logits_sup"] = self.supervised_head(head_input, training=training)
    return outputs

  def get_config(self):
    return {**super().get_config(), "model_config": self.cfg.to_dict(),
            "linear_eval_head": self.linear_eval_head}

  @classmethod
  def from_config(cls, config):
    """An unbuilt model of get_config's config (build_model builds one)."""
    config = dict(config)
    return cls(ModelConfig.from_dict(config.pop("model_config")), **config)


def build_model(cfg: ModelConfig, linear_eval_head=False) -> SimCLRModel:
  """Creates the model and its variables (restoring a checkpoint needs them built first)."""
  model = SimCLRModel(cfg, linear_eval_head=linear_eval_head)
  # Variable shapes do not depend on the spatial size: build on a small image to save time.
  size = min(cfg.image_size, 64)
  model(np.zeros((1, size, size, 3), np.float32), training=False)
  return model


def count_params(variables) -> int:
  return int(sum(np.prod(v.shape) for v in variables))
