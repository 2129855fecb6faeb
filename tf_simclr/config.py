"""Frozen configuration dataclasses: the only way settings reach the library.

`run.py` turns absl flags into these; everything below it takes them as explicit
arguments, so several models of different shapes (a teacher and a student) can live in
one process.
"""

import dataclasses
from typing import Optional

PROJ_HEAD_MODES = ("none", "linear", "nonlinear")
RESNET_DEPTHS = (10, 18, 34, 50, 101, 152, 200)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A SimCLRv2 model (trunk + projection head + supervised head).

  Architecture fields say what the weights are and compute. Training-time fields (metadata
  "training": BN synchronisation and decay, frozen blocks, recomputation) change no variable:
  they say how one run trains the model, so a run that loads another's model (a teacher, an
  export, an initialisation) sets them for itself (tf_simclr.pretrained).
  """
  resnet_depth: int = 50
  width_multiplier: float = 1.0
  sk_ratio: float = 0.0
  se_ratio: float = 0.0
  batch_norm_decay: float = dataclasses.field(default=0.9, metadata={"training": True})
  global_bn: bool = dataclasses.field(default=True, metadata={"training": True})
  image_size: int = 224
  proj_head_mode: str = "nonlinear"
  proj_out_dim: int = 128
  num_proj_layers: int = 3
  ft_proj_selector: int = 0
  num_classes: int = 1000
  # -1 trains everything; k in 0..4 stops gradients and freezes BN below block group k+1
  # (0: after the stem, 4: only the heads). Only meaningful when fine-tuning.
  fine_tune_after_block: int = dataclasses.field(default=-1, metadata={"training": True})
  # The BN of blocks frozen by fine_tune_after_block: True normalises with batch statistics
  # and updates the moving ones, False runs inference mode (moving statistics, kept). None
  # follows the reference's TF1 code behind the paper's numbers: inference mode only when the
  # whole trunk is frozen (k = 4, linear evaluation). docs/MODEL.md.
  update_frozen_bn: Optional[bool] = dataclasses.field(default=None, metadata={"training": True})

  @property
  def frozen_bn_updates(self) -> bool:
    if self.update_frozen_bn is None:
      return self.fine_tune_after_block < 4
    return self.update_frozen_bn
  # Block groups 1..k keep only each block's input for the backward pass and recompute the
  # rest there (less memory, about one more forward of those groups; models/recompute.py).
  # Changes no variable and no result: checkpoints and exports do not depend on it.
  recompute_block_groups: int = dataclasses.field(default=0, metadata={"training": True})

  @classmethod
  def training_fields(cls) -> tuple:
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("training"))

  @classmethod
  def architecture_fields(cls) -> tuple:
    return tuple(f.name for f in dataclasses.fields(cls) if not f.metadata.get("training"))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict) -> "ModelConfig":
    """The inverse of to_dict. Missing fields take their defaults (a config written before
    they existed); unknown ones are a ValueError."""
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"unknown ModelConfig fields {', '.join(unknown)}")
    return cls(**values)

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


# Resamplings of crops and eval views; the first is the reference's and the default.
RESIZE_METHODS = ("bicubic", "bilinear")
# Where the photometric augmentations run: the input pipeline's host CPU, the training step's
# devices, or "auto" (devices when they are GPUs or TPUs).
AUGMENT_PLACEMENTS = ("host", "device", "auto")


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
  # Smallest training crop, as a fraction of the image's area (the reference's 0.08). Crops
  # also cover at least augment.CROP_MIN_COVERED (10%) of the image, as the reference's do.
  crop_min_area: float = 0.08
  # Resampling of training crops and eval views: "bicubic" (the reference's: pixel centres,
  # clipped to [0, 1]) or "bilinear" (aligned corners; a faster input pipeline).
  resize_method: str = "bicubic"
  # "device": the host decodes, crops, flips and resizes, and ships uint8 views with their
  # draws; colour distortion and blur run in the replica's step (tf_simclr.data.pipeline).
  # Same-size images held in memory go uncropped: the step crops them too.
  augment_on: str = "auto"
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

  def validate(self):
    """Raises ValueError (one line) for settings that are wrong whatever the data."""
    if self.image_size < 8:
      raise ValueError(f"image_size must be >= 8, got {self.image_size}")
    if not 0 < self.train_label_fraction <= 1:
      raise ValueError(f"train_label_fraction must be in (0, 1], got {self.train_label_fraction}")
    if self.train_labels_per_class < 0:
      raise ValueError(f"train_labels_per_class must be >= 0, got {self.train_labels_per_class}")
    if self.train_labels_per_class and self.train_label_fraction < 1:
      raise ValueError("train_labels_per_class and train_label_fraction < 1 both choose the "
                       "labelled subset: set one of them")
    if not 0 < self.crop_min_area <= 1:
      raise ValueError(f"crop_min_area must be in (0, 1], got {self.crop_min_area}")
    if self.resize_method not in RESIZE_METHODS:
      raise ValueError(f"resize_method={self.resize_method!r} is not one of {RESIZE_METHODS}")
    if self.augment_on not in AUGMENT_PLACEMENTS:
      raise ValueError(f"augment_on={self.augment_on!r} is not one of {AUGMENT_PLACEMENTS}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The objective, optimizer, schedule and loop of one run, and its process-wide settings
  (seed, determinism, precision), which the trainer applies (train.loop.apply_run_settings)."""
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
  # Zero the supervised head after initialising from another run's checkpoint.
  zero_init_logits_layer: bool = False
  checkpoint_epochs: int = 1
  checkpoint_steps: int = 0
  keep_checkpoint_max: int = 5
  steps_per_loop: int = 0   # 0: choose automatically
  # Training summaries at the first loop end after every this many steps (0: none).
  train_summary_steps: int = 100
  seed: int = 0
  deterministic: bool = False
  precision: str = "float32"
  # SimCLRv2's memory (tf_simclr.memory): K buffered negatives from a moving-average copy of
  # the network with this EMA rate (0: no memory, no memory network).
  memory_size: int = 0
  memory_momentum: float = 0.999

  def validate(self, num_replicas: int = 1, num_train_examples: Optional[int] = None):
    """Raises ValueError with a one-line message for settings that cannot train; with the
    strategy's replicas and the objective's number of examples, also for batch sizes."""
    from tf_simclr import objectives  # names only: no TensorFlow import
    _one_of("train_mode", self.train_mode, objectives.names())
    _one_of("optimizer", self.optimizer, OPTIMIZERS)
    _one_of("learning_rate_scaling", self.learning_rate_scaling, LR_SCALINGS)
    _one_of("precision", self.precision, PRECISIONS)
    for name in ("train_batch_size", "eval_batch_size", "keep_checkpoint_max"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
    for name in ("train_epochs", "train_steps", "eval_steps", "checkpoint_steps",
                 "checkpoint_epochs", "steps_per_loop", "warmup_epochs", "weight_decay",
                 "learning_rate", "train_summary_steps"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    if self.train_steps == 0 and self.train_epochs == 0:
      raise ValueError("one of train_steps or train_epochs must be > 0")
    if self.checkpoint_steps == 0 and self.checkpoint_epochs == 0:
      raise ValueError("one of checkpoint_steps or checkpoint_epochs must be > 0")
    if self.memory_size < 0:
      raise ValueError(f"memory_size must be >= 0, got {self.memory_size}")
    if not 0 <= self.memory_momentum <= 1:
      raise ValueError(f"memory_momentum must be in [0, 1], got {self.memory_momentum}")
    if self.memory_size and self.train_mode != "pretrain":
      raise ValueError("memory_size is a pretraining option: contrastive negatives")
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature}")
    if self.train_batch_size % num_replicas:
      raise ValueError(f"train_batch_size={self.train_batch_size} is not divisible by the "
                       f"{num_replicas} replicas")
    if num_train_examples is not None and num_train_examples < self.train_batch_size:
      raise ValueError(f"train_batch_size={self.train_batch_size} is larger than the "
                       f"{num_train_examples} training examples")


OPTIMIZERS = ("lars", "momentum", "adam")
LR_SCALINGS = ("linear", "sqrt")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def _one_of(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not one of {tuple(allowed)}")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """SimCLRv2's third stage: a frozen teacher labels unlabelled images for a student."""
  # A tf_simclr model_dir, checkpoint or SavedModel; its architecture comes from its model
  # config, with these ModelConfig fields replaced (e.g. from --teacher_resnet_depth).
  teacher_checkpoint: str = ""
  teacher_overrides: dict = dataclasses.field(default_factory=dict)
  distill_temperature: float = 1.0
  # The paper's alpha (SimCLRv2 eq. 3): the distillation loss weighs alpha, the labelled
  # examples' cross-entropy 1 - alpha (1: pure distillation, as the paper's Table 3 runs).
  distill_alpha: float = 1.0

  def validate(self):
    if not self.teacher_checkpoint:
      raise ValueError("teacher_checkpoint is required for distillation")
    if self.distill_temperature <= 0:
      raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature}")
    if not 0 < self.distill_alpha <= 1:
      # alpha = 0 once meant pure distillation in tf_simclr (the weight was reversed).
      raise ValueError(
          f"distill_alpha must be in (0, 1], got {self.distill_alpha}: it is the paper's alpha, "
          "the weight of the distillation loss (pure distillation is 1, which older tf_simclr "
          "flagfiles wrote as 0)")
