"""The `tf.data` input pipeline: training and validation windows.

A window is `seq_length + 1` consecutive ids; the input is its first
`seq_length` ids and the target the same ids shifted by one. Windows start
`seq_length` apart, so consecutive windows share one id and every transition
in the used range is a target exactly once.

Each epoch starts the windows at a different offset in [0, seq_length), drawn
from the seed and the epoch number, so window boundaries move between epochs.
Every epoch is cut to a whole number of global batches and shuffled with a
seeded stateless shuffle, so the batch sequence depends only on the seed and
never on the number of replicas or workers that consume it.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def split_train_validation(ids: np.ndarray, validation_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Splits `ids` into training and validation parts; validation is the end of the text."""
    num_validation = int(round(len(ids) * validation_fraction))
    return ids[:len(ids) - num_validation], ids[len(ids) - num_validation:]


def windows_per_epoch(num_ids: int, seq_length: int) -> int:
    """Returns the fewest windows an epoch can have, over all start offsets.

    With offset `o`, the windows need `o + n * seq_length + 1 <= num_ids`. The
    largest offset is `seq_length - 1`.
    """
    return max(0, (num_ids - seq_length) // seq_length)


def steps_per_epoch(num_ids: int, seq_length: int, global_batch_size: int) -> int:
    return windows_per_epoch(num_ids, seq_length) // global_batch_size


def epoch_window_starts(num_ids: int, seq_length: int, global_batch_size: int,
                        seed: int, epoch: tf.Tensor) -> tf.Tensor:
    """Returns the shuffled window start positions of one epoch, [steps * global_batch].

    The count is the same for every epoch (the minimum over offsets), cut to
    whole global batches.
    """
    epoch = tf.cast(epoch, tf.int64)
    epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch])
    offset = tf.random.stateless_uniform([], seed=epoch_seed, minval=0, maxval=seq_length,
                                         dtype=tf.int64)
    count = steps_per_epoch(num_ids, seq_length, global_batch_size) * global_batch_size
    starts = offset + tf.range(count, dtype=tf.int64) * seq_length
    return tf.random.experimental.stateless_shuffle(starts, seed=epoch_seed + [0, 1 << 31])


def make_train_dataset(ids: np.ndarray, seq_length: int, global_batch_size: int, seed: int,
                       input_context: tf.distribute.InputContext | None = None,
                       start_step: int = 0) -> tf.data.Dataset:
    """Builds the infinite training dataset of (inputs, targets) per-replica batches.

    Each global batch is a contiguous slice of an epoch's shuffled windows.
    Input pipeline `p` of `P` takes columns `[p * B / P, (p + 1) * B / P)` of
    every global batch `B`, so pipelines read disjoint data that together
    covers the epoch; then its per-replica batches go to its replicas in turn.

    Args:
      ids: int32 ids of the training text.
      seq_length: characters per input sequence.
      global_batch_size: sequences per step over all replicas.
      seed: shuffling seed.
      input_context: from `distribute_datasets_from_function`; None for one replica.
      start_step: global step to start from, so a resumed run reads the
        batches an uninterrupted run would have read next.

    Returns:
      A dataset of `(inputs, targets)`, each int32 `[per_replica_batch, seq_length]`.
    """
    num_pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    per_replica = (input_context.get_per_replica_batch_size(global_batch_size)
                   if input_context else global_batch_size)
    per_pipeline = global_batch_size // num_pipelines
    ids_tensor = tf.constant(ids, tf.int32)
    num_ids = len(ids)
    steps = steps_per_epoch(num_ids, seq_length, global_batch_size)

    def epoch_windows(epoch):
        starts = epoch_window_starts(num_ids, seq_length, global_batch_size, seed, epoch)
        starts = tf.reshape(starts, [steps, global_batch_size])
        starts = starts[:, pipeline_id * per_pipeline:(pipeline_id + 1) * per_pipeline]
        return tf.data.Dataset.from_tensor_slices(tf.reshape(starts, [-1]))

    def window(start):
        # The slice bounds are tensors, so the static length is set here,
        # because XLA and TPUs need static shapes.
        chunk = tf.ensure_shape(ids_tensor[start:start + seq_length + 1], [seq_length + 1])
        return chunk[:-1], chunk[1:]

    start_epoch, step_in_epoch = divmod(start_step, steps)
    dataset = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max)
    dataset = dataset.flat_map(epoch_windows)
    dataset = dataset.skip(step_in_epoch * per_pipeline)
    dataset = dataset.map(window, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(per_replica, drop_remainder=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


def make_validation_dataset(ids: np.ndarray, seq_length: int, global_batch_size: int,
                            input_context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """Builds one pass over the validation windows, in order, with no offset.

    The last batch may be partial: evaluation sums losses and counts characters
    instead of averaging per batch, so partial and empty batches are exact.
    """
    num_pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    per_replica = (input_context.get_per_replica_batch_size(global_batch_size)
                   if input_context else global_batch_size)
    count = windows_per_epoch(len(ids) + seq_length - 1, seq_length)  # offset 0 fits one more
    starts = np.arange(count, dtype=np.int64) * seq_length
    windows = np.stack([ids[s:s + seq_length + 1] for s in starts]) if count else np.zeros(
        [0, seq_length + 1], np.int32)
    dataset = tf.data.Dataset.from_tensor_slices(windows)
    dataset = dataset.shard(num_pipelines, pipeline_id)
    dataset = dataset.map(lambda w: (w[:-1], w[1:]))
    return dataset.batch(per_replica).prefetch(tf.data.AUTOTUNE)
