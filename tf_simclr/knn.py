"""kNN monitor: top-1 of weighted nearest-neighbour voting on the trunk's pooled features.

Weighted kNN as in Wu et al. 2018 (instance discrimination) and as the common
self-supervised libraries monitor training: features are L2-normalised (cosine
similarity); each query's k most similar bank examples vote for their class with weight
exp(similarity / temperature); the class with the largest summed weight is the prediction.
Defaults k=200, temperature 0.1 as there.

Ties are broken towards lower indices, as `tf.math.top_k` does: among bank examples of equal
similarity at the k-th place the lower bank index is a neighbour, and among classes of equal
score the lower class index is predicted. k larger than the bank uses the whole bank.

The bank is the eval pipeline's view (no augmentation) of the training split; it is built
under the run's strategy, each replica encoding its share of every global batch, and only
features (N x D floats) are kept: the images are never collected.
"""

import tensorflow as tf

DEFAULT_K = 200
DEFAULT_TEMPERATURE = 0.1


def knn_predict(query_features, bank_features, bank_labels, num_classes, k=DEFAULT_K,
                temperature=DEFAULT_TEMPERATURE):
  """Weighted kNN classification of each query row against the bank.

  Args:
    query_features: [Q, D] features to classify.
    bank_features: [N, D] features of the labelled bank.
    bank_labels: [N] integer classes in [0, num_classes).
    num_classes: C.
    k: neighbours per query (clamped to N).
    temperature: of the exp weights. float32 holds exp(1 / temperature) for temperature
      above ~0.0113 (cosine similarities are at most 1).

  Returns:
    (predictions [Q] int32, scores [Q, C] float32): scores[q, c] is the summed weight of
    q's neighbours of class c.
  """
  if k <= 0 or temperature <= 0:
    raise ValueError(f"kNN needs k > 0 and temperature > 0, got k={k}, "
                     f"temperature={temperature}")
  queries = tf.math.l2_normalize(tf.cast(query_features, tf.float32), axis=-1)
  bank = tf.math.l2_normalize(tf.cast(bank_features, tf.float32), axis=-1)
  similarity = tf.matmul(queries, bank, transpose_b=True)
  top = tf.math.top_k(similarity, tf.minimum(k, tf.shape(bank)[0]))
  weights = tf.exp(top.values / temperature)
  neighbour_labels = tf.gather(tf.cast(bank_labels, tf.int32), top.indices)
  # Sum per (query, class) without a [Q, k, C] one-hot (C = 1000 for ImageNet).
  num_queries = tf.shape(queries)[0]
  segments = tf.range(num_queries)[:, None] * num_classes + neighbour_labels
  scores = tf.math.unsorted_segment_sum(weights, segments, num_queries * num_classes)
  scores = tf.reshape(scores, [num_queries, num_classes])
  predictions = tf.math.top_k(scores, 1).indices[:, 0]
  return predictions, scores


def build_feature_bank(strategy, model_fn, dataset):
  """(features [N, D] float32, labels [N] int32) of every unmasked example of `dataset`.

  `dataset`: a distributed dataset of per-replica {"image", "label", "mask"} batches, as
  `data.pipeline.build_eval_dataset` makes (mask 0 on padding). `model_fn(images)` returns
  one replica's features (e.g. the trunk's "final_avg_pool" in inference mode); it runs
  inside `strategy.run`, one global batch per call, and each batch's features are gathered
  from the replicas in example order.
  """
  def replica_step(batch):
    return (tf.cast(model_fn(batch["image"]), tf.float32), tf.cast(batch["label"], tf.int32),
            tf.cast(batch["mask"], tf.float32))

  @tf.function
  def step(batch):
    outputs = strategy.run(replica_step, args=(batch,))
    return [strategy.gather(x, axis=0) for x in outputs]

  features, labels = [], []
  for batch in dataset:
    f, y, mask = step(batch)
    keep = mask > 0
    features.append(tf.boolean_mask(f, keep))
    labels.append(tf.boolean_mask(y, keep))
  if not features:
    raise ValueError("the feature bank's dataset is empty")
  return tf.concat(features, axis=0), tf.concat(labels, axis=0)


def knn_accuracy(strategy, model_fn, train_dataset, eval_dataset, num_classes, k=DEFAULT_K,
                 temperature=DEFAULT_TEMPERATURE, query_batch=512):
  """kNN top-1 of the eval examples against the training bank.

  Both datasets as for `build_feature_bank` (the training split through the eval pipeline,
  unaugmented). The eval features are classified `query_batch` at a time, so the
  similarities held at once are query_batch x N_train floats.

  Returns:
    {"top_1": fraction of eval examples whose prediction is their label,
     "num_queries": eval examples, "bank_size": training examples}.
  """
  if query_batch <= 0:
    raise ValueError(f"query_batch must be > 0, got {query_batch}")
  bank, bank_labels = build_feature_bank(strategy, model_fn, train_dataset)
  queries, labels = build_feature_bank(strategy, model_fn, eval_dataset)

  @tf.function(reduce_retracing=True)
  def correct(query, label):
    predictions, _ = knn_predict(query, bank, bank_labels, num_classes, k, temperature)
    return tf.reduce_sum(tf.cast(tf.equal(predictions, label), tf.int64))

  num_queries = int(queries.shape[0])
  hits = sum(int(correct(queries[i:i + query_batch], labels[i:i + query_batch]))
             for i in range(0, num_queries, query_batch))
  return {"top_1": hits / num_queries, "num_queries": num_queries,
          "bank_size": int(bank.shape[0])}
