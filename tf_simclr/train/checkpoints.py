"""Checkpoints: resume from model_dir, initialise from another run, check architectures.

`tf.train.CheckpointManager` records a checkpoint in its state file only after every file of
it is written, so a run killed mid-save resumes from the previous complete checkpoint.
Restores happen only after the model and optimizer are built: a deferred restore silently
leaves variables wrong in Keras 3 (see the notes on checkpoints).
"""

import json
import os

import keras
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

CHECKPOINT_PREFIX = "ckpt"
MODEL_PARTS = ("resnet", "projection_head", "supervised_head")


class ArchitectureMismatchError(ValueError):
  """A checkpoint's variables do not fit the model it is restored into."""


def resolve_checkpoint(path: str) -> str:
  """A checkpoint prefix from a prefix, or from a directory holding checkpoints."""
  if tf.io.gfile.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest is None:
      raise FileNotFoundError(f"no checkpoint in directory {path}")
    return latest
  if not tf.io.gfile.exists(path + ".index"):
    raise FileNotFoundError(f"checkpoint {path} does not exist (no {path}.index)")
  return path


def _is_variable(obj):
  return isinstance(obj, (keras.Variable, tf.Variable))


def _children(obj):
  if not hasattr(obj, "_trackable_children"):
    return {}
  return obj._trackable_children(save_type="checkpoint")


def _first_variable(obj, seen=None):
  seen = set() if seen is None else seen
  if id(obj) in seen:
    return None
  seen.add(id(obj))
  if _is_variable(obj):
    return obj
  for child in _children(obj).values():
    found = _first_variable(child, seen)
    if found is not None:
      return found
  return None


def check_compatible(prefix: str, model, parts=MODEL_PARTS):
  """Raises ArchitectureMismatchError naming the first variable of `model.<parts>` that the
  checkpoint lacks or holds with another shape (with both shapes).

  Walks the checkpoint's object graph alongside the model's, as a restore would, so the
  check sees exactly what `tf.train.Checkpoint.read` would match.
  """
  reader = tf.train.load_checkpoint(prefix)
  graph = trackable_object_graph_pb2.TrackableObjectGraph()
  graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
  saved_shapes = reader.get_variable_to_shape_map()

  def fail(message):
    raise ArchitectureMismatchError(f"checkpoint {prefix} does not fit the model: {message}")

  def walk(obj, node_id, seen):
    if id(obj) in seen:
      return
    seen.add(id(obj))
    node = graph.nodes[node_id]
    if _is_variable(obj):
      keys = [a.checkpoint_key for a in node.attributes if a.name == "VARIABLE_VALUE"]
      if not keys:
        fail(f"it holds no value for variable {obj.path}")
      saved = list(saved_shapes[keys[0]])
      if saved != list(obj.shape):
        fail(f"variable {obj.path} has shape {saved} in the checkpoint but "
             f"{list(obj.shape)} in the model")
      return
    saved_children = {c.local_name: c.node_id for c in node.children}
    for name, child in _children(obj).items():
      if name in saved_children:
        walk(child, saved_children[name], seen)
      else:
        missing = _first_variable(child)
        if missing is not None:
          fail(f"it has no variable {missing.path} (is it a run of another architecture?)")

  root = {c.local_name: c.node_id for c in graph.nodes[0].children}
  if "model" not in root:
    fail("it holds no model (was it written by tf_simclr?)")
  model_node = {c.local_name: c.node_id for c in graph.nodes[root["model"]].children}
  seen = set()
  for part in parts:
    if part not in model_node:
      fail(f"it has no {part}")
    walk(getattr(model, part), model_node[part], seen)


def restore_model(prefix: str, model, parts=MODEL_PARTS):
  """Restores the weights (and BN statistics) of `model.<parts>` from any tf_simclr
  checkpoint, after checking that they fit; optimizer state is not read."""
  check_compatible(prefix, model, parts)
  target = tf.train.Checkpoint(model=tf.train.Checkpoint(
      **{part: getattr(model, part) for part in parts}))
  target.read(prefix).expect_partial().assert_existing_objects_matched()


def checkpoint_step(prefix: str) -> int:
  """The global step saved in a tf_simclr checkpoint."""
  reader = tf.train.load_checkpoint(prefix)
  for key in reader.get_variable_to_shape_map():
    if key.startswith("global_step/"):
      return int(reader.get_tensor(key))
  raise ValueError(f"checkpoint {prefix} holds no step")


# --------------------------------------------------------------------------- SavedModels
# A tf_simclr SavedModel (tf_simclr.export) tracks the Keras model as `model` from its root,
# so its variables checkpoint restores with the same object-graph walk as a training one.

SAVED_MODEL_CONFIG = "tf_simclr_config.json"
ARCHITECTURE_FIELDS = ("resnet_depth", "width_multiplier", "sk_ratio", "se_ratio",
                       "batch_norm_decay", "global_bn", "image_size", "proj_head_mode",
                       "proj_out_dim", "num_proj_layers", "ft_proj_selector", "num_classes")


def _saved_model_variables(path):
  """`<path>/variables/variables` if path is a SavedModel directory, else None."""
  prefix = os.path.join(path, "variables", "variables")
  if (tf.io.gfile.exists(os.path.join(path, "saved_model.pb"))
      and tf.io.gfile.exists(prefix + ".index")):
    return prefix
  return None


def resolve_weights(path: str) -> str:
  """Like resolve_checkpoint, and also accepts a SavedModel directory (returns the prefix of
  its variables, which restore_model reads like any tf_simclr checkpoint)."""
  if tf.io.gfile.isdir(path):
    prefix = _saved_model_variables(path)
    if prefix is not None:
      return prefix
  return resolve_checkpoint(path)


def read_model_config(path: str) -> dict:
  """Architecture fields (a subset of ARCHITECTURE_FIELDS) of a model_dir (its flags.json),
  a checkpoint prefix in a model_dir, or a tf_simclr SavedModel (its tf_simclr_config.json,
  also from its variables prefix). num_classes is there only for SavedModels."""
  path = path.rstrip("/")
  directory = path
  if not tf.io.gfile.isdir(path):
    # <saved_model>/variables/variables, or a checkpoint prefix in its model_dir
    directory = os.path.dirname(path)
    if os.path.basename(directory) == "variables":
      directory = os.path.dirname(directory)
  for name in (SAVED_MODEL_CONFIG, "flags.json"):
    file = os.path.join(directory, name)
    if tf.io.gfile.exists(file):
      with tf.io.gfile.GFile(file) as f:
        values = json.load(f)
      fields = {k: values[k] for k in ARCHITECTURE_FIELDS if k in values}
      if name == "flags.json":
        fields.pop("num_classes", None)  # a run's classes come from its data, not its flags
      return fields
  raise FileNotFoundError(f"no {SAVED_MODEL_CONFIG} or flags.json for {path}: pass the "
                          "architecture explicitly")


def checkpoint_num_classes(prefix: str) -> int:
  """Classes of the supervised head saved in a tf_simclr checkpoint or SavedModel."""
  reader = tf.train.load_checkpoint(prefix)
  graph = trackable_object_graph_pb2.TrackableObjectGraph()
  graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
  node = graph.nodes[0]
  # Keras 3 Dense tracks its kernel as `_kernel`.
  for names in (("model",), ("supervised_head",), ("dense",), ("_kernel", "kernel")):
    children = {c.local_name: c.node_id for c in node.children}
    found = [n for n in names if n in children]
    if not found:
      raise ArchitectureMismatchError(f"checkpoint {prefix} has no supervised head")
    node = graph.nodes[children[found[0]]]
  key = [a.checkpoint_key for a in node.attributes if a.name == "VARIABLE_VALUE"][0]
  return int(reader.get_variable_to_shape_map()[key][-1])
