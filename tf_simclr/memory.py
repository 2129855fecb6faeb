"""SimCLRv2's memory: a moving-average copy of the network whose projections of earlier
batches are kept as extra negatives for NT-Xent (MoCo's momentum encoder and queue).

What the paper (Chen et al. 2020, "Big Self-Supervised Models are Strong Semi-Supervised
Learners", arXiv:2006.10029) specifies:
- Method: it incorporates "the memory mechanism from MoCo", a memory network "with a moving
  average of weights for stabilization" whose output is "buffered as negative examples".
  Its large batches (4096) already supply many negatives; the memory gains ~1% in linear
  evaluation and in fine-tuning on 1% of the labels (Appendix D).
- Settings and Implementation Details: memory buffer of 64K, EMA decay 0.999 (MoCo's
  values: K = 65,536, m = 0.999).
- Nothing else. Google's released code (github.com/google-research/simclr, tf1 and tf2)
  has no memory option, so every other detail below is our choice.

Choices the paper leaves open, and ours:
- Which network encodes the positives: the online network, in-batch, exactly as without
  memory (MoCo takes its positive key from the key encoder). The memory network only
  fills the buffer, so a buffer of size 0 is today's loss and the buffer only adds
  negatives (`losses.contrastive_loss(..., memory=buffer.memory_buffer)`).
- What is buffered: the memory network's L2-normalised projection-head outputs (what
  NT-Xent contrasts) of both views of every example of the global batch, 2N rows per step,
  in single-device order (`gather_views`), so every replica holds the same buffer.
- When: after the step's loss, so no batch meets its own memory encodings (among them
  each anchor's positive) as negatives. At the end of a step: `ema_update` from the online
  weights just updated, the memory network's forward pass on the step's views, `enqueue`.
- Memory network: built from the same ModelConfig, started as a copy (`copy_weights` of
  all weights); `ema_update` over the trainable variables only, and run in training mode
  (batch statistics, as MoCo's key encoder and as the online network normalises the same
  batch). Its own BN moving statistics then follow its forward passes and are unused.
  Run its forward pass outside the GradientTape: it gets no gradient.
- Initial contents: random unit vectors (MoCo's initialisation), seeded, used from the
  first step: static shapes (XLA/TPU) at the cost of ceil(K / 2N) steps with
  uninformative negatives (8 steps at the paper's 64K and batch 4096). Zeros would be K
  identical negatives, each adding exp(0) = 1 to every denominator.
- Size K and momentum: no further guidance; DEFAULT_MOMENTUM is the paper's 0.999. What
  matters for staleness is K / 2N, the number of steps the buffer spans (the paper's
  64K at batch 4096 is 8 steps).

Checkpointing: `memory_buffer` and `memory_position` are variables of the MemoryBuffer
module; attach it (and the memory network) to the tf.train.Checkpoint under names that say
`memory`. Neither is part of the Keras model, so exported SavedModels do not contain them.
"""

import keras
import tensorflow as tf

DEFAULT_MOMENTUM = 0.999


class MemoryBuffer(tf.Module):
  """A ring buffer of the K last rows enqueued: [K, D] unit vectors.

  `memory_position` counts the rows enqueued since initialisation (int64); row j of the
  stream lives at index j mod K until K later rows overwrite it. Create it under the
  strategy's scope: every replica then holds a copy, and `enqueue` writes the same rows
  into every copy.
  """

  def __init__(self, size, dim, seed=0, name="memory"):
    super().__init__(name=name)
    if size <= 0 or dim <= 0:
      raise ValueError(f"memory size and dimension must be > 0, got {size} and {dim}")
    self.size = size
    initial = tf.math.l2_normalize(tf.random.stateless_normal([size, dim], seed=[seed, 0]),
                                   axis=-1)
    self.memory_buffer = tf.Variable(initial, trainable=False, name="memory_buffer")
    self.memory_position = tf.Variable(tf.constant(0, tf.int64), trainable=False,
                                       name="memory_position")

  def enqueue(self, rows):
    """Writes `rows` [B, D] (L2-normalised here) after the last row written, wrapping at K.

    Call it with the same rows on every replica: inside `strategy.run` with all-gathered
    values (`gather_views`), or in cross-replica context (under `strategy.scope()`) with
    the global batch. If B > K, only the last K rows are written (the others would be
    overwritten in the same call).
    """
    rows = tf.math.l2_normalize(tf.cast(rows, tf.float32), axis=-1)
    count = tf.shape(rows, out_type=tf.int64)[0]
    kept = tf.minimum(count, self.size)
    rows = rows[count - kept:]
    indices = (self.memory_position + count - kept + tf.range(kept)) % self.size

    def write(strategy, indices, rows, count):
      return tf.group(
          strategy.extended.update(self.memory_buffer,
                                   lambda buffer, i, r: buffer.scatter_nd_update(i[:, None], r),
                                   args=(indices, rows)),
          strategy.extended.update(self.memory_position, lambda p, c: p.assign_add(c),
                                   args=(count,)))

    _in_cross_replica_context(write, indices, rows, count)


def gather_views(hidden):
  """The global batch's rows [2N, D] from this replica's [2n, D] (view 1 rows, then view 2),
  in single-device order: view 1 of every replica, then view 2. In cross-replica context or
  on one replica, `hidden` is already the global batch and is returned as it is."""
  ctx = tf.distribute.get_replica_context()
  if ctx is None or ctx.num_replicas_in_sync == 1:
    return hidden
  view1, view2 = tf.split(hidden, 2, axis=0)
  return tf.concat([ctx.all_gather(view1, axis=0), ctx.all_gather(view2, axis=0)], axis=0)


def copy_weights(target_variables, source_variables):
  """target <- source for each pair (e.g. memory_model.weights, model.weights of two models
  built from one ModelConfig), on every replica's copy."""
  _update_pairs(lambda target, source: target.assign(source), target_variables, source_variables)


def ema_update(target_variables, source_variables, momentum=DEFAULT_MOMENTUM):
  """target <- momentum * target + (1 - momentum) * source for each pair, on every replica's
  copy (MoCo's momentum update; e.g. memory_model.trainable_variables,
  model.trainable_variables)."""
  if not 0 <= momentum <= 1:
    raise ValueError(f"memory momentum must be in [0, 1], got {momentum}")
  _update_pairs(lambda target, source: target.assign(momentum * target + (1 - momentum) * source),
                target_variables, source_variables)


def _update_pairs(fn, targets, sources):
  """fn(target, source) for each pair; the lists must match in length, shapes and (Keras
  variables) paths, as the variables of two models built from the same config do."""
  targets, sources = list(targets), list(sources)
  if len(targets) != len(sources):
    raise ValueError(f"{len(targets)} target variables for {len(sources)} source variables")
  for t, s in zip(targets, sources):
    t_path, s_path = getattr(t, "path", None), getattr(s, "path", None)
    if t.shape != s.shape or t.dtype != s.dtype or (t_path and s_path and t_path != s_path):
      raise ValueError(f"variable {t_path or t.name} {t.dtype} {t.shape} does not match "
                       f"{s_path or s.name} {s.dtype} {s.shape}")

  def update(strategy):
    # With a variable as argument, extended.update hands fn each device's own copy.
    return tf.group([strategy.extended.update(_tf_variable(t), fn, args=(_tf_variable(s),))
                     for t, s in zip(targets, sources)])

  _in_cross_replica_context(update)


def _tf_variable(variable):
  # Keras 3 wraps the (possibly mirrored) tf.Variable that tf.distribute updates.
  return variable.value if isinstance(variable, keras.Variable) else variable


def _in_cross_replica_context(fn, *args):
  """fn(strategy, *args) in cross-replica context: called directly there (which needs the
  variables' `strategy.scope()`), through merge_call inside `strategy.run` (the args then
  arrive as per-replica values).

  Mirrored variables refuse assignment in replica context unless their aggregation says how
  to combine the replicas' values, and model variables' aggregation does not; from
  cross-replica context, `strategy.extended.update` writes each device's copy.
  """
  if tf.distribute.in_cross_replica_context():
    return fn(tf.distribute.get_strategy(), *args)
  return tf.distribute.get_replica_context().merge_call(fn, args=args)
