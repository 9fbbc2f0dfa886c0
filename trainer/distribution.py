"""Choosing the `tf.distribute` strategy and the mixed-precision policy."""

from __future__ import annotations

import json
import os

import tensorflow as tf
from absl import logging

STRATEGIES = ("auto", "mirrored", "one_device", "multi_worker", "tpu")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")


def configure_cpu_replicas(num_replicas: int) -> None:
    """Splits the host CPU into `num_replicas` logical devices.

    This lets MirroredStrategy run several replicas on a machine without a
    GPU. It must run before TensorFlow initializes its devices.
    """
    if num_replicas <= 1:
        return
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_replicas)
    except RuntimeError as error:
        existing = len(tf.config.list_logical_devices("CPU"))
        if existing != num_replicas:
            raise RuntimeError(
                f"--cpu_replicas={num_replicas} cannot be applied: TensorFlow already "
                f"initialized {existing} logical CPU devices in this process.") from error


def _tf_config_workers() -> int:
    try:
        config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON: {error}.") from error
    return len(config.get("cluster", {}).get("worker", [])) + len(config.get("cluster", {}).get("chief", []))


def create_strategy(name: str, cpu_replicas: int = 1, tpu: str = "") -> tf.distribute.Strategy:
    """Creates the strategy named by --strategy.

    `auto` picks MultiWorkerMirroredStrategy when TF_CONFIG lists more than
    one worker, MirroredStrategy when there are several GPUs or
    `cpu_replicas > 1`, and OneDeviceStrategy otherwise.
    """
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        if _tf_config_workers() > 1:
            name = "multi_worker"
        elif len(gpus) > 1 or cpu_replicas > 1:
            name = "mirrored"
        else:
            name = "one_device"
    if name == "multi_worker":
        # Reads the cluster from TF_CONFIG; collectives use gRPC on CPU and NCCL on GPU.
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif name == "mirrored":
        if gpus:
            strategy = tf.distribute.MirroredStrategy()
        else:
            devices = [device.name for device in tf.config.list_logical_devices("CPU")]
            strategy = tf.distribute.MirroredStrategy(
                devices=devices,
                cross_device_ops=tf.distribute.ReductionToOneDevice(reduce_to_device=devices[0]))
    elif name == "one_device":
        strategy = tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    elif name == "tpu":
        # NOTE: wired as TensorFlow documents it but never run in this project's
        # tests, because no TPU is available to them.
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        strategy = tf.distribute.TPUStrategy(resolver)
    else:
        raise ValueError(f"--strategy={name!r} is not one of {', '.join(STRATEGIES)}.")
    logging.info("Strategy %s with %d replicas in sync.", type(strategy).__name__,
                 strategy.num_replicas_in_sync)
    return strategy


def _cpu_supports_bfloat16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str) -> str:
    """Turns `auto` into a concrete policy name for this machine's hardware.

    GPUs with compute capability 8.0 or newer get mixed_bfloat16 (no loss
    scaling needed), older GPUs from 7.0 mixed_float16; CPUs with AMX or
    AVX-512 bfloat16 instructions get mixed_bfloat16; everything else float32.
    """
    if precision != "auto":
        return precision
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        capability = details.get("compute_capability", (0, 0))
        if capability >= (8, 0):
            chosen, reason = "mixed_bfloat16", f"GPU compute capability {capability}"
        elif capability >= (7, 0):
            chosen, reason = "mixed_float16", f"GPU compute capability {capability}"
        else:
            chosen, reason = "float32", f"GPU compute capability {capability} has no fast 16-bit math"
    elif _cpu_supports_bfloat16():
        chosen, reason = "mixed_bfloat16", "CPU has AMX or AVX-512 bfloat16 instructions"
    else:
        chosen, reason = "float32", "CPU has no bfloat16 instructions"
    logging.info("--precision=auto chose %s: %s.", chosen, reason)
    return chosen


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the worker that writes checkpoints, summaries and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (task_type == "worker" and task_id == 0
                                    and "chief" not in resolver.cluster_spec().as_dict())
