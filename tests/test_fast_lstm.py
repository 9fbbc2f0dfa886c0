"""The fused CPU LSTM path gives the Keras LSTM path's outputs, gradients and training.

Tolerances: float32 results agree to 1e-5 (absolute, on values of order 1)
because the two paths differ only in the order of floating-point sums.
Under mixed_bfloat16 the Keras cell keeps its state and gates in bfloat16 and
the fused path keeps them in float32, so they agree only to bfloat16's
precision: 5e-2 relative to the largest value (bfloat16 has 8 significant
bits, about 4e-3 relative error per rounding, and several roundings add up).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from trainer import fast_lstm, train_lib
from trainer.model import ModelConfig, build_model

VOCAB = 11
UNITS = 16
BATCH = 3
TIME = 7


def make_pair(**overrides):
    """Returns a Keras-path model and a fused-path model with the same weights."""
    settings = dict(vocab_size=VOCAB, embedding_dim=8, num_layers=2, units=UNITS)
    settings.update(overrides)
    keras_model = build_model(ModelConfig(**settings, lstm_implementation="keras"))
    fused_model = build_model(ModelConfig(**settings, lstm_implementation="fused"))
    fused_model.set_weights(keras_model.get_weights())
    return keras_model, fused_model


def random_inputs(model):
    ids = tf.constant(np.random.default_rng(0).integers(0, VOCAB, [BATCH, TIME]), tf.int32)
    state = [(tf.random.stateless_normal([BATCH, UNITS], [layer, 0]),
              tf.random.stateless_normal([BATCH, UNITS], [layer, 1]))
             for layer in range(model.config.num_layers)]
    dtype = model.compute_dtype_name
    return ids, [(tf.cast(h, dtype), tf.cast(c, dtype)) for h, c in state]


def outputs_and_gradients(model, ids, state):
    """Returns logits, final state and the gradients of a loss that uses all outputs."""
    with tf.GradientTape() as tape:
        logits, final_state = model(ids, state)
        weights = tf.random.stateless_normal(tf.shape(logits), [1, 2])
        loss = tf.reduce_sum(logits * weights)
        for scale, (h, c) in enumerate(final_state, start=2):
            loss += tf.reduce_sum(scale * tf.cast(h, tf.float32) - tf.cast(c, tf.float32))
    gradients = tape.gradient(loss, model.trainable_variables)
    return logits, final_state, gradients


def assert_close(expected, actual, tolerance, relative=False):
    expected = tf.cast(expected, tf.float32).numpy()
    actual = tf.cast(actual, tf.float32).numpy()
    scale = max(float(np.max(np.abs(expected))), 1e-6) if relative else 1.0
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance * scale)


@pytest.mark.parametrize("input_encoding", ["embedding", "one_hot"])
def test_float32_outputs_match_keras(input_encoding):
    keras_model, fused_model = make_pair(input_encoding=input_encoding)
    ids, state = random_inputs(keras_model)
    expected_logits, expected_state, _ = outputs_and_gradients(keras_model, ids, state)
    logits, final_state, _ = outputs_and_gradients(fused_model, ids, state)
    assert_close(expected_logits, logits, 1e-5)
    for (expected_h, expected_c), (h, c) in zip(expected_state, final_state):
        assert h.dtype == expected_h.dtype
        assert_close(expected_h, h, 1e-5)
        assert_close(expected_c, c, 1e-5)


@pytest.mark.parametrize("input_encoding", ["embedding", "one_hot"])
def test_float32_gradients_match_keras(input_encoding):
    keras_model, fused_model = make_pair(input_encoding=input_encoding)
    ids, state = random_inputs(keras_model)
    *_, expected = outputs_and_gradients(keras_model, ids, state)
    *_, gradients = outputs_and_gradients(fused_model, ids, state)
    names = [variable.path for variable in fused_model.trainable_variables]
    assert names == [variable.path for variable in keras_model.trainable_variables]
    for name, expected_gradient, gradient in zip(names, expected, gradients):
        assert gradient is not None, name
        # Relative to the largest entry: gradients reach a few hundred here.
        assert_close(tf.convert_to_tensor(expected_gradient), tf.convert_to_tensor(gradient),
                     1e-5, relative=True)


@pytest.mark.parametrize("input_encoding", ["embedding", "one_hot"])
def test_single_step_matches_keras(input_encoding):
    # Two ids, fewer than the vocabulary: the fused path embeds them one by
    # one instead of projecting the whole table, and runs no loop.
    keras_model, fused_model = make_pair(input_encoding=input_encoding)
    ids, state = random_inputs(keras_model)
    ids, state = ids[:2, :1], [(h[:2], c[:2]) for h, c in state]
    expected_logits, _, expected = outputs_and_gradients(keras_model, ids, state)
    logits, _, gradients = outputs_and_gradients(fused_model, ids, state)
    assert_close(expected_logits, logits, 1e-5)
    for expected_gradient, gradient in zip(expected, gradients):
        assert_close(tf.convert_to_tensor(expected_gradient), tf.convert_to_tensor(gradient),
                     1e-5, relative=True)


@pytest.mark.parametrize("batch_size", [1, BATCH])
def test_unknown_shape_matches_keras(batch_size):
    # In a graph with unknown batch and time the projection is chosen at run time.
    keras_model, fused_model = make_pair()
    ids, state = random_inputs(keras_model)
    ids, state = ids[:batch_size], [(h[:batch_size], c[:batch_size]) for h, c in state]
    spec = tf.TensorSpec([None, None], tf.int32)
    fused_call = tf.function(lambda ids: fused_model(ids, state)[0], input_signature=[spec])
    assert_close(keras_model(ids, state)[0], fused_call(ids), 1e-5)
    assert_close(keras_model(ids[:, :1], state)[0], fused_call(ids[:, :1]), 1e-5)


def test_bfloat16_matches_keras_loosely():
    keras_model, fused_model = make_pair(precision="mixed_bfloat16")
    ids, state = random_inputs(keras_model)
    expected_logits, _, expected = outputs_and_gradients(keras_model, ids, state)
    logits, final_state, gradients = outputs_and_gradients(fused_model, ids, state)
    assert logits.dtype == tf.float32
    assert final_state[0][0].dtype == tf.bfloat16
    assert_close(expected_logits, logits, 5e-2, relative=True)
    for expected_gradient, gradient in zip(expected, gradients):
        assert_close(tf.convert_to_tensor(expected_gradient), tf.convert_to_tensor(gradient),
                     5e-2, relative=True)


def test_unconnected_outputs_get_zero_gradient():
    # Only the final state is used, so the per-timestep outputs get no upstream gradient.
    _, fused_model = make_pair()
    ids, state = random_inputs(fused_model)
    kernel = fused_model.lstm_layers[0].cell.recurrent_kernel
    with tf.GradientTape() as tape:
        _, final_state = fused_model(ids, state)
        loss = tf.reduce_sum(final_state[0][0])
    gradient = tape.gradient(loss, kernel)
    assert gradient is not None
    assert float(tf.reduce_max(tf.abs(gradient))) > 0.0


def test_keras_checkpoint_restores_into_fused(tmp_path):
    keras_model, _ = make_pair()
    prefix = tf.train.Checkpoint(model=keras_model).save(str(tmp_path / "ckpt"))
    fused_model = build_model(ModelConfig(vocab_size=VOCAB, embedding_dim=8, num_layers=2,
                                          units=UNITS, lstm_implementation="fused"))
    tf.train.Checkpoint(model=fused_model).restore(prefix).assert_existing_objects_matched()
    ids, state = random_inputs(keras_model)
    assert_close(keras_model(ids, state)[0], fused_model(ids, state)[0], 1e-5)


def test_old_model_config_defaults_to_auto():
    saved = json.loads(ModelConfig(vocab_size=VOCAB).to_json())
    del saved["lstm_implementation"]
    assert ModelConfig.from_json(json.dumps(saved)).lstm_implementation == "auto"


def test_unknown_implementation_rejected():
    with pytest.raises(ValueError, match=r"lstm_implementation.*'cudnn'"):
        ModelConfig(vocab_size=VOCAB, lstm_implementation="cudnn")


def test_auto_is_fused_without_gpu():
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("auto picks keras (cuDNN) when TensorFlow sees a GPU")
    assert fast_lstm.resolve_implementation("auto") == "fused"


def test_flag_reaches_model_config(parse_trainer_flags):
    config = parse_trainer_flags("--model_dir=/tmp/unused", "--lstm_implementation=keras")
    assert train_lib.model_config_for(config, VOCAB, "float32").lstm_implementation == "keras"


def test_training_reaches_same_validation_loss(tiny_config, tmp_path):
    # Same seed, data and steps on both paths. The float32 runs differ only
    # by rounding, so 60 Adam steps end within 1e-3 nats per character.
    losses = {}
    for implementation in ("keras", "fused"):
        config = tiny_config(model_dir=str(tmp_path / implementation), train_steps=60,
                             learning_rate=0.03, steps_per_loop=20, log_every_steps=20,
                             checkpoint_every_steps=60, eval_every_steps=60,
                             lstm_implementation=implementation)
        summary = train_lib.run(config).summary
        losses[implementation] = summary["validation_loss"]
    # A uniform guess costs log(vocabulary size) nats per character.
    assert losses["fused"] < 0.5 * np.log(summary["vocabulary_size"]), losses
    assert abs(losses["fused"] - losses["keras"]) < 1e-3, losses
