"""The streaming path (splits too big for memory), on real Fashion-MNIST through TFDS.

The in-memory threshold is lowered to 0 so that a small split takes the path a full
ImageNet would take; everything else is the library's own code.
"""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tf_simclr.config import DataConfig
from tf_simclr.data import datasets, pipeline

TRAIN, EVAL = "train[:512]", "test[:300]"


@pytest.fixture
def streaming(monkeypatch):
  monkeypatch.setattr(datasets, "IN_MEMORY_BYTES", 0)


def tfds_labels(split):
  ds = tfds.builder("fashion_mnist").as_dataset(split=split, as_supervised=True)
  return np.array([label for _, label in tfds.as_numpy(ds)])


def take(ds, n):
  return [{k: v.numpy() for k, v in x.items()} for x in ds.take(n)]


@pytest.mark.parametrize("num_pipelines", [1, 2])
def test_streamed_epochs_cover_each_pipelines_share(streaming, num_pipelines):
  cfg = DataConfig(dataset="fashion_mnist", train_split=TRAIN, image_size=28)
  source = datasets.load_train(cfg, "all")
  assert not source.in_memory and source.num_examples == 512
  share = 512 // num_pipelines
  for i in range(num_pipelines):
    ds = pipeline.train_dataset(source, cfg, global_batch_size=64, per_replica_batch=32, views=2,
                                contrastive=True, num_pipelines=num_pipelines, pipeline_id=i)
    xs = take(ds, 2 * share // 32)  # two epochs of this pipeline's share
    for x in xs:
      assert x["image"].shape == (32, 28, 28, 6) and x["label"].shape == (32,)
      assert 0 <= x["image"].min() and x["image"].max() <= 1
      assert np.abs(x["image"][..., :3] - x["image"][..., 3:]).max(axis=(1, 2, 3)).min() > 1e-3
    # Each pipeline reads its own contiguous share, once per epoch. The parallel map does not
    # keep order, so an element or two may cross the epoch boundary.
    expected = np.bincount(tfds_labels(f"train[{i * share}:{(i + 1) * share}]"), minlength=10)
    first_epoch = np.concatenate([x["label"] for x in xs[:share // 32]])
    assert np.abs(np.bincount(first_epoch, minlength=10) - expected).sum() <= 8
  if num_pipelines == 2:
    # The two shares differ, so reading the same share twice would fail the check above.
    halves = [np.bincount(tfds_labels(s), minlength=10) for s in ("train[:256]", "train[256:512]")]
    assert np.abs(halves[0] - halves[1]).sum() > 16


def test_streamed_eval_equals_in_memory_eval(monkeypatch):
  # 40 > 33: the eval centre crop and resize run too.
  cfg = DataConfig(dataset="fashion_mnist", eval_split=EVAL, image_size=40)
  in_memory = take(pipeline.eval_dataset(datasets.load_eval(cfg), cfg, global_batch_size=128,
                                         per_replica_batch=128), 10)
  monkeypatch.setattr(datasets, "IN_MEMORY_BYTES", 0)
  source = datasets.load_eval(cfg)
  assert not source.in_memory
  streamed = take(pipeline.eval_dataset(source, cfg, global_batch_size=128,
                                        per_replica_batch=128), 10)
  assert len(streamed) == len(in_memory) == pipeline.num_eval_steps(300, 128) == 3
  for a, b in zip(streamed, in_memory):
    np.testing.assert_array_equal(a["mask"], b["mask"])
    real = a["mask"] == 1  # padding content is unspecified
    np.testing.assert_array_equal(a["label"][real], b["label"][real])
    # Same sampling points, resampled per image (streamed) or per batch (in memory).
    np.testing.assert_allclose(a["image"][real], b["image"][real], atol=3e-6)
  assert streamed[-1]["mask"].sum() == 300 - 256
  np.testing.assert_array_equal(np.concatenate([x["label"] for x in streamed])[:300],
                                tfds_labels(EVAL))


def test_label_fraction_needs_memory(streaming):
  cfg = DataConfig(dataset="fashion_mnist", train_split=TRAIN, image_size=28,
                   train_label_fraction=0.1)
  message = r"needs fashion_mnist:train\[:512\] in memory; set cache_dataset=True"
  with pytest.raises(ValueError, match="subset='labelled' " + message):
    datasets.load_train(cfg, "labelled")
  with pytest.raises(ValueError, match="a label subset " + message):
    datasets.dataset_info(cfg, with_eval=False)
  # Unlabelled pretraining of the whole split streams.
  source = datasets.load_train(cfg, "all")
  assert not source.in_memory
  (x,) = take(pipeline.train_dataset(source, cfg, global_batch_size=16, per_replica_batch=16,
                                     views=1, contrastive=False), 1)
  assert x["image"].shape == (16, 28, 28, 3)
