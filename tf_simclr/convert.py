"""Import of the reference's published SimCLR(v2) weights (google-research/simclr).

  python -m tf_simclr.convert --source=<SavedModel dir, checkpoint prefix or dir> \
      --output=<dir> --resnet_depth=50 --width_multiplier=1 --sk_ratio=0.0625

Two source layouts exist, both produced by the reference code:
  - TF1 (root of the reference repository): name-based checkpoints. Layers are created by
    `tf.layers` in call order inside variable scopes, so the trunk is the sequences
    `base_model/conv2d[_N]/{kernel,bias}` and `base_model/batch_normalization[_N]/*` in N
    order; heads are `head_contrastive/{nl,l}_<j>/{dense,batch_normalization}/*` and
    `head_supervised/linear_layer/dense/*`.
  - TF2 (its tf2/ directory): object-based checkpoints and SavedModels whose root tracks the
    Keras model as `model`. Paths follow its attributes: `resnet_model/
    initial_conv_relu_max_pool/<i>`, `resnet_model/block_groups/<g>/layers/<b>/<list>/<i>`,
    `_projection_head/linear_layers/<j>`, `supervised_head/linear_layer`.
Both orders are the reference's layer creation order (stem; per block: projection shortcut,
main path, selective-kernel internals, squeeze-excitation), which is also the order in which
`_model_units` lists our layers, so convolutions and BNs are matched one to one in order and
every shape is checked. Writes `<output>/ckpt-0` (a tf_simclr checkpoint),
`<output>/saved_model/0/` (tf_simclr.export) and `<output>/tf_simclr_config.json` (the model
config, tf_simclr.pretrained).
"""

import collections
import dataclasses
import os
import re

import numpy as np
import tensorflow as tf

from tf_simclr import export, files, pretrained
from tf_simclr.config import ModelConfig
from tf_simclr.models.resnet import BottleneckBlock, SelectiveKernel
from tf_simclr.models.simclr import build_model
from tf_simclr.train import checkpoints

BN_PARAMS = ("gamma", "beta", "moving_mean", "moving_variance")
CONV, BN = "conv", "bn"

# A layer with parameters: kind (CONV also covers dense and SE convs, which have a bias),
# a name for messages, and {short name: variable or array}.
Unit = collections.namedtuple("Unit", "kind name params")


class ConversionError(ValueError):
  """The source does not hold the reference's weights for the requested architecture."""


@dataclasses.dataclass
class ReferenceWeights:
  trunk: list          # Units in the reference's creation order
  projection: list     # per projection layer: [dense Unit, BN Unit]
  supervised: object   # the supervised head's dense Unit, or None


# --------------------------------------------------------------------------- sources

def _index(suffix):
  return int(suffix) if suffix else 0


def _group(entries):
  """[(order key, kind, layer name, param, value)] -> Units sorted by key."""
  layers = {}
  for key, kind, name, param, value in entries:
    unit = layers.setdefault(key, Unit(kind, name, {}))
    unit.params[param] = value
  return [layers[key] for key in sorted(layers)]


def _read_tf1(reader, names):
  trunk, heads, supervised = [], [], []
  bn_params = "|".join(BN_PARAMS)
  for name in names:
    m = re.fullmatch(r"base_model/(conv2d(?:_(\d+))?)/(kernel|bias)", name)
    if m:
      trunk.append(((CONV, _index(m[2])), CONV, f"base_model/{m[1]}", m[3], name))
      continue
    m = re.fullmatch(rf"base_model/(batch_normalization(?:_(\d+))?)/({bn_params})", name)
    if m:
      trunk.append(((BN, _index(m[2])), BN, f"base_model/{m[1]}", m[3], name))
      continue
    m = re.fullmatch(r"head_contrastive/n?l_(\d+)/(dense|batch_normalization)/(\w+)", name)
    if m:
      kind = CONV if m[2] == "dense" else BN
      heads.append(((int(m[1]), kind == BN), kind, name.rsplit("/", 1)[0], m[3], name))
      continue
    m = re.fullmatch(r"head_supervised/linear_layer/dense/(kernel|bias)", name)
    if m:
      supervised.append((0, CONV, "head_supervised/linear_layer/dense", m[1], name))

  def load(units):
    return [Unit(u.kind, u.name, {p: reader.get_tensor(k) for p, k in u.params.items()})
            for u in units]

  # Convolutions and BNs have separate name counters: keep each sequence in its own order.
  trunk_units = load(_group(trunk))
  head_units = load(_group(heads))
  return ReferenceWeights(
      trunk=trunk_units,
      projection=[head_units[i:i + 2] for i in range(0, len(head_units), 2)],
      supervised=(load(_group(supervised)) or [None])[0])


# Ranks of the reference's (tf2/) block attributes in creation order.
_LIST_RANK = {"projection_layers": 0, "shortcut_layers": 0, "conv2d_bn_layers": 1,
              "conv_relu_dropblock_layers": 1, "se_layer": 2}
_SUBLAYERS = {  # SK_Conv2D's and SE_Layer's parameterized children, in creation order
    "conv2d_fixed_padding/conv2d": (0, CONV), "batch_norm_relu/bn": (1, BN),
    "conv2d_0": (2, CONV), "batch_norm_relu_1/bn": (3, BN), "conv2d_1": (4, CONV),
    "se_reduce": (0, CONV), "se_expand": (1, CONV), "conv2d": (0, CONV), "bn": (0, BN)}


def _variable_paths(graph):
  """{variable node id: [paths from the root]} of an object graph (a variable can have
  several: SavedModels also list variables in flat lists)."""
  paths = collections.defaultdict(list)
  stack = [(0, (), (0,))]
  while stack:
    node_id, path, on_path = stack.pop()
    node = graph.nodes[node_id]
    if checkpoints.variable_key(node) is not None:
      paths[node_id].append(path)
    for child in node.children:
      # Object graphs can have cycles; tf.keras 2's `keras_api` only re-lists objects.
      if child.node_id not in on_path and child.local_name != "keras_api":
        stack.append((child.node_id, path + (child.local_name,), on_path + (child.node_id,)))
  return paths


def _tf2_entry(path):
  """(group, order key, kind, layer name, param) of a reference tf2 variable path, or None."""
  text = "/".join(path)
  m = re.search(r"(?:^|/)resnet_model/(.*)$", text)
  if m:
    rest = m[1]
    s = re.fullmatch(r"initial_conv_relu_max_pool/(\d+)/(conv2d|bn)/(\w+)", rest)
    if s:
      kind = CONV if s[2] == "conv2d" else BN
      return "trunk", (0, int(s[1])), kind, text.rsplit("/", 1)[0], s[3]
    s = re.fullmatch(r"block_groups/(\d+)/layers/(\d+)/(\w+?)(?:/(\d+))?/(.+)/(\w+)", rest)
    if s and s[3] in _LIST_RANK and s[5] in _SUBLAYERS:
      rank, kind = _SUBLAYERS[s[5]]
      key = (1, int(s[1]), int(s[2]), _LIST_RANK[s[3]], int(s[4] or 0), rank)
      return "trunk", key, kind, text.rsplit("/", 1)[0], s[6]
    return None
  m = re.search(r"(?:^|/)_projection_head/linear_layers/(\d+)/(dense|bn_relu/bn)/(\w+)$", text)
  if m:
    kind = CONV if m[2] == "dense" else BN
    return "projection", (int(m[1]), kind == BN), kind, text.rsplit("/", 1)[0], m[3]
  m = re.search(r"(?:^|/)supervised_head/linear_layer/dense/(\w+)$", text)
  if m:
    return "supervised", 0, CONV, text.rsplit("/", 1)[0], m[1]
  return None


def _read_tf2(reader, graph):
  groups = collections.defaultdict(dict)
  for node_id, paths in _variable_paths(graph).items():
    for path in paths:
      entry = _tf2_entry(path)
      if entry is None:
        continue
      group, key, kind, name, param = entry
      value = reader.get_tensor(checkpoints.variable_key(graph.nodes[node_id]))
      groups[group][(key, param)] = (key, kind, name, param, value)
      break
  heads = _group(groups["projection"].values())
  return ReferenceWeights(
      trunk=_group(groups["trunk"].values()),
      projection=[heads[i:i + 2] for i in range(0, len(heads), 2)],
      supervised=(_group(groups["supervised"].values()) or [None])[0])


def read_reference(prefix) -> ReferenceWeights:
  """The reference model's weights in a checkpoint (TF1 name-based or TF2 object-based)."""
  reader = tf.train.load_checkpoint(prefix)
  names = reader.get_variable_to_shape_map()
  graph = checkpoints.object_graph(reader)
  if any(name.startswith("base_model/") for name in names):
    weights = _read_tf1(reader, sorted(names))
  elif graph is not None:
    weights = _read_tf2(reader, graph)
  else:
    weights = ReferenceWeights([], [], None)
  if not weights.trunk:
    raise ConversionError(f"{prefix} holds no SimCLR reference ResNet (neither TF1 "
                          "`base_model/...` variables nor a TF2 `model/resnet_model`)")
  return weights


# --------------------------------------------------------------------------- our model

def _conv_unit(layer):
  params = {"kernel": layer.kernel}
  if layer.bias is not None:
    params["bias"] = layer.bias
  return Unit(CONV, layer.kernel.path.rsplit("/", 1)[0], params)


def _bn_unit(layer):
  params = {p: getattr(layer, p) for p in BN_PARAMS if getattr(layer, p) is not None}
  return Unit(BN, layer.moving_mean.path.rsplit("/", 1)[0], params)


def _model_units(model, cfg: ModelConfig):
  """Our model's layers as ReferenceWeights, in the reference's creation order."""
  resnet = model.resnet
  trunk = []

  def conv_bn(unit):  # a ConvBatchNorm
    trunk.extend([_conv_unit(unit.conv.conv), _bn_unit(unit.bn)])

  if cfg.cifar_stem or cfg.sk_ratio <= 0:
    stems = ["stem_conv"]
  else:
    stems = ["stem_conv_1", "stem_conv_2", "stem_conv_3"]
  for name in stems:
    trunk.extend([_conv_unit(resnet.get_layer(name).conv),
                  _bn_unit(resnet.get_layer(name + "_bn"))])
  for g in range(1, 5):
    group = resnet.get_layer(f"block_group{g}")
    for b in range(group.num_blocks):
      block = getattr(group, f"block_{b}")
      if block.shortcut is not None:
        conv_bn(block.shortcut.proj)
      conv_bn(block.conv_1)
      if isinstance(block.conv_2, SelectiveKernel):
        sk = block.conv_2
        conv_bn(sk.streams)
        trunk.extend([_conv_unit(sk.reduce), _bn_unit(sk.reduce_bn), _conv_unit(sk.mixing)])
      else:
        conv_bn(block.conv_2)
      if isinstance(block, BottleneckBlock):
        conv_bn(block.conv_3)
      if block.se is not None:
        trunk.extend([_conv_unit(block.se.reduce), _conv_unit(block.se.expand)])
  head = model.projection_head
  projection = []
  for j in range(head.num_layers):
    layer = getattr(head, f"layer_{j}")
    projection.append([_conv_unit(layer.dense), _bn_unit(layer.bn)])
  return ReferenceWeights(trunk, projection, _conv_unit(model.supervised_head.dense))


# --------------------------------------------------------------------------- mapping

def _shape(value):
  return list(value.shape)


def _pair(ours, theirs, assignments):
  """Queues the assignment of one reference layer to one of ours; raises on any mismatch."""
  if theirs is None:
    first = next(iter(ours.params.values()))
    raise ConversionError(f"the source has no layer for {first.path} {_shape(first)} "
                          "(is it a smaller or different architecture?)")
  if ours.kind != theirs.kind:
    raise ConversionError(f"layer order differs: {ours.name} is a {ours.kind} but the "
                          f"source's {theirs.name} is a {theirs.kind}")
  order = ("kernel", "bias") + BN_PARAMS
  for param in sorted(set(ours.params) | set(theirs.params),
                      key=lambda p: order.index(p) if p in order else len(order)):
    if param not in theirs.params:
      raise ConversionError(f"the source's {theirs.name} has no {param} for "
                            f"{ours.params[param].path} {_shape(ours.params[param])}")
    if param not in ours.params:
      raise ConversionError(f"the source's {theirs.name}/{param} "
                            f"{_shape(theirs.params[param])} has no counterpart in "
                            f"{ours.name} (another head or block configuration?)")
    variable, value = ours.params[param], theirs.params[param]
    if _shape(variable) != _shape(value):
      raise ConversionError(f"shape mismatch: the source's {theirs.name}/{param} is "
                            f"{_shape(value)} but our {variable.path} is {_shape(variable)}")
    assignments.append((variable, value))


def _pair_sequence(ours, theirs, what, assignments):
  """Pairs convolutions with convolutions and BNs with BNs, each in order."""
  source = {CONV: [u for u in theirs if u.kind == CONV], BN: [u for u in theirs if u.kind == BN]}
  used = {CONV: 0, BN: 0}
  for unit in ours:
    queue = source[unit.kind]
    _pair(unit, queue[used[unit.kind]] if used[unit.kind] < len(queue) else None, assignments)
    used[unit.kind] += 1
  for kind in (CONV, BN):
    if used[kind] < len(source[kind]):
      extra = source[kind][used[kind]]
      param, value = next(iter(extra.params.items()))
      raise ConversionError(f"the source's {what} has more layers than the model: first "
                            f"unmatched {extra.name}/{param} {_shape(value)} (is it a deeper "
                            "or different architecture?)")


def load_reference_weights(model, cfg: ModelConfig, reference: ReferenceWeights):
  """Assigns reference weights to `model` (built from cfg). Checks everything first, so a
  mismatch leaves the model unchanged. Returns notes about parts the source lacks."""
  ours = _model_units(model, cfg)
  assignments, notes = [], []
  _pair_sequence(ours.trunk, reference.trunk, "ResNet", assignments)
  if len(ours.projection) != len(reference.projection):
    raise ConversionError(
        f"the source's projection head has {len(reference.projection)} layers, the model "
        f"{len(ours.projection)} (set --num_proj_layers / --proj_head_mode to match)")
  for mine, theirs in zip(ours.projection, reference.projection):
    _pair_sequence(mine, theirs, "projection head", assignments)
  if reference.supervised is None:
    notes.append("the source has no supervised head: logits_sup starts at zero")
    assignments.extend((v, np.zeros(v.shape, np.float32)) for v in ours.supervised.params.values())
  else:
    _pair(ours.supervised, reference.supervised, assignments)
  for variable, value in assignments:
    variable.assign(np.asarray(value, np.float32))
  return notes


def convert(source, output, cfg: ModelConfig):
  """Writes a tf_simclr checkpoint, SavedModel and model config of the reference weights in
  `source` under `output`. Returns the checkpoint prefix."""
  prefix = checkpoints.resolve_weights(source)
  reference = read_reference(prefix)
  if cfg.num_classes <= 0:
    if reference.supervised is None:
      raise ConversionError("the source has no supervised head: pass --num_classes")
    cfg = dataclasses.replace(cfg, num_classes=_shape(reference.supervised.params["kernel"])[-1])
  model = build_model(cfg)
  for note in load_reference_weights(model, cfg, reference):
    print(f"Note: {note}", flush=True)

  with files.writing(output):
    tf.io.gfile.makedirs(output)
  step = tf.Variable(0, dtype=tf.int64)
  manager = tf.train.CheckpointManager(
      tf.train.Checkpoint(model=model, global_step=step), output, max_to_keep=1,
      checkpoint_name=checkpoints.CHECKPOINT_PREFIX)
  path = checkpoints.save_checkpoint(manager, 0)
  export.export_run(model, output, cfg, step=0, keep_hub_module_max=1)
  pretrained.write_model_config(output, cfg)
  return path


# --------------------------------------------------------------------------- CLI

def main():
  from absl import app, flags
  from tf_simclr import model_flags

  flags.DEFINE_string("source", None, "Reference SavedModel directory, or TF1/TF2 checkpoint "
                      "(prefix or directory).")
  flags.DEFINE_string("output", None, "Directory for the tf_simclr checkpoint and SavedModel.")
  # The source's architecture; ft_proj_selector does not show in weights.
  model_flags.define_architecture_flags()
  flags.DEFINE_integer("num_classes", 0,
                       "Classes of the supervised head (0: from the source's head).")
  flags.mark_flags_as_required(["source", "output"])

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    F = flags.FLAGS
    cfg = ModelConfig(**model_flags.architecture_from_flags(), num_classes=max(F.num_classes, 1))
    try:
      cfg.validate()
      cfg = dataclasses.replace(cfg, num_classes=F.num_classes)
      path = convert(F.source, F.output, cfg)
    except (ConversionError, FileNotFoundError, ValueError) as e:
      raise app.UsageError(str(e))
    print(f"Wrote {path}, {os.path.join(F.output, 'saved_model', '0')} and "
          f"{os.path.join(F.output, pretrained.MODEL_CONFIG_FILE)}", flush=True)

  app.run(checkpoints.exit_on_storage_error(run))


if __name__ == "__main__":
  main()
