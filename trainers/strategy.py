"""A `--strategy` string to a `tf.distribute.Strategy`, as a plain if-chain.

`auto` picks from what the process can see: a TPU when `--tpu` is given,
MultiWorkerMirrored when TF_CONFIG names more than one worker, Mirrored for
several GPUs, else the default strategy. A name that does not fit the machine
fails loudly; nothing silently falls back to the CPU.
"""

from __future__ import annotations

import json
import os
import threading

import tensorflow as tf

from trainers.config import UserError


def tf_config_workers(environ=os.environ) -> int:
  """Number of chief + worker tasks TF_CONFIG names (0 when unset)."""
  text = environ.get("TF_CONFIG")
  if not text:
    return 0
  try:
    cluster = json.loads(text).get("cluster", {})
  except (ValueError, AttributeError) as error:
    raise UserError(f"TF_CONFIG is not valid JSON: {error}") from error
  return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def resolve_auto(tpu: str | None, num_workers: int, num_gpus: int) -> str:
  """The strategy name `auto` means for these facts."""
  if tpu:
    return "tpu"
  if num_workers > 1:
    return "multi_worker"
  if num_gpus > 1:
    return "mirrored"
  return "default"


def split_cpu(num_devices: int) -> None:
  """Makes `num_devices` logical CPUs; must run before TF initialises."""
  cpu = tf.config.list_physical_devices("CPU")[0]
  tf.config.set_logical_device_configuration(
      cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)


def connect_tpu(tpu: str, timeout: float):
  """Resolves, connects to and initialises the TPU, or fails naming it.

  The connect call blocks forever on an address that accepts TCP but is not a
  TPU, so it runs in a daemon thread that we stop waiting for after `timeout`.
  """
  outcome = {}

  def connect():
    try:
      # Resolve (a name goes through the Cloud TPU API), connect (a no-op for
      # "local"), initialise the TPU system.
      outcome["resolver"] = (
          tf.distribute.cluster_resolver.TPUClusterResolver.connect(tpu=tpu))
    except Exception as error:  # Resolver, gRPC and TPU init raise many types.
      outcome["error"] = error

  thread = threading.Thread(target=connect, daemon=True, name="connect_tpu")
  thread.start()
  thread.join(timeout)
  if thread.is_alive():
    raise UserError(f"--tpu={tpu}: no answer within {timeout:.0f} s")
  if "error" in outcome:
    first_line = (str(outcome["error"]).strip().splitlines() or [""])[0]
    raise UserError(f"--tpu={tpu}: {type(outcome['error']).__name__}: "
                    f"{first_line}")
  return outcome["resolver"]


def make_strategy(name: str, tpu: str | None = None, tpu_timeout: float = 60.0,
                  num_cpu_devices: int = 0) -> tf.distribute.Strategy:
  """The strategy for `name` (see module docstring for `auto`)."""
  if num_cpu_devices > 1:
    split_cpu(num_cpu_devices)
  # Physical, not logical: listing logical devices initialises TF, after
  # which MultiWorkerMirroredStrategy can no longer configure collectives.
  gpus = tf.config.list_physical_devices("GPU")
  if name == "auto":
    name = resolve_auto(tpu, tf_config_workers(), len(gpus))
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "one_device":
    return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
  if name == "mirrored":
    devices = (tf.config.list_logical_devices("GPU") or
               tf.config.list_logical_devices("CPU"))
    return tf.distribute.MirroredStrategy([device.name for device in devices])
  if name == "multi_worker":
    if tf_config_workers() < 1:
      raise UserError("--strategy=multi_worker needs TF_CONFIG naming the "
                      "cluster and this task")
    return tf.distribute.MultiWorkerMirroredStrategy()
  if name == "tpu":
    if not tpu:
      raise UserError("--strategy=tpu needs --tpu=NAME (or --tpu=local)")
    return tf.distribute.TPUStrategy(connect_tpu(tpu, tpu_timeout))
  raise UserError(f"unknown --strategy={name}")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this task writes checkpoints, summaries, metrics and the export."""
  resolver = getattr(strategy, "cluster_resolver", None)
  task_type = getattr(resolver, "task_type", None)
  task_id = getattr(resolver, "task_id", 0) or 0
  if task_type in (None, "chief"):
    return True
  has_chief = "chief" in resolver.cluster_spec().as_dict()
  return task_type == "worker" and task_id == 0 and not has_chief


def task_id(strategy: tf.distribute.Strategy) -> int:
  resolver = getattr(strategy, "cluster_resolver", None)
  return getattr(resolver, "task_id", 0) or 0
