"""Training objectives, one module each, registered by name (the run's --train_mode).

The loop asks the objective what it needs (views, subset, extra streams), what it measures
and its loss; it never tests a mode's name. Adding an objective is one module with a subclass
of `base.Objective` plus one line below.

Entries name their classes as "module:Class" so that listing the modes (run.py's flag
definitions, --help) does not import TensorFlow.
"""

import importlib

REGISTRY = {
    "pretrain": "tf_simclr.objectives.pretrain:Pretrain",
    "finetune": "tf_simclr.objectives.finetune:Finetune",
    "distill": "tf_simclr.objectives.distill:Distill",
}


def names():
  return tuple(REGISTRY)


def get(name):
  """The Objective subclass registered as `name`."""
  if name not in REGISTRY:
    raise ValueError(f"train_mode={name!r} is not one of {names()}")
  module, cls = REGISTRY[name].split(":")
  return getattr(importlib.import_module(module), cls)
