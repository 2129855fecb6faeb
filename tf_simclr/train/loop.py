"""One custom training loop for every mode; the mode only chooses the objective.

pretrain: NT-Xent on two views over the global batch (+ a linear head on stop-gradient
          features when lineareval_while_pretraining);
finetune: softmax cross-entropy on labels;
distill:  cross-entropy to a frozen teacher's softened predictions (SimCLRv2 section 2.3),
          mixed with the labelled loss as the paper's eq. 3 (weights alpha and 1 - alpha).

Several steps run per tf.function call (`steps_per_loop`) so Python never sits between two
steps; metrics, summaries and progress are read once per loop.
"""

import dataclasses
import json
import math
import os
import signal
import time
from typing import Optional

import keras
import tensorflow as tf

from tf_simclr import losses
from tf_simclr.config import DataConfig, DistillConfig, ModelConfig, TrainConfig
from tf_simclr.data import datasets, pipeline
from tf_simclr.optim import factory, schedules
from tf_simclr.train import checkpoints


class NonFiniteLossError(RuntimeError):
  pass


class Interrupted(RuntimeError):
  """Raised after a SIGTERM/SIGINT once the current step is checkpointed."""


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
  # Called as export_fn(model, step) after training, on the chief (see tf_simclr.export).
  export_fn: Optional[object] = None


def log(message):
  print(message, flush=True)


def format_seconds(seconds):
  seconds = int(max(seconds, 0))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s"


def train_subset(train_mode):
  # Pretraining and distillation see every training image (labels unused); fine-tuning
  # only the labelled fraction.
  return "labelled" if train_mode == "finetune" else "all"


def num_train_examples(info: datasets.DatasetInfo, train_mode):
  return info.num_labelled_examples if train_mode == "finetune" else info.num_train_examples


class Trainer:
  """Builds model, optimizer, checkpoint and the distributed step functions of a run."""

  def __init__(self, spec: RunSpec, teacher=None, info=None):
    """`info` (a datasets.DatasetInfo) skips reading the dataset's sizes again: run.py has
    read them already, and the training-step benchmark runs without any dataset."""
    self.spec = spec
    cfg = spec.train_cfg
    self.strategy = spec.strategy
    self.mode = cfg.train_mode
    self.info = info if info is not None else datasets.dataset_info(spec.data_cfg)
    if self.info.num_classes != spec.model_cfg.num_classes:
      raise ValueError(f"num_classes={spec.model_cfg.num_classes} but dataset "
                       f"{spec.data_cfg.dataset} has {self.info.num_classes} classes")
    self.num_examples = num_train_examples(self.info, self.mode)
    if self.num_examples < cfg.train_batch_size:
      raise ValueError(
          f"train_batch_size={cfg.train_batch_size} is larger than the "
          f"{self.num_examples} training examples of {spec.data_cfg.dataset}")
    replicas = self.strategy.num_replicas_in_sync
    if cfg.train_batch_size % replicas:
      raise ValueError(f"train_batch_size={cfg.train_batch_size} is not divisible by the "
                       f"{replicas} replicas")
    self.total_steps = schedules.total_train_steps(
        self.num_examples, cfg.train_epochs, cfg.train_steps, cfg.train_batch_size)
    self.epoch_steps = max(1, int(round(self.num_examples / cfg.train_batch_size)))
    self.checkpoint_every = cfg.checkpoint_steps or cfg.checkpoint_epochs * self.epoch_steps
    self.steps_per_loop = cfg.steps_per_loop or min(self.checkpoint_every, 50)
    self.teacher = teacher

    from tf_simclr.models.simclr import build_model
    with self.strategy.scope():
      self.model = build_model(
          spec.model_cfg,
          linear_eval_head=self.mode == "pretrain" and cfg.lineareval_while_pretraining)
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
      self.metrics = {name: keras.metrics.Mean(name) for name in self._metric_names()}
      self.first_bad_step = tf.Variable(-1, dtype=tf.int64, trainable=False,
                                        name="first_bad_step")
    self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                          global_step=self.global_step)
    self.manager = tf.train.CheckpointManager(
        self.checkpoint, spec.model_dir, max_to_keep=cfg.keep_checkpoint_max,
        checkpoint_name=checkpoints.CHECKPOINT_PREFIX)

  def _metric_names(self):
    names = ["loss", "weight_decay"]
    if self.mode == "pretrain":
      names += ["contrast_loss", "contrast_acc", "contrast_entropy"]
      if self.spec.train_cfg.lineareval_while_pretraining:
        names += ["supervised_loss", "supervised_acc"]
    elif self.mode == "finetune":
      names += ["supervised_loss", "supervised_acc"]
    else:
      names += ["distill_loss", "teacher_agreement"]
      if self.spec.distill_cfg.distill_alpha < 1:
        names += ["supervised_loss", "supervised_acc"]
    return names

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

  def initialize_from(self, prefix, zero_init_logits_layer):
    """Weights-only initialisation of a new run from another run's checkpoint."""
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

  # ---------------------------------------------------------------- steps

  def _objective(self, batch, labelled_batch):
    """Returns (loss without weight decay, {metric: value}) for one replica's batch."""
    cfg = self.spec.train_cfg
    images, labels = batch["image"], batch["label"]
    metrics = {}
    if self.mode == "pretrain":
      # Two views are stacked on channels; the model sees them as one batch of 2n images.
      views = tf.concat(tf.split(images, 2, axis=-1), axis=0)
      outputs = self.model(views, training=True)
      loss, logits_ab, con_labels = losses.contrastive_loss(
          outputs["proj_head_output"], hidden_norm=cfg.hidden_norm, temperature=cfg.temperature)
      metrics["contrast_loss"] = loss
      metrics.update(losses.contrastive_metrics(logits_ab, con_labels))
      if cfg.lineareval_while_pretraining:
        sup_labels = tf.concat([labels, labels], 0)
        sup = losses.supervised_loss(sup_labels, outputs["logits_sup"])
        metrics["supervised_loss"] = sup
        metrics["supervised_acc"] = _accuracy(sup_labels, outputs["logits_sup"])
        loss += sup
    elif self.mode == "finetune":
      logits = self.model(images, training=True)["logits_sup"]
      loss = losses.supervised_loss(labels, logits)
      metrics["supervised_loss"] = loss
      metrics["supervised_acc"] = _accuracy(labels, logits)
    else:
      teacher_logits = self.teacher(images, training=False)["logits_sup"]
      logits = self.model(images, training=True)["logits_sup"]
      loss = losses.distillation_loss(teacher_logits, logits,
                                      self.spec.distill_cfg.distill_temperature)
      metrics["distill_loss"] = loss
      metrics["teacher_agreement"] = _agreement(teacher_logits, logits)
      alpha = self.spec.distill_cfg.distill_alpha
      if alpha < 1:
        l_logits = self.model(labelled_batch["image"], training=True)["logits_sup"]
        sup = losses.supervised_loss(labelled_batch["label"], l_logits)
        metrics["supervised_loss"] = sup
        metrics["supervised_acc"] = _accuracy(labelled_batch["label"], l_logits)
        loss = alpha * loss + (1 - alpha) * sup
    return loss, metrics

  def _train_step(self, batch, labelled_batch):
    cfg = self.spec.train_cfg
    variables = self.model.trainable_variables
    with tf.GradientTape() as tape:
      loss, metrics = self._objective(batch, labelled_batch)
      weight_decay = losses.weight_decay_loss(variables, cfg.weight_decay, cfg.optimizer)
      total = loss + weight_decay
      # Keras sums gradients over replicas in apply_gradients: scale to a mean.
      scaled = total / self.strategy.num_replicas_in_sync
      if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
        scaled = self.optimizer.scale_loss(scaled)
    grads = tape.gradient(scaled, variables)
    pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
    self.optimizer.apply_gradients(pairs)
    metrics["loss"] = total
    metrics["weight_decay"] = weight_decay
    for name, value in metrics.items():
      self.metrics[name].update_state(value)
    return total

  def _make_train_loop(self):
    @tf.function
    def train_loop(iterator, labelled_iterator, num_steps):
      for _ in tf.range(num_steps):
        labelled = next(labelled_iterator) if labelled_iterator is not None else None
        total = self.strategy.run(self._train_step, args=(next(iterator), labelled))
        total = self.strategy.reduce(tf.distribute.ReduceOp.MEAN, total, axis=None)
        # Remember the first step whose loss is not finite, to name it in the error.
        bad = tf.logical_and(tf.logical_not(tf.math.is_finite(total)),
                             self.first_bad_step < 0)
        self.first_bad_step.assign(tf.where(bad, self.optimizer.iterations - 1,
                                            self.first_bad_step))
    return train_loop

  # ---------------------------------------------------------------- loop

  def train(self, step):
    """Trains from `step` (see restore_or_initialize) to the last step; returns it."""
    spec, cfg = self.spec, self.spec.train_cfg
    if step >= self.total_steps:
      log(f"Training already finished: step {step} of {self.total_steps}")
      return step
    source = datasets.load_train(spec.data_cfg, train_subset(self.mode))
    dataset = pipeline.build_train_dataset(
        self.strategy, spec.data_cfg, global_batch_size=cfg.train_batch_size,
        train_mode=self.mode, subset=train_subset(self.mode), start_step=step, source=source)
    iterator = iter(dataset)
    labelled_iterator = None
    if self.mode == "distill" and spec.distill_cfg.distill_alpha < 1:
      labelled_iterator = iter(pipeline.build_train_dataset(
          self.strategy, spec.data_cfg, global_batch_size=cfg.train_batch_size,
          train_mode="finetune", subset="labelled", start_step=step))
    writer = (tf.summary.create_file_writer(os.path.join(spec.model_dir, "train"))
              if spec.is_chief else tf.summary.create_noop_writer())
    if step == 0 and spec.is_chief:
      self._write_image_summary(writer, source)
    train_loop = self._make_train_loop()

    interrupted = []
    previous = {sig: signal.signal(sig, lambda s, f: interrupted.append(s))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    log(f"Training {self.mode} from step {step} to {self.total_steps} "
        f"({self.num_examples} examples, batch {cfg.train_batch_size}, "
        f"{self.strategy.num_replicas_in_sync} replica(s), {self.steps_per_loop} steps per loop)")
    start_time, start_step = time.time(), step
    try:
      while step < self.total_steps:
        next_checkpoint = (step // self.checkpoint_every + 1) * self.checkpoint_every
        n = min(self.steps_per_loop, next_checkpoint - step, self.total_steps - step)
        loop_start = time.time()
        train_loop(iterator, labelled_iterator, tf.constant(n))
        values = {name: float(m.result()) for name, m in self.metrics.items()}
        bad_step = int(self.first_bad_step.numpy())
        step += n
        if bad_step >= 0 or not math.isfinite(values["loss"]):
          raise NonFiniteLossError(
              f"loss became non-finite at step {bad_step if bad_step >= 0 else step}; "
              + (f"the last good checkpoint {self.manager.latest_checkpoint} is kept"
                 if self.manager.latest_checkpoint else
                 f"no checkpoint written yet in {spec.model_dir}")
              + ". Lower --learning_rate or check the data.")
        elapsed = time.time() - loop_start
        rate = n * cfg.train_batch_size / max(elapsed, 1e-9)
        overall = (step - start_step) / max(time.time() - start_time, 1e-9)
        eta = (self.total_steps - step) / max(overall, 1e-9)
        lr = float(self.schedule(step))
        shown = " ".join(f"{k}={v:.4f}" for k, v in values.items())
        log(f"step {step}/{self.total_steps} | {rate:.0f} img/s | lr={lr:.4g} {shown} | "
            f"ETA {format_seconds(eta)}")
        every = cfg.train_summary_steps
        if every and (step // every > (step - n) // every or step == self.total_steps):
          with writer.as_default(step=step):
            for name, value in values.items():
              tf.summary.scalar(f"train/{name}", value)
            tf.summary.scalar("train/learning_rate", lr)
            tf.summary.scalar("train/images_per_sec", rate)
        for m in self.metrics.values():
          m.reset_state()
        if step % self.checkpoint_every == 0 or step == self.total_steps:
          self.save(step)
        if interrupted:
          path = self.save(step)
          raise Interrupted(
              f"stopped by signal {interrupted[0]} at step {step}; checkpoint {path} saved. "
              "Run the same command again to resume.")
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)
      writer.flush()
    if spec.export_fn is not None and spec.is_chief:
      spec.export_fn(self.model, step)
    return step

  def _write_image_summary(self, writer, source):
    """A few augmented training images, as the model sees them (both views when pretraining):
    the first ones of step 1, from the training examples already loaded."""
    batch = next(iter(pipeline.build_train_dataset(
        tf.distribute.get_strategy(), self.spec.data_cfg,
        global_batch_size=self.spec.train_cfg.train_batch_size, train_mode=self.mode,
        subset=train_subset(self.mode), source=source)))
    images = batch["image"][:4]
    views = tf.split(images, images.shape[-1] // 3, axis=-1)
    with writer.as_default(step=0):
      for i, view in enumerate(views):
        tf.summary.image(f"augmented_images/view_{i + 1}", view, max_outputs=4)

  # ---------------------------------------------------------------- eval

  def evaluate(self, prefix=None):
    """Top-1/top-5 of the supervised head on the eval split (every example exactly once)."""
    spec = self.spec
    if prefix is not None:
      checkpoints.verify_checkpoint(prefix)
      checkpoints.check_compatible(prefix, self.model)
      tf.train.Checkpoint(model=self.model, global_step=self.global_step).read(
          prefix).expect_partial()
    step = int(self.global_step.numpy())
    batch_size = spec.train_cfg.eval_batch_size
    replicas = self.strategy.num_replicas_in_sync
    batch_size = max(replicas, batch_size // replicas * replicas)
    dataset = pipeline.build_eval_dataset(self.strategy, spec.data_cfg,
                                          global_batch_size=batch_size)
    num_classes = spec.model_cfg.num_classes
    teacher = self.teacher if self.mode == "distill" else None

    def eval_step(batch):
      logits = tf.cast(self.model(batch["image"], training=False)["logits_sup"], tf.float32)
      labels, mask = tf.cast(batch["label"], tf.int32), batch["mask"]
      sums = {
          "count": tf.reduce_sum(mask),
          "top_1": tf.reduce_sum(mask * top_k_correct(labels, logits, 1)),
          "top_5": tf.reduce_sum(mask * top_k_correct(labels, logits, min(5, num_classes))),
      }
      if teacher is not None:
        t_logits = tf.cast(teacher(batch["image"], training=False)["logits_sup"], tf.float32)
        sums["teacher_top_1"] = tf.reduce_sum(mask * top_k_correct(labels, t_logits, 1))
        sums["agreement"] = tf.reduce_sum(mask * tf.cast(
            tf.equal(tf.argmax(t_logits, -1), tf.argmax(logits, -1)), tf.float32))
      return sums

    @tf.function
    def distributed_eval_step(batch):
      sums = self.strategy.run(eval_step, args=(batch,))
      return {k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
              for k, v in sums.items()}

    totals = {}
    steps = spec.train_cfg.eval_steps
    for i, batch in enumerate(dataset):
      if steps and i >= steps:
        break
      for k, v in distributed_eval_step(batch).items():
        totals[k] = totals.get(k, 0.0) + float(v)
    count = max(totals.get("count", 0.0), 1.0)
    weight_decay = losses.weight_decay_loss(self.model.trainable_variables,
                                            spec.train_cfg.weight_decay,
                                            spec.train_cfg.optimizer)
    result = {
        "eval/label_top_1_accuracy": totals.get("top_1", 0.0) / count,
        "eval/label_top_5_accuracy": totals.get("top_5", 0.0) / count,
        "eval/regularization_loss": float(weight_decay),
        "eval/num_examples": int(totals.get("count", 0.0)),
        "global_step": step,
    }
    if teacher is not None:
      result["eval/teacher_top_1_accuracy"] = totals["teacher_top_1"] / count
      result["eval/teacher_student_agreement"] = totals["agreement"] / count
    if spec.is_chief:
      write_result(spec.model_dir, result)
      writer = tf.summary.create_file_writer(os.path.join(spec.model_dir, "eval"))
      with writer.as_default(step=step):
        for k, v in result.items():
          if k.startswith("eval/"):
            tf.summary.scalar(k, v)
      writer.flush()
    shown = " ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in result.items()
                     if k.startswith("eval/") and isinstance(v, float))
    log(f"eval at step {step}: {shown} ({result['eval/num_examples']} examples)")
    return result


def _accuracy(labels, logits):
  return tf.reduce_mean(tf.cast(
      tf.equal(tf.cast(labels, tf.int64), tf.argmax(logits, -1)), tf.float32))


def _agreement(teacher_logits, logits):
  return _accuracy(tf.argmax(teacher_logits, -1), logits)


def top_k_correct(labels, logits, k):
  """1.0 where the label is among the k first classes of `tf.math.top_k` (ties go to the
  lower class index, so top-1 is argmax, as the reference's accuracy), else 0.0.

  Not `tf.math.in_top_k`: it counts every class tied with the k-th as a hit, so a
  degenerate head (all logits equal) would score 100%.
  """
  hits = tf.equal(tf.math.top_k(logits, k).indices, tf.cast(labels, tf.int32)[:, None])
  return tf.cast(tf.reduce_any(hits, axis=-1), tf.float32)


def write_result(model_dir, result):
  """result_<step>.json and result.json, written atomically (temp file + rename)."""
  for name in (f"result_{result['global_step']}.json", "result.json"):
    write_json_atomic(os.path.join(model_dir, name), result)


def write_json_atomic(path, obj):
  tmp = f"{path}.tmp-{os.getpid()}"
  with checkpoints.writing(path, tmp):
    with tf.io.gfile.GFile(tmp, "w") as f:
      f.write(json.dumps(obj, indent=2, sort_keys=True))
    tf.io.gfile.rename(tmp, path, overwrite=True)
