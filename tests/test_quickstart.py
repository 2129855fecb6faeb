"""The quickstart driver: its plan of run.py stages, the label regimes of its flagfiles,
running and resuming stages, and the results it writes."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tf_simclr import quickstart
from tf_simclr.config import DataConfig
from tf_simclr.data import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"linear_eval_pretrained", "linear_eval_random", "finetune_low", "finetune_high",
        "distill_low", "distill_high", "supervised_low", "supervised_high"}
FULL_KEYS = {"big_finetune_low", "distill_big_to_small_low", "finetune_from_trunk_low"}


def flagfile_flags(name, seen=()):
  """Every flag a flagfile sets, nested flagfiles expanded (later settings win)."""
  values = {}
  with open(os.path.join(ROOT, "flags", name)) as f:
    for line in f:
      line = line.strip()
      if line.startswith("--flagfile=flags/"):
        values.update(flagfile_flags(line[len("--flagfile=flags/"):]))
      elif line.startswith("--"):
        key, _, value = line[2:].partition("=")
        values[key] = value
  return values


@pytest.mark.parametrize("recipe", quickstart.RECIPES)
def test_plan_runs_every_claim_from_existing_flagfiles(recipe):
  plan = quickstart.stages(recipe, seeds=3)
  keys = {s.key for s in plan}
  expected = KEYS | {"pretrain"}
  if recipe == "fashion_mnist_full":
    expected |= FULL_KEYS | {"big_pretrain"}
  assert keys == expected
  names = [s.name for s in plan]
  assert len(set(names)) == len(names)
  for i, stage in enumerate(plan):
    # A stage's inputs come before it, and are the model_dirs its flags name.
    assert all(names.index(a) < i for a in stage.after)
    cmd = " ".join(quickstart.command(stage, "/out"))
    assert all(f"/out/{a}" in cmd for a in stage.after)
    for f in stage.flagfiles:
      flagfile_flags(f)  # exists, and so do the files it nests
    if stage.seed is not None:
      assert stage.name == f"{stage.key}_s{stage.seed}" and f"--seed={stage.seed}" in cmd
  by_name = {s.name: s for s in plan}
  for seed in range(3):
    distill = quickstart.command(by_name[f"distill_low_s{seed}"], "/out")
    assert f"--teacher_checkpoint=/out/finetune_low_s{seed}" in distill
    assert "--checkpoint=/out/pretrain" in distill
    # The baseline starts from random weights with its own recipe.
    supervised = quickstart.command(by_name[f"supervised_high_s{seed}"], "/out")
    assert not any(f.startswith("--checkpoint") for f in supervised)
  assert "--update_frozen_bn=true" in quickstart.command(by_name["linear_eval_random"], "/out")
  # Tuning runs evaluate on the held-out validation images, never on test.
  cmd = quickstart.command(by_name["finetune_low_s0"], "/out", eval_on="validation")
  assert cmd[-1] == "--eval_split=train[55000:]"


def test_flagfiles_hold_out_the_validation_split_and_share_one_model():
  base = flagfile_flags("fashion_mnist_base.cfg")
  assert base["train_split"] == "train[:55000]" and base["eval_split"] == "test"
  for name in os.listdir(os.path.join(ROOT, "flags")):
    if name.startswith("fashion_mnist_") and name not in ("fashion_mnist_big.cfg",
                                                          "fashion_mnist_low.cfg",
                                                          "fashion_mnist_high.cfg"):
      values = flagfile_flags(name)
      for key in ("train_split", "resnet_depth", "width_multiplier", "image_size"):
        assert values[key] == base[key], (name, key)


def test_label_regimes_have_the_papers_labels_per_class():
  """ImageNet's 1% and 10% subsets have ~12.8 and ~128 labels per class."""
  labels = datasets.load_train(DataConfig(dataset="fashion_mnist", train_split="train[:55000]",
                                          image_size=28), "all").labels
  for regime, per_class in (("low", 13), ("high", 128)):
    count = int(flagfile_flags(f"fashion_mnist_{regime}.cfg")["train_labels_per_class"])
    chosen = datasets.labelled_indices(labels, 1.0, seed=0, per_class=count)
    np.testing.assert_array_equal(np.bincount(labels[chosen]), [per_class] * 10)


def fake_results(plan, value=0.8):
  """Stage results as run_all returns them: distinct values per stage and seed."""
  out = {}
  for i, s in enumerate(plan):
    out[s.name] = {"eval/label_top_1_accuracy": value + 0.001 * i}
  return out


def test_summary_table_and_chart(tmp_path):
  plan = quickstart.stages("fashion_mnist_full", seeds=3)
  results_by_stage = fake_results(plan)
  for regime, count in (("low", 13), ("high", 128)):
    os.makedirs(tmp_path / f"finetune_{regime}_s0")
    with open(tmp_path / f"finetune_{regime}_s0" / "flags.json", "w") as f:
      json.dump({"train_labels_per_class": count}, f)
  results = quickstart.summarise(plan, results_by_stage, str(tmp_path))
  seeds = [results_by_stage[f"finetune_low_s{s}"]["eval/label_top_1_accuracy"] for s in range(3)]
  assert results["finetune_low"] == pytest.approx(np.mean(seeds))
  assert results["std"]["finetune_low"] == pytest.approx(np.std(seeds, ddof=1))
  assert results["label_fraction_low"] == pytest.approx(130 / 55000)
  assert set(results) >= KEYS | FULL_KEYS and all(0 <= results[k] <= 1 for k in KEYS)
  table = quickstart.results_table(results)
  assert "| 13 labels/class | 128 labels/class |" in table
  cell = f"{results['finetune_low'] * 100:.2f} ± {results['std']['finetune_low'] * 100:.2f}"
  assert f"| SimCLRv2 fine-tuned | {cell} |" in table
  # Each claim is judged from the numbers: later stages have higher fake values here.
  verdicts = {claim: holds for claim, holds, _ in quickstart.claims(results)}
  gain = results["finetune_low"] - results["supervised_low"]
  assert verdicts[next(c for c in verdicts if c.startswith("(a) fine-tuning"))] == (gain >= 0.03)
  quickstart.plot(results, str(tmp_path / "results.png"))
  with open(tmp_path / "results.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


TINY = ("--train_steps=2", "--image_size=16", "--width_multiplier=0.125", "--proj_out_dim=16",
        "--train_split=train[:1024]", "--eval_split=test[:256]", "--keep_hub_module_max=0")


def test_stages_run_in_order_resume_and_skip_what_is_done(tmp_path):
  """Two real stages (pretrain, then linear eval from it); the second run skips both."""
  plan = [s for s in quickstart.stages("fashion_mnist", seeds=1)
          if s.key in ("pretrain", "linear_eval_pretrained")]
  out = str(tmp_path)
  first = quickstart.run_all(plan, out, jobs=2, eval_on="test", extra_flags=TINY)
  assert set(first) == {"pretrain", "linear_eval_pretrained"}
  with open(tmp_path / "linear_eval_pretrained" / "log.txt") as f:
    assert f"Initialised resnet, projection_head from {out}/pretrain" in f.read()
  mtime = os.path.getmtime(tmp_path / "pretrain" / "log.txt")
  again = quickstart.run_all(plan, out, jobs=2, eval_on="test", extra_flags=TINY)
  assert again == first
  assert os.path.getmtime(tmp_path / "pretrain" / "log.txt") == mtime  # not run again


def test_failing_stage_is_named_with_its_cause_and_no_traceback(tmp_path):
  out = subprocess.run([sys.executable, "-m", "tf_simclr.quickstart", f"--out={tmp_path}",
                        "--extra_flags=--train_batch_size=0"], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=ROOT))
  assert out.returncode == 1
  assert "Traceback" not in out.stderr + out.stdout
  summary = out.stderr[out.stderr.index("quickstart: "):].splitlines()
  assert summary[0] == ("quickstart: stage pretrain failed (exit 1): run.py: --train_batch_size "
                        "must be > 0, got 0 (run.py --helpshort lists the flags)")
  assert f"Its log is {tmp_path}/pretrain/log.txt" in summary[1]
  assert "run the same command again" in summary[1]
  assert re.search(r"--train_batch_size must be > 0", out.stdout)  # the live log


def test_tune_grid_is_every_combination():
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  import tune  # pylint: disable=import-outside-toplevel
  combos = list(tune.combinations("learning_rate=0.1,0.4;train_epochs=60,200,600"))
  assert len(combos) == 6 and len({tuple(c) for c in combos}) == 6
  assert combos[0] == [("learning_rate", "0.1"), ("train_epochs", "60")]
  assert list(tune.combinations("")) == [[]]
