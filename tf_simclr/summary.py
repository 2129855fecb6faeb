"""Parameter counts of a SimCLRv2 model, per part.

  python -m tf_simclr.summary --resnet_depth=152 --width_multiplier=3 --sk_ratio=0.0625 --json

Counts are trainable parameters with every layer trainable (fine_tune_after_block=-1),
as the SimCLRv2 paper's model table reports them.
"""

import json

from absl import app, flags

from tf_simclr import model_flags
from tf_simclr.config import ModelConfig

model_flags.define_architecture_flags()
flags.DEFINE_integer("num_classes", 1000, "Classes of the supervised head.")
flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
FLAGS = flags.FLAGS


def parameter_counts(cfg: ModelConfig) -> dict:
  from tf_simclr.models.simclr import build_model, count_params
  model = build_model(cfg)
  counts = {
      "trunk_params": count_params(model.resnet.trainable_weights),
      "projection_head_params": count_params(model.projection_head.trainable_weights),
      "supervised_head_params": count_params(model.supervised_head.trainable_weights),
      "non_trainable_params": count_params(model.non_trainable_weights),
  }
  counts["total_params"] = (counts["trunk_params"] + counts["projection_head_params"]
                            + counts["supervised_head_params"])
  return counts


def main(argv):
  del argv
  cfg = ModelConfig(**model_flags.architecture_from_flags(), num_classes=FLAGS.num_classes,
                    global_bn=False)
  try:
    cfg.validate()
  except ValueError as e:
    raise app.UsageError(str(e))
  counts = parameter_counts(cfg)
  if FLAGS.json:
    print(json.dumps(counts))
  else:
    width = f"{cfg.width_multiplier:g}x"
    print(f"ResNet-{cfg.resnet_depth} {width}{' SK' if cfg.sk_ratio > 0 else ''}"
          f"{' SE' if cfg.se_ratio > 0 else ''}, {cfg.image_size}px, {cfg.num_classes} classes")
    for key, value in counts.items():
      print(f"  {key:24s} {value:>14,d}")


if __name__ == "__main__":
  app.run(main)
