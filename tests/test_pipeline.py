"""Distributed pipelines: shapes, reproducibility (resume, replicas, pipelines), eval coverage."""

import json
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tf_simclr.config import DataConfig
from tf_simclr.data import augment, datasets, pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = tf.distribute.get_strategy()
# What pretraining and fine-tuning ask the pipeline for.
PRETRAIN = dict(views=2, contrastive=True)
FINETUNE = dict(views=1, contrastive=False)


def make_folder(root, num_classes=3, per_class=8):
  rng = np.random.default_rng(0)
  for c in range(num_classes):
    os.makedirs(os.path.join(root, f"class{c}"))
    for i in range(per_class):
      pixels = rng.integers(0, 256, (12 + i, 14, 3), dtype=np.uint8)
      tf.io.write_file(os.path.join(root, f"class{c}", f"{i}.png"), tf.io.encode_png(pixels))
  return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return make_folder(str(tmp_path_factory.mktemp("folder") / "imgs"))


def indexed(n, size=8):
  """In-memory examples whose label is their index, so batches show which examples they hold."""
  rng = np.random.default_rng(1)
  return datasets.Examples(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                           np.arange(n, dtype=np.int32), "pixels")


def batches(ds, n, strategy=DEFAULT):
  out = []
  for x, _ in zip(ds, range(n)):
    out.append({k: np.concatenate([t.numpy() for t in strategy.experimental_local_results(v)])
                for k, v in x.items()})
  return out


@pytest.mark.parametrize("views,contrastive", [(2, True), (1, False), (3, False)])
def test_train_shapes_and_values(folder, views, contrastive):
  cfg = DataConfig(dataset=f"folder:{folder}", image_size=16)
  (x,) = batches(pipeline.build_train_dataset(DEFAULT, cfg, global_batch_size=8, views=views,
                                              contrastive=contrastive), 1)
  assert x["image"].shape == (8, 16, 16, 3 * views) and x["image"].dtype == np.float32
  assert x["label"].dtype == np.int32 and set(x["label"]) <= {0, 1, 2}
  assert x["image"].min() >= 0 and x["image"].max() <= 1
  if views > 1:
    assert np.abs(x["image"][..., :3] - x["image"][..., 3:6]).max(axis=(1, 2, 3)).min() > 1e-3


def test_epochs_are_fresh_permutations():
  ds = pipeline.train_dataset(indexed(24), DataConfig(image_size=8), global_batch_size=8,
                              per_replica_batch=8, **FINETUNE)
  labels = np.concatenate([b["label"] for b in batches(ds, 6)])
  first, second = labels[:24], labels[24:]
  np.testing.assert_array_equal(np.sort(first), np.arange(24))
  np.testing.assert_array_equal(np.sort(second), np.arange(24))
  assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(24))


def test_resume_at_step_equals_kth_batch(folder):
  cfg = DataConfig(dataset=f"folder:{folder}", image_size=16, use_blur=True)
  ref = batches(pipeline.build_train_dataset(DEFAULT, cfg, global_batch_size=8, **PRETRAIN), 5)
  resumed = batches(pipeline.build_train_dataset(DEFAULT, cfg, global_batch_size=8, start_step=3,
                                                 **PRETRAIN), 2)
  for a, b in zip(ref[3:], resumed):
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(a["image"], b["image"])
  other_seed = batches(pipeline.build_train_dataset(
      DEFAULT, DataConfig(dataset=f"folder:{folder}", image_size=16, seed=1),
      global_batch_size=8, **PRETRAIN), 1)
  assert not np.array_equal(other_seed[0]["image"], ref[0]["image"])


def test_input_pipelines_split_each_global_batch():
  cfg = DataConfig(image_size=8)
  source = indexed(40)
  single = batches(pipeline.train_dataset(source, cfg, global_batch_size=8, per_replica_batch=8,
                                          start_step=2, **PRETRAIN), 3)
  shares = [batches(pipeline.train_dataset(source, cfg, global_batch_size=8, per_replica_batch=2,
                                           start_step=2, num_pipelines=2, pipeline_id=i,
                                           **PRETRAIN), 6)
            for i in range(2)]
  for step in range(3):
    # Pipeline i feeds 2 replicas per step; its share is positions 4i .. 4i+3 of the step.
    parts = [shares[i][2 * step + r] for i in range(2) for r in range(2)]
    for key in ("image", "label"):
      np.testing.assert_array_equal(single[step][key], np.concatenate([p[key] for p in parts]))


@pytest.mark.parametrize("num_pipelines", [1, 2])
def test_eval_covers_every_example_once(num_pipelines):
  source = indexed(37, size=40)
  seen, masks = [], []
  for i in range(num_pipelines):
    ds = pipeline.eval_dataset(source, DataConfig(image_size=35), global_batch_size=8,
                               per_replica_batch=8 // num_pipelines,
                               num_pipelines=num_pipelines, pipeline_id=i)
    for x in batches(ds, 100):
      assert x["image"].shape == (8 // num_pipelines, 35, 35, 3)
      seen.append(x["label"][x["mask"] == 1])
      masks.append(x["mask"])
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(37))
  assert len(np.concatenate(masks)) == 8 * pipeline.num_eval_steps(37, 8) == 40


def test_eval_is_a_deterministic_centre_crop(folder):
  cfg = DataConfig(dataset=f"folder:{folder}", image_size=36)
  ds = pipeline.build_eval_dataset(DEFAULT, cfg, global_batch_size=2)
  a, b = batches(ds, 10), batches(ds, 10)
  assert len(a) == pipeline.num_eval_steps(datasets.dataset_info(cfg).num_eval_examples, 2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert a[-1]["mask"].tolist() == [1.0, 0.0]  # 3 eval images, padded to 4
  # The eval views are augment.preprocess_for_eval's of the decoded files, in order.
  decoded = [datasets.decode_image(tf.io.read_file(f)) for f in datasets.load_eval(cfg).images]
  expected = [augment.preprocess_for_eval(image, 36) for image in decoded]
  np.testing.assert_array_equal(np.concatenate([x["image"] for x in a])[:3], expected)


@pytest.mark.parametrize("size", [16, augment.EVAL_CROP_MIN_SIZE + 3])
@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
def test_eval_views_are_preprocess_for_eval(size, method):
  # In-memory pixels (labels are indices), uncropped below EVAL_CROP_MIN_SIZE.
  source = indexed(13, size=40)
  ds = pipeline.eval_dataset(source, DataConfig(image_size=size, resize_method=method),
                             global_batch_size=8, per_replica_batch=8)
  x = {k: np.concatenate([b[k] for b in batches(ds, 10)]) for k in ("image", "label", "mask")}
  real = x["mask"] == 1
  assert real.sum() == 13
  expected = [augment.preprocess_for_eval(source.images[i], size, resize_method=method)
              for i in x["label"][real]]
  np.testing.assert_array_equal(x["image"][real], expected)


def test_mock_cifar10_pretrain():
  with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = pipeline.build_train_dataset(DEFAULT, DataConfig(dataset="cifar10", image_size=32,
                                                          use_blur=False),
                                      global_batch_size=16, **PRETRAIN)
  (x,) = batches(ds, 1)
  assert x["image"].shape == (16, 32, 32, 6)


@pytest.mark.parametrize("size", [32, augment.PER_IMAGE_MIN_SIZE])
def test_pretraining_views_are_colour_distorted(size):
  # Batched below PER_IMAGE_MIN_SIZE, per image before batching from it: both distort.
  with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = pipeline.build_train_dataset(DEFAULT, DataConfig(dataset="cifar10", image_size=size),
                                      global_batch_size=32, **PRETRAIN)
  views = np.concatenate([x["image"].reshape(32, size, size, 2, 3) for x in batches(ds, 4)])
  views = np.moveaxis(views, 3, 1).reshape(-1, size, size, 3)  # 256 views
  gray = np.all(np.abs(views - views[..., :1]).max(axis=(1, 2)) < 1e-5, axis=-1)
  assert 0.1 < gray.mean() < 0.3
  assert views.min() >= 0.0 and views.max() <= 1.0


def test_device_placement_ships_the_hosts_crops_as_uint8_with_their_draws(folder):
  """On the device placement the host's work stops after the geometric augmentations: its
  views are the crop + flip views of the same positions (those of the non-contrastive
  stream), rounded to uint8, shipped with each view's row of draws."""
  cfg = DataConfig(dataset=f"folder:{folder}", image_size=16, use_blur=True)
  (shipped,) = batches(pipeline.build_train_dataset(DEFAULT, cfg, global_batch_size=8,
                                                    on_device=True, **PRETRAIN), 1)
  (crops,) = batches(pipeline.build_train_dataset(DEFAULT, cfg, global_batch_size=8, views=2,
                                                  contrastive=False), 1)
  assert shipped["image"].dtype == np.uint8 and shipped["image"].shape == (8, 16, 16, 6)
  assert shipped["u"].shape == (8, 2, augment.DRAWS_PER_VIEW)
  np.testing.assert_array_equal(shipped["label"], crops["label"])
  np.testing.assert_array_equal(shipped["image"], np.round(crops["image"] * 255))
  # Without photometric augmentations there is nothing left for the device but the cast.
  (plain,) = batches(pipeline.build_train_dataset(DEFAULT, cfg, global_batch_size=8,
                                                  on_device=True, **FINETUNE), 1)
  assert "u" not in plain and plain["image"].dtype == np.uint8


@pytest.mark.parametrize("kind", ["pixels", "encoded"])
@pytest.mark.parametrize("size", [32, augment.PER_IMAGE_MIN_SIZE])
def test_device_placement_gives_the_hosts_views(kind, size):
  """Same draws, same views, below and above PER_IMAGE_MIN_SIZE (where the host distorts per
  image). Same-size images in memory ("pixels") ship uncropped and the device crops them as
  the host does (random crops). Other sources ship the host's views rounded to uint8: with
  crops that are whole images at their own size (no resampling, so the rounding is exact),
  the views the device finishes equal the host placement's to float rounding."""
  cfg = DataConfig(image_size=size, crop_min_area=1.0 if kind == "encoded" else 0.08,
                   use_blur=True)
  rng = np.random.default_rng(2)
  pixels = rng.integers(0, 256, (32, size, size, 3), dtype=np.uint8)
  images = (pixels if kind == "pixels" else
            np.array([tf.io.encode_png(image).numpy() for image in pixels], dtype=object))
  source = datasets.Examples(images, np.arange(32, dtype=np.int32), kind)
  streams = {on_device: batches(pipeline.build_train_dataset(
      DEFAULT, cfg, global_batch_size=16, source=source, on_device=on_device, **PRETRAIN), 2)
             for on_device in (False, True)}
  for host, shipped in zip(streams[False], streams[True]):
    if kind == "pixels":  # each example's own image, once, with its draws
      assert set(shipped) == {"source", "u", "label"}
      np.testing.assert_array_equal(shipped["source"], pixels[shipped["label"]])
    else:
      assert set(shipped) == {"image", "u", "label"} and shipped["image"].dtype == np.uint8
    device = pipeline.augment_on_device({k: tf.constant(v) for k, v in shipped.items()}, cfg,
                                        **PRETRAIN)
    assert set(device) == {"image", "label"} and device["image"].dtype == tf.float32
    np.testing.assert_array_equal(device["label"], host["label"])
    np.testing.assert_allclose(device["image"], host["image"], atol=2e-5)
  assert np.abs(host["image"][..., :3] - host["image"][..., 3:]).max() > 0.1  # distorted


def test_augment_placement():
  gpu = types.SimpleNamespace(extended=types.SimpleNamespace(
      worker_devices=("/job:localhost/replica:0/task:0/device:GPU:0",)))
  assert pipeline.augment_placement("auto", DEFAULT) == "host"
  assert pipeline.augment_placement("auto", gpu) == "device"
  assert pipeline.augment_placement("host", gpu) == "host"
  assert pipeline.augment_placement("device", DEFAULT) == "device"
  with pytest.raises(ValueError, match="augment_on='gpu' is not one of"):
    DataConfig(augment_on="gpu").validate()


def test_errors(folder):
  cfg = DataConfig(dataset=f"folder:{folder}", image_size=16)
  three = types.SimpleNamespace(num_replicas_in_sync=3)
  with pytest.raises(ValueError, match="not a positive multiple of the 3 replicas"):
    pipeline.build_train_dataset(three, cfg, global_batch_size=8, **PRETRAIN)
  with pytest.raises(ValueError, match="has 21 examples, fewer than one global batch of 32"):
    pipeline.build_train_dataset(DEFAULT, cfg, global_batch_size=32, **PRETRAIN)
  with pytest.raises(ValueError, match="views must be >= 1, got 0"):
    pipeline.build_train_dataset(DEFAULT, cfg, global_batch_size=8, views=0, contrastive=False)
  with pytest.raises(ValueError, match="subset 'unlabelled' .* has 0 examples"):
    pipeline.build_train_dataset(DEFAULT, cfg, global_batch_size=8, subset="unlabelled",
                                 **FINETUNE)
  with pytest.raises(ValueError, match="subset='none' is not one of"):
    pipeline.build_train_dataset(DEFAULT, cfg, global_batch_size=8, subset="none", **FINETUNE)
  bad = DataConfig(dataset=f"folder:{folder}", image_size=16, resize_method="lanczos")
  message = r"^resize_method='lanczos' is not one of \('bicubic', 'bilinear'\)$"
  with pytest.raises(ValueError, match=message):
    bad.validate()
  with pytest.raises(ValueError, match=message):
    pipeline.build_train_dataset(DEFAULT, bad, global_batch_size=8, **PRETRAIN)
  with pytest.raises(ValueError, match=message):
    pipeline.build_eval_dataset(DEFAULT, bad, global_batch_size=8)


def generated(n):
  rng = np.random.default_rng(n)
  return rng.integers(0, 256, (n, 10, 12, 3), dtype=np.uint8), np.arange(n, dtype=np.int32) % 3


class Generated:
  """A test-only source held in memory: `generated:N` is N random 10x12 images, label i % 3,
  the same N as its train and eval splits."""

  def __init__(self, name, cfg):
    self.num_classes = 3
    self._examples = datasets.Examples(*generated(int(name)), "pixels")

  def num_examples(self, split):
    return self._examples.num_examples

  def labels(self, split):
    return self._examples.labels

  def load(self, split):
    return self._examples


class PngStream:
  """A test-only stream of PNG-encoded images, as TFRecord files of encoded images would be."""
  in_memory = False

  def __init__(self, images, labels):
    self.pngs = [tf.io.encode_png(image).numpy() for image in images]
    self.labels = labels
    self.num_examples = len(labels)

  def read(self, *, share=(0, 1), seed=None):
    ds = tf.data.Dataset.from_tensor_slices({"image": self.pngs, "label": self.labels})
    ds = ds.shard(share[1], share[0])
    return ds if seed is None else ds.shuffle(self.num_examples, seed=seed)

  def decode(self, data):
    return tf.io.decode_png(data, channels=3)


class Pngs(Generated):
  """`pngs:N`: Generated's images, streamed."""

  def labels(self, split):
    raise datasets.needs_memory(f"pngs:{split}", "a label subset")

  def load(self, split):
    return PngStream(self._examples.images, self._examples.labels)


@pytest.mark.parametrize("prefix,cls", [("generated:", Generated), ("pngs:", Pngs)])
def test_a_registered_source_feeds_the_pipelines(monkeypatch, prefix, cls):
  # A new kind of source is a class registered by prefix; the pipelines are unchanged.
  monkeypatch.setitem(datasets.SOURCES, prefix, cls)
  cfg = DataConfig(dataset=f"{prefix}24", image_size=8)
  assert datasets.dataset_info(cfg) == datasets.DatasetInfo(3, 24, 24, 24)
  train = batches(pipeline.build_train_dataset(DEFAULT, cfg, global_batch_size=8, **PRETRAIN), 6)
  for x in train:
    assert x["image"].shape == (8, 8, 8, 6) and 0 <= x["image"].min() and x["image"].max() <= 1
  # An epoch of labels (the streamed order may cross the epoch's end by an element or two).
  counts = np.bincount(np.concatenate([x["label"] for x in train[:3]]), minlength=3)
  assert np.abs(counts - 8).sum() <= (0 if prefix == "generated:" else 4)
  evaluation = batches(pipeline.build_eval_dataset(DEFAULT, cfg, global_batch_size=8), 10)
  images, labels = generated(24)
  np.testing.assert_array_equal(np.concatenate([x["label"] for x in evaluation]), labels)
  np.testing.assert_array_equal(np.concatenate([x["image"] for x in evaluation]),
                                [augment.preprocess_for_eval(image, 8) for image in images])
  if prefix == "pngs:":
    with pytest.raises(ValueError, match="a label subset needs pngs:train in memory"):
      datasets.dataset_info(DataConfig(dataset="pngs:24", train_label_fraction=0.5))


_TWO_REPLICAS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import tensorflow_datasets as tfds
    from tf_simclr.config import DataConfig
    from tf_simclr.data import augment, pipeline

    def batches(strategy, ds, n):
      out = []
      for x, _ in zip(ds, range(n)):
        out.append({k: np.concatenate([t.numpy() for t in strategy.experimental_local_results(v)])
                    for k, v in x.items()})
      return out

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    default = tf.distribute.get_strategy()
    result = {}
    for name, cfg in [("files", DataConfig(dataset="folder:" + sys.argv[1], image_size=16,
                                           use_blur=True, train_label_fraction=0.5)),
                      ("pixels", DataConfig(dataset="cifar10", image_size=24, use_blur=True)),
                      ("pixels_bilinear", DataConfig(dataset="cifar10", image_size=24,
                                                     resize_method="bilinear")),
                      # Large images: colour distortion per image, before batching.
                      ("per_image", DataConfig(dataset="cifar10", image_size=augment.PER_IMAGE_MIN_SIZE,
                                               use_blur=True))]:
      streams = []
      for strategy in (default, mirrored):
        with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
          ds = pipeline.build_train_dataset(strategy, cfg, global_batch_size=8, views=2,
                                            contrastive=True, start_step=1)
        streams.append(batches(strategy, ds, 4))
      result[name] = all(np.array_equal(a[k], b[k]) for a, b in zip(*streams) for k in a)
    # The device placement: the replicas finish their shares of the shipped batch.
    cfg = DataConfig(dataset="cifar10", image_size=32, use_blur=True)  # ships uncropped
    with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
      host = batches(default, pipeline.build_train_dataset(
          default, cfg, global_batch_size=8, views=2, contrastive=True, start_step=1), 2)
      shipped = pipeline.build_train_dataset(mirrored, cfg, global_batch_size=8, views=2,
                                             contrastive=True, start_step=1, on_device=True)
    finish = tf.function(lambda b: mirrored.run(
        lambda x: pipeline.augment_on_device(x, cfg, views=2, contrastive=True), args=(b,)))
    device = [{k: np.concatenate([t.numpy() for t in mirrored.experimental_local_results(v)])
               for k, v in finish(x).items()} for x, _ in zip(shipped, range(2))]
    result["device_placement"] = all(np.allclose(a["image"], b["image"], atol=2e-5)
                                     and np.array_equal(a["label"], b["label"])
                                     for a, b in zip(host, device))
    ev = batches(mirrored, pipeline.build_eval_dataset(
        mirrored, DataConfig(dataset="folder:" + sys.argv[1], image_size=16),
        global_batch_size=4), 10)
    result["eval_shapes"] = sorted({x["image"].shape for x in ev})
    result["eval_real"] = float(sum(x["mask"].sum() for x in ev))
    print(json.dumps(result))
""")


def test_one_and_two_replicas_give_the_same_global_batches(folder):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
  run = subprocess.run([sys.executable, "-c", _TWO_REPLICAS, folder], capture_output=True,
                       text=True, env=env, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout.strip().splitlines()[-1])
  assert result["files"] and result["pixels"] and result["pixels_bilinear"] and result["per_image"]
  assert result["device_placement"]
  assert result["eval_shapes"] == [[4, 16, 16, 3]] and result["eval_real"] == 3
