"""Checkpoints: resume from model_dir, initialise from another run, check architectures.

`tf.train.CheckpointManager` records a checkpoint in its state file only after every file of
it is written, so a run killed mid-save resumes from the previous complete checkpoint.
Restores happen only after the model and optimizer are built: a deferred restore silently
leaves variables wrong in Keras 3 (see the notes on checkpoints).

Storage faults: every reader first checks that a checkpoint reads back completely
(verify_checkpoint), resuming falls back to the newest complete one (latest_usable), and a
failed write leaves nothing behind (tf_simclr.files.writing). They raise StorageError, whose
message is the one line programs print instead of a traceback.
"""

import os
import re
import sys
import time

import keras
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from tf_simclr.files import StorageError, error_reason, writing

CHECKPOINT_PREFIX = "ckpt"
MODEL_PARTS = ("resnet", "projection_head", "supervised_head")
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


class ArchitectureMismatchError(ValueError):
  """A checkpoint's variables do not fit the model it is restored into."""


class DamagedCheckpointError(StorageError):
  """A checkpoint whose files are missing, truncated or corrupt."""


def _data_file(prefix, message=""):
  """The data file of checkpoint `prefix` that an error is about: the shard the message names,
  else the only one."""
  files = sorted(tf.io.gfile.glob(prefix + ".data-?????-of-?????"))
  shard = re.search(r"shard (\d+)", message)
  if shard:
    files = [f for f in files if f.startswith(f"{prefix}.data-{int(shard[1]):05d}-")]
  return files[0] if len(files) == 1 else prefix + ".data-*"


def verify_checkpoint(prefix: str):
  """Raises DamagedCheckpointError naming the file at fault unless checkpoint `prefix` reads
  back completely: the index parses and every tensor it records reads from its data file with
  the recorded size and checksum (the reader checks both). Reads the whole checkpoint once."""
  def damaged(problem):
    raise DamagedCheckpointError(f"checkpoint {prefix} is damaged: {problem}")

  index = prefix + ".index"
  if not tf.io.gfile.exists(index):
    damaged(f"{index} is missing")
  try:
    reader = tf.train.load_checkpoint(prefix)
  except tf.errors.OpError as e:
    damaged(f"{index} cannot be read ({error_reason(e)})")
  for key in reader.get_variable_to_shape_map():
    try:
      reader.get_tensor(key)
    except IndexError:  # "Read less bytes than requested"
      damaged(f"{_data_file(prefix)} is shorter than its index records (truncated)")
    except tf.errors.NotFoundError as e:
      damaged(f"{e.message.split(';')[0]} is missing")
    except tf.errors.OpError as e:
      damaged(f"{_data_file(prefix, e.message)} does not read back ({e.message})")


def _checkpoint_state(directory):
  """tf.train.get_checkpoint_state, except that a state file that exists but does not parse is
  a DamagedCheckpointError (TF ignores it, or raises ValueError when it is empty)."""
  try:
    state = tf.train.get_checkpoint_state(directory)
  except ValueError:
    state = None
  state_file = os.path.join(directory, "checkpoint")
  if state is None and tf.io.gfile.exists(state_file):
    raise DamagedCheckpointError(f"{state_file}, the list of the checkpoints in {directory}, "
                                 "cannot be read")
  return state


def resolve_checkpoint(path: str) -> str:
  """A verified checkpoint prefix from a prefix, or from a directory holding checkpoints (its
  latest one, which must be usable: only resuming falls back to older ones)."""
  if tf.io.gfile.isdir(path):
    state = _checkpoint_state(path)
    if state is None:
      raise FileNotFoundError(f"no checkpoint in directory {path}")
    path = state.model_checkpoint_path
  elif not tf.io.gfile.exists(path + ".index") and not tf.io.gfile.glob(path + ".data-*"):
    raise FileNotFoundError(f"checkpoint {path} does not exist (no {path}.index)")
  verify_checkpoint(path)
  return path


def latest_usable(manager: tf.train.CheckpointManager, is_chief=True):
  """The newest checkpoint listed in manager's directory that reads back completely (see
  verify_checkpoint), or None when it lists none.

  Each newer damaged one is reported on stderr in one line, dropped from the manager's list
  (its rotation would otherwise count it and delete it) and, by the chief, renamed aside with
  its files kept: a new checkpoint of the same step must not overwrite them. Raises
  DamagedCheckpointError, changing nothing, when no listed checkpoint is usable.
  """
  directory = manager.directory
  state = _checkpoint_state(directory)
  if state is None:
    return None
  listed = [state.model_checkpoint_path] + [
      p for p in reversed(state.all_model_checkpoint_paths) if p != state.model_checkpoint_path]
  damaged = []
  for prefix in listed:
    try:
      verify_checkpoint(prefix)
      break
    except DamagedCheckpointError as e:
      damaged.append((prefix, e))
  else:
    raise DamagedCheckpointError(
        f"no usable checkpoint in {directory}: " + "; ".join(str(e) for _, e in damaged)
        + " (nothing was changed: restore these files, or move them away to start afresh)")
  suffix = time.strftime(".damaged-%Y%m%d-%H%M%S")
  for bad, error in damaged:
    kept = "left in place"
    if is_chief:
      files = [f for f in [bad + ".index"] + tf.io.gfile.glob(bad + ".data-?????-of-?????")
               if tf.io.gfile.exists(f)]
      with writing(f"{bad}.*{suffix}"):
        for f in files:
          tf.io.gfile.rename(f, f + suffix)
      kept = f"its files renamed to {os.path.basename(bad)}.*{suffix}"
    print(f"Warning: {error}; skipped, {kept}", file=sys.stderr, flush=True)
    # CheckpointManager has no public way to forget a checkpoint.
    manager._maybe_delete.pop(bad, None)
  if damaged:
    manager._latest_checkpoint = prefix
    # (A state file without timestamps leaves the list empty; the next save records it.)
    if is_chief and manager._maybe_delete:
      with writing(os.path.join(directory, "checkpoint")):
        manager._record_state()
  return prefix


def save_checkpoint(manager: tf.train.CheckpointManager, step):
  """manager.save numbered `step`. A failed write raises StorageError after removing what it
  left (the temporary directory, a new checkpoint's files, the state file's temporary);
  the previous checkpoints and the state file stay as they were."""
  prefix = f"{os.path.join(manager.directory, CHECKPOINT_PREFIX)}-{int(step)}"
  leftovers = [prefix + "_temp", os.path.join(manager.directory, "checkpoint.tmp*")]
  if prefix not in manager.checkpoints:
    leftovers += [prefix + ".index", prefix + ".data-?????-of-?????"]
  with writing(f"checkpoint {prefix}", *leftovers):
    return manager.save(checkpoint_number=step)


def exit_on_storage_error(main):
  """An absl main that ends with StorageError's one line on stderr and status 1 instead of a
  traceback."""
  def wrapped(argv):
    try:
      return main(argv)
    except StorageError as e:
      print(f"{os.path.basename(argv[0])}: {e}", file=sys.stderr, flush=True)
      sys.exit(1)
  return wrapped


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


def object_graph(reader):
  """The object graph of the checkpoint `reader` reads (tf.train.load_checkpoint), or None
  for a name-based (TF1) checkpoint, which has none."""
  if not reader.has_tensor(OBJECT_GRAPH_KEY):
    return None
  graph = trackable_object_graph_pb2.TrackableObjectGraph()
  graph.ParseFromString(reader.get_tensor(OBJECT_GRAPH_KEY))
  return graph


def child_ids(node) -> dict:
  """{local name: node id} of an object graph node's children."""
  return {c.local_name: c.node_id for c in node.children}


def variable_key(node):
  """The checkpoint key of an object graph node's value if it is a variable, else None."""
  keys = [a.checkpoint_key for a in node.attributes if a.name == "VARIABLE_VALUE"]
  return keys[0] if keys else None


def check_compatible(prefix: str, model, parts=MODEL_PARTS):
  """Raises ArchitectureMismatchError naming the first variable of `model.<parts>` that the
  checkpoint lacks or holds with another shape (with both shapes).

  Walks the checkpoint's object graph alongside the model's, as a restore would, so the
  check sees exactly what `tf.train.Checkpoint.read` would match.
  """
  reader = tf.train.load_checkpoint(prefix)
  graph = object_graph(reader)
  saved_shapes = reader.get_variable_to_shape_map()

  def fail(message):
    raise ArchitectureMismatchError(f"checkpoint {prefix} does not fit the model: {message}")

  def walk(obj, node_id, seen):
    if id(obj) in seen:
      return
    seen.add(id(obj))
    node = graph.nodes[node_id]
    if _is_variable(obj):
      key = variable_key(node)
      if key is None:
        fail(f"it holds no value for variable {obj.path}")
      saved = list(saved_shapes[key])
      if saved != list(obj.shape):
        fail(f"variable {obj.path} has shape {saved} in the checkpoint but "
             f"{list(obj.shape)} in the model")
      return
    saved_children = child_ids(node)
    for name, child in _children(obj).items():
      if name in saved_children:
        walk(child, saved_children[name], seen)
      else:
        missing = _first_variable(child)
        if missing is not None:
          fail(f"it has no variable {missing.path} (is it a run of another architecture?)")

  root = child_ids(graph.nodes[0]) if graph else {}
  if "model" not in root:
    fail("it holds no model (was it written by tf_simclr?)")
  model_node = child_ids(graph.nodes[root["model"]])
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

def saved_model_variables(path):
  """`<path>/variables/variables` if path is a SavedModel directory, else None."""
  if tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
    return os.path.join(path, "variables", "variables")
  return None


def resolve_weights(path: str) -> str:
  """Like resolve_checkpoint, and also accepts a SavedModel directory (returns the prefix of
  its variables, which restore_model reads like any tf_simclr checkpoint)."""
  if tf.io.gfile.isdir(path):
    prefix = saved_model_variables(path)
    if prefix is not None:
      verify_checkpoint(prefix)
      return prefix
  return resolve_checkpoint(path)


def checkpoint_num_classes(prefix: str) -> int:
  """Classes of the supervised head saved in a tf_simclr checkpoint or SavedModel."""
  reader = tf.train.load_checkpoint(prefix)
  graph = object_graph(reader)
  if graph is None:
    raise ArchitectureMismatchError(f"checkpoint {prefix} holds no model (was it written by "
                                    "tf_simclr?)")
  node = graph.nodes[0]
  # Keras 3 Dense tracks its kernel as `_kernel`.
  for names in (("model",), ("supervised_head",), ("dense",), ("_kernel", "kernel")):
    children = child_ids(node)
    found = [n for n in names if n in children]
    if not found:
      raise ArchitectureMismatchError(f"checkpoint {prefix} has no supervised head")
    node = graph.nodes[children[found[0]]]
  return int(reader.get_variable_to_shape_map()[variable_key(node)][-1])
