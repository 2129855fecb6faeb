"""Grid search of one run.py recipe on the validation split (the test split stays unread).

  .venv/bin/python scripts/tune.py --out=runs/tune/supervised_low \
      --recipe=flags/fashion_mnist_supervised_low.cfg \
      --grid="learning_rate=0.1,0.4;weight_decay=0,5e-4" -- --train_epochs=100

Runs every combination of the grid (each a run.py call evaluated on --validation_split, in
<out>/<combination>/, skipped when already done), then prints them best first and writes
<out>/tune.json. Flags after `--` go to every run.
"""

import itertools
import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tf_simclr import quickstart  # noqa: E402  (the stage runner: logs, resume, skip)

flags.DEFINE_string("out", None, "Directory of the runs and tune.json.")
flags.DEFINE_multi_string("recipe", None, "run.py flagfile(s) of the recipe (not --flagfile: "
                          "absl would read that one itself).")
flags.DEFINE_string("grid", "", "name=v1,v2;name=v1,v2 ... (run.py flags without --).")
flags.DEFINE_string("validation_split", quickstart.VALIDATION_SPLIT, "Evaluation split.")
flags.DEFINE_integer("seeds", 1, "Seeds per combination (the score is their mean).")
flags.mark_flag_as_required("out")
flags.mark_flag_as_required("recipe")
FLAGS = flags.FLAGS


def combinations(grid):
  axes = [(name, values.split(",")) for name, _, values in
          (part.partition("=") for part in grid.split(";") if part)]
  for values in itertools.product(*(v for _, v in axes)):
    yield [(name, value) for (name, _), value in zip(axes, values)]


def main(argv):
  extra = argv[1:]
  out = os.path.abspath(FLAGS.out)
  rows = []
  for combo in combinations(FLAGS.grid):
    scores = []
    for seed in range(FLAGS.seeds):
      name = "_".join(f"{k}={v}" for k, v in combo) or "default"
      name += f"_s{seed}" if FLAGS.seeds > 1 else ""
      cmd = [sys.executable, "run.py", *(f"--flagfile={f}" for f in FLAGS.recipe),
             f"--model_dir={os.path.join(out, name)}", *(f"--{k}={v}" for k, v in combo),
             *extra, f"--seed={seed}", f"--eval_split={FLAGS.validation_split}",
             "--keep_hub_module_max=0"]
      result = quickstart.run_stage(name, cmd, os.path.join(out, name), live=False)
      scores.append(result["eval/label_top_1_accuracy"])
    rows.append({"flags": dict(combo), "validation_top_1": sum(scores) / len(scores),
                 "per_seed": scores})
  rows.sort(key=lambda r: -r["validation_top_1"])
  for r in rows:
    print(f"{r['validation_top_1']:.4f}  {r['flags']}  {r['per_seed']}")
  with open(os.path.join(out, "tune.json"), "w") as f:
    json.dump({"recipe": FLAGS.recipe, "extra": extra, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
