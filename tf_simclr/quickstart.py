"""SimCLRv2's semi-supervised result, end to end on Fashion-MNIST, in one command.

  python -m tf_simclr.quickstart --out=runs/quickstart

Runs each stage as a plain `run.py --flagfile=flags/fashion_mnist_*.cfg` call (so any stage
can be rerun by hand, and an interrupted quickstart resumes stage by stage), then writes
<out>/results.json, results.md and results.png. Stages:
  1. pretrain on all training images (labels unused);
  2. linear eval of the pretrained trunk and of a random trunk;
  3. fine-tune on class-balanced 1% and 10% label subsets, from the projection head's
     middle layer;
  4. distill each fine-tuned teacher into a same-size student on all training images
     (the student starts from the pretrained trunk);
  5. the same architecture trained supervised-only on the same subsets, same epochs.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_string("out", "runs/quickstart", "Output directory of every stage and the results.")
flags.DEFINE_enum("recipe", "fashion_mnist", ["fashion_mnist", "fashion_mnist_full"],
                  "Flagfile family: the ~20-minute quickstart or the longer recipe (~1-1.5 h).")
flags.DEFINE_list("label_fractions", ["0.01", "0.1"], "Label fractions to fine-tune on.")
flags.DEFINE_list("extra_flags", [], "Flags appended to every stage (e.g. --train_steps=5 "
                  "for a smoke test).")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def finetune_epochs(fraction):
  """The paper's budget: 60 epochs over 1% of the labels, 30 over 10% (and the baseline gets
  the same epochs over the same labelled subset)."""
  return 60 if float(fraction) <= 0.01 else 30


def pct(fraction):
  return f"{round(float(fraction) * 100):d}pct"


def stages(out, fractions, recipe="fashion_mnist"):
  """(result key, model_dir, flagfile, extra flags) in run order."""
  pretrain = os.path.join(out, "pretrain")
  plan = [("pretrain", pretrain, f"{recipe}_pretrain.cfg", [])]
  # Baselines keep no SavedModel: nobody reuses them.
  plan.append(("linear_eval_pretrained", os.path.join(out, "linear_eval_pretrained"),
               f"{recipe}_linear_eval.cfg", [f"--checkpoint={pretrain}"]))
  plan.append(("linear_eval_random", os.path.join(out, "linear_eval_random"),
               f"{recipe}_linear_eval.cfg", ["--keep_hub_module_max=0"]))
  for fraction in fractions:
    p = pct(fraction)
    labels = [f"--train_label_fraction={fraction}", f"--train_epochs={finetune_epochs(fraction)}"]
    finetune = os.path.join(out, f"finetune_{p}")
    plan.append((f"finetune_{p}", finetune, f"{recipe}_finetune.cfg",
                 [f"--checkpoint={pretrain}", *labels]))
    plan.append((f"distill_{p}", os.path.join(out, f"distill_{p}"), f"{recipe}_distill.cfg",
                 [f"--teacher_checkpoint={finetune}", f"--checkpoint={pretrain}"]))
    plan.append((f"supervised_{p}", os.path.join(out, f"supervised_{p}"),
                 f"{recipe}_finetune.cfg",
                 [*labels, "--ft_proj_selector=0", "--keep_hub_module_max=0"]))
  return plan


class StageFailed(RuntimeError):
  pass


def run_stage(name, model_dir, flagfile, extra):
  cmd = [sys.executable, os.path.join(ROOT, "run.py"),
         f"--flagfile={os.path.join(ROOT, 'flags', flagfile)}", f"--model_dir={model_dir}",
         *extra, *FLAGS.extra_flags]
  print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
  start = time.time()
  # The stage's stderr is shown as it comes and its last line kept: that line is the cause
  # (run.py ends on a one-line message, or on a traceback's last line) named in the summary.
  proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True, errors="replace")
  last = ""
  for line in proc.stderr:
    sys.stderr.write(line)
    if line.strip() and "\r" not in line:  # progress bars redraw with carriage returns
      last = line.strip()
  if proc.wait():
    raise StageFailed(f"stage {name} failed (exit {proc.returncode}): {last or 'no message'}\n"
                      f"Its log is above; its model_dir is {model_dir}. Once the cause "
                      "is fixed, run the same command again: finished stages are not trained "
                      "again and this one resumes from its last checkpoint.")
  with open(os.path.join(model_dir, "result.json")) as f:
    result = json.load(f)
  print(f"=== {name}: top-1 {result['eval/label_top_1_accuracy']:.4f} "
        f"({time.time() - start:.0f} s)", flush=True)
  return result


def results_table(results, fractions):
  rows = [("Supervised from scratch", "supervised"), ("SimCLRv2 fine-tuned", "finetune"),
          ("SimCLRv2 distilled (self)", "distill")]
  header = "| method | " + " | ".join(f"{float(f) * 100:g}% labels" for f in fractions) + " |"
  lines = [header, "|---" * (len(fractions) + 1) + "|"]
  for title, key in rows:
    cells = [f"{results[f'{key}_{pct(f)}'] * 100:.2f}" for f in fractions]
    lines.append(f"| {title} | " + " | ".join(cells) + " |")
  lines += ["", "| linear eval (100% labels, frozen trunk) | top-1 |", "|---|---|",
            f"| pretrained SimCLRv2 trunk | {results['linear_eval_pretrained'] * 100:.2f} |",
            f"| random trunk | {results['linear_eval_random'] * 100:.2f} |"]
  return "\n".join(lines)


def plot(results, fractions, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  methods = [("supervised", "supervised from scratch"), ("finetune", "SimCLRv2 fine-tuned"),
             ("distill", "SimCLRv2 distilled")]
  fig, ax = plt.subplots(figsize=(7, 4))
  width = 0.8 / len(methods)
  for i, (key, label) in enumerate(methods):
    values = [results[f"{key}_{pct(f)}"] * 100 for f in fractions]
    xs = [j + (i - 1) * width for j in range(len(fractions))]
    bars = ax.bar(xs, values, width, label=label)
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
  ax.set_xticks(range(len(fractions)), [f"{float(f) * 100:g}% labels" for f in fractions])
  ax.set_ylabel("test top-1 (%)")
  low = min(results[f"{k}_{pct(f)}"] for k, _ in methods for f in fractions) * 100
  ax.set_ylim(max(0, low - 10), 100)
  ax.set_title("Fashion-MNIST: SimCLRv2 vs supervised with few labels")
  ax.legend(loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  start = time.time()
  out = os.path.abspath(FLAGS.out)
  os.makedirs(out, exist_ok=True)
  results = {}
  for name, model_dir, flagfile, extra in stages(out, FLAGS.label_fractions, FLAGS.recipe):
    try:
      result = run_stage(name, model_dir, flagfile, extra)
    except StageFailed as e:
      print(f"\nquickstart: {e}", file=sys.stderr, flush=True)
      sys.exit(1)
    if name != "pretrain":
      results[name] = result["eval/label_top_1_accuracy"]
  results["wall_seconds"] = round(time.time() - start, 1)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  table = results_table(results, FLAGS.label_fractions)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("# Quickstart results (Fashion-MNIST test split, top-1 %)\n\n" + table + "\n\n"
            f"Wall time: {results['wall_seconds'] / 60:.1f} min. Stages and their flags: "
            "see the log above and each stage's flags.json.\n")
  plot(results, FLAGS.label_fractions, os.path.join(out, "results.png"))
  print("\n" + table)
  print(f"\nResults: {out}/results.json, results.md, results.png "
        f"({results['wall_seconds'] / 60:.1f} min); TensorBoard: tensorboard --logdir {out}")


if __name__ == "__main__":
  app.run(main)
