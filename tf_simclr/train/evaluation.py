"""Evaluation of the supervised head on the eval split: top-1/top-5 over every example exactly
once, plus the objective's own figures. Returns the result; callbacks write it."""

import tensorflow as tf

from tf_simclr import losses
from tf_simclr.data import pipeline


def top_k_correct(labels, logits, k):
  """1.0 where the label is among the k first classes of `tf.math.top_k` (ties go to the
  lower class index, so top-1 is argmax, as the reference's accuracy), else 0.0.

  Not `tf.math.in_top_k`: it counts every class tied with the k-th as a hit, so a
  degenerate head (all logits equal) would score 100%.
  """
  hits = tf.equal(tf.math.top_k(logits, k).indices, tf.cast(labels, tf.int32)[:, None])
  return tf.cast(tf.reduce_any(hits, axis=-1), tf.float32)


def global_eval_batch(strategy, eval_batch_size):
  """eval_batch_size rounded down to a multiple of the replicas (at least one per replica)."""
  replicas = strategy.num_replicas_in_sync
  return max(replicas, eval_batch_size // replicas * replicas)


def evaluate(model, objective, strategy, data_cfg, *, eval_batch_size, eval_steps, num_classes,
             weight_decay, optimizer_name, step):
  """The eval result dict of `model` at `step` (keys as the reference's result.json)."""
  dataset = pipeline.build_eval_dataset(
      strategy, data_cfg, global_batch_size=global_eval_batch(strategy, eval_batch_size))

  def eval_step(batch):
    images = batch["image"]
    logits = tf.cast(model(images, training=False)["logits_sup"], tf.float32)
    labels, mask = tf.cast(batch["label"], tf.int32), batch["mask"]
    sums = {
        "count": tf.reduce_sum(mask),
        "eval/label_top_1_accuracy": tf.reduce_sum(mask * top_k_correct(labels, logits, 1)),
        "eval/label_top_5_accuracy": tf.reduce_sum(
            mask * top_k_correct(labels, logits, min(5, num_classes))),
    }
    sums.update(objective.eval_sums(images, logits, labels, mask))
    return sums

  @tf.function
  def distributed_eval_step(batch):
    sums = strategy.run(eval_step, args=(batch,))
    return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
            for k, v in sums.items()}

  totals = {}
  for i, batch in enumerate(dataset):
    if eval_steps and i >= eval_steps:
      break
    for k, v in distributed_eval_step(batch).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  count = totals.pop("count", 0.0)
  result = {"eval/label_top_1_accuracy": 0.0, "eval/label_top_5_accuracy": 0.0}
  result.update({k: v / max(count, 1.0) for k, v in totals.items()})
  result.update({
      "eval/regularization_loss": float(losses.weight_decay_loss(
          model.trainable_variables, weight_decay, optimizer_name)),
      "eval/num_examples": int(count),
      "global_step": step,
  })
  return result
