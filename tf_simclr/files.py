"""Writes that a failure never leaves half done.

A write that fails on a full or read-only disk raises StorageError, whose message names the
file and the reason: the one line programs print instead of a traceback. `replacing` puts a
file or directory in place only once it is complete, so readers see the old version or the
new one, never a partial one.
"""

import contextlib
import json
import os
import re

import tensorflow as tf


class StorageError(RuntimeError):
  """A checkpoint, export or result that cannot be written or read back; the message names the
  file and what is wrong."""


def error_reason(error):
  """What an I/O error says without the path and op decorations TF adds ("path; No space
  left on device [Op:SaveV2]")."""
  message = getattr(error, "message", None) or str(error)
  message = re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:\w+\]", "", message.splitlines()[0])
  return message.rsplit("; ", 1)[-1]


def _remove(path):
  (tf.io.gfile.rmtree if tf.io.gfile.isdir(path) else tf.io.gfile.remove)(path)


@contextlib.contextmanager
def writing(what, *leftovers):
  """Turns a write that fails (full or read-only disk) into StorageError("could not write
  <what>: <reason>"). Whatever the block raises, `leftovers` (paths or glob patterns of what
  it left) are removed first."""
  try:
    yield
  except BaseException as e:
    for pattern in leftovers:
      for path in tf.io.gfile.glob(pattern):
        # A cleanup that fails must not hide why the write failed.
        with contextlib.suppress(OSError, tf.errors.OpError):
          _remove(path)
    if isinstance(e, (OSError, tf.errors.OpError)):
      raise StorageError(f"could not write {what}: {error_reason(e)}") from e
    raise


@contextlib.contextmanager
def replacing(path, what=None):
  """Yields a temporary path beside `path` to write a file or a directory to; when the block
  ends, that replaces whatever is at `path`. If the block raises, the temporary is removed
  and `path` is left as it was; a failed write (full or read-only disk) is a StorageError
  about `what` (default: path)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with writing(what or path, tmp):
    tf.io.gfile.makedirs(os.path.dirname(path) or ".")
    if tf.io.gfile.exists(tmp):  # left by a killed process that had the same id
      _remove(tmp)
    yield tmp
    if not tf.io.gfile.isdir(tmp):
      tf.io.gfile.rename(tmp, path, overwrite=True)
    elif tf.io.gfile.exists(path):
      # rename cannot replace a directory: move the old one aside first.
      stale = f"{tmp}.old"
      tf.io.gfile.rename(path, stale)
      tf.io.gfile.rename(tmp, path)
      tf.io.gfile.rmtree(stale)
    else:
      tf.io.gfile.rename(tmp, path)


def write_json_atomic(path, obj):
  """Writes `obj` as indented JSON with sorted keys to `path` through `replacing`."""
  with replacing(path) as tmp, tf.io.gfile.GFile(tmp, "w") as f:
    f.write(json.dumps(obj, indent=2, sort_keys=True))
