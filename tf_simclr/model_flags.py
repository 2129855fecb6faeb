"""The architecture flags of every command line that describes a model: run.py,
`python -m tf_simclr.summary` and `python -m tf_simclr.convert`. One definition, with the
reference's flag names and ModelConfig's defaults, so a model is spelled the same everywhere.
"""

from absl import flags

from tf_simclr.config import PROJ_HEAD_MODES, RESNET_DEPTHS, ModelConfig

_HELP = {
    "resnet_depth": f"ResNet depth: one of {', '.join(map(str, RESNET_DEPTHS))}.",
    "width_multiplier": "Width multiplier of the trunk (integers above 1; below 1 allowed).",
    "sk_ratio": "Selective kernel ratio (SimCLRv2: 0.0625); 0 disables.",
    "se_ratio": "Squeeze-excitation ratio; 0 disables.",
    "image_size": "Input image size (<= 32 uses the CIFAR stem).",
    "proj_head_mode": "Projection head type.",
    "proj_out_dim": "Output width of the projection head.",
    "num_proj_layers": "Layers of the nonlinear projection head.",
    "ft_proj_selector": "Projection head layer feeding the supervised head (0: trunk output; "
                        "SimCLRv2 fine-tunes from 1, the middle of its 3-layer head; -1: the "
                        "head's output).",
}
NAMES = tuple(_HELP)


def define_architecture_flags(flag_values=flags.FLAGS, names=NAMES, override_of=None):
  """Defines the flags `names`; with `override_of`, as `--<override_of>_<name>` flags whose
  default None keeps that model's own value. Returns the flags' names."""
  defaults = ModelConfig()
  defined = []
  for name in names:
    kind = getattr(defaults, name)
    flag, default, help_text = name, kind, _HELP[name]
    if override_of:
      flag, default = f"{override_of}_{name}", None
      help_text = f"Override of the {override_of}'s {name} (default: its model config)."
    if name == "proj_head_mode":
      flags.DEFINE_enum(flag, default, list(PROJ_HEAD_MODES), help_text, flag_values=flag_values)
    elif isinstance(kind, int):
      flags.DEFINE_integer(flag, default, help_text, flag_values=flag_values)
    else:
      flags.DEFINE_float(flag, default, help_text, flag_values=flag_values)
    defined.append(flag)
  return defined


def architecture_from_flags(flag_values=flags.FLAGS) -> dict:
  """ModelConfig keyword arguments of the architecture flags."""
  return {name: flag_values[name].value for name in NAMES}
