"""The tf.distribute strategy of a run: one device, mirrored, multi-worker or TPU.

`build_strategy(name, num_cpu_replicas, tpu, tpu_zone, gcp_project)` (run.py's `--strategy`,
`--num_cpu_replicas`, `--tpu`, `--tpu_zone`, `--gcp_project`):

- `auto`: TPU if `tpu` is given; MultiWorkerMirrored if TF_CONFIG names several tasks;
  Mirrored if there are several GPUs or `num_cpu_replicas` > 1; else one device.
- `one_device`: the first GPU, else the CPU.
- `mirrored`: all local GPUs, or `num_cpu_replicas` logical CPU devices, or the CPU.
- `multi_worker`: MultiWorkerMirroredStrategy from TF_CONFIG (one replica per worker on CPU
  hosts, each worker's GPUs otherwise).
- `tpu`: TPUStrategy on the TPU named by `tpu` (or the local TPU VM when it is empty).

Problems are ValueErrors with one line (run.py turns them into usage errors).
See docs/DISTRIBUTED.md.
"""

import json
import os

import tensorflow as tf

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")


def split_cpu(num_replicas: int):
  """Splits the host CPU into `num_replicas` logical devices (must run before any TF op).

  This lets MirroredStrategy run several replicas without accelerators: the test suite and
  users without GPUs can check multi-replica behaviour (global negatives, synchronized BN).
  """
  cpus = tf.config.list_physical_devices("CPU")
  try:
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_replicas)
  except RuntimeError as e:
    existing = len(tf.config.list_logical_devices("CPU"))
    if existing != num_replicas:
      raise RuntimeError(f"cannot split the CPU into {num_replicas} devices after TensorFlow "
                         f"started ({existing} exist already): {e}") from None


def tf_config() -> dict:
  """The parsed TF_CONFIG environment variable ({} when unset)."""
  raw = os.environ.get("TF_CONFIG", "") or "{}"
  try:
    config = json.loads(raw)
  except json.JSONDecodeError as e:
    raise ValueError(f"TF_CONFIG is not valid JSON ({e}): {raw[:200]}") from None
  if not isinstance(config, dict):
    raise ValueError(f"TF_CONFIG must be a JSON object, got: {raw[:200]}")
  return config


def _tf_config_workers() -> int:
  """Number of training tasks (chief + workers) TF_CONFIG names."""
  cluster = tf_config().get("cluster", {})
  return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def build_strategy(name="auto", num_cpu_replicas=0, tpu=None, tpu_zone=None, gcp_project=None):
  """Builds the strategy (see the module docstring); must run before any other TF op when
  `num_cpu_replicas` > 1."""
  if name not in STRATEGIES:
    raise ValueError(f"--strategy={name!r} is not one of {STRATEGIES}")
  if num_cpu_replicas < 0:
    raise ValueError(f"--num_cpu_replicas must be >= 0, got {num_cpu_replicas}")
  if name == "auto":
    if tpu:
      name = "tpu"
    elif _tf_config_workers() > 1:
      name = "multi_worker"
    elif num_cpu_replicas > 1 or len(tf.config.list_physical_devices("GPU")) > 1:
      name = "mirrored"
    else:
      name = "one_device"
  if num_cpu_replicas > 1 and name != "mirrored":
    # Splitting the CPU only makes sense for MirroredStrategy on one host: multi-worker runs
    # one replica per CPU worker, and a TPU or one device has its own devices.
    raise ValueError(f"--num_cpu_replicas={num_cpu_replicas} needs --strategy=mirrored "
                     f"(or auto without --tpu and TF_CONFIG), not --strategy={name}")
  if name == "tpu":
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu=tpu or "", zone=tpu_zone, project=gcp_project)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)
  if name == "multi_worker":
    config = tf_config()
    if not config.get("cluster") or "task" not in config:
      raise ValueError("--strategy=multi_worker needs TF_CONFIG with a cluster and this task, "
                       "e.g. {\"cluster\": {\"worker\": [\"host1:12345\", \"host2:12345\"]}, "
                       "\"task\": {\"type\": \"worker\", \"index\": 0}} (see docs/DISTRIBUTED.md)")
    # Constructing it blocks until every worker of TF_CONFIG is up.
    return tf.distribute.MultiWorkerMirroredStrategy()
  if num_cpu_replicas > 1:
    split_cpu(num_cpu_replicas)
    return tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(num_cpu_replicas)],
        cross_device_ops=tf.distribute.ReductionToOneDevice())
  if name == "mirrored":
    return tf.distribute.MirroredStrategy()
  gpus = tf.config.list_logical_devices("GPU")
  return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")


def is_chief(strategy) -> bool:
  """Only the chief writes summaries, checkpoints, results and exports.

  The chief is the `chief` task if TF_CONFIG has one, else worker 0; every other strategy
  runs in one process, which is the chief.
  """
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return True
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or resolver.task_type is None:
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  if task_type == "chief":
    return True
  has_chief = bool(resolver.cluster_spec().as_dict().get("chief"))
  return task_type == "worker" and task_id == 0 and not has_chief
