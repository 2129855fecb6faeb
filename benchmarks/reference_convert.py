"""The reference's own weights through `python -m tf_simclr.convert`, outputs compared.

Two stages sharing --work_dir, one per venv (setup: benchmarks/reference_step.py's docstring):

  /tmp/refvenv/bin/python benchmarks/reference_convert.py --stage=reference \
      --reference_dir=/tmp/simclr_ref/tf2 --work_dir=/tmp/convert_parity
  .venv/bin/python benchmarks/reference_convert.py --stage=ours --work_dir=/tmp/convert_parity

`reference`: for each of CONFIGS, Google's SimCLRv2 model (github.com/google-research/simclr,
tf2/, imported from --reference_dir; none of its code is copied here) is built with every
variable set to seeded random values (BN statistics, and the zero-initialised last BN of each
block, included), then written by the reference's own code paths: a `tf.train.Checkpoint`
whose root tracks it as `model`, as its run.py's checkpoints do (without optimizer state), and
the hub SavedModel of its run.py's `build_saved_model`. The module's inference call
(`trainable=False`) on a fixed random batch gives the expected outputs.

`ours`: each source goes through `python -m tf_simclr.convert` (a subprocess, flags printed);
the converted `<output>/saved_model/0` is called on the same batch, and every output of both
(`initial_conv` ... `logits_sup`) is compared: max |ours - reference| / max |reference|,
which must stay under --tolerance. The last line printed is a JSON list of the comparisons.

The reference stage imports the reference's run.py, so its absl flags are the reference's
own (names and defaults), set per config here; lars_optimizer gets benchmarks/reference_step.py's
shim.
"""

import json
import os
import subprocess
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (reference flags, classes, input batch size). The published models' layout (ResNet-50
# SK, fine-tuned: the supervised head reads the projection head's first layer), and a small
# one with the CIFAR stem and squeeze-excitation, pretrained with the linear-eval head.
CONFIGS = {
    "r50_1x_sk1_finetune": (dict(resnet_depth=50, width_multiplier=1, sk_ratio=0.0625,
                                 se_ratio=0.0, image_size=224, train_mode="finetune",
                                 ft_proj_selector=1), 1000, 64),
    "r18_1x_se_cifar_pretrain": (dict(resnet_depth=18, width_multiplier=1, sk_ratio=0.0,
                                      se_ratio=0.25, image_size=32, train_mode="pretrain",
                                      ft_proj_selector=0), 10, 32),
}
ARCH_FLAGS = ("resnet_depth", "width_multiplier", "sk_ratio", "se_ratio", "image_size",
              "ft_proj_selector")

flags.DEFINE_enum("stage", None, ["reference", "ours"], "Which side to run (see above).")
flags.DEFINE_string("work_dir", "/tmp/convert_parity", "Sources, outputs and expected values.")
flags.DEFINE_string("reference_dir", None, "The reference's tf2 directory (stage reference).")
flags.DEFINE_list("configs", list(CONFIGS), f"Some of {list(CONFIGS)}.")
flags.DEFINE_float("tolerance", 1e-4, "Largest allowed max|diff| / max|reference| per output.")
FLAGS = flags.FLAGS


def randomise(model, seed):
  """Sets every variable of the reference model to seeded random values of a sane scale."""
  import numpy as np
  rng = np.random.default_rng(seed)
  for v in model.variables:
    shape, name = v.shape, v.name
    if "kernel" in name:
      value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
    elif "moving_variance" in name or "gamma" in name:
      value = rng.uniform(0.5, 1.5, shape)
    else:  # bias, beta, moving_mean
      value = rng.normal(0.0, 0.1, shape)
    v.assign(value.astype(v.dtype.as_numpy_dtype))


def run_reference(names):
  import numpy as np
  import tensorflow.compat.v2 as tf
  sys.path.insert(0, os.path.abspath(FLAGS.reference_dir))
  optimizers = tf.keras.optimizers
  optimizer_new = optimizers.Optimizer
  optimizers.Optimizer = optimizers.legacy.Optimizer  # the shim of reference_step.py
  try:
    import run as ref_run  # pylint: disable=import-outside-toplevel  (defines its flags)
  finally:
    optimizers.Optimizer = optimizer_new
  for i, name in enumerate(names):
    ref_flags, num_classes, size = CONFIGS[name]
    for key, value in ref_flags.items():
      FLAGS[key].value = value
    FLAGS.global_bn = False  # one device: plain BN, same variables
    tf.keras.backend.clear_session()
    model = ref_run.model_lib.Model(num_classes)
    images = tf.constant(np.random.default_rng(100 + i).random((2, size, size, 3), np.float32))
    model(images, training=False)
    randomise(model, i)
    out_dir = os.path.join(FLAGS.work_dir, name)
    module = ref_run.build_saved_model(model)
    expected = {k: v.numpy() for k, v in module(images, trainable=False).items()}
    tf.saved_model.save(module, os.path.join(out_dir, "reference_saved_model"))
    tf.train.Checkpoint(model=model, global_step=tf.Variable(1, dtype=tf.int64)).write(
        os.path.join(out_dir, "reference_ckpt", "ckpt-1"))
    np.savez(os.path.join(out_dir, "expected.npz"), images=images.numpy(), **expected)
    print(f"reference {name}: {len(model.variables)} variables; wrote the checkpoint, the "
          f"SavedModel and {len(expected)} outputs to {out_dir}", flush=True)


def run_ours(names):
  import numpy as np
  import tensorflow as tf
  results = []
  for name in names:
    ref_flags, _, _ = CONFIGS[name]
    out_dir = os.path.join(FLAGS.work_dir, name)
    data = np.load(os.path.join(out_dir, "expected.npz"))
    for source in ("reference_ckpt/ckpt-1", "reference_saved_model"):
      output = os.path.join(out_dir, "ours_from_" + source.split("/")[0])
      cmd = [sys.executable, "-m", "tf_simclr.convert", f"--source={out_dir}/{source}",
             f"--output={output}"] + [f"--{k}={ref_flags[k]}" for k in ARCH_FLAGS]
      print("$ python", " ".join(cmd[1:]).replace(FLAGS.work_dir, "$WORK_DIR"), flush=True)
      proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
      if proc.returncode:
        raise SystemExit(f"convert failed:\n{proc.stderr[-3000:]}")
      module = tf.saved_model.load(os.path.join(output, "saved_model", "0"))
      outputs = module(tf.constant(data["images"]), trainable=False)
      keys = sorted(k for k in data.files if k != "images")
      if sorted(outputs) != keys:
        raise SystemExit(f"outputs differ: ours {sorted(outputs)}, reference {keys}")
      errors = {}
      for k in keys:
        ref, got = data[k], outputs[k].numpy()
        if ref.shape != got.shape:
          raise SystemExit(f"{k}: shape {got.shape} is not the reference's {ref.shape}")
        errors[k] = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
      worst = max(errors, key=errors.get)
      ok = errors[worst] <= FLAGS.tolerance
      results.append({"config": name, "source": source, "outputs": len(keys),
                      "max_rel_error": errors[worst], "worst_output": worst, "ok": ok,
                      "errors": errors})
      print(f"  {name} from {source}: {len(keys)} outputs, max |diff| / max |ref| "
            f"{errors[worst]:.2e} ({worst}) -> {'OK' if ok else 'FAIL'}", flush=True)
  print(json.dumps(results), flush=True)
  if not all(r["ok"] for r in results):
    raise SystemExit(1)


def main(_):
  unknown = [n for n in FLAGS.configs if n not in CONFIGS]
  if unknown:
    raise app.UsageError(f"unknown configs {unknown}; known: {list(CONFIGS)}")
  if FLAGS.stage == "reference":
    if not FLAGS.reference_dir:
      raise app.UsageError("--reference_dir is required with --stage=reference")
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    run_reference(FLAGS.configs)
  elif FLAGS.stage == "ours":
    run_ours(FLAGS.configs)
  else:
    raise app.UsageError("--stage is required")


if __name__ == "__main__":
  app.run(main)
