"""Sampling the next character from logits, shared by the trainer and the export.

Every row of a batch draws its randomness from its own seed, so a row's
result does not depend on which other rows share its batch. The noise is
Gumbel noise from `tf.random.stateless_uniform`, and
`argmax(logits / T + Gumbel)` is a sample from `softmax(logits / T)`.
"""

from __future__ import annotations

import tensorflow as tf

from trainer.model import CharLSTM
from trainer.vocabulary import Vocabulary


def step_seeds(seeds: tf.Tensor, step) -> tf.Tensor:
    """Returns the seeds for generation step `step`: the second word plus `step`.

    Clients that stream one character per call use the same rule, so a
    streamed text equals the text of one `generate` call with the same seed.
    """
    seeds = tf.convert_to_tensor(seeds, tf.int32)  # [batch, 2]
    return tf.stack([seeds[:, 0], seeds[:, 1] + tf.cast(step, tf.int32)], axis=1)


def sample_ids(logits: tf.Tensor, temperature: tf.Tensor, seeds: tf.Tensor,
               top_k: tf.Tensor | None = None) -> tf.Tensor:
    """Draws one id per row.

    Args:
      logits: float32 [batch, vocab].
      temperature: float32 [batch]; 0 means greedy (argmax). Must be >= 0.
      seeds: int32 [batch, 2], one stateless seed per row.
      top_k: optional int32 [batch]; keep only the k largest logits of a
        row before sampling, 0 keeps all.

    Returns:
      int32 [batch] ids.
    """
    logits = tf.cast(logits, tf.float32)
    vocab_size = tf.shape(logits)[1]
    if top_k is not None:
        top_k = tf.convert_to_tensor(top_k, tf.int32)
        k = tf.where(top_k > 0, tf.minimum(top_k, vocab_size), vocab_size)  # [batch]
        sorted_logits = tf.sort(logits, axis=1, direction="DESCENDING")
        threshold = tf.gather(sorted_logits, k - 1, batch_dims=1)  # [batch]
        logits = tf.where(logits < threshold[:, None], tf.constant(-1e30, tf.float32), logits)

    def row_noise(seed):
        return tf.random.stateless_uniform(
            [vocab_size], seed=seed, minval=1e-7, maxval=1.0, dtype=tf.float32)

    uniform = tf.map_fn(row_noise, tf.convert_to_tensor(seeds, tf.int32),
                        fn_output_signature=tf.float32)  # [batch, vocab]
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
