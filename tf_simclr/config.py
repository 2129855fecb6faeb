"""Frozen configuration dataclasses: the only way settings reach the library.

`run.py` turns absl flags into these; everything below it takes them as explicit
arguments, so several models of different shapes (a teacher and a student) can live in
one process.
"""

import dataclasses
from typing import Optional

TRAIN_MODES = ("pretrain", "finetune", "distill")
PROJ_HEAD_MODES = ("none", "linear", "nonlinear")
RESNET_DEPTHS = (10, 18, 34, 50, 101, 152, 200)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a SimCLRv2 model (trunk + projection head + supervised head)."""
  resnet_depth: int = 50
  width_multiplier: float = 1.0
  sk_ratio: float = 0.0
  se_ratio: float = 0.0
  batch_norm_decay: float = 0.9
  global_bn: bool = True
  image_size: int = 224
  proj_head_mode: str = "nonlinear"
  proj_out_dim: int = 128
  num_proj_layers: int = 3
  ft_proj_selector: int = 0
  num_classes: int = 1000
  # -1 trains everything; k in 0..4 stops gradients and freezes BN below block group k+1
  # (0: after the stem, 4: only the heads). Only meaningful when fine-tuning.
  fine_tune_after_block: int = -1
  # The BN of blocks frozen by fine_tune_after_block: True normalises with batch statistics
  # and updates the moving ones, False runs inference mode (moving statistics, kept). None
  # follows the reference's TF1 code behind the paper's numbers: inference mode only when the
  # whole trunk is frozen (k = 4, linear evaluation). docs/MODEL.md.
  update_frozen_bn: Optional[bool] = None

  @property
  def frozen_bn_updates(self) -> bool:
    if self.update_frozen_bn is None:
      return self.fine_tune_after_block < 4
    return self.update_frozen_bn
  # Block groups 1..k keep only each block's input for the backward pass and recompute the
  # rest there (less memory, about one more forward of those groups; models/recompute.py).
  # Changes no variable and no result: checkpoints and exports do not depend on it.
  recompute_block_groups: int = 0

  @property
  def cifar_stem(self) -> bool:
    return self.image_size <= 32

  def validate(self):
    """Raises ValueError with a one-line message for an impossible architecture."""
    if self.resnet_depth not in RESNET_DEPTHS:
      raise ValueError(f"resnet_depth={self.resnet_depth} is not one of {RESNET_DEPTHS}")
    if self.width_multiplier <= 0:
      raise ValueError(f"width_multiplier must be > 0, got {self.width_multiplier}")
    if self.width_multiplier >= 1 and self.width_multiplier != int(self.width_multiplier):
      raise ValueError("width_multiplier above 1 must be an integer (the paper's 1x/2x/3x), "
                       f"got {self.width_multiplier}")
    if self.sk_ratio < 0 or self.se_ratio < 0:
      raise ValueError(f"sk_ratio and se_ratio must be >= 0, got {self.sk_ratio}, {self.se_ratio}")
    if not 0 < self.batch_norm_decay < 1:
      raise ValueError(f"batch_norm_decay must be in (0, 1), got {self.batch_norm_decay}")
    if self.image_size < 8:
      raise ValueError(f"image_size must be >= 8, got {self.image_size}")
    if self.proj_head_mode not in PROJ_HEAD_MODES:
      raise ValueError(f"proj_head_mode={self.proj_head_mode!r} is not one of {PROJ_HEAD_MODES}")
    if self.proj_out_dim <= 0 or self.num_proj_layers <= 0 or self.num_classes <= 0:
      raise ValueError("proj_out_dim, num_proj_layers and num_classes must be > 0, got "
                       f"{self.proj_out_dim}, {self.num_proj_layers}, {self.num_classes}")
    max_selector = {"none": 0, "linear": 1, "nonlinear": self.num_proj_layers}[self.proj_head_mode]
    # -1 counts from the end as in the reference (hiddens[-1]: the head's output).
    if not -1 <= self.ft_proj_selector <= max_selector:
      raise ValueError(f"ft_proj_selector={self.ft_proj_selector} must be in -1..{max_selector} "
                       f"(proj_head_mode={self.proj_head_mode}, num_proj_layers={self.num_proj_layers})")
    if not -1 <= self.fine_tune_after_block <= 4:
      raise ValueError(f"fine_tune_after_block={self.fine_tune_after_block} must be in -1..4")
    if not 0 <= self.recompute_block_groups <= 4:
      raise ValueError(
          f"recompute_block_groups={self.recompute_block_groups} must be in 0..4")


def resolve_recompute_block_groups(requested: int, precision: str) -> int:
  """ModelConfig.recompute_block_groups for a flag value; -1 chooses by precision.

  Float32 activations take twice the bytes of mixed precision's: recomputing block group 1
  (the highest resolution) brings a float32 step's peak memory to 0.65-0.8x the reference
  implementation's for ~10% more step time; mixed precision is there without it
  (docs/PERFORMANCE.md).
  """
  if requested != -1:
    return requested
  return 1 if precision == "float32" else 0


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the images come from and how they are augmented."""
  dataset: str = "imagenet2012"   # a TFDS name, or "folder:/path/to/images"
  data_dir: Optional[str] = None
  train_split: str = "train"
  eval_split: str = "validation"
  image_size: int = 224
  color_jitter_strength: float = 1.0
  use_blur: bool = True
  # Resampling of training crops and eval views: "bicubic" (the reference's: pixel centres,
  # clipped to [0, 1]) or "bilinear" (aligned corners; a faster input pipeline).
  resize_method: str = "bicubic"
  cache_dataset: bool = False
  # Class-balanced, seeded subset of the labelled training split (the paper's 1%/10%).
  train_label_fraction: float = 1.0
  # > 0: exactly this many labelled examples per class instead (all of a smaller class): the
  # paper's regimes as labels per class (ImageNet's 1% has ~12.8, its 10% ~128).
  train_labels_per_class: int = 0
  seed: int = 0

  @property
  def has_label_subset(self) -> bool:
    return self.train_label_fraction < 1 or self.train_labels_per_class > 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The objective, optimizer, schedule and loop of one run."""
  train_mode: str = "pretrain"
  train_batch_size: int = 512
  train_epochs: int = 100
  train_steps: int = 0
  eval_batch_size: int = 256
  eval_steps: int = 0
  learning_rate: float = 0.3
  learning_rate_scaling: str = "linear"
  warmup_epochs: float = 10
  weight_decay: float = 1e-6
  optimizer: str = "lars"
  momentum: float = 0.9
  temperature: float = 0.1
  hidden_norm: bool = True
  lineareval_while_pretraining: bool = True
  zero_init_logits_layer: bool = False
  checkpoint_epochs: int = 1
  checkpoint_steps: int = 0
  keep_checkpoint_max: int = 5
  steps_per_loop: int = 0   # 0: choose automatically
  # Training summaries at the first loop end after every this many steps (0: none).
  train_summary_steps: int = 100
  seed: int = 0
  precision: str = "float32"


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """SimCLRv2's third stage: a frozen teacher labels unlabelled images for a student."""
  teacher_checkpoint: str = ""
  distill_temperature: float = 1.0
  # The paper's alpha (SimCLRv2 eq. 3): the distillation loss weighs alpha, the labelled
  # examples' cross-entropy 1 - alpha (1: pure distillation, as the paper's Table 3 runs).
  distill_alpha: float = 1.0
