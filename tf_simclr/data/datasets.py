"""Example sources: TFDS builders (with offline Fashion-MNIST), image folders, label subsets.

A source is a kind of dataset (a `Source`), chosen by the prefix of `DataConfig.dataset` in
`SOURCES` ("folder:" -> `ImageFolder`; any other name -> `Tfds`): a new kind is one class
registered with `register(prefix)`, and the pipelines read whatever it loads. A loaded split
is either held in memory for random access (`Examples`: decoded pixels, encoded images or
file paths, plus labels), which lets the pipeline address any position of its stream
directly, or, when too big for memory, read as a stream (a `Stream`, e.g. `TfdsStream`).
"""

import contextlib
import dataclasses
import fcntl
import functools
import gzip
import hashlib
import logging
import os
from typing import ClassVar, Optional, Protocol, Union

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils
from tensorflow_datasets.core.download import checksums as tfds_checksums
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from tf_simclr.config import DataConfig

FOLDER_PREFIX = "folder:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Held-out share of each class when a folder has no train/ and val/ subfolders. Its seed
# is fixed (not cfg.seed) so that every run evaluates on the same images.
FOLDER_EVAL_FRACTION = 0.1
FOLDER_SPLIT_SEED = 0
# TFDS splits up to this size are loaded into memory (exact, random-access stream).
IN_MEMORY_BYTES = 2 << 30

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# SHA-256 of the DECOMPRESSED files of Debian's dataset-fashion-mnist. Debian recompressed
# the archives (no file name in the gzip header, another mtime), so the .gz checksums TFDS
# registered cannot match; the content is what is checked instead.
_FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
_APT_HINT = "install them with `apt-get install dataset-fashion-mnist`"

SUBSETS = ("labelled", "all", "unlabelled")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  num_train_examples: int      # whole training split
  num_labelled_examples: int   # class-balanced label-fraction subset (whole split at 1.0)
  num_eval_examples: Optional[int]  # None when not asked for (a run that never evaluates)


# ----------------------------------------------------------------------------------------
# What sources provide.

@dataclasses.dataclass(frozen=True)
class Examples:
  """A split in memory, read by position. `kind` says what `images` holds:

  "pixels": uint8 [N, H, W, C]; "encoded": JPEG/PNG bytes [N]; "files": paths [N].
  """
  images: np.ndarray
  labels: np.ndarray  # int32 [N]
  kind: str
  in_memory: ClassVar[bool] = True

  @property
  def num_examples(self) -> int:
    return len(self.labels)

  @functools.cached_property
  def tensors(self):
    """(images, labels) as TF tensors, made once: pipelines built on these examples share
    them instead of each copying the arrays."""
    return tf.constant(self.images), tf.constant(self.labels)

  def take(self, indices):
    return Examples(self.images[indices], self.labels[indices], self.kind)

  def decode(self, data: tf.Tensor) -> tf.Tensor:
    """One element of `images` -> uint8 [H, W, C]."""
    if self.kind == "pixels":
      return data
    return decode_image(tf.io.read_file(data) if self.kind == "files" else data)


class Stream(Protocol):
  """A split too big for memory, read front to back (never by position)."""
  in_memory: ClassVar[bool]  # False
  num_examples: int

  def read(self, *, share=(0, 1), seed: Optional[int] = None) -> tf.data.Dataset:
    """Elements {"image": stored image, "label": class} of share i of n (share = (i, n),
    even shares that together hold every example once): in order with seed None, else in
    an order shuffled by `seed` as far as the storage makes cheap (e.g. by file)."""

  def decode(self, data: tf.Tensor) -> tf.Tensor:
    """One stored image -> uint8 [H, W, C]."""


Split = Union[Examples, Stream]


class Source(Protocol):
  """A kind of dataset, built as cls(dataset name without its prefix, cfg). `split` is
  "train" or "eval" (cfg.train_split and cfg.eval_split, or the source's own)."""
  num_classes: int

  def num_examples(self, split: str) -> int:
    """Without reading the examples."""

  def labels(self, split: str) -> np.ndarray:
    """int32 [N] (label subsets); a ValueError (`needs_memory`) for a streamed split."""

  def load(self, split: str) -> Split:
    ...


# Dataset name prefix -> Source class. The longest prefix of cfg.dataset wins; "" (TFDS)
# matches every name.
SOURCES = {}


def register(prefix: str):
  """Class decorator: datasets named prefix + name are read by this Source class."""
  def add(cls):
    SOURCES[prefix] = cls
    return cls
  return add


def source(cfg: DataConfig) -> Source:
  prefix = max((p for p in SOURCES if cfg.dataset.startswith(p)), key=len)
  return SOURCES[prefix](cfg.dataset[len(prefix):], cfg)


def needs_memory(split_name: str, what: str) -> ValueError:
  return ValueError(f"{what} needs {split_name} in memory; set cache_dataset=True or use a "
                    "prepared subset (e.g. imagenet2012_subset/1pct)")


# ----------------------------------------------------------------------------------------
# Loading.

def dataset_info(cfg: DataConfig, with_eval: bool = True) -> DatasetInfo:
  """Sizes of the splits; reads labels only for a label subset.

  `with_eval=False` leaves the eval split alone (a training-only run need not name one that
  exists: most TFDS datasets have no "validation")."""
  cfg.validate()
  src = source(cfg)
  num_train = src.num_examples("train")
  num_eval = src.num_examples("eval") if with_eval else None
  num_labelled = num_train
  if cfg.has_label_subset:
    num_labelled = len(labelled_indices(src.labels("train"), cfg.train_label_fraction, cfg.seed,
                                        cfg.train_labels_per_class))
  return DatasetInfo(src.num_classes, num_train, num_labelled, num_eval)


def load_train(cfg: DataConfig, subset: str = "labelled") -> Split:
  """The training examples of `subset` ("labelled", "all" or "unlabelled")."""
  cfg.validate()
  if subset not in SUBSETS:
    raise ValueError(f"subset={subset!r} is not one of {SUBSETS}")
  split = source(cfg).load("train")
  if subset == "all" or (subset == "labelled" and not cfg.has_label_subset):
    return split
  if not split.in_memory:
    raise needs_memory(f"{cfg.dataset}:{cfg.train_split}", f"subset={subset!r}")
  return split.take(subset_indices(split.labels, cfg.train_label_fraction, cfg.seed, subset,
                                   cfg.train_labels_per_class))


def load_eval(cfg: DataConfig) -> Split:
  cfg.validate()
  return source(cfg).load("eval")


# ----------------------------------------------------------------------------------------
# Label-fraction subsets.

def labelled_indices(labels: np.ndarray, fraction: float, seed: int,
                     per_class: int = 0) -> np.ndarray:
  """Sorted indices of a class-balanced subset: round(fraction * n_c) (at least 1) per class,
  or with `per_class` > 0 min(per_class, n_c).

  Each class draws from its own generator seeded by (seed, class), so a class's choice does
  not depend on the other classes, and the result is identical in every process.
  """
  labels = np.asarray(labels)
  if fraction >= 1 and not per_class:
    return np.arange(len(labels))
  chosen = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    k = min(len(members), per_class or max(1, int(round(fraction * len(members)))))
    rng = np.random.default_rng([seed, int(c) & 0xFFFFFFFF])
    chosen.append(members[rng.permutation(len(members))[:k]])
  return np.sort(np.concatenate(chosen))


def subset_indices(labels: np.ndarray, fraction: float, seed: int, subset: str,
                   per_class: int = 0) -> np.ndarray:
  labelled = labelled_indices(labels, fraction, seed, per_class)
  if subset == "labelled":
    return labelled
  if subset == "unlabelled":
    return np.setdiff1d(np.arange(len(labels)), labelled)
  return np.arange(len(labels))



# ----------------------------------------------------------------------------------------
# TFDS.

@register("")
class Tfds:
  """A TFDS builder by name with `image` and a ClassLabel `label`, prepared on first use.
  A split is held in memory up to IN_MEMORY_BYTES (any size with cfg.cache_dataset), else
  streamed."""

  def __init__(self, name: str, cfg: DataConfig):
    self.builder = tfds_builder(name, cfg.data_dir)
    self.num_classes = self.builder.info.features["label"].num_classes
    self._names = {"train": cfg.train_split, "eval": cfg.eval_split}
    self._cache = cfg.cache_dataset

  def num_examples(self, split):
    return _num_examples(self.builder, self._names[split])

  def labels(self, split):
    name = self._names[split]
    if not self._in_memory(name):
      raise needs_memory(f"{self.builder.name}:{name}", "a label subset")
    _num_examples(self.builder, name)
    ds = self.builder.as_dataset(split=name, shuffle_files=False,
                                 decoders={"image": tfds.decode.SkipDecoding()})
    ds = ds.map(lambda ex: ex["label"]).batch(65536)
    return np.concatenate(list(tfds.as_numpy(ds))).astype(np.int32)

  def load(self, split):
    name = self._names[split]
    if not self._in_memory(name):
      return TfdsStream(self.builder, name, _num_examples(self.builder, name))
    num = _num_examples(self.builder, name)
    fixed = None not in self.builder.info.features["image"].shape
    decoders = None if fixed else {"image": tfds.decode.SkipDecoding()}
    ds = self.builder.as_dataset(split=name, shuffle_files=False, decoders=decoders)
    # One batch of the whole split (batch_size=-1 needs split metadata, absent in mock data).
    data = next(iter(tfds.as_numpy(ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})
                                   .batch(num))))
    return Examples(data["image"], data["label"].astype(np.int32), "pixels" if fixed else "encoded")

  def _in_memory(self, name):
    if self._cache or not self.builder.info.splits:
      return True
    shape = self.builder.info.features["image"].shape
    if None not in shape:
      size = _num_examples(self.builder, name) * int(np.prod(shape))
    else:
      size = self.builder.info.splits[name].num_bytes
    return size <= IN_MEMORY_BYTES


@dataclasses.dataclass(frozen=True)
class TfdsStream:
  """A TFDS split too big for memory (a `Stream`): encoded images, decoded per example."""
  builder: tfds.core.DatasetBuilder
  split: str
  num_examples: int
  in_memory: ClassVar[bool] = False

  def read(self, *, share=(0, 1), seed=None):
    # Even shares of the examples: sharding by file (TFDS's input_context) fails when a split
    # has fewer files than pipelines.
    index, count = share
    split = tfds.even_splits(self.split, n=count)[index]
    skip = {"image": tfds.decode.SkipDecoding()}
    if seed is None:
      return self.builder.as_dataset(split=split, shuffle_files=False, decoders=skip)
    return self.builder.as_dataset(
        split=split, shuffle_files=True, decoders=skip,
        read_config=tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=16,
                                    interleave_block_length=1))

  def decode(self, data):
    return decode_image(data)


def tfds_builder(name: str, data_dir: Optional[str]) -> tfds.core.DatasetBuilder:
  """The prepared builder `name` (downloads it, or for fashion_mnist uses Debian's files)."""
  builder = _builder(name, data_dir)
  features = builder.info.features
  if ("image" not in features or "label" not in features
      or not isinstance(features["label"], tfds.features.ClassLabel)):
    raise ValueError(f"dataset {name!r} has no 'image' and class 'label' features")
  if builder.is_prepared():
    return builder
  # Processes started together on a fresh machine (the workers of one multi-worker run, the
  # test suite's workers) prepare the data once: the first holds the lock, the others then
  # find it prepared.
  with _preparation_lock(builder.data_dir_root):
    builder = _builder(name, data_dir)
    if not builder.is_prepared():
      if builder.name == "fashion_mnist":
        prepare_fashion_mnist(builder)
      else:
        builder.download_and_prepare()
  # A builder made before the data existed keeps the info it read then (no splits): the
  # prepared data is read through a new one.
  return _builder(name, data_dir)


def _builder(name, data_dir) -> tfds.core.DatasetBuilder:
  try:
    return tfds.builder(name, data_dir=data_dir)
  except ValueError as e:  # DatasetNotFoundError and unknown configs are ValueErrors
    first = str(e).splitlines()[0]
    prefixes = ", ".join(f"'{p}...'" for p in SOURCES if p)
    raise ValueError(f"unknown dataset {name!r}: not a TFDS builder nor {prefixes} "
                     f"({first})") from None


@contextlib.contextmanager
def _preparation_lock(data_dir):
  data_dir = os.fspath(data_dir)
  if "://" in data_dir:  # remote storage (gs://): no file locks there
    yield
    return
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, ".tf_simclr_prepare.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _num_examples(builder, split: str) -> int:
  splits = builder.info.splits
  if not splits:  # TFDS mock data (MockPolicy.USE_CODE) knows no splits
    return int(builder.as_dataset(split=split).cardinality())
  try:
    return splits[split].num_examples
  except (KeyError, ValueError):
    raise ValueError(f"dataset {builder.name!r} has no split {split!r} "
                     f"(splits: {', '.join(sorted(splits))})") from None


class _LocalFashionMNIST(tfds_mnist.FashionMNIST, skip_registration=True):
  """TFDS's own Fashion-MNIST builder, expecting the checksums of the Debian archives.

  Only the expected archive checksums differ, and only after the archives' decompressed
  content was verified, so TFDS still checks that it reads exactly the verified files.
  The prepared data lands where `tfds.builder("fashion_mnist")` reads it.
  """
  name = "fashion_mnist"

  @tfds_utils.classproperty
  @classmethod
  def url_infos(cls):
    return {url: tfds_checksums.compute_url_info(os.path.join(FASHION_MNIST_DIR, os.path.basename(url)))
            for url in tfds_mnist.FashionMNIST.url_infos}


def prepare_fashion_mnist(builder):
  """Prepares Fashion-MNIST in builder's data dir from Debian's package files (checked against
  their sha256), else by TFDS's download; fails with one line saying what to install."""
  if all(os.path.exists(os.path.join(FASHION_MNIST_DIR, f)) for f in _FASHION_MNIST_SHA256):
    for name, expected in _FASHION_MNIST_SHA256.items():
      with gzip.open(os.path.join(FASHION_MNIST_DIR, name), "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
      if digest != expected:
        raise RuntimeError(f"{FASHION_MNIST_DIR}/{name} does not hold the Fashion-MNIST content "
                           f"(sha256 {digest}); reinstall the package: {_APT_HINT}")
    local = _LocalFashionMNIST(data_dir=builder.data_dir_root)
    local.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=FASHION_MNIST_DIR))
    return
  try:
    builder.download_and_prepare()
  except Exception as e:  # any download failure: offline is the common case here
    raise RuntimeError(f"fashion_mnist: no files in {FASHION_MNIST_DIR} and the download failed "
                       f"({type(e).__name__}); {_APT_HINT}") from e


# ----------------------------------------------------------------------------------------
# Image folders.

@register(FOLDER_PREFIX)
class ImageFolder:
  """`folder:/path`: one subfolder of JPEG/PNG files per class; /path/train and /path/val (or
  validation) as the splits, else FOLDER_EVAL_FRACTION of each class held out for eval.
  Held in memory as file paths."""

  def __init__(self, path: str, cfg: DataConfig):  # pylint: disable=unused-argument
    root = os.path.expanduser(path)
    if not os.path.isdir(root):
      raise ValueError(f"image folder {root!r} does not exist")
    eval_dir = next((os.path.join(root, d) for d in ("val", "validation")
                     if os.path.isdir(os.path.join(root, d))), None)
    train_dir = os.path.join(root, "train")
    if os.path.isdir(train_dir) and eval_dir:
      classes = _class_names(train_dir)
      train = _folder_examples(train_dir, classes)
      evaluation = _folder_examples(eval_dir, classes)
      if not evaluation.num_examples:
        raise ValueError(f"image folder {eval_dir!r} holds no readable JPEG/PNG images")
    else:
      classes = _class_names(root)
      everything = _folder_examples(root, classes)
      held_out = labelled_indices(everything.labels, FOLDER_EVAL_FRACTION, FOLDER_SPLIT_SEED)
      train = everything.take(np.setdiff1d(np.arange(everything.num_examples), held_out))
      evaluation = everything.take(held_out)
    self.num_classes = len(classes)
    self._splits = {"train": train, "eval": evaluation}

  def num_examples(self, split):
    return self._splits[split].num_examples

  def labels(self, split):
    return self._splits[split].labels

  def load(self, split):
    return self._splits[split]


def _class_names(directory):
  classes = sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d)))
  if not classes:
    raise ValueError(f"image folder {directory!r} has no class subfolders")
  return classes


def _folder_examples(directory, classes) -> Examples:
  paths, labels = [], []
  for label, name in enumerate(classes):
    class_dir = os.path.join(directory, name)
    if not os.path.isdir(class_dir):
      continue
    for dirpath, _, files in sorted(os.walk(class_dir)):
      for f in sorted(files):
        if f.lower().endswith(IMAGE_EXTENSIONS):
          paths.append(os.path.join(dirpath, f))
          labels.append(label)
  if not paths:
    raise ValueError(f"image folder {directory!r} holds no JPEG/PNG images")
  ok = _decodable(tuple((p, os.path.getsize(p), os.path.getmtime(p)) for p in paths))
  bad = [p for p, good in zip(paths, ok) if not good]
  if bad:
    logging.warning("skipping %d undecodable image(s) under %s: %s", len(bad), directory,
                    ", ".join(bad))
  if len(bad) == len(paths):
    raise ValueError(f"image folder {directory!r} holds no readable JPEG/PNG images")
  return Examples(np.array(paths)[ok], np.array(labels, np.int32)[ok], "files")


@functools.lru_cache(maxsize=16)
def _decodable(files) -> np.ndarray:
  """Decodes every file once (in parallel) so that a bad one never fails an epoch."""
  paths = [f[0] for f in files]
  ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths))
  ds = ds.map(lambda i, p: (i, tf.shape(decode_image(tf.io.read_file(p)))),
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.ignore_errors().map(lambda i, _: i).batch(4096)
  ok = np.zeros(len(paths), bool)
  for good in ds.as_numpy_iterator():
    ok[good] = True
  return ok


def decode_image(data: tf.Tensor) -> tf.Tensor:
  """JPEG/PNG bytes -> uint8 [H, W, 3] (grayscale and alpha converted)."""
  image = tf.io.decode_image(data, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image