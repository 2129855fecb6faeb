"""Where a training step's time goes: the TF profiler's trace, summed by op class.

  python benchmarks/train_step.py --preset=cifar_r18 --precision=float32 --steps=5 \
      --profile_dir=/tmp/prof --json      # its JSON then holds "op_breakdown"
  python benchmarks/op_breakdown.py --profile_dir=/tmp/prof --steps=5 --json

Reads the `*.xplane.pb` the profiler wrote and sums, per op class, the duration of every op
the executor ran on the host's threads (TF's op events are named "<op name>:<op type>"),
divided by --steps. An op's duration is its wall time (its intra-op threads included), and
independent ops overlap on the executor's threads, so the classes can add up to more than
a step's wall time; `op_seconds_per_step` is that sum, `share` each class's part of it. Containers (function calls, loops) are left out: the ops inside them are counted.
Classes are by op type, except that the ops of the contrastive loss and of the optimizer are
recognised by their name scopes.
"""

import collections
import glob
import json
import os

from absl import app, flags

# Op types whose events span the ops they run: counting them would count those twice. An
# XLA cluster's run (_XlaRun) is counted: its ops are compiled code, not executor events.
_CONTAINERS = {"While", "StatelessWhile", "If", "StatelessIf", "PartitionedCall",
               "StatefulPartitionedCall", "Case", "StatelessCase", "_XlaCompile"}
# Name scopes (lower case) that decide the class whatever the op type.
_SCOPES = (("contrastive", "contrastive loss"), ("lars", "optimizer"), ("sgd", "optimizer"),
           ("adam", "optimizer"), ("optimizer", "optimizer"), ("apply_gradients", "optimizer"))
_TYPES = (
    ("convolution backward", ("Conv2DBackpropInput", "Conv2DBackpropFilter",
                              "DepthwiseConv2dNativeBackpropInput",
                              "DepthwiseConv2dNativeBackpropFilter")),
    ("convolution forward", ("Conv2D", "_FusedConv2D", "DepthwiseConv2dNative",
                             "_MklNativeConv2D", "_MklNativeFusedConv2D")),
    ("matmul", ("MatMul", "_FusedMatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3",
                "_MklMatMul")),
    ("batch norm", ("FusedBatchNormV3", "FusedBatchNormGradV3", "_FusedBatchNormEx",
                    "_MklNativeFusedBatchNormV3", "_MklNativeFusedBatchNormGradV3")),
    ("casts", ("Cast",)),
    ("all-reduce", ("CollectiveReduceV2", "CollectiveGatherV2", "NcclAllReduce",
                    "CollectiveAllToAllV2", "CollectiveReduce", "CollectiveGather")),
    ("input (iterator, copies)", ("IteratorGetNext", "IteratorGetNextAsOptional",
                                  "OptionalGetValue", "_Send", "_Recv", "Identity")),
)
_CLASS_OF_TYPE = {t: name for name, types in _TYPES for t in types}
OTHER = "elementwise, activations, reductions, other"


def op_class(name, op_type):
  """The class of one op, from its name (scopes) and type."""
  lowered = name.lower()
  for scope, cls in _SCOPES:
    if scope in lowered:
      return cls
  if op_type.startswith("_Xla") or op_type == "XlaLaunch" or op_type.startswith("cluster_"):
    return "XLA clusters"
  return _CLASS_OF_TYPE.get(op_type, OTHER)


def op_events(profile_dir):
  """(op name, op type, seconds) of every op event in the traces under `profile_dir`."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=import-outside-toplevel
  paths = glob.glob(os.path.join(profile_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no *.xplane.pb under {profile_dir}")
  for path in paths:
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
      space.ParseFromString(f.read())
    for plane in space.planes:
      if not plane.name.startswith("/host:CPU"):
        continue
      for line in plane.lines:
        for event in line.events:
          name = plane.event_metadata[event.metadata_id].name
          # Op events are "<op name>:<op type>"; the executor's own ("ExecutorState::Process",
          # ...) contain "::" and span the ops they run.
          if ":" not in name or "::" in name:
            continue
          op_name, op_type = name.rsplit(":", 1)
          if not op_type or not op_type[0].isalpha() and op_type[0] != "_":
            continue
          yield op_name, op_type, event.duration_ps * 1e-12


def breakdown(profile_dir, steps):
  """{"op_seconds_per_step", "classes": {class: seconds per step}, "share": {class: part},
  "top_op_types": [(type, seconds per step), ...]} of a profile of `steps` steps."""
  by_class, by_type = collections.Counter(), collections.Counter()
  for name, op_type, seconds in op_events(profile_dir):
    if op_type in _CONTAINERS:
      continue
    by_class[op_class(name, op_type)] += seconds / steps
    by_type[op_type] += seconds / steps
  total = sum(by_class.values())
  return {"op_seconds_per_step": total,
          "classes": dict(by_class.most_common()),
          "share": {k: v / total for k, v in by_class.most_common()} if total else {},
          "top_op_types": by_type.most_common(15)}


def print_breakdown(b):
  print(f"  ops        {b['op_seconds_per_step']:.3f} s of op time per step (both cores):")
  for cls, seconds in b["classes"].items():
    print(f"    {cls:<45} {seconds:8.4f} s  {b['share'][cls]:6.1%}")


def main(_):
  b = breakdown(FLAGS.profile_dir, FLAGS.steps)
  print_breakdown(b)
  if FLAGS.json:
    print(json.dumps(b))


if __name__ == "__main__":
  flags.DEFINE_string("profile_dir", None, "A TF profiler log directory.")
  flags.DEFINE_integer("steps", 1, "Steps the profile holds (the figures are per step).")
  flags.DEFINE_bool("json", False, "Print a JSON summary as the last line.")
  flags.mark_flag_as_required("profile_dir")
  FLAGS = flags.FLAGS
  app.run(main)
