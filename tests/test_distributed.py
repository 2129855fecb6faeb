"""Distribution: run.py on 1 vs 4 logical CPU replicas and on 2 loopback workers gives the
same training step (loss, weights, BN moving statistics, optimizer slots) as one device;
after several steps, 4 replicas stay as close to one device as one device with other conv
kernels (oneDNN switched) does.

The 4-replica pretraining run recomputes block groups 1-2 in its backward pass.
Every multi-replica run is its own run.py process (logical devices must be configured before
any TF op, and only one MirroredStrategy can live in a process). Runs go two at a time
(2 CPU cores). The model is the tiny one of tests/test_train.py, with global BN.
"""

import glob
import json
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import launch_workers  # noqa: E402  pylint: disable=wrong-import-position

TINY = ["--dataset=fashion_mnist", "--train_split=train[:2048]", "--eval_split=test[:256]",
        "--image_size=16", "--resnet_depth=10", "--width_multiplier=0.125",
        "--proj_out_dim=16", "--global_bn=true", "--cache_dataset=true",
        "--train_batch_size=64", "--eval_batch_size=128", "--seed=1", "--deterministic",
        "--steps_per_loop=1", "--checkpoint_steps=1", "--train_summary_steps=1",
        "--warmup_epochs=0"]
# Every pretraining run here has SimCLRv2's memory: 96 negatives, 1.5 global batches of both
# views (the buffer wraps), so each comparison of pretraining also covers the buffer.
PRETRAIN = ["--train_mode=pretrain", "--train_steps=3", "--learning_rate=0.5",
            "--memory_size=96", "--memory_momentum=0.9"]
FINETUNE = ["--train_mode=finetune", "--train_steps=1", "--optimizer=momentum",
            "--learning_rate=0.1", "--ft_proj_selector=1"]
DISTILL = ["--train_mode=distill", "--train_steps=1", "--optimizer=lars",
           "--learning_rate=0.1", "--ft_proj_selector=1"]
# oneDNN's kernels on, as run.py has them on x86 (tf_simclr/__init__.py), whatever the
# environment says; other_kernels_env switches them off.
ENV = dict(os.environ, PYTHONPATH=ROOT, TF_ENABLE_ONEDNN_OPTS="1")
# ~10 s of export per run: only the runs whose export a test reads make one.
NO_EXPORT = "--keep_hub_module_max=0"


def other_kernels_env():
  """ENV with oneDNN's kernels off (TensorFlow's own Eigen kernels): the same model and data,
  other rounding."""
  return dict(ENV, TF_ENABLE_ONEDNN_OPTS="0")

# One step: measured max relative difference 2e-4 (an fp32 gradient of this model is only
# accurate to ~1e-4..1e-2 per variable, whatever the replica count: see docs/DISTRIBUTED.md).
STEP_RTOL = 1e-3
LOSS_RTOL = 1e-5


def start(*args, env=ENV):
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), *TINY, *args],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def finish(proc):
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-2000:] + err[-4000:]
  return out


def losses(stdout):
  """{step: loss} from run.py's progress lines."""
  return {int(m.group(1)): float(m.group(2))
          for m in re.finditer(r"step (\d+)/\d+ \|.*? loss=([-\d.]+)", stdout)}


def variables(prefix):
  reader = tf.train.load_checkpoint(prefix)
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if k.endswith("VARIABLE_VALUE")}


def max_relative_difference(prefix_a, prefix_b):
  """max over variables of max|a - b| / max|a| (0 for all-zero variables), and its key."""
  a, b = variables(prefix_a), variables(prefix_b)
  assert a.keys() == b.keys()
  assert len(a) > 50
  worst, worst_key = 0.0, None
  for key in a:
    x, y = np.asarray(a[key], np.float64), np.asarray(b[key], np.float64)
    assert x.shape == y.shape, key
    scale = np.abs(x).max() if x.size else 0.0
    diff = np.abs(x - y).max() if x.size else 0.0
    rel = diff / scale if scale > 0 else diff
    if rel > worst:
      worst, worst_key = rel, key
  return worst, worst_key


def global_relative_difference(prefix_a, prefix_b):
  """||a - b|| / ||a|| over all variables at once."""
  a, b = variables(prefix_a), variables(prefix_b)
  diff = sum(np.sum(np.square(np.float64(a[k]) - np.float64(b[k]))) for k in a)
  return float(np.sqrt(diff / sum(np.sum(np.square(np.float64(a[k]))) for k in a)))


def assert_same_step(dir_a, dir_b, out_a, out_b, step=1, rtol=STEP_RTOL):
  rel, key = max_relative_difference(os.path.join(dir_a, f"ckpt-{step}"),
                                     os.path.join(dir_b, f"ckpt-{step}"))
  print(f"ckpt-{step}: max relative difference {rel:.2e} ({key})")
  assert rel < rtol, (rel, key)
  la, lb = losses(out_a), losses(out_b)
  assert step in la and step in lb, (out_a[-1000:], out_b[-1000:])
  # Losses are printed with 4 decimals.
  assert la[step] == pytest.approx(lb[step], rel=LOSS_RTOL, abs=2e-4)


def replicas_of(stdout):
  return int(re.search(r"batch \d+, (\d+) replica\(s\)", stdout).group(1))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Every run of this module, started as early as its inputs allow (the runs spend much
  of their time in single-threaded tracing, so several at once use the 2 cores better)."""
  d = {k: str(tmp_path_factory.mktemp(k)) for k in
       ("pretrain1", "pretrain4", "pretrain1_kernels", "mw", "ft1", "ft4", "d1", "d4",
        "d1_kernels")}
  log = os.path.join(d["mw"] + "_workers.log")
  results = {}

  def workers():
    with open(log, "w") as f:
      results["mw_code"] = launch_workers.launch(
          2, [*TINY, *PRETRAIN, "--strategy=multi_worker", "--mode=train_then_eval",
              f"--model_dir={d['mw']}"], env=ENV, timeout=500, out=f)

  thread = threading.Thread(target=workers)
  p1 = start(*PRETRAIN, f"--model_dir={d['pretrain1']}")
  # The 4-replica run also recomputes its first block groups in the backward pass (all-reduces
  # of synchronized BN inside gradients), which must not change the step either.
  p4 = start(*PRETRAIN, "--num_cpu_replicas=4", "--recompute_block_groups=2", NO_EXPORT,
             f"--model_dir={d['pretrain4']}")
  thread.start()
  out = {"pretrain1": finish(p1)}
  teacher = d["pretrain1"]
  # Fine-tuning starts from fresh weights: after a few steps of training the fp32 gradient
  # of this model is much less accurate (see the xfail below), whatever the replica count.
  ft = [*FINETUNE, NO_EXPORT]
  distill = [*DISTILL, NO_EXPORT, f"--teacher_checkpoint={teacher}"]
  procs = {"pretrain1_kernels": start(*PRETRAIN, NO_EXPORT,
                                      f"--model_dir={d['pretrain1_kernels']}",
                                      env=other_kernels_env()),
           "ft1": start(*ft, f"--model_dir={d['ft1']}"),
           "ft4": start(*ft, "--num_cpu_replicas=4", f"--model_dir={d['ft4']}"),
           "d1": start(*distill, f"--model_dir={d['d1']}"),
           "d4": start(*distill, "--num_cpu_replicas=4", f"--model_dir={d['d4']}"),
           "d1_kernels": start(*distill, f"--model_dir={d['d1_kernels']}",
                               env=other_kernels_env())}
  out["pretrain4"] = finish(p4)
  thread.join()
  with open(log) as f:
    out["mw"] = f.read()
  if results["mw_code"] == 0:
    # What the workers wrote, before a single-process eval of their checkpoint adds to it.
    results["mw_events"] = {sub: len(glob.glob(os.path.join(d["mw"], sub, "events.out.*")))
                            for sub in ("train", "eval")}
    with open(os.path.join(d["mw"], "result.json")) as f:
      results["mw_result"] = json.load(f)
    os.remove(os.path.join(d["mw"], "result.json"))
    procs["mw_eval"] = start(*PRETRAIN, "--mode=eval", "--strategy=one_device",
                             f"--model_dir={d['mw']}")
  for name, proc in procs.items():
    out[name] = finish(proc)
  return d, out, results


def test_memory_pretraining_1_vs_4_replicas(runs):
  """The buffer takes the all-gathered global batch: after step 1 the buffer, its position
  and the memory network are in the checkpoint and agree as the model does
  (test_pretrain_step_1_vs_4_replicas compares every variable), and step 2's loss, whose
  denominators run over that buffer, agrees too."""
  d, out, _ = runs
  names = variables(os.path.join(d["pretrain4"], "ckpt-1"))
  assert any("memory/memory_buffer" in k for k in names)
  assert any("memory/memory_position" in k for k in names)
  assert any(k.startswith("memory_network/") for k in names)
  l1, l4 = losses(out["pretrain1"]), losses(out["pretrain4"])
  assert l1[2] == pytest.approx(l4[2], rel=1e-3)
  # The export is the model alone: neither the buffer nor the memory network.
  (export,) = glob.glob(os.path.join(d["pretrain1"], "saved_model", "*"))
  exported = variables(os.path.join(export, "variables", "variables"))
  assert len(exported) > 50 and not any("memory" in k for k in exported)


def test_pretrain_step_1_vs_4_replicas(runs):
  d, out, _ = runs
  assert replicas_of(out["pretrain1"]) == 1 and replicas_of(out["pretrain4"]) == 4
  assert_same_step(d["pretrain1"], d["pretrain4"], out["pretrain1"], out["pretrain4"], step=1)


@pytest.mark.xfail(reason="one step agrees to 3e-4, but this training amplifies fp32 rounding: "
                          "after 3 steps single variables differ by up to ~30% between 1 and 4 "
                          "replicas, and by up to ~98% between two one-device runs that differ "
                          "only in their conv kernels (next test; docs/DISTRIBUTED.md)",
                   strict=False)
def test_pretrain_several_steps_1_vs_4_replicas(runs):
  d, out, _ = runs
  assert_same_step(d["pretrain1"], d["pretrain4"], out["pretrain1"], out["pretrain4"], step=3)


def test_pretrain_several_steps_1_vs_4_replicas_within_fp32_rounding(runs):
  # What several steps of fp32 training can promise: 4 replicas are no further from one
  # device than one device is from itself when only its conv kernels change (oneDNN switched),
  # measured as one norm over all variables. Measured: 2.0e-3 vs 1.4e-3 after step 2,
  # 8.7e-3 vs 8.1e-3 after step 3 (default warmup, trainable variables: 1.9e-7 vs 1.3e-6 after
  # 3 steps, 7.6e-7 vs 1.1e-5 after 6).
  d, _, _ = runs
  for step in (2, 3):
    one, four, kernels = (os.path.join(d[k], f"ckpt-{step}")
                          for k in ("pretrain1", "pretrain4", "pretrain1_kernels"))
    replicas = global_relative_difference(one, four)
    rounding = global_relative_difference(one, kernels)
    print(f"ckpt-{step}: 1 vs 4 replicas {replicas:.2e}, 1 device other kernels {rounding:.2e}")
    assert 0 < rounding < 0.05
    assert replicas <= 3 * rounding, (step, replicas, rounding)


def test_finetune_step_1_vs_4_replicas(runs):
  d, out, _ = runs
  assert replicas_of(out["ft4"]) == 4
  assert_same_step(d["ft1"], d["ft4"], out["ft1"], out["ft4"])


def test_distill_step_1_vs_4_replicas(runs):
  d, out, _ = runs
  assert "Teacher: ResNet-10" in out["d4"] and replicas_of(out["d4"]) == 4
  # One LARS update here is ill-conditioned (a near-zero gradient times the trust ratio): one
  # device differs from itself by as much when only its conv kernels change (oneDNN switched;
  # measured 2026-12-02 with bicubic crops: 7.8e-2 in one variable, both ways, 6.7e-5 with
  # bilinear ones). The bound is the larger of STEP_RTOL and twice that envelope.
  envelope, key = max_relative_difference(os.path.join(d["d1"], "ckpt-1"),
                                          os.path.join(d["d1_kernels"], "ckpt-1"))
  print(f"1 device, other kernels: {envelope:.2e} ({key})")
  assert envelope < 0.5
  assert_same_step(d["d1"], d["d4"], out["d1"], out["d4"], rtol=max(STEP_RTOL, 2 * envelope))


def test_two_loopback_workers_match_one_process(runs):
  d, out, results = runs
  text = out["mw"]
  assert results["mw_code"] == 0, text[-5000:]
  per_worker = ["\n".join(l[len(f"[worker {i}] "):] for l in text.splitlines()
                          if l.startswith(f"[worker {i}] ")) for i in range(2)]
  for lines in per_worker:
    assert replicas_of(lines) == 2
  # Metrics are global: both workers log the same losses.
  assert losses(per_worker[0]) == losses(per_worker[1])
  # The step equals one device's.
  assert_same_step(d["pretrain1"], d["mw"], out["pretrain1"], per_worker[0], step=1)


def test_only_the_chief_writes_and_one_device_restores(runs):
  d, out, results = runs
  assert results["mw_code"] == 0
  # One events file per summary directory: only one process wrote; no scratch left over.
  assert results["mw_events"] == {"train": 1, "eval": 1}
  assert not glob.glob(os.path.join(d["mw"], ".worker_tmp*"))
  assert tf.train.latest_checkpoint(d["mw"]).endswith("ckpt-3")
  multi = results["mw_result"]
  assert multi["global_step"] == 3
  # The workers' checkpoints restore in one process on one device, and evaluating the last
  # one there gives the accuracy the workers computed.
  assert "eval at step 1" in out["mw_eval"] and "eval at step 3" in out["mw_eval"]
  with open(os.path.join(d["mw"], "result.json")) as f:
    single = json.load(f)
  assert single["global_step"] == 3
  assert single["eval/num_examples"] == multi["eval/num_examples"] == 256
  assert single["eval/label_top_1_accuracy"] == pytest.approx(
      multi["eval/label_top_1_accuracy"], abs=1 / 256 + 1e-9)


ERRORS = [
    (["--num_cpu_replicas=4", "--train_batch_size=66"],
     "--train_batch_size=66 is not divisible by the 4 replicas"),
    (["--num_cpu_replicas=4", "--strategy=one_device"],
     "--num_cpu_replicas=4 needs --strategy=mirrored"),
    (["--strategy=multi_worker"], "--strategy=multi_worker needs TF_CONFIG"),
]


def test_distribution_flag_errors_are_one_line(tmp_path):
  env = {k: v for k, v in ENV.items() if k != "TF_CONFIG"}
  procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), *TINY,
                             "--train_steps=1", f"--model_dir={tmp_path / str(i)}", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i, (args, _) in enumerate(ERRORS)]
  for proc, (args, message) in zip(procs, ERRORS):
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, args
    assert message in err, err[-3000:]
    assert "Traceback" not in err


def test_tf_config_selects_multi_worker_and_chief(monkeypatch):
  from tf_simclr import strategy as strategy_lib
  monkeypatch.setenv("TF_CONFIG", json.dumps(
      {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
       "task": {"type": "worker", "index": 1}}))
  assert strategy_lib._tf_config_workers() == 2
  monkeypatch.setenv("TF_CONFIG", "{not json")
  with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
    strategy_lib.tf_config()
  monkeypatch.delenv("TF_CONFIG")
  assert strategy_lib._tf_config_workers() == 0
  assert strategy_lib.is_chief(tf.distribute.get_strategy())
