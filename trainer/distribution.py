"""Choosing the `tf.distribute` strategy and the mixed-precision policy."""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
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


def _read_tf_config() -> dict:
    try:
        config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON: {error}.") from error
    if not isinstance(config, dict):
        raise ValueError(f"TF_CONFIG must be a JSON object, got {config!r}.")
    return config


def _tf_config_workers() -> int:
    cluster = _read_tf_config().get("cluster", {})
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def check_tf_config() -> None:
    """Checks that TF_CONFIG's task names an entry of its cluster.

    MultiWorkerMirroredStrategy would otherwise wait for workers that never
    come, or fail with a gRPC error that does not name TF_CONFIG.

    Raises:
      ValueError: naming the task and the cluster.
    """
    config = _read_tf_config()
    cluster = config.get("cluster", {})
    if not cluster:
        return
    task = config.get("task", {})
    task_type, task_index = task.get("type"), task.get("index", 0)
    if task_type not in ("chief", "worker"):
        raise ValueError(
            f"TF_CONFIG task type {task_type!r} is not 'chief' or 'worker'. Set "
            '"task": {"type": "worker", "index": N} with N this machine\'s position in '
            '"cluster"."worker".')
    addresses = cluster.get(task_type, [])
    if not isinstance(task_index, int) or not 0 <= task_index < len(addresses):
        raise ValueError(
            f"TF_CONFIG task index {task_index!r} is out of range: cluster.{task_type} lists "
            f"{len(addresses)} addresses {addresses!r}. Use an index from 0 to "
            f"{len(addresses) - 1}.")


def describe_cluster(strategy: tf.distribute.Strategy) -> str:
    """Returns a one-line description of this task's place in the cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    workers = len(spec.get("worker", [])) + len(spec.get("chief", []))
    if not workers:
        return (f"single machine, {strategy.num_replicas_in_sync} replicas in sync "
                f"({type(strategy).__name__})")
    return (f"task {resolver.task_type}:{resolver.task_id} of {workers} workers, "
            f"{strategy.num_replicas_in_sync} replicas in sync over all workers, chief: "
            f"{'yes' if is_chief(strategy) else 'no'}")


def create_strategy(name: str, cpu_replicas: int = 1, tpu: str = "") -> tf.distribute.Strategy:
    """Creates the strategy named by --strategy.

    `auto` picks MultiWorkerMirroredStrategy when TF_CONFIG lists more than
    one worker, MirroredStrategy when there are several GPUs or
    `cpu_replicas > 1`, and OneDeviceStrategy otherwise.
    """
    # Physical, not logical, devices: listing logical devices initializes the
    # TensorFlow runtime, and MultiWorkerMirroredStrategy must be created
    # before that ("Collective ops must be configured at program startup").
    gpus = tf.config.list_physical_devices("GPU")
    if name == "auto":
        if _tf_config_workers() > 1:
            name = "multi_worker"
        elif len(gpus) > 1 or cpu_replicas > 1:
            name = "mirrored"
        else:
            name = "one_device"
    if name == "multi_worker":
        # Reads the cluster from TF_CONFIG; collectives use gRPC on CPU and NCCL on GPU.
        # Without a cluster in TF_CONFIG it runs as a one-worker cluster.
        check_tf_config()
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
    logging.info("Strategy %s: %s.", type(strategy).__name__, describe_cluster(strategy))
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


def _to_16_bit_chunks(value: int, count: int) -> list[float]:
    # 16-bit pieces are exact in float32, which every collective backend
    # (gRPC rings on CPU, NCCL on GPU) all-gathers.
    return [float((value >> (16 * i)) & 0xFFFF) for i in range(count)]


def _gather_from_workers(strategy: tf.distribute.Strategy,
                         chunks: list[float]) -> Optional[tuple[np.ndarray, int]]:
    """All-gathers `chunks` from every replica of a multi-worker cluster.

    Returns:
      (rows as int64 [replicas, len(chunks)], replicas per worker), or None
      without a multi-worker cluster.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    workers = len(spec.get("worker", [])) + len(spec.get("chief", []))
    if workers < 2:
        return None
    local = tf.constant([chunks], tf.float32)  # [1, len(chunks)]

    @tf.function
    def gather():
        def replica_fn():
            return tf.distribute.get_replica_context().all_gather(local, axis=0)  # [replicas, n]
        return strategy.run(replica_fn)

    rows = strategy.experimental_local_results(gather())[0].numpy().astype(np.int64)
    return rows, max(1, strategy.num_replicas_in_sync // workers)


def check_same_vocabulary(strategy: tf.distribute.Strategy, fingerprint: str) -> None:
    """Checks that every worker built the same vocabulary; a no-op on one machine.

    Each worker reads the corpus and builds the vocabulary itself. Workers
    that read different text would otherwise train on mismatched ids, or hang
    when their variables differ in shape. Costs one small all-gather, and has
    to run before the model's variables are created.

    Args:
      strategy: the training strategy.
      fingerprint: hex digest that identifies the vocabulary.

    Raises:
      ValueError: naming the first worker that differs from worker 0.
    """
    gathered = _gather_from_workers(strategy, _to_16_bit_chunks(int(fingerprint[:32], 16), 8))
    if gathered is None:
        return
    rows, replicas_per_worker = gathered
    for replica, row in enumerate(rows):
        if (row != rows[0]).any():
            raise ValueError(
                f"Worker {replica // replicas_per_worker} built a different vocabulary from "
                "worker 0, so the workers read different training text. Give every worker the "
                "same --text_files (or --tfds_name), --encoding, --min_char_count and "
                "--validation_fraction.")


def check_same_step(strategy: tf.distribute.Strategy, step: int) -> None:
    """Checks that every worker restored the same global step; a no-op on one machine.

    Every worker restores from the model directory itself. If only the chief
    can read it (a local disk on another machine), the others would start from
    fresh weights while the chief resumes.

    Raises:
      ValueError: naming the steps and what --model_dir must be.
    """
    gathered = _gather_from_workers(strategy, _to_16_bit_chunks(step, 4))
    if gathered is None:
        return
    rows, replicas_per_worker = gathered
    steps = [sum(int(value) << (16 * i) for i, value in enumerate(row)) for row in rows]
    for replica, worker_step in enumerate(steps):
        if worker_step != steps[0]:
            raise ValueError(
                f"Worker {replica // replicas_per_worker} restored step {worker_step} but worker 0 "
                f"restored step {steps[0]}, so the workers see different checkpoints. "
                "--model_dir must be storage that every worker reads, such as gs:// or a "
                "shared file system.")
