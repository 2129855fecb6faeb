"""What happens around the training loop, as callbacks a caller adds or leaves out.

The loop calls, in order: `on_train_begin` once; per loop of steps `on_loop_end` (the metrics
of the loop's steps, before any checkpoint of that step) and `on_checkpoint` after each save;
`on_train_end` after the last step; `on_evaluate` with each eval result (callbacks may add
figures to it: a later callback sees them); `close` always, also after an error.
`default_callbacks` is run.py's set.
"""

import math
import os
import signal
import time

import tensorflow as tf

from tf_simclr import files
from tf_simclr.data import pipeline


class NonFiniteLossError(RuntimeError):
  pass


class Callback:

  def on_train_begin(self, trainer, step):
    pass

  def on_loop_end(self, trainer, step, logs):
    """`logs`: the mean of each metric over the loop's steps, learning_rate, images_per_sec."""

  def on_checkpoint(self, trainer, step, path):
    pass

  def on_train_end(self, trainer, step):
    pass

  def on_evaluate(self, trainer, result):
    pass

  def close(self, trainer):
    pass


def log(message):
  print(message, flush=True)


def format_seconds(seconds):
  seconds = int(max(seconds, 0))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s"


_writers = {}


def summary_writer(logdir):
  """One summary writer per directory and process, so that callbacks writing to the same
  directory (scalars, images) share one event file."""
  if logdir not in _writers:
    _writers[logdir] = tf.summary.create_file_writer(logdir)
  return _writers[logdir]


class NonFiniteCheck(Callback):
  """Stops the run, before the step is checkpointed, once the loss is not finite."""

  def on_loop_end(self, trainer, step, logs):
    bad_step = trainer.first_bad_step()
    if bad_step < 0 and math.isfinite(logs["loss"]):
      return
    latest = trainer.manager.latest_checkpoint
    raise NonFiniteLossError(
        f"loss became non-finite at step {bad_step if bad_step >= 0 else step}; "
        + (f"the last good checkpoint {latest} is kept" if latest else
           f"no checkpoint written yet in {trainer.spec.model_dir}")
        + ". Lower --learning_rate or check the data.")


class ProgressLogger(Callback):
  """One line per loop of steps: rate, learning rate, metrics and the time left."""

  def on_train_begin(self, trainer, step):
    cfg = trainer.spec.train_cfg
    log(f"Training {cfg.train_mode} from step {step} to {trainer.total_steps} "
        f"({trainer.num_examples} examples, batch {cfg.train_batch_size}, "
        f"{trainer.strategy.num_replicas_in_sync} replica(s), "
        f"{trainer.steps_per_loop} steps per loop)")
    self.start_time, self.start_step = time.time(), step

  def on_loop_end(self, trainer, step, logs):
    overall = (step - self.start_step) / max(time.time() - self.start_time, 1e-9)
    eta = (trainer.total_steps - step) / max(overall, 1e-9)
    shown = " ".join(f"{k}={v:.4f}" for k, v in logs.items()
                     if k not in ("learning_rate", "images_per_sec"))
    log(f"step {step}/{trainer.total_steps} | {logs['images_per_sec']:.0f} img/s | "
        f"lr={logs['learning_rate']:.4g} {shown} | ETA {format_seconds(eta)}")

  def on_evaluate(self, trainer, result):
    shown = " ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in result.items()
                     if k.startswith("eval/") and isinstance(v, float))
    log(f"eval at step {result['global_step']}: {shown} ({result['eval/num_examples']} examples)")


class TensorBoard(Callback):
  """Training scalars (train/) about every `every` steps, eval results (eval/)."""

  def __init__(self, model_dir, every):
    self.model_dir, self.every = model_dir, every
    self.writer = None

  def on_train_begin(self, trainer, step):
    self.writer = summary_writer(os.path.join(self.model_dir, "train"))
    self.last_step = step

  def on_loop_end(self, trainer, step, logs):
    previous, self.last_step = self.last_step, step
    if self.every and (step // self.every > previous // self.every
                       or step == trainer.total_steps):
      with self.writer.as_default(step=step):
        for name, value in logs.items():
          tf.summary.scalar(f"train/{name}", value)

  def on_evaluate(self, trainer, result):
    writer = summary_writer(os.path.join(self.model_dir, "eval"))
    with writer.as_default(step=result["global_step"]):
      for k, v in result.items():
        if k.startswith("eval/"):
          tf.summary.scalar(k, v)
    writer.flush()

  def close(self, trainer):
    if self.writer is not None:
      self.writer.flush()


class ImageSummary(Callback):
  """A few augmented training images as the model sees them (every view), at step 0."""

  def __init__(self, model_dir, max_outputs=4):
    self.model_dir, self.max_outputs = model_dir, max_outputs

  def on_train_begin(self, trainer, step):
    if step:
      return
    batch = next(iter(trainer.train_dataset(tf.distribute.get_strategy(), start_step=0)))
    images = trainer.augmented(batch)["image"][:self.max_outputs]
    writer = summary_writer(os.path.join(self.model_dir, "train"))
    with writer.as_default(step=0):
      for i, view in enumerate(tf.split(images, images.shape[-1] // 3, axis=-1)):
        tf.summary.image(f"augmented_images/view_{i + 1}", view, max_outputs=self.max_outputs)
    writer.flush()


class StopOnSignal(Callback):
  """SIGTERM/SIGINT end the run at the end of the current loop, with a checkpoint there."""

  def on_train_begin(self, trainer, step):
    self.received = []
    self.previous = {sig: signal.signal(sig, lambda s, f: self.received.append(s))
                     for sig in (signal.SIGTERM, signal.SIGINT)}

  def on_loop_end(self, trainer, step, logs):
    if self.received:
      trainer.request_stop(f"stopped by signal {self.received[0]}")

  def close(self, trainer):
    for sig, handler in getattr(self, "previous", {}).items():
      signal.signal(sig, handler)
    self.previous = {}


class KnnMonitor(Callback):
  """Weighted kNN top-1 (tf_simclr.knn) of the trunk's pooled features of the eval split
  against those of every training image, unaugmented: a readout of the representation with
  no head to train. Adds `eval/knn_top_1_accuracy` to each eval result (put it before the
  callbacks that write results). The training images are the run's, loaded once."""

  def __init__(self, k=200, temperature=0.1):
    self.k, self.temperature = k, temperature

  def on_evaluate(self, trainer, result):
    from tf_simclr import knn
    from tf_simclr.train.evaluation import global_eval_batch
    strategy = trainer.strategy
    batch = global_eval_batch(strategy, trainer.spec.train_cfg.eval_batch_size)
    data_cfg = trainer.spec.data_cfg
    bank = pipeline.build_eval_dataset(strategy, data_cfg, global_batch_size=batch,
                                       source=trainer.examples("all"))
    queries = pipeline.build_eval_dataset(strategy, data_cfg, global_batch_size=batch)
    start = time.time()
    out = knn.knn_accuracy(
        strategy, lambda images: trainer.model(images, training=False)["final_avg_pool"],
        bank, queries, trainer.spec.model_cfg.num_classes, self.k, self.temperature)
    result["eval/knn_top_1_accuracy"] = out["top_1"]
    log(f"kNN monitor: top-1 {out['top_1']:.4f} (k={self.k}, {out['bank_size']} training "
        f"images, {time.time() - start:.0f}s)")


class EvaluateAtCheckpoints(Callback):
  """Evaluates the model at every checkpoint (the eval split once per checkpoint)."""

  def on_checkpoint(self, trainer, step, path):
    trainer.evaluate()


class ResultFiles(Callback):
  """result_<step>.json and result.json in model_dir, each written atomically."""

  def __init__(self, model_dir):
    self.model_dir = model_dir

  def on_evaluate(self, trainer, result):
    for name in (f"result_{result['global_step']}.json", "result.json"):
      files.write_json_atomic(os.path.join(self.model_dir, name), result)


class Export(Callback):
  """Calls export_fn(model, step) after the last step (see tf_simclr.export)."""

  def __init__(self, export_fn):
    self.export_fn = export_fn

  def on_train_end(self, trainer, step):
    self.export_fn(trainer.model, step)


def default_callbacks(model_dir, *, is_chief, summary_steps, export_fn=None, knn_monitor=None):
  """run.py's callbacks: every worker checks the loss, stops on signals, logs progress and
  runs the kNN monitor (a KnnMonitor or None) at evaluations; the chief also writes
  summaries, result files and the export."""
  callbacks = [NonFiniteCheck(), StopOnSignal()]
  if knn_monitor is not None:
    callbacks.append(knn_monitor)
  callbacks.append(ProgressLogger())
  if is_chief:
    callbacks += [TensorBoard(model_dir, summary_steps), ImageSummary(model_dir),
                  ResultFiles(model_dir)]
    if export_fn is not None:
      callbacks.append(Export(export_fn))
  return callbacks
