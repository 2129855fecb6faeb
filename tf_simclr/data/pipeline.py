"""Per-replica tf.data pipelines for a tf.distribute strategy.

In-memory sources give an exactly reproducible stream. Training consumes example
positions p = 0, 1, 2, ...; position p is example `index_shuffle(p mod N, seed=(seed, p div N))`
of the subset (a fresh permutation per epoch, computed without materialising it), and
every random number of its augmentation is read from one Philox stream at an offset
derived from p. Global step s covers positions s*B .. (s+1)*B - 1 whatever the number of
replicas or input pipelines: pipeline i of P emits, for each step, the per-replica batches
of its contiguous share, in replica order. Resuming at `start_step` starts the stream at
position start_step*B, at no cost.

Sources too big for memory are streamed (a `datasets.Stream`: shuffled by file, then a
shuffle buffer, an even share per input pipeline); see docs/DATA.md for what is then not
reproducible. The pipelines see sources only through `datasets.Examples` and
`datasets.Stream`.

Photometric augmentations (colour distortion, blur) run on the host by default. With
`on_device` (DataConfig.augment_on "device", or "auto" on GPUs and TPUs: `augment_placement`)
`augment_on_device` applies them inside the replica's training step, from the draws the host
ships with the batch: the same functions of the same draws as on the host. What the host
ships depends on the source: images of one size held in memory ("pixels": CIFAR, Fashion-MNIST)
go as they are, uint8, once per image, and the step also crops and resamples them (the same
batched `augment.crop_and_resize`: the same views to float rounding, the host left with a
gather); any other source's views go after crop, flip and resize, rounded to uint8 (a quarter
of float32's bytes to the accelerator).
"""

import math

import numpy as np
import tensorflow as tf

from tf_simclr.config import DataConfig
from tf_simclr.data import augment, datasets

# Philox counters: training augmentation draws and the streaming fallback's draws use
# different high words so that they never overlap.
_TRAIN_STREAM = 0
_STREAMING_STREAM = 1
# The reference's shuffle buffer for streamed data, in per-replica batches.
_SHUFFLE_BATCHES_SMALL, _SHUFFLE_BATCHES_LARGE = 50, 10


def build_train_dataset(strategy, cfg: DataConfig, *, global_batch_size: int, views: int,
                        contrastive: bool, subset: str = "labelled", start_step: int = 0,
                        source=None, on_device: bool = False):
  """Infinite distributed stream of {"image": [b, S, S, 3V], "label": [b]} per replica.

  `views` augmented views of each image, concatenated on channels; `contrastive`: with the
  augmentations declared contrastive-only (colour distortion, blur), else crop and flip.
  `source`: the examples of `subset` if already loaded (`datasets.load_train`).
  `on_device`: each example's draws come as "u" [b, V, augment.DRAWS_PER_VIEW] with, for
  in-memory pixel sources, its source image as "source" (uint8 [b, H, W, C]) instead of views,
  else its views as uint8 before their photometric augmentations; `augment_on_device`
  finishes them.
  """
  if views < 1:
    raise ValueError(f"views must be >= 1, got {views}")
  _check_batch(strategy, global_batch_size)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  if source is None:
    source = datasets.load_train(cfg, subset)
  if source.num_examples < global_batch_size:
    raise ValueError(f"subset {subset!r} of {cfg.dataset}:{cfg.train_split} has "
                     f"{source.num_examples} examples, fewer than one global batch of "
                     f"{global_batch_size}")

  def input_fn(ctx):
    return train_dataset(source, cfg, global_batch_size=global_batch_size, views=views,
                         contrastive=contrastive, start_step=start_step,
                         num_pipelines=ctx.num_input_pipelines, pipeline_id=ctx.input_pipeline_id,
                         per_replica_batch=ctx.get_per_replica_batch_size(global_batch_size),
                         on_device=on_device)

  return strategy.distribute_datasets_from_function(input_fn)


def augment_placement(augment_on: str, strategy) -> str:
  """"host" or "device" for DataConfig.augment_on under `strategy`: "auto" is "device" when
  the strategy's devices are GPUs or TPUs, whose hosts are the bottleneck of SimCLR's
  augmentations, and "host" on CPUs, where both placements share the same cores."""
  if augment_on != "auto":
    return augment_on
  try:
    devices = strategy.extended.worker_devices
  except RuntimeError:  # the default strategy: TF's default placement, on any accelerator
    devices = [d.name for d in tf.config.list_logical_devices()]
  accelerated = any(tf.DeviceSpec.from_string(d).device_type in ("GPU", "TPU") for d in devices)
  return "device" if accelerated else "host"


def augment_on_device(batch, cfg: DataConfig, *, views: int, contrastive: bool):
  """A batch of an `on_device` stream as the host placement would have made it: float32 views
  in [0, 1], cropped from shipped source images if any, photometric augmentations applied
  from the shipped draws. Runs per replica, inside the training step (in float32 whatever
  the run's precision: the model casts its inputs; the photometric pass XLA-compiled)."""
  rest = {k: v for k, v in batch.items() if k not in ("image", "source", "u")}
  if "source" in batch:
    x = _batch_views(batch["source"], batch["u"], cfg, contrastive)
  else:
    x = tf.cast(batch["image"], tf.float32) / 255.0
    if "u" not in batch:
      return {**rest, "image": x}
    size = x.shape[1]
    x = tf.transpose(tf.reshape(x, [-1, size, size, views, 3]), [0, 3, 1, 2, 4])
  return {**rest, "image": _side_by_side(_photometric_views(x, batch["u"], cfg, contrastive))}


def build_eval_dataset(strategy, cfg: DataConfig, *, global_batch_size: int, source=None):
  """Finite distributed stream of {"image", "label", "mask"}: every eval example once.

  The last global batch is padded (mask 0) so every per-replica batch has the same size.
  `source`: other examples to run through the eval pipeline than the eval split (e.g. the
  training split already loaded, unaugmented).
  """
  _check_batch(strategy, global_batch_size)
  if source is None:
    source = datasets.load_eval(cfg)

  def input_fn(ctx):
    return eval_dataset(source, cfg, global_batch_size=global_batch_size,
                        num_pipelines=ctx.num_input_pipelines, pipeline_id=ctx.input_pipeline_id,
                        per_replica_batch=ctx.get_per_replica_batch_size(global_batch_size))

  return strategy.distribute_datasets_from_function(input_fn)


def num_eval_steps(num_eval_examples: int, global_batch_size: int) -> int:
  return math.ceil(num_eval_examples / global_batch_size)


def _check_batch(strategy, global_batch_size):
  replicas = strategy.num_replicas_in_sync
  if global_batch_size <= 0 or global_batch_size % replicas:
    raise ValueError(f"global batch size {global_batch_size} is not a positive multiple of the "
                     f"{replicas} replicas")


# ----------------------------------------------------------------------------------------
# One input pipeline.

def train_dataset(source, cfg: DataConfig, *, global_batch_size, per_replica_batch, views,
                  contrastive, start_step=0, num_pipelines=1, pipeline_id=0,
                  on_device=False) -> tf.data.Dataset:
  """The per-replica batches one input pipeline feeds to its replicas, in replica order."""
  view_fn, finish = _photometric_fns(cfg, views, contrastive, on_device)
  if not source.in_memory:
    ds = _streaming_train(source, cfg, per_replica_batch, views, contrastive,
                          start_step * global_batch_size, num_pipelines, pipeline_id, view_fn)
  else:
    b, width = per_replica_batch, augment.DRAWS_PER_VIEW * views

    def example_fn(image, p):
      return _views_of(image, _draws(cfg.seed, p, 1, width), cfg, views, contrastive, view_fn)

    def batch_fn(images, first_position):  # crops of a whole batch in one pass
      u = tf.reshape(_draws(cfg.seed, first_position, b, width), [b, views, -1])
      if on_device:  # the step crops (augment_on_device): the host only gathers
        return {"source": images, "u": u}
      return {"image": _batch_views(images, u, cfg, contrastive), "u": u}

    positions = _positions(b, global_batch_size, num_pipelines, pipeline_id, start_step)
    ds = _examples_at(source, positions, b, _train_lookup(source.num_examples, cfg.seed),
                      example_fn, batch_fn if view_fn is None else None)
  ds = _map(ds, finish, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE)


def eval_dataset(source, cfg: DataConfig, *, global_batch_size, per_replica_batch,
                 num_pipelines=1, pipeline_id=0) -> tf.data.Dataset:
  """The per-replica eval batches one input pipeline emits: `augment.preprocess_for_eval` of
  each example, per example, so evaluation sees exactly what that function returns."""
  def view(image):
    return augment.preprocess_for_eval(image, cfg.image_size, resize_method=cfg.resize_method)

  num = source.num_examples
  steps = num_eval_steps(num, global_batch_size)
  if not source.in_memory:
    ds = _streaming_eval(source, cfg, per_replica_batch, global_batch_size, steps,
                         num_pipelines, pipeline_id, view)
  else:
    replicas_here = global_batch_size // per_replica_batch // num_pipelines
    positions = _positions(per_replica_batch, global_batch_size, num_pipelines, pipeline_id, 0)
    positions = positions.take(steps * replicas_here)

    def lookup(p):
      return tf.minimum(p, num - 1), tf.cast(p < num, tf.float32)

    ds = _examples_at(source, positions, per_replica_batch, lookup,
                      lambda image, p: {"image": view(image)})
  return ds.prefetch(tf.data.AUTOTUNE)


def _map(ds, fn, **kwargs):
  """`ds.map(fn)` without AutoGraph: these functions are TF ops without Python control flow
  on tensors, and converting them cost ~3 s of every run's start-up (measured on run.py)."""
  return ds.map(tf.autograph.experimental.do_not_convert(fn), **kwargs)


def _positions(b, global_batch, num_pipelines, pipeline_id, start_step):
  """[b] consecutive stream positions of each per-replica batch this pipeline emits."""
  replicas_here = global_batch // b // num_pipelines

  def first(k):
    step = start_step + k // replicas_here
    return step * global_batch + pipeline_id * replicas_here * b + (k % replicas_here) * b

  return _map(tf.data.Dataset.range(np.iinfo(np.int64).max),
              lambda k: first(k) + tf.range(b, dtype=tf.int64))


def _train_lookup(num, seed):
  """Position -> (example index, 1): a fresh seeded permutation per epoch."""
  def lookup(p):
    epoch = p // num
    seeds = tf.stack([tf.fill(tf.shape(p), tf.constant(seed, tf.int64)), epoch,
                      tf.zeros_like(p)], axis=-1)
    index = tf.raw_ops.RandomIndexShuffle(index=p % num, seed=seeds,
                                          max_index=tf.constant(num - 1, tf.int64))
    return index, tf.ones(tf.shape(p), tf.float32)
  return lookup


def _draws(seed, first_position, count, width, stream=_TRAIN_STREAM):
  """[count, width] uniforms of positions first_position .. + count - 1.

  Position p owns numbers [p*width, (p+1)*width) of one Philox stream (width is a multiple
  of 4, Philox's output per counter step), so its numbers do not depend on the batch it is in.
  """
  counter = tf.stack([tf.cast(first_position * (width // 4), tf.uint64), tf.constant(stream, tf.uint64)])
  u = tf.raw_ops.StatelessRandomUniformV2(
      shape=[count * width], key=tf.constant([seed % 2**64], tf.uint64), counter=counter,
      alg=1, dtype=tf.float32)
  return tf.reshape(u, [count, width])


def _view_boxes(u, height, width, cfg, views, contrastive):
  """[n*V, 4] crop boxes, example-major, from u ([n, V*K] or [n, V, K]) and the n images'
  sizes."""
  return augment.view_boxes(tf.reshape(u, [-1, augment.DRAWS_PER_VIEW]), tf.repeat(height, views),
                            tf.repeat(width, views), cfg, contrastive=contrastive)


def _examples_at(source, positions, b, lookup, example_fn, batch_fn=None):
  """Per-replica batches of the examples at `positions`: {"label", "mask"} and the entries
  that `batch_fn(images [b, H, W, C], first position)` returns for in-memory pixel arrays
  (when given: one pass per batch), or else `example_fn(image [H, W, C], position)` per
  example before batching."""
  images, labels = source.tensors

  if source.kind == "pixels" and batch_fn is not None:
    def per_batch(pos):
      index, mask = lookup(pos)
      return {**batch_fn(tf.gather(images, index), pos[0]), "label": tf.gather(labels, index),
              "mask": mask}

    return _map(positions, per_batch, num_parallel_calls=tf.data.AUTOTUNE)

  def per_example(p):
    index, mask = lookup(p)
    return {**example_fn(source.decode(images[index]), p), "label": labels[index], "mask": mask}

  ds = _map(positions.unbatch(), per_example, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(b, drop_remainder=True)


def _batch_views(images, u, cfg, contrastive):
  """Views [b, V, S, S, 3] float32 in [0, 1] of same-size images [b, H, W, C] from their draws
  u [b, V, K]: the geometric augmentations of the whole batch in one pass."""
  b, views, size = tf.shape(u)[0], u.shape[1], cfg.image_size
  h, w = (tf.fill([b], tf.cast(d, tf.float32)) for d in tf.unstack(tf.shape(images)[1:3]))
  boxes = _view_boxes(u, h, w, cfg, views, contrastive)
  crops = augment.crop_and_resize(images, boxes, size, tf.repeat(tf.range(b), views),
                                  method=cfg.resize_method)
  return tf.reshape(crops, [b, views, size, size, 3])


def _views_of(image, u, cfg, views, contrastive, view_fn):
  """{"image": one image's crops [V, S, S, 3] (view_fn applied, if any), "u": its draws [V, K]}."""
  shape = tf.cast(tf.shape(image), tf.float32)
  boxes = _view_boxes(u, shape[0:1], shape[1:2], cfg, views, contrastive)
  crops = augment.crop_and_resize_views(image, boxes, cfg.image_size, method=cfg.resize_method)
  u = tf.reshape(u, [views, augment.DRAWS_PER_VIEW])
  return {"image": crops if view_fn is None else view_fn(crops, u), "u": u}


def _photometric_fns(cfg, views, contrastive, on_device):
  """(per-example fn or None, per-batch fn): the photometric augmentations where they run
  fastest on the host (augment.PER_IMAGE_MIN_SIZE), or left to the device, and the final
  [b, S, S, 3V] layout."""
  photometric = bool(augment.active(cfg, contrastive, geometric=False))
  per_image = photometric and not on_device and cfg.image_size >= augment.PER_IMAGE_MIN_SIZE

  def view_fn(crops, u):
    return augment.photometric_per_image(crops, u, cfg, contrastive=contrastive)

  def finish(ex):
    label = tf.cast(ex["label"], tf.int32)
    if "source" in ex:
      return {"source": ex["source"], "u": ex["u"], "label": label}
    x = ex["image"]
    if on_device:
      # Rounded to the nearest of 256 levels: at most half a level off, before the colour
      # distortion (docs/DATA.md).
      x = _side_by_side(tf.cast(tf.round(x * 255.0), tf.uint8))
      return {"image": x, "label": label, **({"u": ex["u"]} if photometric else {})}
    if photometric and not per_image:
      x = _photometric_views(x, ex["u"], cfg, contrastive)
    return {"image": _side_by_side(x), "label": label}
  return (view_fn if per_image else None), finish


def _photometric_views(x, u, cfg, contrastive):
  """`augment.photometric` of views [b, V, S, S, 3] with their draws u [b, V, K]."""
  views, size = x.shape[1], x.shape[2]
  flat = augment.photometric(tf.reshape(x, [-1, size, size, 3]),
                             tf.reshape(u, [-1, augment.DRAWS_PER_VIEW]), cfg,
                             contrastive=contrastive)
  return tf.reshape(flat, [-1, views, size, size, 3])


def _side_by_side(x):
  """Views [b, V, S, S, 3] side by side on channels: view v is channels 3v .. 3v+2."""
  b, views, size = tf.shape(x)[0], x.shape[1], x.shape[2]
  return tf.reshape(tf.transpose(x, [0, 2, 3, 1, 4]), [b, size, size, 3 * views])


# ----------------------------------------------------------------------------------------
# Streamed sources.

def _decode_crop(source, cfg, views, contrastive, view_fn=None):
  def fn(ex, p):
    u = _draws(cfg.seed, p, 1, augment.DRAWS_PER_VIEW * views, _STREAMING_STREAM)
    return {**_views_of(source.decode(ex["image"]), u, cfg, views, contrastive, view_fn),
            "label": tf.cast(ex["label"], tf.int32)}
  return fn


def _streaming_train(source, cfg, b, views, contrastive, first_position, num_pipelines,
                     pipeline_id, view_fn=None):
  # Each pipeline reads its own even share of the examples.
  ds = source.read(share=(pipeline_id, num_pipelines), seed=cfg.seed)
  buffer = _SHUFFLE_BATCHES_SMALL if cfg.image_size <= 32 else _SHUFFLE_BATCHES_LARGE
  ds = ds.shuffle(b * buffer, seed=cfg.seed).repeat()
  # Positions interleave the pipelines, so no two pipelines share augmentation draws.
  ds = _map(ds.enumerate(), lambda i, ex: (ex, first_position + i * num_pipelines + pipeline_id))
  ds = _map(ds, _decode_crop(source, cfg, views, contrastive, view_fn),
           num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  return ds.batch(b, drop_remainder=True)


def _streaming_eval(source, cfg, b, global_batch, steps, num_pipelines, pipeline_id, view):
  ds = _map(source.read(), lambda ex: {"image": view(source.decode(ex["image"])),
                                       "label": tf.cast(ex["label"], tf.int32),
                                       "mask": tf.constant(1.0)},
            num_parallel_calls=tf.data.AUTOTUNE)
  size = cfg.image_size
  pad = {"image": tf.zeros([size, size, 3]), "label": tf.constant(0, tf.int32),
         "mask": tf.constant(0.0)}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(steps * global_batch - source.num_examples))
  # Every pipeline reads the whole split and keeps its replicas' batches of each step.
  replicas_here = global_batch // b // num_pipelines
  ds = ds.batch(b, drop_remainder=True).batch(replicas_here).shard(num_pipelines, pipeline_id)
  return ds.unbatch()
