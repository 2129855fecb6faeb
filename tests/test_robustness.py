"""Nothing lost: signals, kill -9, non-finite losses and bad input, on real run.py processes."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.test_train import ROOT, TINY, run

CHEAP = ["--train_mode=finetune", "--optimizer=momentum", "--learning_rate=0.05",
         "--warmup_epochs=0", "--deterministic"]


def start(*args):
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), *TINY, *args],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT))


def wait_for(predicate, proc, timeout=240):
  deadline = time.time() + timeout
  while not predicate():
    assert proc.poll() is None, proc.communicate()
    assert time.time() < deadline, "timed out"
    time.sleep(0.2)


def variables(model_dir):
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(model_dir))
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if k.endswith("VARIABLE_VALUE") and "save_counter" not in k}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, sig):
  model_dir = str(tmp_path)
  proc = start(*CHEAP, "--train_steps=2000", "--checkpoint_steps=1000", "--steps_per_loop=1",
               f"--model_dir={model_dir}")
  wait_for(lambda: os.path.exists(os.path.join(model_dir, "train")), proc)
  time.sleep(3)  # let it run a few steps past the start
  proc.send_signal(sig)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 3, stderr[-3000:]
  assert "Run the same command again to resume" in stderr
  step = int(tf.train.latest_checkpoint(model_dir).rsplit("-", 1)[1])
  assert 0 < step < 1000  # saved at the interruption, not at a scheduled checkpoint
  assert f"step {step}/2000" in stdout


def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path):
  """Pretraining with SimCLRv2's memory holds the most state: model, optimizer, step, the
  data stream's position, the buffer, its write position and the memory network. (Resuming
  fine-tuning from a checkpoint: tests/test_storage.py.)"""
  objective = ["--train_mode=pretrain", "--memory_size=100", "--memory_momentum=0.9",
               "--deterministic"]
  args = [*objective, "--train_steps=8", "--checkpoint_steps=2", "--steps_per_loop=1"]
  reference = str(tmp_path / "uninterrupted")
  run(*args, f"--model_dir={reference}")

  model_dir = str(tmp_path / "killed")
  proc = start(*args, f"--model_dir={model_dir}")
  wait_for(lambda: os.path.exists(os.path.join(model_dir, "ckpt-4.index")), proc)
  proc.kill()
  proc.communicate()
  latest = tf.train.latest_checkpoint(model_dir)
  assert latest is not None and int(latest.rsplit("-", 1)[1]) < 8
  out = run(*args, f"--model_dir={model_dir}")
  assert "Resumed from" in out.stdout
  expected, resumed = variables(reference), variables(model_dir)
  assert expected.keys() == resumed.keys() and len(expected) > 50
  assert any("memory/memory_buffer" in k for k in expected)
  for key in expected:
    np.testing.assert_array_equal(expected[key], resumed[key], err_msg=key)


def test_half_written_checkpoint_is_never_taken(tmp_path):
  args = [*CHEAP, "--train_steps=4", "--checkpoint_steps=2"]
  model_dir = str(tmp_path)
  run(*args, f"--model_dir={model_dir}")
  # A crash while writing ckpt-6 leaves data files but no state-file entry: ignored.
  with open(os.path.join(model_dir, "ckpt-6.data-00000-of-00001"), "wb") as f:
    f.write(b"\0" * 100)
  out = run(*args, "--train_steps=6", f"--model_dir={model_dir}")
  assert "at step 4" in out.stdout
  assert tf.train.latest_checkpoint(model_dir).endswith("ckpt-6")


def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  model_dir = str(tmp_path)
  run(*CHEAP, "--train_steps=2", "--checkpoint_steps=2", f"--model_dir={model_dir}")
  before = variables(model_dir)
  out = run(*CHEAP, "--train_steps=6", "--checkpoint_steps=2", "--learning_rate=1e30",
            f"--model_dir={model_dir}", check=False)
  assert out.returncode == 2
  assert "loss became non-finite at step" in out.stderr
  assert tf.train.latest_checkpoint(model_dir).endswith("ckpt-2")
  after = variables(model_dir)
  for key in before:
    np.testing.assert_array_equal(before[key], after[key])


def test_fewer_examples_than_one_batch_is_a_clear_error(tmp_path):
  out = run("--train_mode=finetune", "--train_label_fraction=0.01", "--train_batch_size=64",
            "--train_steps=1", f"--model_dir={tmp_path}", check=False)
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert "is larger than the" in out.stderr


def test_model_dir_that_cannot_be_written_is_a_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  out = run("--train_steps=1", f"--model_dir={blocker}/run", check=False)
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert "is not writable" in out.stderr
