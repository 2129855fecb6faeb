"""The training loop: state, the distributed step function and the loop over steps.

It knows no training mode: the objective (tf_simclr.objectives, looked up by
TrainConfig.train_mode) declares the data it needs, its metrics and its loss; progress,
summaries, signals, non-finite checks, evaluation and result files are callbacks
(tf_simclr.train.callbacks). Several steps run per tf.function call (`steps_per_loop`) so
Python never sits between two steps; metrics are read once per loop.
"""

import dataclasses
import os
import time
from typing import Optional, Sequence

import keras
import tensorflow as tf

from tf_simclr import losses, objectives, pretrained
from tf_simclr.config import DataConfig, DistillConfig, ModelConfig, TrainConfig
from tf_simclr.data import datasets, pipeline
from tf_simclr.optim import factory, schedules
from tf_simclr.train import checkpoints, evaluation
from tf_simclr.train.callbacks import log


class Interrupted(RuntimeError):
  """Raised when a callback stopped the run (e.g. on SIGTERM), after a checkpoint."""


@dataclasses.dataclass
class RunSpec:
  """Everything a run needs, as explicit objects (built by run.py from flags)."""
  strategy: tf.distribute.Strategy
  model_dir: str
  model_cfg: ModelConfig
  data_cfg: DataConfig
  train_cfg: TrainConfig
  distill_cfg: DistillConfig = dataclasses.field(default_factory=DistillConfig)
  is_chief: bool = True


def apply_run_settings(cfg: TrainConfig):
  """The process-wide settings of a run: seeds, op determinism, Keras's dtype policy."""
  keras.utils.set_random_seed(cfg.seed)
  if cfg.deterministic:
    tf.config.experimental.enable_op_determinism()
  keras.mixed_precision.set_global_policy(cfg.precision)


class Trainer:
  """Model, optimizer, checkpoint and step function of a run, and the loop that trains it."""

  def __init__(self, spec: RunSpec, callbacks: Sequence = (), objective=None,
               info: Optional[datasets.DatasetInfo] = None):
    """`objective`: an objectives.base.Objective built for `spec` (default: the one registered
    as train_cfg.train_mode). `info` (a datasets.DatasetInfo) skips reading the dataset's
    sizes again: run.py has read them already, and benchmarks run without any dataset."""
    self.spec = spec
    self.callbacks = list(callbacks)
    cfg = spec.train_cfg
    self.strategy = spec.strategy
    self.info = info if info is not None else datasets.dataset_info(spec.data_cfg)
    if self.info.num_classes != spec.model_cfg.num_classes:
      raise ValueError(f"num_classes={spec.model_cfg.num_classes} but dataset "
                       f"{spec.data_cfg.dataset} has {self.info.num_classes} classes")
    apply_run_settings(cfg)
    self.objective = objective or objectives.get(cfg.train_mode)(spec)
    self.num_examples = (self.info.num_labelled_examples if self.objective.subset == "labelled"
                         else self.info.num_train_examples)
    cfg.validate(num_replicas=self.strategy.num_replicas_in_sync,
                 num_train_examples=self.num_examples)
    self.total_steps = schedules.total_train_steps(
        self.num_examples, cfg.train_epochs, cfg.train_steps, cfg.train_batch_size)
    self.epoch_steps = max(1, int(round(self.num_examples / cfg.train_batch_size)))
    self.checkpoint_every = cfg.checkpoint_steps or cfg.checkpoint_epochs * self.epoch_steps
    self.steps_per_loop = cfg.steps_per_loop or min(self.checkpoint_every, 50)
    self._stop_reason = None
    self._examples = {}
    self.augment_on = pipeline.augment_placement(spec.data_cfg.augment_on, self.strategy)

    from tf_simclr.models.simclr import build_model
    with self.strategy.scope():
      self.model = build_model(spec.model_cfg, linear_eval_head=self.objective.linear_eval_head)
      self.schedule = schedules.WarmupCosineDecay(
          cfg.learning_rate, cfg.train_batch_size, self.num_examples, cfg.warmup_epochs,
          self.total_steps, cfg.learning_rate_scaling)
      optimizer = factory.build_optimizer(cfg.optimizer, self.schedule, cfg.momentum,
                                          cfg.weight_decay)
      if cfg.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
      self.optimizer = optimizer
      # Slots must exist before the first distributed step (see the notes).
      self.optimizer.build(self.model.trainable_variables)
      names = ("loss", "weight_decay") + tuple(self.objective.metric_names)
      self.metrics = {name: keras.metrics.Mean(name) for name in names}
      self._first_bad_step = tf.Variable(-1, dtype=tf.int64, trainable=False,
                                         name="first_bad_step")
      extra_state = self.objective.build(self.model)
    self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                          global_step=self.global_step, **extra_state)
    self.manager = tf.train.CheckpointManager(
        self.checkpoint, spec.model_dir, max_to_keep=cfg.keep_checkpoint_max,
        checkpoint_name=checkpoints.CHECKPOINT_PREFIX)

  # ---------------------------------------------------------------- state

  def restore_or_initialize(self):
    """Resumes from model_dir's latest checkpoint (model, optimizer, step) if there is one.
    Returns the step training starts at (0 for a new run; see initialize_from)."""
    latest = checkpoints.latest_usable(self.manager, self.spec.is_chief)
    if latest:
      checkpoints.check_compatible(latest, self.model)
      self.checkpoint.read(latest).assert_existing_objects_matched()
      step = int(self.global_step.numpy())
      log(f"Resumed from {latest} at step {step}")
      return step
    return 0

  def initialize_from(self, prefix):
    """Weights-only initialisation of a new run from another run's checkpoint (the supervised
    head too where it fits, unless train_cfg.zero_init_logits_layer)."""
    zero_init_logits_layer = self.spec.train_cfg.zero_init_logits_layer
    head = self.model.supervised_head
    head_fits = True
    try:
      checkpoints.check_compatible(prefix, self.model, parts=("supervised_head",))
    except checkpoints.ArchitectureMismatchError:
      head_fits = False
    parts = ("resnet", "projection_head")
    if head_fits and not zero_init_logits_layer:
      parts += ("supervised_head",)
    checkpoints.restore_model(prefix, self.model, parts)
    if zero_init_logits_layer:
      for v in head.trainable_variables:
        v.assign(tf.zeros(v.shape, v.dtype))
    log(f"Initialised {', '.join(parts)} from {prefix}"
        + (" (supervised head zero-initialised)" if zero_init_logits_layer else ""))

  def save(self, step):
    self.global_step.assign(step)
    if self.spec.is_chief:
      return checkpoints.save_checkpoint(self.manager, step)
    # Non-chief workers write to a scratch directory so collective saves stay in step.
    scratch = os.path.join(self.spec.model_dir, f".worker_tmp_{os.getpid()}")
    path = checkpoints.save_checkpoint(tf.train.CheckpointManager(self.checkpoint, scratch, 1),
                                       step)
    tf.io.gfile.rmtree(scratch)
    return path

  def request_stop(self, reason):
    """Ends training after the current loop of steps, with a checkpoint (callbacks call it)."""
    self._stop_reason = reason

  def first_bad_step(self):
    """The first step whose loss was not finite, or -1."""
    return int(self._first_bad_step.numpy())

  # ---------------------------------------------------------------- data

  def examples(self, subset):
    """The training examples of `subset` (datasets.load_train), loaded once per run."""
    if subset not in self._examples:
      self._examples[subset] = datasets.load_train(self.spec.data_cfg, subset)
    return self._examples[subset]

  def train_dataset(self, strategy, start_step):
    """The objective's training stream from `start_step`, distributed by `strategy`."""
    subset = self.objective.subset
    return pipeline.build_train_dataset(
        strategy, self.spec.data_cfg, global_batch_size=self.spec.train_cfg.train_batch_size,
        views=self.objective.views, contrastive=self.objective.contrastive_augmentation,
        subset=subset, start_step=start_step, source=self.examples(subset),
        on_device=self.augment_on == "device")

  def labelled_dataset(self, start_step):
    """The labelled subset, one view, as fine-tuning sees it (an objective's extra stream)."""
    return pipeline.build_train_dataset(
        self.strategy, self.spec.data_cfg, global_batch_size=self.spec.train_cfg.train_batch_size,
        views=1, contrastive=False, subset="labelled", start_step=start_step,
        on_device=self.augment_on == "device")

  def augmented(self, batch, labelled=False):
    """A batch of `train_dataset` (or of `labelled_dataset`) as the model sees it: with the
    augmentations placed on the device, they run here (pipeline.augment_on_device)."""
    if self.augment_on != "device":
      return batch
    views, contrastive = ((1, False) if labelled else
                          (self.objective.views, self.objective.contrastive_augmentation))
    return pipeline.augment_on_device(batch, self.spec.data_cfg, views=views,
                                      contrastive=contrastive)

  # ---------------------------------------------------------------- steps

  def train_step(self, batch, labelled_batch=None):
    """One replica's step: the objective's loss plus weight decay, one optimizer update."""
    cfg = self.spec.train_cfg
    variables = self.model.trainable_variables
    batch = self.augmented(batch)
    if labelled_batch is not None:
      labelled_batch = self.augmented(labelled_batch, labelled=True)
    with tf.GradientTape() as tape:
      loss, metrics = self.objective.loss(self.model, batch, labelled_batch)
      weight_decay = losses.weight_decay_loss(variables, cfg.weight_decay, cfg.optimizer)
      total = loss + weight_decay
      # Keras sums gradients over replicas in apply_gradients: scale to a mean.
      scaled = total / self.strategy.num_replicas_in_sync
      if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
        scaled = self.optimizer.scale_loss(scaled)
    grads = tape.gradient(scaled, variables)
    self.optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None])
    self.objective.after_update(self.model, batch)
    metrics["loss"] = total
    metrics["weight_decay"] = weight_decay
    for name, value in metrics.items():
      self.metrics[name].update_state(value)
    return total

  def make_train_loop(self):
    """A tf.function running `num_steps` distributed steps from the iterators."""
    @tf.function
    def train_loop(iterator, labelled_iterator, num_steps):
      for _ in tf.range(num_steps):
        labelled = next(labelled_iterator) if labelled_iterator is not None else None
        total = self.strategy.run(self.train_step, args=(next(iterator), labelled))
        total = self.strategy.reduce(tf.distribute.ReduceOp.MEAN, total, axis=None)
        # Remember the first step whose loss is not finite, to name it in the error.
        bad = tf.logical_and(tf.logical_not(tf.math.is_finite(total)),
                             self._first_bad_step < 0)
        self._first_bad_step.assign(tf.where(bad, self.optimizer.iterations - 1,
                                             self._first_bad_step))
    return train_loop

  # ---------------------------------------------------------------- loop

  def train(self, step):
    """Trains from `step` (see restore_or_initialize) to the last step; returns it."""
    cfg = self.spec.train_cfg
    if step >= self.total_steps:
      log(f"Training already finished: step {step} of {self.total_steps}")
      return step
    if self.spec.is_chief:
      pretrained.write_model_config(self.spec.model_dir, self.spec.model_cfg)
    iterator = iter(self.train_dataset(self.strategy, step))
    labelled_iterator = (iter(self.labelled_dataset(step)) if self.objective.labelled_stream
                         else None)
    train_loop = self.make_train_loop()
    self._stop_reason = None
    try:
      for c in self.callbacks:
        c.on_train_begin(self, step)
      while step < self.total_steps:
        next_checkpoint = (step // self.checkpoint_every + 1) * self.checkpoint_every
        n = min(self.steps_per_loop, next_checkpoint - step, self.total_steps - step)
        loop_start = time.time()
        train_loop(iterator, labelled_iterator, tf.constant(n))
        logs = {name: float(m.result()) for name, m in self.metrics.items()}
        elapsed = time.time() - loop_start
        step += n
        logs["learning_rate"] = float(self.schedule(step))
        logs["images_per_sec"] = n * cfg.train_batch_size / max(elapsed, 1e-9)
        for c in self.callbacks:
          c.on_loop_end(self, step, logs)
        for m in self.metrics.values():
          m.reset_state()
        saved = None
        if step % self.checkpoint_every == 0 or step == self.total_steps:
          saved = self.save(step)
          for c in self.callbacks:
            c.on_checkpoint(self, step, saved)
        if self._stop_reason:
          path = saved or self.save(step)
          raise Interrupted(f"{self._stop_reason} at step {step}; checkpoint {path} saved. "
                            "Run the same command again to resume.")
      for c in self.callbacks:
        c.on_train_end(self, step)
    finally:
      for c in self.callbacks:
        c.close(self)
    return step

  # ---------------------------------------------------------------- eval

  def evaluate(self, prefix=None):
    """Evaluates the model (restored from checkpoint `prefix` if given) on the eval split;
    the callbacks' on_evaluate see (and may extend) the result, which is returned."""
    if prefix is not None:
      checkpoints.verify_checkpoint(prefix)
      checkpoints.check_compatible(prefix, self.model)
      tf.train.Checkpoint(model=self.model, global_step=self.global_step).read(
          prefix).expect_partial()
    cfg = self.spec.train_cfg
    result = evaluation.evaluate(
        self.model, self.objective, self.strategy, self.spec.data_cfg,
        eval_batch_size=cfg.eval_batch_size, eval_steps=cfg.eval_steps,
        num_classes=self.spec.model_cfg.num_classes, weight_decay=cfg.weight_decay,
        optimizer_name=cfg.optimizer, step=int(self.global_step.numpy()))
    for c in self.callbacks:
      c.on_evaluate(self, result)
    return result
