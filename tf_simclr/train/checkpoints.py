"""Checkpoints: resume from model_dir, initialise from another run, check architectures.

`tf.train.CheckpointManager` records a checkpoint in its state file only after every file of
it is written, so a run killed mid-save resumes from the previous complete checkpoint.
Restores happen only after the model and optimizer are built: a deferred restore silently
leaves variables wrong in Keras 3 (see the notes on checkpoints).
"""

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
