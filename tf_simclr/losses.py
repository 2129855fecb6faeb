"""Training objectives of SimCLRv2: NT-Xent, supervised CE, distillation, L2 decay.

Every loss is computed in float32 so that mixed-precision models (bfloat16
activations) keep full-precision softmax/log arithmetic.
"""

import tensorflow as tf

# Subtracted from self-similarity logits so they vanish from the softmax while
# staying finite (an -inf would turn 0 * -inf into NaN in the cross-entropy).
_MASK_PENALTY = 1e9


def contrastive_loss(hidden, hidden_norm=True, temperature=0.1, memory=None):
  """NT-Xent loss with negatives drawn from the global (all-replica) batch.

  Args:
    hidden: [2n, d] projections; rows [:n] are view 1, rows [n:] view 2.
    hidden_norm: L2-normalise projections first (cosine similarity).
    temperature: softmax temperature.
    memory: optional [K, d] L2-normalised negatives (tf_simclr.memory.MemoryBuffer), the
      same on every replica. Each row's softmax then also runs over its K dot products with
      them, divided by `temperature`; they get no gradient. None: plain NT-Xent.

  Returns:
    (loss, logits_ab, labels). `loss` is the mean cross-entropy of the
    view1->view2 direction plus that of view2->view1 over this replica's rows.
    `logits_ab` is [n, N] (local view-1 rows against the global view-2 batch)
    and `labels` the [n, 2N] one-hot targets, N being the global batch size.
    Both leave the memory out, so contrastive_metrics mean the same whatever K.
  """
  hidden = tf.cast(hidden, tf.float32)
  if hidden_norm:
    hidden = tf.math.l2_normalize(hidden, axis=-1)
  view1, view2 = tf.split(hidden, 2, axis=0)
  local_n = tf.shape(view1)[0]

  ctx = tf.distribute.get_replica_context()
  if ctx is not None and ctx.num_replicas_in_sync > 1:
    # all_gather is differentiable: each replica's gradient then includes
    # the terms its projections contribute as negatives elsewhere.
    view1_all = ctx.all_gather(view1, axis=0)
    view2_all = ctx.all_gather(view2, axis=0)
    offset = tf.cast(ctx.replica_id_in_sync_group, tf.int32) * local_n
  else:
    view1_all, view2_all = view1, view2
    offset = 0
  global_n = tf.shape(view1_all)[0]

  positives = tf.range(local_n) + offset
  labels = tf.one_hot(positives, 2 * global_n)
  self_mask = tf.one_hot(positives, global_n) * _MASK_PENALTY

  logits_ab = tf.matmul(view1, view2_all, transpose_b=True) / temperature
  logits_ba = tf.matmul(view2, view1_all, transpose_b=True) / temperature
  logits_aa = tf.matmul(view1, view1_all, transpose_b=True) / temperature - self_mask
  logits_bb = tf.matmul(view2, view2_all, transpose_b=True) / temperature - self_mask

  # Candidates per row: the other view of all N examples (one positive) plus
  # the same view of the N-1 other examples: 2N-2 negatives (+ K from memory).
  candidates_a, candidates_b, targets = [logits_ab, logits_aa], [logits_ba, logits_bb], labels
  if memory is not None:
    # MoCo's queued keys are constants of the step: no gradient reaches the memory network.
    memory = tf.stop_gradient(tf.cast(memory, tf.float32))
    candidates_a.append(tf.matmul(view1, memory, transpose_b=True) / temperature)
    candidates_b.append(tf.matmul(view2, memory, transpose_b=True) / temperature)
    targets = tf.pad(labels, [[0, 0], [0, tf.shape(memory)[0]]])
  loss_a = tf.nn.softmax_cross_entropy_with_logits(
      targets, tf.concat(candidates_a, axis=1))
  loss_b = tf.nn.softmax_cross_entropy_with_logits(
      targets, tf.concat(candidates_b, axis=1))
  loss = tf.reduce_mean(loss_a) + tf.reduce_mean(loss_b)
  return loss, logits_ab, labels


def contrastive_metrics(logits_ab, labels):
  """contrast_acc (positive ranked first among cross-view logits) and the
  mean entropy of the cross-view softmax, as logged by the reference."""
  logits_ab = tf.cast(logits_ab, tf.float32)
  hit = tf.equal(tf.argmax(labels, axis=1), tf.argmax(logits_ab, axis=1))
  probs = tf.nn.softmax(logits_ab)
  entropy = -tf.reduce_sum(probs * tf.math.log(probs + 1e-8), axis=-1)
  return {
      "contrast_acc": tf.reduce_mean(tf.cast(hit, tf.float32)),
      "contrast_entropy": tf.reduce_mean(entropy),
  }


def supervised_loss(labels, logits, weights=None):
  """Softmax cross-entropy over integer labels, averaged (weighted if given)."""
  per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32))
  if weights is None:
    return tf.reduce_mean(per_example)
  weights = tf.cast(weights, tf.float32)
  return tf.math.divide_no_nan(
      tf.reduce_sum(per_example * weights), tf.reduce_sum(weights))


def distillation_loss(teacher_logits, student_logits, temperature=1.0):
  """SimCLRv2 distillation: cross-entropy of the student's tempered softmax
  against the (frozen) teacher's tempered softmax, averaged over the batch."""
  teacher = tf.stop_gradient(tf.cast(teacher_logits, tf.float32))
  student = tf.cast(student_logits, tf.float32)
  targets = tf.nn.softmax(teacher / temperature, axis=-1)
  log_probs = tf.nn.log_softmax(student / temperature, axis=-1)
  return tf.reduce_mean(-tf.reduce_sum(targets * log_probs, axis=-1))


def _is_bn_param(variable):
  return variable.name in ("gamma", "beta")


def weight_decay_loss(variables, weight_decay, optimizer_name):
  """L2 penalty `weight_decay * sum(0.5 * w**2)` added to the loss.

  LARS already decays every variable except BN/bias and the supervised head,
  so for it only the head's kernels are penalised here; for the other
  optimizers every trainable variable but BN gamma/beta is.
  """
  if optimizer_name == "lars":
    selected = [
        v for v in variables
        if "head_supervised" in getattr(v, "path", v.name)
        and v.name != "bias" and not _is_bn_param(v)
    ]
  else:
    selected = [v for v in variables if not _is_bn_param(v)]
  selected = [v for v in selected if v.trainable]
  if not selected or not weight_decay:
    return tf.constant(0.0, tf.float32)
  return weight_decay * tf.add_n(
      [tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in selected])
