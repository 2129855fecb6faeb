"""Storage faults on real runs: a damaged checkpoint is skipped when resuming and named by every
reader, and a full or read-only disk ends a run with one line, leaving no temporary files.

Full and read-only disks are small tmpfs mounts (skipped where mounting is not permitted; one
test simulates the failed write instead)."""

import glob
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.test_robustness import CHEAP, variables
from tests.test_train import ROOT, run
from tf_simclr import files
from tf_simclr.train import checkpoints

ARGS = [*CHEAP, "--checkpoint_steps=2", "--keep_hub_module_max=0"]
DATA = ".data-00000-of-00001"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished run with checkpoints at steps 2, 4 and 6."""
  model_dir = str(tmp_path_factory.mktemp("trained"))
  run(*ARGS, "--train_steps=6", f"--model_dir={model_dir}")
  return model_dir


def copy_of(trained, tmp_path):
  model_dir = str(tmp_path / "run")
  shutil.copytree(trained, model_dir)
  return model_dir


def truncate(path, by=1000):
  os.truncate(path, os.path.getsize(path) - by)


def flip_byte(path, offset=1000):
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)
    f.seek(offset)
    f.write(bytes([byte[0] ^ 0xFF]))


def error_line(out, program="run.py"):
  """The one line a failed run printed (and that it printed no traceback)."""
  assert out.returncode != 0, out.stdout[-2000:]
  assert "Traceback" not in out.stderr, out.stderr[-4000:]
  lines = [line for line in out.stderr.splitlines() if line.startswith(f"{program}: ")]
  assert len(lines) == 1, out.stderr[-4000:]
  return lines[0]


def checkpoint_files(directory):
  """{name: size} of the checkpoint files and state file in directory."""
  return {os.path.basename(p): os.path.getsize(p)
          for p in glob.glob(os.path.join(directory, "c*")) if os.path.isfile(p)}


@pytest.fixture
def small_disk(tmp_path):
  """mount(size) -> a tmpfs directory of that size, unmounted after the test."""
  path = tmp_path / "disk"

  def mount(size):
    path.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if out.returncode:
      pytest.skip(f"cannot mount a tmpfs to fill (mount says: {out.stderr.strip()})")
    return str(path)

  yield mount
  if os.path.ismount(path):
    subprocess.run(["umount", str(path)], check=True)


def fill(directory):
  """Writes a file until the disk is full."""
  with open(os.path.join(directory, "filler"), "wb", buffering=0) as f:
    try:
      while True:
        f.write(b"\0" * 4096)
    except OSError:
      pass


# --------------------------------------------------------------------------- reading

def test_resume_skips_damaged_newer_checkpoints_and_keeps_their_files(trained, tmp_path):
  model_dir = copy_of(trained, tmp_path)
  truncate(os.path.join(model_dir, "ckpt-6" + DATA))  # e.g. a partial copy
  os.remove(os.path.join(model_dir, "ckpt-4.index"))
  out = run(*ARGS, "--train_steps=6", f"--model_dir={model_dir}")
  warnings = [line for line in out.stderr.splitlines() if line.startswith("Warning: ")]
  assert len(warnings) == 2, out.stderr[-4000:]
  assert (f"checkpoint {model_dir}/ckpt-6 is damaged: {model_dir}/ckpt-6{DATA} is shorter "
          "than its index records") in warnings[0]
  assert f"checkpoint {model_dir}/ckpt-4 is damaged: {model_dir}/ckpt-4.index is missing" \
      in warnings[1]
  assert f"Resumed from {model_dir}/ckpt-2 at step 2" in out.stdout
  # The damaged files are kept, renamed so that the new checkpoints 4 and 6 do not overwrite.
  (kept_6,) = glob.glob(os.path.join(model_dir, f"ckpt-6{DATA}.damaged-*"))
  assert os.path.getsize(kept_6) == os.path.getsize(os.path.join(trained, "ckpt-6" + DATA)) - 1000
  assert glob.glob(os.path.join(model_dir, f"ckpt-4{DATA}.damaged-*"))
  state = tf.train.get_checkpoint_state(model_dir)
  assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == \
      ["ckpt-2", "ckpt-4", "ckpt-6"]
  # Resumed from step 2, the run ends exactly where the undamaged one did.
  expected, resumed = variables(trained), variables(model_dir)
  assert expected.keys() == resumed.keys()
  for key in expected:
    np.testing.assert_array_equal(expected[key], resumed[key], err_msg=key)


def test_no_usable_checkpoint_is_one_line_and_changes_nothing(trained, tmp_path):
  model_dir = copy_of(trained, tmp_path)
  truncate(os.path.join(model_dir, "ckpt-6" + DATA))
  os.remove(os.path.join(model_dir, "ckpt-4.index"))
  flip_byte(os.path.join(model_dir, "ckpt-2" + DATA))
  before = checkpoint_files(model_dir)
  line = error_line(run(*ARGS, "--train_steps=8", f"--model_dir={model_dir}", check=False))
  assert line.startswith(f"run.py: no usable checkpoint in {model_dir}: ")
  assert f"{model_dir}/ckpt-6{DATA} is shorter than its index records" in line
  assert f"{model_dir}/ckpt-4.index is missing" in line
  assert f"{model_dir}/ckpt-2{DATA} does not read back" in line and "Checksum" in line
  assert checkpoint_files(model_dir) == before and len(before) == 6


@pytest.fixture(scope="module")
def damaged(trained, tmp_path_factory):
  """A copy of `trained` whose latest data file is truncated and whose oldest index is gone."""
  model_dir = str(tmp_path_factory.mktemp("damaged") / "run")
  shutil.copytree(trained, model_dir)
  truncate(os.path.join(model_dir, "ckpt-6" + DATA))
  os.remove(os.path.join(model_dir, "ckpt-2.index"))
  return model_dir


def _python(*args):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)


# Each reader of a checkpoint, given a damaged one: (program, its command, the damaged file).
READERS = {
    "checkpoint": ("run.py", lambda d, tmp: run(
        *ARGS, "--train_steps=2", f"--checkpoint={d}", f"--model_dir={tmp}", check=False),
        "ckpt-6" + DATA),
    "teacher_checkpoint": ("run.py", lambda d, tmp: run(
        "--train_mode=distill", "--train_steps=2", f"--teacher_checkpoint={d}/ckpt-2",
        f"--model_dir={tmp}", check=False), "ckpt-2.index"),
    "eval": ("run.py", lambda d, tmp: run(
        *ARGS, "--mode=eval", "--train_steps=6", f"--model_dir={d}", check=False),
        "ckpt-2.index"),
    "export": ("export.py", lambda d, tmp: _python(
        "-m", "tf_simclr.export", f"--model_dir={d}", f"--output={tmp}/saved_model"),
        "ckpt-6" + DATA),
    "convert": ("convert.py", lambda d, tmp: _python(
        "-m", "tf_simclr.convert", f"--source={d}/ckpt-6", f"--output={tmp}/converted",
        "--resnet_depth=10", "--width_multiplier=0.125", "--image_size=16",
        "--proj_out_dim=16"), "ckpt-6" + DATA),
}


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_names_the_damaged_file_in_one_line(damaged, tmp_path, reader):
  program, command, damaged_file = READERS[reader]
  line = error_line(command(damaged, tmp_path), program)
  prefix = os.path.join(damaged, damaged_file.split(".")[0])
  assert line.startswith(f"{program}: checkpoint {prefix} is damaged: "
                         f"{damaged}/{damaged_file} is "), line


def test_verify_checkpoint_reads_every_tensor(trained, tmp_path):
  model_dir = copy_of(trained, tmp_path)
  prefix = os.path.join(model_dir, "ckpt-4")
  checkpoints.verify_checkpoint(prefix)
  # One flipped bit in the middle of the data file: only reading every tensor finds it.
  flip_byte(prefix + DATA, os.path.getsize(prefix + DATA) // 2)
  with pytest.raises(checkpoints.DamagedCheckpointError, match="Checksum does not match"):
    checkpoints.verify_checkpoint(prefix)
  with open(prefix + ".index", "wb") as f:
    f.write(b"not an index")
  with pytest.raises(checkpoints.DamagedCheckpointError, match=r"ckpt-4\.index cannot be read"):
    checkpoints.resolve_weights(prefix)


# --------------------------------------------------------------------------- writing

def test_full_disk_at_the_first_checkpoint_is_one_line_and_leaves_nothing(small_disk):
  model_dir = os.path.join(small_disk("400k"), "run")
  out = run(*ARGS, "--train_steps=4", f"--model_dir={model_dir}", check=False)
  line = error_line(out)
  assert line == (f"run.py: could not write checkpoint {model_dir}/ckpt-2: "
                  "No space left on device")
  assert sorted(os.listdir(model_dir)) == ["flags.json", "tf_simclr_config.json", "train"]


def test_full_disk_keeps_the_previous_checkpoint(small_disk):
  model_dir = small_disk("64k")
  weights = tf.Variable(tf.zeros([8192]))  # 32 KiB: a second checkpoint does not fit
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(w=weights), model_dir, 5,
                                       checkpoint_name=checkpoints.CHECKPOINT_PREFIX)
  first = checkpoints.save_checkpoint(manager, 1)
  with pytest.raises(checkpoints.StorageError,
                     match=f"could not write checkpoint {model_dir}/ckpt-2: No space left"):
    checkpoints.save_checkpoint(manager, 2)
  assert sorted(os.listdir(model_dir)) == ["checkpoint", "ckpt-1" + DATA, "ckpt-1.index"]
  assert tf.train.latest_checkpoint(model_dir) == first
  checkpoints.verify_checkpoint(first)


@pytest.mark.parametrize("fault, reason", [("full", "No space left on device"),
                                           ("read-only", "Read-only file system")])
def test_result_json_on_a_full_or_read_only_disk(small_disk, fault, reason):
  model_dir = small_disk("64k")
  path = os.path.join(model_dir, "result.json")
  files.write_json_atomic(path, {"global_step": 1})
  if fault == "full":
    fill(model_dir)
  else:
    subprocess.run(["mount", "-o", "remount,ro", model_dir], check=True)
  with pytest.raises(checkpoints.StorageError, match=f"could not write {path}: {reason}"):
    files.write_json_atomic(path, {"global_step": 2, "padding": "x" * 8192})
  assert [name for name in os.listdir(model_dir) if name != "filler"] == ["result.json"]
  with open(path) as f:
    assert f.read() == '{\n  "global_step": 1\n}'


def test_failed_rename_is_a_storage_error_without_temporary_file(tmp_path, monkeypatch):
  """The same without a tmpfs: the write is made to fail at the rename."""
  path = str(tmp_path / "flags.json")

  def rename(*args, **kwargs):
    raise tf.errors.ResourceExhaustedError(None, None, f"{path}; No space left on device")

  monkeypatch.setattr(tf.io.gfile, "rename", rename)
  with pytest.raises(checkpoints.StorageError,
                     match=f"could not write {path}: No space left on device"):
    files.write_json_atomic(path, {"a": 1})
  assert os.listdir(tmp_path) == []


def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path):
  out = run(*ARGS, "--train_steps=4", "--learning_rate=1e30", f"--model_dir={tmp_path}",
            check=False)
  assert out.returncode == 2
  line = error_line(out)
  assert "loss became non-finite at step" in line
  assert f"no checkpoint written yet in {tmp_path}" in line and "None" not in line
