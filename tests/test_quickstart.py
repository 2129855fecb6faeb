"""The quickstart driver: its plan of run.py stages and the results it writes."""

import os
import subprocess
import sys

import pytest

from tf_simclr import quickstart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("recipe", ["fashion_mnist", "fashion_mnist_full"])
def test_plan_runs_every_stage_from_existing_flagfiles(recipe):
  plan = quickstart.stages("/out", ["0.01", "0.1"], recipe)
  names = [name for name, _, _, _ in plan]
  assert names[0] == "pretrain"
  expected = {"linear_eval_pretrained", "linear_eval_random", "finetune_1pct", "finetune_10pct",
              "distill_1pct", "distill_10pct", "supervised_1pct", "supervised_10pct"}
  assert set(names[1:]) == expected
  for name, model_dir, flagfile, extra in plan:
    assert os.path.exists(os.path.join(ROOT, "flags", flagfile)), flagfile
    assert model_dir == f"/out/{name}"
  by_name = {name: extra for name, _, _, extra in plan}
  # Teachers come from the fine-tuned runs, which start from the pretrained one.
  assert "--teacher_checkpoint=/out/finetune_1pct" in by_name["distill_1pct"]
  assert "--checkpoint=/out/pretrain" in by_name["finetune_10pct"]
  # The baseline sees the same labels for the same epochs, without the pretrained weights.
  for p in ("1pct", "10pct"):
    shared = [f for f in by_name[f"finetune_{p}"] if f.startswith(("--train_label", "--train_ep"))]
    assert len(shared) == 2 and all(f in by_name[f"supervised_{p}"] for f in shared)
    assert not any(f.startswith("--checkpoint") for f in by_name[f"supervised_{p}"])
  assert names.index("finetune_1pct") < names.index("distill_1pct")


def test_results_table_and_chart(tmp_path):
  results = {f"{m}_{p}": v for m, base in (("supervised", 0.6), ("finetune", 0.7),
                                             ("distill", 0.72))
             for p, v in (("1pct", base), ("10pct", base + 0.1))}
  results.update(linear_eval_pretrained=0.8, linear_eval_random=0.3)
  table = quickstart.results_table(results, ["0.01", "0.1"])
  assert "| SimCLRv2 fine-tuned | 70.00 | 80.00 |" in table
  assert "| random trunk | 30.00 |" in table
  quickstart.plot(results, ["0.01", "0.1"], str(tmp_path / "results.png"))
  with open(tmp_path / "results.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_failing_stage_is_named_with_its_cause_and_no_traceback(tmp_path):
  out = subprocess.run([sys.executable, "-m", "tf_simclr.quickstart", f"--out={tmp_path}",
                        "--extra_flags=--train_batch_size=0"], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=ROOT))
  assert out.returncode == 1
  assert "Traceback" not in out.stderr
  summary = out.stderr[out.stderr.index("quickstart: "):].splitlines()
  assert summary[0] == ("quickstart: stage pretrain failed (exit 1): run.py: --train_batch_size "
                        "must be > 0, got 0 (run.py --helpshort lists the flags)")
  assert f"model_dir is {tmp_path}/pretrain" in summary[1] and "run the same command" in summary[1]
