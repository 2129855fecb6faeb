"""Sources: label-fraction subsets, offline Fashion-MNIST through TFDS, image folders, errors."""

import gzip
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tf_simclr.config import DataConfig
from tf_simclr.data import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_image(path, value, size=(10, 12), channels=3):
  pixels = np.full(size + (channels,), value, np.uint8)
  encode = tf.io.encode_png if path.endswith(".png") else tf.io.encode_jpeg
  tf.io.write_file(path, encode(pixels))


def make_folder(root, classes=("cat", "dog", "eel"), per_class=10, corrupt=True):
  for c, name in enumerate(classes):
    os.makedirs(os.path.join(root, name))
    for i in range(per_class):
      ext = ".png" if i % 2 else ".jpg"
      write_image(os.path.join(root, name, f"{i}{ext}"), 20 * c + i, channels=1 if i == 3 else 3)
  if corrupt:
    with open(os.path.join(root, classes[0], "broken.jpg"), "wb") as f:
      f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
  return root


# ------------------------------------------------------------------------------ subsets

def test_label_fraction_is_class_balanced_and_seeded():
  labels = np.repeat(np.arange(5), [100, 50, 20, 7, 1])
  chosen = datasets.labelled_indices(labels, 0.1, seed=3)
  counts = np.bincount(labels[chosen], minlength=5)
  np.testing.assert_array_equal(counts, [10, 5, 2, 1, 1])  # at least one per class
  np.testing.assert_array_equal(chosen, datasets.labelled_indices(labels, 0.1, seed=3))
  assert not np.array_equal(chosen, datasets.labelled_indices(labels, 0.1, seed=4))
  assert np.all(np.diff(chosen) > 0)


def test_subsets_partition_the_split():
  labels = np.arange(200) % 7
  labelled = datasets.subset_indices(labels, 0.25, 0, "labelled")
  unlabelled = datasets.subset_indices(labels, 0.25, 0, "unlabelled")
  assert len(np.intersect1d(labelled, unlabelled)) == 0
  np.testing.assert_array_equal(np.union1d(labelled, unlabelled), np.arange(200))
  np.testing.assert_array_equal(datasets.subset_indices(labels, 0.25, 0, "all"), np.arange(200))
  assert len(datasets.subset_indices(labels, 1.0, 0, "unlabelled")) == 0


# ------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("kwargs,message", [
    (dict(image_size=4), "image_size must be >= 8"),
    (dict(train_label_fraction=0.0), "train_label_fraction must be in (0, 1]"),
    (dict(train_label_fraction=1.5), "train_label_fraction must be in (0, 1]"),
    (dict(dataset="no_such_dataset_xyz"), "unknown dataset 'no_such_dataset_xyz'"),
    (dict(dataset="imagenet2012_subset/3pct"), "unknown dataset"),
    (dict(dataset="folder:/nonexistent/dir"), "does not exist"),
    (dict(crop_min_area=0.0), "crop_min_area must be in (0, 1], got 0.0"),
    (dict(crop_min_area=1.5), "crop_min_area must be in (0, 1], got 1.5"),
])
def test_bad_input_errors(kwargs, message):
  with pytest.raises(ValueError) as e:
    datasets.dataset_info(DataConfig(**kwargs))
  assert message in str(e.value) and "\n" not in str(e.value)


def test_sources_are_chosen_by_prefix(tmp_path, monkeypatch):
  root = make_folder(str(tmp_path / "imgs"), per_class=2, corrupt=False)
  assert isinstance(datasets.source(DataConfig(dataset=f"folder:{root}")), datasets.ImageFolder)
  assert datasets.SOURCES[""] is datasets.Tfds  # every other name
  # The longest registered prefix wins; the rest of the name goes to the source.
  seen = []
  monkeypatch.setitem(datasets.SOURCES, "folder:special:",
                      lambda name, cfg: seen.append(name) or "special")
  assert datasets.source(DataConfig(dataset="folder:special:x/y")) == "special"
  assert seen == ["x/y"]
  with pytest.raises(ValueError, match=r"not a TFDS builder nor 'folder:\.\.\.', "
                                       r"'folder:special:\.\.\.'"):
    datasets.source(DataConfig(dataset="no_such_dataset_xyz"))


def test_empty_folders(tmp_path):
  with pytest.raises(ValueError, match="no class subfolders"):
    datasets.dataset_info(DataConfig(dataset=f"folder:{tmp_path}"))
  os.makedirs(tmp_path / "a")
  (tmp_path / "a" / "notes.txt").write_text("x")
  with pytest.raises(ValueError, match="holds no JPEG/PNG images"):
    datasets.dataset_info(DataConfig(dataset=f"folder:{tmp_path}"))


def test_fashion_mnist_missing_files_and_offline(tmp_path, monkeypatch):
  monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", str(tmp_path / "missing"))

  class Offline:
    def download_and_prepare(self):
      raise ConnectionError("no network")

  with pytest.raises(RuntimeError, match="apt-get install dataset-fashion-mnist"):
    datasets.prepare_fashion_mnist(Offline())


def test_fashion_mnist_wrong_content_is_refused(tmp_path, monkeypatch):
  for name in datasets._FASHION_MNIST_SHA256:
    with gzip.open(tmp_path / name, "wb") as f:
      f.write(b"not fashion-mnist")
  monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", str(tmp_path))
  with pytest.raises(RuntimeError, match="does not hold the Fashion-MNIST content"):
    datasets.prepare_fashion_mnist(None)


# ------------------------------------------------------------------------------ TFDS

@pytest.fixture(scope="module")
def fashion_mnist_dir(tmp_path_factory):
  """Fashion-MNIST prepared from Debian's files into an EMPTY data directory by two run.py
  processes started together, each preparing (or waiting for the other) and then training
  one step in the same process: a newcomer's first run, and the workers of a multi-worker
  run on a fresh machine. The training-only run names no eval split that exists."""
  if not os.path.exists(os.path.join(datasets.FASHION_MNIST_DIR, "train-labels-idx1-ubyte.gz")):
    pytest.skip("needs `apt-get install dataset-fashion-mnist`")
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  assert not os.listdir(data_dir)
  procs = []
  for i in range(2):
    model_dir = str(tmp_path_factory.mktemp(f"first_run_{i}"))
    cmd = [sys.executable, os.path.join(ROOT, "run.py"), "--dataset=fashion_mnist",
           f"--data_dir={data_dir}", "--mode=train", "--train_mode=pretrain",
           "--eval_split=validation", "--image_size=16", "--resnet_depth=10",
           "--width_multiplier=0.125", "--proj_out_dim=16", "--global_bn=false",
           "--train_batch_size=32", "--train_steps=1", "--keep_hub_module_max=0",
           f"--model_dir={model_dir}"]
    procs.append((model_dir, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True,
                                              env=dict(os.environ, PYTHONPATH=ROOT))))
  for model_dir, proc in procs:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert "step 1/1" in stdout
    assert tf.train.latest_checkpoint(model_dir).endswith("ckpt-1")
  return data_dir


def test_fashion_mnist_offline_through_tfds(fashion_mnist_dir):
  # The standard builder reads what the local preparation wrote.
  builder = tfds.builder("fashion_mnist", data_dir=fashion_mnist_dir)
  assert builder.is_prepared()
  cfg = DataConfig(dataset="fashion_mnist", data_dir=fashion_mnist_dir, eval_split="test",
                   train_label_fraction=0.01, image_size=28)
  assert datasets.dataset_info(cfg) == datasets.DatasetInfo(10, 60000, 600, 10000)
  evaluation = datasets.load_eval(cfg)
  assert evaluation.kind == "pixels" and evaluation.images.shape == (10000, 28, 28, 1)
  with gzip.open(os.path.join(datasets.FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")) as f:
    debian_labels = np.frombuffer(f.read()[8:], np.uint8)
  np.testing.assert_array_equal(np.bincount(evaluation.labels), np.bincount(debian_labels))
  labelled = datasets.load_train(cfg, "labelled")
  np.testing.assert_array_equal(np.bincount(labelled.labels), [60] * 10)


def test_missing_split(fashion_mnist_dir):
  cfg = DataConfig(dataset="fashion_mnist", data_dir=fashion_mnist_dir, eval_split="validation")
  with pytest.raises(ValueError, match="has no split 'validation' \\(splits: test, train\\)"):
    datasets.dataset_info(cfg)


def test_split_slicing(fashion_mnist_dir):
  cfg = DataConfig(dataset="fashion_mnist", data_dir=fashion_mnist_dir, train_split="train[:10%]",
                   eval_split="test[:500]")
  info = datasets.dataset_info(cfg)
  assert (info.num_train_examples, info.num_eval_examples) == (6000, 500)


def test_tfds_mock_data():
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    cfg = DataConfig(dataset="cifar10", eval_split="test", train_label_fraction=0.5)
    train = datasets.load_train(cfg, "all")
    assert train.kind == "pixels" and train.images.shape == (40, 32, 32, 3)
    info = datasets.dataset_info(cfg)
    assert info.num_classes == 10 and info.num_train_examples == 40
    assert info.num_labelled_examples == len(datasets.labelled_indices(train.labels, 0.5, 0))
    encoded = datasets.load_train(DataConfig(dataset="imagenet2012"), "all")
    assert encoded.kind == "encoded" and encoded.num_examples == 40


# ------------------------------------------------------------------------------ folders

def test_folder_seeded_split_skips_corrupt_file(tmp_path, caplog):
  root = make_folder(str(tmp_path / "imgs"))
  cfg = DataConfig(dataset=f"folder:{root}")
  with caplog.at_level(logging.WARNING):
    info = datasets.dataset_info(cfg)
  assert "broken.jpg" in caplog.text and "skipping 1 undecodable" in caplog.text
  # 10% per class held out (1 of 10), the corrupt file dropped.
  assert info == datasets.DatasetInfo(3, 27, 27, 3)
  train, evaluation = datasets.load_train(cfg, "all"), datasets.load_eval(cfg)
  assert train.kind == "files" and not set(train.images) & set(evaluation.images)
  np.testing.assert_array_equal(np.bincount(evaluation.labels), [1, 1, 1])


def test_folder_train_val_layout(tmp_path):
  make_folder(str(tmp_path / "train"), per_class=4, corrupt=False)
  make_folder(str(tmp_path / "val"), classes=("cat", "eel"), per_class=2, corrupt=False)
  cfg = DataConfig(dataset=f"folder:{tmp_path}", train_label_fraction=0.5)
  assert datasets.dataset_info(cfg) == datasets.DatasetInfo(3, 12, 6, 4)
  np.testing.assert_array_equal(np.unique(datasets.load_eval(cfg).labels), [0, 2])


def test_labels_per_class_and_its_conflict_with_a_fraction():
  labels = np.repeat(np.arange(4), [30, 12, 5, 40])
  chosen = datasets.labelled_indices(labels, 1.0, seed=2, per_class=10)
  np.testing.assert_array_equal(np.bincount(labels[chosen]), [10, 10, 5, 10])
  # Seeded: the same subset in every process, another with another seed.
  np.testing.assert_array_equal(chosen, datasets.labelled_indices(labels, 1.0, 2, per_class=10))
  assert not np.array_equal(chosen, datasets.labelled_indices(labels, 1.0, 3, per_class=10))
  with pytest.raises(ValueError, match="set one of them"):
    DataConfig(train_labels_per_class=13, train_label_fraction=0.1).validate()
