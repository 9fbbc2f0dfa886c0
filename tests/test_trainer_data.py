"""The tf.data pipeline: windows, per-epoch offsets, shuffling, batching, resume."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf

from trainer import data

SEQ = 5
BATCH = 4
# ids[i] == i, so a window's values are its positions in the text.
NUM_IDS = 123
IDS = np.arange(NUM_IDS, dtype=np.int32)
STEPS = data.steps_per_epoch(NUM_IDS, SEQ, BATCH)


def take_batches(dataset: tf.data.Dataset, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy(), y.numpy()) for x, y in dataset.take(count)]


def epoch_batches(epoch: int, seed: int = 7) -> list[tuple[np.ndarray, np.ndarray]]:
    dataset = data.make_train_dataset(IDS, SEQ, BATCH, seed, start_step=epoch * STEPS)
    return take_batches(dataset, STEPS)


def test_steps_per_epoch_counts_whole_batches():
    # The largest offset, SEQ - 1, leaves 119 ids: 23 windows of 5 + 1 ids, 5 batches of 4.
    assert data.windows_per_epoch(NUM_IDS, SEQ) == 23
    assert STEPS == 5


def test_target_is_input_shifted_by_one():
    for inputs, targets in epoch_batches(0):
        assert inputs.shape == (BATCH, SEQ)
        assert targets.shape == (BATCH, SEQ)
        np.testing.assert_array_equal(targets, inputs + 1)


def test_windows_are_contiguous_text():
    for inputs, _ in epoch_batches(0):
        np.testing.assert_array_equal(np.diff(inputs, axis=1), np.ones([BATCH, SEQ - 1]))


def test_offset_changes_across_epochs():
    # The offset of an epoch is its smallest window start modulo SEQ.
    offsets = set()
    for epoch in range(6):
        starts = np.concatenate([inputs[:, 0] for inputs, _ in epoch_batches(epoch)])
        residues = set(starts % SEQ)
        assert len(residues) == 1, f"epoch {epoch} mixes offsets {residues}"
        offsets.add(residues.pop())
    assert len(offsets) >= 2


def test_every_transition_is_a_target_once():
    for epoch in range(3):
        batches = epoch_batches(epoch)
        pairs = collections.Counter()
        for inputs, targets in batches:
            pairs.update(zip(inputs.ravel().tolist(), targets.ravel().tolist()))
        starts = [a for a, _ in pairs]
        first, last = min(starts), max(starts)
        expected = {(i, i + 1) for i in range(first, last + 1)}
        assert set(pairs) == expected, f"epoch {epoch} skips transitions"
        assert set(pairs.values()) == {1}, f"epoch {epoch} repeats transitions"
        assert len(pairs) == STEPS * BATCH * SEQ


def test_shuffle_depends_on_seed():
    same = epoch_batches(0, seed=3)
    again = epoch_batches(0, seed=3)
    other = epoch_batches(0, seed=4)
    for (a, _), (b, _) in zip(same, again):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for (a, _), (b, _) in zip(same, other))


def test_windows_are_shuffled():
    starts = np.concatenate([inputs[:, 0] for inputs, _ in epoch_batches(0)])
    assert not np.all(np.diff(starts) > 0), "window starts are in text order"


def test_batches_have_fixed_shape():
    dataset = data.make_train_dataset(IDS, SEQ, BATCH, seed=1)
    assert dataset.element_spec[0].shape.as_list() == [BATCH, SEQ]
    assert dataset.element_spec[1].shape.as_list() == [BATCH, SEQ]


def test_dataset_repeats_past_one_epoch():
    batches = take_batches(data.make_train_dataset(IDS, SEQ, BATCH, seed=1), 3 * STEPS)
    assert len(batches) == 3 * STEPS


def test_start_step_continues_sequence():
    full = take_batches(data.make_train_dataset(IDS, SEQ, BATCH, seed=5), 2 * STEPS)
    for start in (2, STEPS, STEPS + 3):
        resumed = take_batches(data.make_train_dataset(IDS, SEQ, BATCH, seed=5, start_step=start), 2)
        for (expected, _), (got, _) in zip(full[start:start + 2], resumed):
            np.testing.assert_array_equal(got, expected)


def test_dataset_is_prefetched():
    dataset = data.make_train_dataset(IDS, SEQ, BATCH, seed=1)
    assert "Prefetch" in type(dataset).__name__


def test_split_takes_validation_from_end():
    train, validation = data.split_train_validation(IDS, 0.1)
    assert len(validation) == 12
    np.testing.assert_array_equal(np.concatenate([train, validation]), IDS)
    np.testing.assert_array_equal(validation, IDS[-12:])


def test_validation_covers_split_in_order():
    validation_ids = np.arange(40, dtype=np.int32)
    batches = take_batches(data.make_validation_dataset(validation_ids, SEQ, BATCH), 100)
    inputs = np.concatenate([x for x, _ in batches])
    targets = np.concatenate([y for _, y in batches])
    # 40 ids hold 7 windows of 5 + 1 at offset 0; the last batch is partial.
    assert inputs.shape == (7, SEQ)
    np.testing.assert_array_equal(inputs[:, 0], np.arange(7) * SEQ)
    np.testing.assert_array_equal(targets, inputs + 1)


@pytest.mark.parametrize("num_ids", [0, SEQ, SEQ * 2 - 1])
def test_too_short_text_has_no_steps(num_ids):
    assert data.steps_per_epoch(num_ids, SEQ, 1) == 0
