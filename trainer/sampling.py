"""Sampling the next character from logits, shared by the trainer and the export.

Every row of a batch draws its randomness from its own seed, so a row's
result does not depend on which other rows share its batch. The noise is
Gumbel noise, and `argmax(logits / T + Gumbel)` is a sample from
`softmax(logits / T)`. The uniforms under the Gumbel noise come from an
integer hash of (row seed, vocabulary index), computed for the whole batch at
once; see `hash_uniform`.
"""

from __future__ import annotations

import tensorflow as tf

from trainer.model import CharLSTM
from trainer.vocabulary import Vocabulary

# Odd multipliers of a two-multiply xor-shift finalizer in the style of
# MurmurHash3's fmix32. Each step is a bijection on uint32.
_MIX_MULTIPLIER_1 = 0x7FEB352D
_MIX_MULTIPLIER_2 = 0x846CA68B
# Distinct odd constants (the 32-bit golden ratio and MurmurHash3's fmix32
# multipliers) that keep the seed words and the index from cancelling out.
_GOLDEN_RATIO_32 = 0x9E3779B9
_SEED_SALT = 0x85EBCA6B
_INDEX_SALT = 0xC2B2AE35
# A uniform takes the hash's top 24 bits, the float32 significand.
_UNIFORM_BITS = 24


def _mix32(x: tf.Tensor) -> tf.Tensor:
    """Scrambles uint32 values with a bijective finalizer (xor-shift, multiply, xor-shift, ...)."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = x * tf.constant(_MIX_MULTIPLIER_1, tf.uint32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))
    x = x * tf.constant(_MIX_MULTIPLIER_2, tf.uint32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def hash_uniform(seeds: tf.Tensor, size) -> tf.Tensor:
    """Returns float32 [batch, size] uniforms in (0, 1), row b a function of `seeds[b]` only.

    Value [b, j] is `(top 24 bits of hash(seeds[b], j) + 0.5) / 2**24`, so it
    is never 0 or 1 and `log(-log(u))` stays finite. Only integer ops
    (uint32 xor, shift and multiply, which wrap modulo 2**32) build the
    hash, so the values are bit-identical with and without XLA, unlike
    `tf.random.stateless_uniform`. One vectorized pass replaces a per-row
    random op. This is a hash, not a cryptographic or statistically certified
    generator; `tests/test_sampling.py` checks its mean, variance, and the
    independence of neighbouring seeds and indices.

    Args:
      seeds: int32 [batch, 2], one pair of seed words per row.
      size: the number of uniforms per row (the vocabulary size).
    """
    words = tf.bitcast(tf.convert_to_tensor(seeds, tf.int32), tf.uint32)  # [batch, 2]
    row_key = _mix32(tf.bitwise.bitwise_xor(words[:, 0], tf.constant(_SEED_SALT, tf.uint32)))
    row_key = _mix32(row_key + words[:, 1] * tf.constant(_GOLDEN_RATIO_32, tf.uint32))  # [batch]
    index = tf.range(size, dtype=tf.int32)
    index_key = _mix32(tf.bitcast(index, tf.uint32) * tf.constant(_INDEX_SALT, tf.uint32)
                       + tf.constant(_GOLDEN_RATIO_32, tf.uint32))  # [size]
    bits = _mix32(tf.bitwise.bitwise_xor(row_key[:, None], index_key[None, :]))  # [batch, size]
    top_bits = tf.bitwise.right_shift(bits, 32 - _UNIFORM_BITS)
    # Values below 2**24 convert to float32 exactly, and so does k + 0.5.
    return (tf.cast(tf.bitcast(top_bits, tf.int32), tf.float32) + 0.5) * (2.0 ** -_UNIFORM_BITS)


def step_seeds(seeds: tf.Tensor, step) -> tf.Tensor:
    """Returns the seeds for generation step `step`: the second word plus `step`.

    Clients that stream one character per call use the same rule, so a
    streamed text equals the text of one `generate` call with the same seed.
    """
    seeds = tf.convert_to_tensor(seeds, tf.int32)  # [batch, 2]
    return tf.stack([seeds[:, 0], seeds[:, 1] + tf.cast(step, tf.int32)], axis=1)


def _keep_top_k(logits: tf.Tensor, top_k: tf.Tensor) -> tf.Tensor:
    """Sets every logit below a row's k-th largest to -1e30; k = 0 keeps the row whole."""
    vocab_size = tf.shape(logits)[1]
    k = tf.where(top_k > 0, tf.minimum(top_k, vocab_size), vocab_size)  # [batch]

    def cut():
        # One top_k with the batch's largest k gives every row's k-th largest value.
        largest, _ = tf.math.top_k(logits, k=tf.reduce_max(k), sorted=True)  # [batch, max k]
        threshold = tf.gather(largest, k - 1, batch_dims=1)  # [batch]
        return tf.where(logits < threshold[:, None], tf.constant(-1e30, tf.float32), logits)

    # Most requests keep all logits, so the batch usually skips the top_k.
    return tf.cond(tf.reduce_any(k < vocab_size), cut, lambda: logits)


def sample_ids(logits: tf.Tensor, temperature: tf.Tensor, seeds: tf.Tensor,
               top_k: tf.Tensor | None = None) -> tf.Tensor:
    """Draws one id per row.

    Args:
      logits: float32 [batch, vocab].
      temperature: float32 [batch]; 0 means greedy (argmax). Must be >= 0.
      seeds: int32 [batch, 2], one seed per row.
      top_k: optional int32 [batch]; keep only the k largest logits of a
        row before sampling, 0 keeps all.

    Returns:
      int32 [batch] ids.
    """
    logits = tf.cast(logits, tf.float32)
    if top_k is not None:
        logits = _keep_top_k(logits, tf.convert_to_tensor(top_k, tf.int32))
    uniform = hash_uniform(seeds, tf.shape(logits)[1])  # [batch, vocab]
    gumbel = -tf.math.log(-tf.math.log(uniform))
    temperature = tf.convert_to_tensor(temperature, tf.float32)
    safe_temperature = tf.where(temperature > 0, temperature, tf.ones_like(temperature))
    sampled = tf.argmax(logits / safe_temperature[:, None] + gumbel, axis=1, output_type=tf.int32)
    greedy = tf.argmax(logits, axis=1, output_type=tf.int32)
    return tf.where(temperature > 0, sampled, greedy)


def generate_text(model: CharLSTM, vocabulary: Vocabulary, prompt: str, num_chars: int,
                  temperature: float, seed: int) -> str:
    """Generates `num_chars` characters after `prompt` with the Keras model.

    Used for the trainer's samples; served models generate through the
    export's signatures instead. Prompt characters not in the vocabulary map
    to the unknown id.
    """
    prompt_ids = vocabulary.encode(prompt or "\n")
    if len(prompt_ids) > 1:
        _, state = model(tf.constant(prompt_ids[None, :-1], tf.int32))
    else:
        state = model.zero_state(1)
    ids = _generate_ids(model, state, tf.constant(prompt_ids[-1:], tf.int32),
                        tf.constant(num_chars, tf.int32), tf.constant([temperature], tf.float32),
                        tf.constant([[seed, 0]], tf.int32))
    return vocabulary.decode(ids.numpy()[0])


@tf.function
def _generate_ids(model, state, last, num_chars, temperature, seeds):
    outputs = tf.TensorArray(tf.int32, size=num_chars)
    for step in tf.range(num_chars):
        logits, state = model(last[:, None], state)
        last = sample_ids(logits[:, -1], temperature, step_seeds(seeds, step))
        outputs = outputs.write(step, last)
    return tf.transpose(outputs.stack())  # [batch, num_chars]
