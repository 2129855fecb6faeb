"""SavedModel export of a SimCLRModel: serves, fine-tunes, and restores into Keras.

One SavedModel carries, all returning the dict of `OUTPUT_NAMES` for float32 images in
[0, 1] of any size, [B, H, W, 3]:
  - `__call__(images, trainable=False)`: the reference hub modules' interface, traced for both
    values of the Python bool `trainable` (training-mode BN when True);
  - `serve` (also the `serving_default` signature) and `training`: Keras 3 endpoints for
    `keras.layers.TFSMLayer(path, call_endpoint="serve", call_training_endpoint="training")`;
  - `variables` / `trainable_variables`, and the Keras model itself under the attribute
    `model`, so that `<dir>/variables/variables` restores into a fresh Keras model with
    `checkpoints.restore_model` exactly like a training checkpoint does;
  - `tf_simclr_config.json`: the model config and step (tf_simclr.pretrained).

  python -m tf_simclr.export --model_dir=<run> [--checkpoint=<prefix>] [--output=<dir>]
"""

import dataclasses
import os

import keras
import tensorflow as tf

from tf_simclr import files, pretrained
from tf_simclr.config import ModelConfig
from tf_simclr.models.simclr import OUTPUT_NAMES, build_model
from tf_simclr.train import checkpoints

EXPORT_SUBDIR = "saved_model"
SERVE_ENDPOINT = "serve"
TRAINING_ENDPOINT = "training"
_IMAGES = tf.TensorSpec([None, None, None, 3], tf.float32, name="images")


def _export_copy(model, model_cfg: ModelConfig):
  """A float32 single-device copy of `model` with the same weights, built from model_cfg.

  Exports then neither depend on the training run's strategy (mirrored variables) nor
  precision policy.
  BN is not synchronized in the copy: on one device it computes the same, and synchronized
  BN's all-reduce has a custom gradient whose own gradient a SavedModel cannot keep (loading
  then warns about "unsaved custom gradients"). An exported training endpoint never
  synchronizes BN across replicas anyway.
  """
  cfg = dataclasses.replace(model_cfg, global_bn=False)
  policy = keras.config.dtype_policy()
  keras.config.set_dtype_policy("float32")
  try:
    copy = build_model(cfg)
  finally:
    keras.config.set_dtype_policy(policy)
  if len(copy.weights) != len(model.weights):
    raise ValueError(f"model has {len(model.weights)} weights, but a model of its config "
                     f"has {len(copy.weights)}: is model_cfg the model's config?")
  for target, source in zip(copy.weights, model.weights):
    if target.path != source.path or tuple(target.shape) != tuple(source.shape):
      raise ValueError(f"model weight {source.path} {list(source.shape)} does not match "
                       f"{target.path} {list(target.shape)} of a model built from model_cfg")
    target.assign(tf.cast(source.value, target.dtype))
  return copy


def export_saved_model(model, export_dir, model_cfg: ModelConfig, step=None):
  """Writes `model` (a SimCLRModel built from `model_cfg`) as a SavedModel in export_dir.

  Call it outside any strategy scope. Not atomic: see `export_run` for that.
  """
  # Exports are fully trainable (no frozen blocks) and do not recompute activations (a
  # training-memory choice): whoever reuses the model decides.
  model_cfg = dataclasses.replace(model_cfg, fine_tune_after_block=-1, recompute_block_groups=0)
  model = _export_copy(model, model_cfg)

  def outputs(images, training):
    result = model(images, training=training)
    return {name: result[name] for name in OUTPUT_NAMES}

  @tf.function(autograph=False)
  def hub_call(images, trainable=False):
    return outputs(images, trainable)

  for trainable in (False, True):
    hub_call.get_concrete_function(_IMAGES, trainable=trainable)

  archive = keras.export.ExportArchive()
  archive.track(model)
  # The first endpoint also becomes the `serving_default` signature.
  archive.add_endpoint(SERVE_ENDPOINT, lambda images: outputs(images, False), [_IMAGES])
  archive.add_endpoint(TRAINING_ENDPOINT, lambda images: outputs(images, True), [_IMAGES])
  # The archive saves this object as the SavedModel's root. `__call__` is set here rather than
  # added as an endpoint, which would also make it a serving signature of one arbitrary trace.
  # `model` makes the variables checkpoint restorable as a tf_simclr checkpoint.
  root = archive._tf_trackable
  root.__call__ = hub_call
  root.model = model
  # Custom gradients (the all-reduce of synchronized BN) must be saved for fine-tuning.
  archive.write_out(export_dir, verbose=False,
                    options=tf.saved_model.SaveOptions(experimental_custom_gradients=True))
  pretrained.write_model_config(export_dir, model_cfg, global_step=step)


def list_exports(model_dir):
  """Steps of the complete exports under <model_dir>/saved_model, ascending."""
  parent = os.path.join(model_dir, EXPORT_SUBDIR)
  if not tf.io.gfile.isdir(parent):
    return []
  return sorted(int(d.rstrip("/")) for d in tf.io.gfile.listdir(parent)
                if d.rstrip("/").isdigit())


def _export_to(path, model, model_cfg, step):
  """export_saved_model through files.replacing: a crash never leaves a partial SavedModel at
  `path`, and a failed write (full or read-only disk) raises files.StorageError and leaves no
  temporary files."""
  with files.replacing(path, f"SavedModel {path}") as tmp:
    export_saved_model(model, tmp, model_cfg, step)


def export_run(model, model_dir, model_cfg: ModelConfig, step, keep_hub_module_max=1):
  """Exports to <model_dir>/saved_model/<step>/ and keeps the newest keep_hub_module_max
  exports (all if <= 0). Returns the export's path.

  The SavedModel is written under a non-numeric temporary name in the same directory and
  renamed when complete, so a crash never leaves a numeric (valid-looking) partial export.
  """
  parent = os.path.join(model_dir, EXPORT_SUBDIR)
  final = os.path.join(parent, str(int(step)))
  _export_to(final, model, model_cfg, step)
  if keep_hub_module_max > 0:
    for old in list_exports(model_dir)[:-keep_hub_module_max]:
      tf.io.gfile.rmtree(os.path.join(parent, str(old)))
  return final


class TrainableTFSMLayer(keras.layers.TFSMLayer):
  """`keras.layers.TFSMLayer` that fine-tunes with optimizers that have slots.

  TFSMLayer names the weights it wraps after the SavedModel's variables, ':0' suffix included,
  and optimizers derive slot names from them ("'kernel:0_momentum' is not a valid scope name");
  this wraps each weight under the name without the suffix. It also defaults to our endpoints
  and, when frozen (trainable=False), always calls the inference endpoint.
  """

  def __init__(self, filepath, call_endpoint=SERVE_ENDPOINT,
               call_training_endpoint=TRAINING_ENDPOINT, trainable=True, **kwargs):
    super().__init__(filepath, call_endpoint=call_endpoint,
                     call_training_endpoint=call_training_endpoint, trainable=trainable,
                     **kwargs)

  def call(self, inputs, training=False, **kwargs):
    # As Keras' own BN layers: a frozen layer runs in inference mode, statistics untouched.
    return super().call(inputs, training=bool(training) and self.trainable, **kwargs)

  def _add_existing_weight(self, weight):
    name = weight.name.split(":")[0].replace("/", "_")
    self._track_variable(keras.Variable(
        initializer=weight, trainable=weight.trainable, dtype=weight.dtype,
        shape=weight.shape, name=name))


# --------------------------------------------------------------------------- CLI

def _main(argv):
  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  FLAGS = flags.FLAGS
  try:
    # The checkpoint's own config describes it (a prefix in model_dir: model_dir's).
    model, cfg, prefix = pretrained.load_pretrained(FLAGS.checkpoint or FLAGS.model_dir,
                                                    {"fine_tune_after_block": -1})
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e))
  step = checkpoints.checkpoint_step(prefix)
  if FLAGS.output:
    if tf.io.gfile.exists(FLAGS.output):
      raise app.UsageError(f"--output={FLAGS.output} exists; remove it or choose another")
    path = FLAGS.output.rstrip("/")
    _export_to(path, model, cfg, step)
  else:
    path = export_run(model, FLAGS.model_dir, cfg, step,
                      keep_hub_module_max=FLAGS.keep_hub_module_max)
  print(f"Exported {prefix} (step {step}, ResNet-{cfg.resnet_depth} "
        f"{cfg.width_multiplier:g}x, {cfg.num_classes} classes) to {path}", flush=True)


def main():
  from absl import app, flags
  flags.DEFINE_string("model_dir", None, "A tf_simclr run: its tf_simclr_config.json gives the "
                      "architecture.")
  flags.DEFINE_string("checkpoint", None,
                      "Checkpoint prefix to export (default: the run's latest checkpoint); "
                      "the config file of its directory describes it.")
  flags.DEFINE_string("output", None,
                      "SavedModel directory to write (default: <model_dir>/saved_model/<step>).")
  flags.DEFINE_integer("keep_hub_module_max", 0,
                       "Without --output: keep this many newest exports of the run (0: all).")
  flags.mark_flag_as_required("model_dir")
  app.run(checkpoints.exit_on_storage_error(_main))


if __name__ == "__main__":
  main()
