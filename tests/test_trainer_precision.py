"""Mixed precision: finite 16-bit steps, float32 logits, loss scaling skipping bad steps."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import data, distribution, train_lib
from trainer.model import ModelConfig

VOCAB = 7
BATCH = 4
SEQ = 10
IDS = (np.arange(400) * 3 % (VOCAB - 1) + 1).astype(np.int32)


def make_trainer(precision: str, clip_norm: float = 5.0) -> train_lib.Trainer:
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    config = ModelConfig(vocab_size=VOCAB, embedding_dim=8, units=16, precision=precision)
    return train_lib.Trainer(strategy, config, BATCH, learning_rate=0.01, clip_norm=clip_norm)


def train(trainer: train_lib.Trainer, steps: int) -> list[float]:
    dataset = trainer.strategy.distribute_datasets_from_function(
        lambda context: data.make_train_dataset(IDS, SEQ, BATCH, 1, context))
    iterator = iter(dataset)
    return [float(trainer.train_loop(iterator, tf.constant(1))) for _ in range(steps)]


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_losses_finite(precision):
    trainer = make_trainer(precision)
    losses = train(trainer, 4)
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < losses[0], losses
    assert int(trainer.step.numpy()) == 4


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_logits_and_variables_float32(precision):
    trainer = make_trainer(precision)
    logits, state = trainer.model(tf.constant(IDS[None, :SEQ]))
    assert logits.dtype == tf.float32
    assert state[0][0].dtype == keras.DTypePolicy(precision).compute_dtype
    assert {v.dtype for v in trainer.model.trainable_variables} == {"float32"}


def test_float16_wraps_adam_in_loss_scaling():
    assert isinstance(make_trainer("mixed_float16").optimizer, keras.optimizers.LossScaleOptimizer)
    assert not make_trainer("mixed_bfloat16").uses_loss_scaling
    assert not make_trainer("float32").uses_loss_scaling


@pytest.mark.parametrize("clip_norm", [5.0, 0.0])
def test_non_finite_gradient_skips_step(clip_norm):
    trainer = make_trainer("mixed_float16", clip_norm=clip_norm)
    train(trainer, 1)  # One real step first, as in training.
    variables = trainer.model.trainable_variables
    before = [v.numpy() for v in variables]
    scale_before = float(trainer.optimizer.dynamic_scale)
    gradients = [tf.ones_like(v) for v in variables]
    gradients[1] = tf.tensor_scatter_nd_update(
        gradients[1], [[0] * len(gradients[1].shape)], [float("nan")])

    @tf.function
    def apply(gradients):
        trainer.strategy.run(trainer.apply_gradients, args=(gradients,))

    apply(gradients)
    for b, v in zip(before, variables):
        np.testing.assert_array_equal(b, v.numpy(), err_msg=v.path)
    assert float(trainer.optimizer.dynamic_scale) == scale_before / 2

    # The next finite step applies again.
    apply([tf.ones_like(v) for v in variables])
    assert any(not np.array_equal(b, v.numpy()) for b, v in zip(before, variables))


def test_float16_run_end_to_end(tiny_config):
    result = train_lib.run(tiny_config(precision="mixed_float16", train_steps=3))
    assert result.summary["precision"] == "mixed_float16"
    assert math.isfinite(result.summary["train_loss"])
    assert math.isfinite(result.summary["validation_loss"])


def test_auto_precision_on_cpu_is_concrete():
    chosen = distribution.resolve_precision("auto")
    assert chosen in ("float32", "mixed_bfloat16")
    assert distribution.resolve_precision("mixed_float16") == "mixed_float16"
