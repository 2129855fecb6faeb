"""SimCLRv2's semi-supervised claims, end to end on Fashion-MNIST, in one command.

  python -m tf_simclr.quickstart --out=runs/quickstart [--recipe=fashion_mnist_full]

Runs each stage as a plain `run.py --flagfile=flags/fashion_mnist_*.cfg` call (so any stage
can be rerun by hand from its flags.json, and an interrupted quickstart resumes stage by
stage), then writes <out>/results.json, results.md and results.png. Stages:
  1. pretrain on the 55k training images (labels unused);
  2. linear eval of the pretrained trunk and of a random trunk (its BN statistics from the
     data);
  3. per label regime (13 and 128 labels per class, as ImageNet's 1% and 10%) and per seed:
     fine-tune from the projection head's middle layer, the supervised baseline with its own
     tuned recipe, and self-distillation of the fine-tuned model on all images;
  4. the longer recipe adds a bigger pretrained model fine-tuned at the low regime, a small
     student distilled from it, and fine-tuning from the trunk output (the paper's ablation).
Every hyperparameter was chosen on the validation split train[55000:] (--eval_on=validation
reruns the plan against it); the final table reads the test split.
"""

import concurrent.futures
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Optional, Tuple

from absl import app, flags

RECIPES = ("fashion_mnist", "fashion_mnist_full")
VALIDATION_SPLIT = "train[55000:]"
# The recipes train on train[:55000] (flags/fashion_mnist_base.cfg): 10 classes.
NUM_CLASSES, NUM_TRAIN = 10, 55000

FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGIMES = ("low", "high")


@dataclasses.dataclass(frozen=True)
class Stage:
  key: str                 # results.json key (e.g. "finetune_low"), seeds averaged under it
  name: str                # model_dir name under --out: the key, plus _s<seed> per seed
  flagfiles: Tuple[str, ...]
  extra: Tuple[str, ...] = ()
  after: Tuple[str, ...] = ()   # names of the stages whose model_dirs this one reads
  seed: Optional[int] = None


def stages(recipe="fashion_mnist", seeds=3):
  """Every stage of a recipe, in an order that respects `after`."""
  full = recipe == "fashion_mnist_full"
  prefix = "fashion_mnist_full" if full else "fashion_mnist"
  out = []

  def add(key, flagfiles, extra=(), after=(), seed=None):
    name = key if seed is None or seeds == 1 else f"{key}_s{seed}"
    out.append(Stage(key, name, tuple(flagfiles), tuple(extra), tuple(after), seed))
    return name

  pretrain = add("pretrain", [f"{prefix}_pretrain.cfg"])
  linear_eval = f"{prefix}_linear_eval.cfg"
  add("linear_eval_pretrained", [linear_eval], [f"--checkpoint={{{pretrain}}}"], [pretrain])
  # A random trunk's BN never saw the data: let its statistics come from it (the frozen
  # blocks' BN normalises with batch statistics and updates its moving ones).
  add("linear_eval_random", [linear_eval], ["--update_frozen_bn=true", "--keep_hub_module_max=0"])
  distill = f"{prefix}_distill.cfg"
  for seed in range(seeds):
    s = [f"--seed={seed}"]
    for regime in REGIMES:
      finetune = add(f"finetune_{regime}", [f"fashion_mnist_finetune_{regime}.cfg"],
                     [f"--checkpoint={{{pretrain}}}", *s], [pretrain], seed)
      add(f"supervised_{regime}", [f"fashion_mnist_supervised_{regime}.cfg"], s, (), seed)
      add(f"distill_{regime}", [distill, f"fashion_mnist_{regime}.cfg"],
          [f"--teacher_checkpoint={{{finetune}}}", f"--checkpoint={{{pretrain}}}", *s],
          [finetune, pretrain], seed)
  if full:
    big_pretrain = add("big_pretrain", [f"{prefix}_pretrain.cfg", "fashion_mnist_big.cfg"])
    for seed in range(seeds):
      s = [f"--seed={seed}"]
      big = add("big_finetune_low", ["fashion_mnist_finetune_low.cfg", "fashion_mnist_big.cfg"],
                [f"--checkpoint={{{big_pretrain}}}", *s], [big_pretrain], seed)
      # The paper's big-to-small distillation: the small pretrained model learns from the big
      # fine-tuned teacher (whose architecture its run directory records).
      add("distill_big_to_small_low", [distill, "fashion_mnist_low.cfg"],
          [f"--teacher_checkpoint={{{big}}}", f"--checkpoint={{{pretrain}}}", *s],
          [big, pretrain], seed)
      add("finetune_from_trunk_low", ["fashion_mnist_finetune_low.cfg"],
          [f"--checkpoint={{{pretrain}}}", "--ft_proj_selector=0", *s], [pretrain], seed)
  return out


def command(stage, out, eval_on="test", extra_flags=()):
  model_dirs = {s: os.path.join(out, s) for s in stage.after}
  cmd = [sys.executable, "run.py",
         *(f"--flagfile=flags/{f}" for f in stage.flagfiles),
         f"--model_dir={os.path.join(out, stage.name)}",
         *(flag.format(**model_dirs) for flag in stage.extra)]
  if eval_on == "validation":
    cmd.append(f"--eval_split={VALIDATION_SPLIT}")
  return cmd + list(extra_flags)


class StageFailed(RuntimeError):
  pass


_print_lock = threading.Lock()


def say(message, stream=sys.stdout):
  with _print_lock:
    print(message, file=stream, flush=True)


def run_stage(name, cmd, model_dir, live):
  """Runs one stage (skipped when it already finished with the same command); returns its
  result.json. Its output goes to <model_dir>/log.txt, and to the terminal when `live`."""
  done_marker = os.path.join(model_dir, "quickstart_done.json")
  if os.path.exists(done_marker):
    with open(done_marker) as f:
      done = json.load(f)
    if done["command"] == cmd[1:]:
      say(f"=== {name}: done earlier, top-1 {done['top_1']:.4f}")
      return done["result"]
  say(f"\n=== {name}: {' '.join(cmd[1:])}" + ("" if live else
                                                     f"\n    (log: {model_dir}/log.txt)"))
  os.makedirs(model_dir, exist_ok=True)
  start = time.time()
  last = ""
  with open(os.path.join(model_dir, "log.txt"), "a", buffering=1) as log:  # line by line
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    for line in proc.stdout:
      log.write(line)
      if live:
        sys.stdout.write(line)
      # The last line that is not a progress bar's redraw is the cause if the run fails
      # (run.py ends on a one-line message, or a traceback's last line).
      if line.strip() and "\r" not in line:
        last = line.strip()
  if proc.wait():
    raise StageFailed(f"stage {name} failed (exit {proc.returncode}): "
                      f"{last or 'no message'}\nIts log is {model_dir}/log.txt. Once the cause "
                      "is fixed, run the same command again: finished stages are skipped and "
                      "this one resumes from its last checkpoint.")
  with open(os.path.join(model_dir, "result.json")) as f:
    result = json.load(f)
  top_1 = result["eval/label_top_1_accuracy"]
  with open(done_marker, "w") as f:
    json.dump({"command": cmd[1:], "top_1": top_1, "result": result}, f, indent=2)
  say(f"=== {name}: top-1 {top_1:.4f} ({time.time() - start:.0f} s)")
  return result


def _is_pretraining(stage):
  return stage.key.endswith("pretrain")


def run_all(plan, out, jobs, eval_on, extra_flags):
  """Runs the plan, each stage once its `after` stages are done, up to `jobs` at a time
  (a stage alone runs live on the terminal). Returns {stage name: result}."""
  results, running = {}, {}
  pending = list(plan)
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
    while pending or running:
      ready = [s for s in pending if all(a in results for a in s.after)]
      # Pretraining keeps both cores busy on its own: it runs alone (and live), first.
      if any(_is_pretraining(s) for s in running.values()):
        ready = []
      elif any(_is_pretraining(s) for s in ready):
        ready = [next(s for s in ready if _is_pretraining(s))] if not running else []
      for stage in ready[:max(jobs, 1) - len(running)]:
        pending.remove(stage)
        cmd = command(stage, out, eval_on, extra_flags)
        live = jobs <= 1 or _is_pretraining(stage)
        running[pool.submit(run_stage, stage.name, cmd, os.path.join(out, stage.name),
                             live)] = stage
      if not running:
        raise RuntimeError(f"stages {[s.name for s in pending]} wait on stages not in the plan")
      finished, _ = concurrent.futures.wait(running, return_when="FIRST_COMPLETED")
      for future in finished:
        stage = running.pop(future)
        results[stage.name] = future.result()  # a StageFailed ends the run here
  return results


def summarise(plan, stage_results, out):
  """results.json: per key the mean top-1 over seeds (plus std and per-seed values)."""
  per_key = {}
  for stage in plan:
    if _is_pretraining(stage):
      continue
    per_key.setdefault(stage.key, []).append(
        stage_results[stage.name]["eval/label_top_1_accuracy"])
  results = {key: statistics.mean(v) for key, v in per_key.items()}
  results["std"] = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in per_key.items()}
  results["per_seed"] = per_key
  for regime in REGIMES:
    with open(os.path.join(out, next(s.name for s in plan if s.key == f"finetune_{regime}"),
                           "flags.json")) as f:
      per_class = json.load(f)["train_labels_per_class"]
    results[f"labels_per_class_{regime}"] = per_class
    results[f"label_fraction_{regime}"] = per_class * NUM_CLASSES / NUM_TRAIN
  return results


def claims(results):
  """The paper's claims this recipe tests, each (claim, holds?, numbers)."""
  r = results
  pct = lambda key: f"{r[key] * 100:.2f} ± {r['std'][key] * 100:.2f}"
  out = []
  gain = r["finetune_low"] - r["supervised_low"]
  out.append(("(a) fine-tuning beats the tuned supervised baseline by >= 3 points at the low "
              "regime", gain >= 0.03, f"{pct('finetune_low')} vs {pct('supervised_low')} "
              f"({gain * 100:+.2f})"))
  gain = r["finetune_high"] - r["supervised_high"]
  out.append(("(a) ... and is not worse at the high regime", gain >= 0,
              f"{pct('finetune_high')} vs {pct('supervised_high')} ({gain * 100:+.2f})"))
  for regime in REGIMES:
    gain = r[f"distill_{regime}"] - r[f"finetune_{regime}"]
    out.append((f"(b) the self-distilled student is at least as good as its teacher "
                f"({regime} regime)", gain >= 0,
                f"{pct(f'distill_{regime}')} vs {pct(f'finetune_{regime}')} ({gain * 100:+.2f})"))
  if "big_finetune_low" in r:
    gain = r["big_finetune_low"] - r["finetune_low"]
    out.append(("(c) the bigger pretrained model fine-tunes better at the low regime",
                gain > 0, f"{pct('big_finetune_low')} vs {pct('finetune_low')} "
                f"({gain * 100:+.2f})"))
    gain = r["distill_big_to_small_low"] - r["finetune_low"]
    out.append(("(c) the small student of the big teacher beats the small model fine-tuned "
                "directly", gain > 0, f"{pct('distill_big_to_small_low')} vs "
                f"{pct('finetune_low')} ({gain * 100:+.2f})"))
    gain = r["finetune_low"] - r["finetune_from_trunk_low"]
    out.append(("(d) fine-tuning from the projection head's middle layer vs from the trunk",
                None, f"{pct('finetune_low')} vs {pct('finetune_from_trunk_low')} "
                f"({gain * 100:+.2f})"))
  return out


def results_table(results, split="test"):
  r = results
  cell = lambda key: f"{r[key] * 100:.2f} ± {r['std'][key] * 100:.2f}"
  per_class = {g: r[f"labels_per_class_{g}"] for g in REGIMES}
  lines = [f"Fashion-MNIST {split} split, top-1 %, mean ± std over {len(r['per_seed']['finetune_low'])} "
           "seeds", "",
           "| method | " + " | ".join(f"{per_class[g]} labels/class" for g in REGIMES) + " |",
           "|---|---|---|"]
  rows = [("Supervised from scratch (tuned)", "supervised"), ("SimCLRv2 fine-tuned", "finetune"),
          ("SimCLRv2 distilled (self)", "distill")]
  for title, key in rows:
    lines.append(f"| {title} | " + " | ".join(cell(f"{key}_{g}") for g in REGIMES) + " |")
  extra = [("Bigger pretrained model, fine-tuned", "big_finetune_low"),
           ("Small student of the big teacher", "distill_big_to_small_low"),
           ("SimCLRv2 fine-tuned from the trunk output", "finetune_from_trunk_low")]
  for title, key in extra:
    if key in r:
      lines.append(f"| {title} | {cell(key)} | |")
  lines += ["", "| linear eval (all labels, frozen trunk) | top-1 |", "|---|---|",
            f"| pretrained SimCLRv2 trunk | {r['linear_eval_pretrained'] * 100:.2f} |",
            f"| random trunk (BN statistics from the data) | {r['linear_eval_random'] * 100:.2f} |",
            "", "| claim | holds | numbers |", "|---|---|---|"]
  for claim, holds, numbers in claims(r):
    verdict = "reported" if holds is None else ("yes" if holds else "**no**")
    lines.append(f"| {claim} | {verdict} | {numbers} |")
  return "\n".join(lines)


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  methods = [("supervised", "supervised from scratch (tuned)"),
             ("finetune", "SimCLRv2 fine-tuned"), ("distill", "SimCLRv2 distilled")]
  fig, ax = plt.subplots(figsize=(7, 4))
  width = 0.8 / len(methods)
  for i, (key, label) in enumerate(methods):
    values = [results[f"{key}_{g}"] * 100 for g in REGIMES]
    errors = [results["std"][f"{key}_{g}"] * 100 for g in REGIMES]
    xs = [j + (i - 1) * width for j in range(len(REGIMES))]
    bars = ax.bar(xs, values, width, yerr=errors, capsize=3, label=label)
    ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=6)
  per_class = [results[f"labels_per_class_{g}"] for g in REGIMES]
  ax.set_xticks(range(len(REGIMES)), [f"{n} labels per class" for n in per_class])
  ax.set_ylabel("top-1 (%), mean ± std over seeds")
  low = min(results[f"{k}_{g}"] for k, _ in methods for g in REGIMES) * 100
  ax.set_ylim(max(0, math.floor(low / 5) * 5 - 10), 100)
  ax.set_title("Fashion-MNIST: SimCLRv2 vs a tuned supervised baseline")
  ax.legend(loc="upper left", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  if FLAGS.seeds < 1 or FLAGS.jobs < 1:
    raise app.UsageError(f"--seeds and --jobs must be >= 1, got {FLAGS.seeds}, {FLAGS.jobs}")
  start = time.time()
  out = os.path.abspath(FLAGS.out)
  os.makedirs(out, exist_ok=True)
  plan = stages(FLAGS.recipe, FLAGS.seeds)
  try:
    stage_results = run_all(plan, out, FLAGS.jobs, FLAGS.eval_on, FLAGS.extra_flags)
  except StageFailed as e:
    say(f"\nquickstart: {e}", sys.stderr)
    sys.exit(1)
  results = summarise(plan, stage_results, out)
  results["wall_seconds"] = round(time.time() - start, 1)
  results["eval_split"] = VALIDATION_SPLIT if FLAGS.eval_on == "validation" else "test"
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  table = results_table(results, results["eval_split"])
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(f"# Quickstart results ({FLAGS.recipe})\n\n{table}\n\nWall time: "
            f"{results['wall_seconds'] / 60:.1f} min. Each stage's command is in its "
            "quickstart_done.json, its flags in flags.json, its output in log.txt.\n")
  plot(results, os.path.join(out, "results.png"))
  print("\n" + table)
  print(f"\nResults: {out}/results.json, results.md, results.png "
        f"({results['wall_seconds'] / 60:.1f} min); TensorBoard: tensorboard --logdir {out}")


def define_flags():
  """The command line's flags (defined only when run as a program, so that other tools can
  import the stage runner)."""
  flags.DEFINE_string("out", "runs/quickstart", "Output directory of every stage and the results.")
  flags.DEFINE_enum("recipe", "fashion_mnist", RECIPES,
                    "fashion_mnist: the README's main job (~25 min on 2 cores); "
                    "fashion_mnist_full: the longer recipe with every claim (~3 h).")
  flags.DEFINE_integer("seeds", 3, "Seeds (label subset, initialisation, data order) of every "
                       "stage after pretraining; results are their means.")
  flags.DEFINE_enum("eval_on", "test", ["test", "validation"],
                    "test: the final table; validation: evaluate every stage on train[55000:] "
                    "instead (for tuning; the test split stays unread).")
  flags.DEFINE_integer("jobs", 2, "Stages run at once once their inputs exist (the small stages "
                       "leave cores idle; pretraining runs alone).")
  flags.DEFINE_list("extra_flags", [], "Flags appended to every stage (e.g. --train_steps=5 "
                    "for a smoke test).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
