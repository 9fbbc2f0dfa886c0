"""Specification of trainer.sampling: the hash uniforms and the per-row sampler."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from trainer.sampling import hash_uniform, sample_ids, step_seeds

# 64 rows x 4096 uniforms = 262,144 draws. The mean of n uniforms has
# standard deviation sqrt(1 / (12 n)) ~= 5.6e-4 and the variance estimate
# about 2.2e-4, so these tolerances are about 5 standard deviations.
MEAN_ATOL = 3e-3
VARIANCE_ATOL = 1.2e-3
# The correlation of 262,144 independent pairs has standard deviation ~2e-3.
CORRELATION_ATOL = 1e-2
# 20,000 draws of a category with probability p have standard deviation
# sqrt(p (1 - p) / 20000) <= 3.6e-3.
FREQUENCY_ATOL = 1.5e-2


def random_seeds(batch_size: int, generator_seed: int = 0) -> tf.Tensor:
    rng = np.random.default_rng(generator_seed)
    return tf.constant(rng.integers(-2**31, 2**31 - 1, size=[batch_size, 2]), tf.int32)


def test_hash_uniform_mean_and_variance():
    values = hash_uniform(random_seeds(64), 4096).numpy()
    assert abs(values.mean() - 0.5) < MEAN_ATOL
    assert abs(values.var() - 1 / 12) < VARIANCE_ATOL


def test_hash_uniform_strictly_inside_unit_interval():
    values = hash_uniform(random_seeds(256), 1000).numpy()
    assert values.min() > 0.0
    assert values.max() < 1.0


def test_hash_uniform_bins_are_even():
    values = hash_uniform(random_seeds(64), 4096).numpy().ravel()
    counts, _ = np.histogram(values, bins=16, range=(0.0, 1.0))
    expected = values.size / 16
    # Each bin count has standard deviation sqrt(expected * 15 / 16) ~= 124.
    np.testing.assert_allclose(counts, expected, atol=700)


def test_hash_uniform_next_step_uncorrelated():
    seeds = random_seeds(64)
    now = hash_uniform(step_seeds(seeds, 0), 4096).numpy().ravel()
    later = hash_uniform(step_seeds(seeds, 1), 4096).numpy().ravel()
    assert abs(np.corrcoef(now, later)[0, 1]) < CORRELATION_ATOL


def test_hash_uniform_neighbouring_indices_uncorrelated():
    values = hash_uniform(random_seeds(64), 4097).numpy()
    assert abs(np.corrcoef(values[:, :-1].ravel(), values[:, 1:].ravel())[0, 1]) < CORRELATION_ATOL


def test_hash_uniform_first_seed_word_matters():
    first = hash_uniform(tf.constant([[1, 7]], tf.int32), 4096).numpy().ravel()
    second = hash_uniform(tf.constant([[2, 7]], tf.int32), 4096).numpy().ravel()
    assert abs(np.corrcoef(first, second)[0, 1]) < 0.1  # 4096 pairs: standard deviation ~0.016


def test_hash_uniform_row_independent_of_batch():
    seeds = random_seeds(17)
    batch = hash_uniform(seeds, 77).numpy()
    for row in (0, 8, 16):
        alone = hash_uniform(seeds[row:row + 1], 77).numpy()
        np.testing.assert_array_equal(batch[row], alone[0])


def test_hash_uniform_identical_under_xla():
    seeds = random_seeds(64)
    compiled = tf.function(lambda s: hash_uniform(s, 77), jit_compile=True)(seeds)
    np.testing.assert_array_equal(compiled.numpy(), hash_uniform(seeds, 77).numpy())


def test_sample_ids_follows_softmax():
    probabilities = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
    batch_size = 20000
    logits = tf.tile(tf.math.log(probabilities)[None], [batch_size, 1])
    ids = sample_ids(logits, tf.ones([batch_size]), random_seeds(batch_size, 5)).numpy()
    frequencies = np.bincount(ids, minlength=4) / batch_size
    np.testing.assert_allclose(frequencies, probabilities, atol=FREQUENCY_ATOL)


def test_sample_ids_temperature_zero_is_argmax():
    logits = tf.random.stateless_normal([32, 77], seed=[1, 2])
    ids = sample_ids(logits, tf.zeros([32]), random_seeds(32), tf.fill([32], 5))
    np.testing.assert_array_equal(ids.numpy(), tf.argmax(logits, axis=1).numpy())


def test_sample_ids_row_independent_of_batch():
    logits = tf.random.stateless_normal([40, 77], seed=[3, 4])
    seeds = random_seeds(40)
    temperature = tf.fill([40], 1.5)
    top_k = tf.constant([0, 3] * 20, tf.int32)
    batch = sample_ids(logits, temperature, seeds, top_k).numpy()
    for row in (0, 1, 39):
        alone = sample_ids(logits[row:row + 1], temperature[row:row + 1], seeds[row:row + 1],
                           top_k[row:row + 1]).numpy()
        assert batch[row] == alone[0], f"row {row}"


@pytest.mark.parametrize("k", [1, 3, 10])
def test_sample_ids_stays_in_top_k(k):
    batch_size = 2000
    logits = tf.random.stateless_normal([batch_size, 77], seed=[5, 6])
    # A high temperature flattens the distribution, so without the cut
    # most draws would fall outside the top k.
    ids = sample_ids(logits, tf.fill([batch_size], 10.0), random_seeds(batch_size),
                     tf.fill([batch_size], k)).numpy()
    _, top = tf.math.top_k(logits, k=k)
    assert all(ids[row] in top.numpy()[row] for row in range(batch_size))


def test_sample_ids_mixed_top_k_rows():
    batch_size = 2000
    logits = tf.random.stateless_normal([batch_size, 77], seed=[7, 8])
    top_k = tf.constant([0, 2] * (batch_size // 2), tf.int32)
    ids = sample_ids(logits, tf.fill([batch_size], 10.0), random_seeds(batch_size), top_k).numpy()
    _, top = tf.math.top_k(logits, k=2)
    in_top_two = np.array([ids[row] in top.numpy()[row] for row in range(batch_size)])
    assert in_top_two[1::2].all()
    # Rows with top_k 0 keep all 77 logits: at temperature 10 most draws fall outside the top 2.
    assert in_top_two[0::2].mean() < 0.5
