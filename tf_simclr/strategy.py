"""The tf.distribute strategy of a run: one device, mirrored, multi-worker or TPU."""

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


def _tf_config_workers() -> int:
  config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
  cluster = config.get("cluster", {})
  return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def build_strategy(name="auto", num_cpu_replicas=0, tpu=None, tpu_zone=None, gcp_project=None):
  """Builds the strategy. `auto`: TPU if `tpu` is given, multi-worker if TF_CONFIG names
  several workers, mirrored over several GPUs or `num_cpu_replicas` > 1 CPUs, else one device."""
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
  if name == "tpu":
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu=tpu, zone=tpu_zone, project=gcp_project)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)
  if num_cpu_replicas > 1:
    split_cpu(num_cpu_replicas)
  if name == "multi_worker":
    # One replica per worker on CPU hosts; the GPUs of each worker otherwise.
    return tf.distribute.MultiWorkerMirroredStrategy()
  gpus = tf.config.list_logical_devices("GPU")
  if name == "mirrored":
    if num_cpu_replicas > 1:
      return tf.distribute.MirroredStrategy(
          [f"/cpu:{i}" for i in range(num_cpu_replicas)],
          cross_device_ops=tf.distribute.ReductionToOneDevice())
    return tf.distribute.MirroredStrategy()
  return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")


def is_chief(strategy) -> bool:
  """Only the chief writes summaries, checkpoints and exports in a multi-worker run."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  return task_type is None or task_type == "chief" or (task_type == "worker" and task_id == 0)
