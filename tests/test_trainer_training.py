"""End-to-end training on a tiny corpus: loss, outputs, logs, schedules, samples, presets."""

from __future__ import annotations

import collections
import glob
import json
import logging
import math
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import data, sampling, train_lib
from trainer.config import TrainConfig
from trainer.vocabulary import UNKNOWN_ID, Vocabulary

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT_TEXT = "the cat sat on the mat. the dog sat on the log. " * 20
# 960 characters, 912 of them in the training split: 90 windows, 22 steps of 4.
STEPS_PER_EPOCH = data.steps_per_epoch(len(SHORT_TEXT) - round(len(SHORT_TEXT) * 0.05), 10, 4)
TOTAL_STEPS = 2 * STEPS_PER_EPOCH
PROGRESS_LINE = r"step +\d+/\d+ \| loss \d+\.\d{4} \| +\d+ chars/s \| eta \d+:\d\d:\d\d"


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def read_events(directory: str) -> dict[str, list[tuple[int, object]]]:
    """Returns {tag: [(step, value)]} from the TensorBoard event files in `directory`."""
    events = collections.defaultdict(list)
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                events[value.tag].append((event.step, tf.make_ndarray(value.tensor)))
    return events


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One two-epoch run shared by the tests that only read its outputs."""
    root = tmp_path_factory.mktemp("trained")
    corpus = root / "short.txt"
    corpus.write_text(SHORT_TEXT, encoding="utf-8")
    config = TrainConfig(model_dir=str(root / "model"), text_files=(str(corpus),), seq_length=10,
                         batch_size=4, epochs=2, embedding_dim=8, units=16, learning_rate=0.02,
                         precision="float32", steps_per_loop=5, log_every_steps=5,
                         checkpoint_every_steps=10, max_checkpoints=10, sample_length=20,
                         export=False)
    records = _Records()
    absl_logger = logging.getLogger("absl")
    absl_logger.addHandler(records)
    previous_level = absl_logger.level
    absl_logger.setLevel(logging.INFO)
    try:
        result = train_lib.run(config)
    finally:
        absl_logger.removeHandler(records)
        absl_logger.setLevel(previous_level)
    return config, result, records.messages


def test_loss_decreases(trained):
    config, result, _ = trained
    losses = [float(v) for _, v in read_events(os.path.join(config.model_dir, "train"))["loss"]]
    uniform = math.log(result.vocabulary.size)
    assert losses[0] > losses[-1] + 0.5, f"train losses {losses}"
    assert result.summary["validation_loss"] < uniform - 0.5


def test_summary_json_reports_validation(trained):
    config, result, _ = trained
    with open(os.path.join(config.model_dir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    assert STEPS_PER_EPOCH == 22
    assert summary["steps"] == TOTAL_STEPS
    assert summary["epochs"] == pytest.approx(2.0)
    assert summary["validation_loss"] == pytest.approx(result.summary["validation_loss"])
    assert math.isfinite(summary["validation_loss"])
    assert summary["validation_bits_per_char"] == pytest.approx(
        summary["validation_loss"] / math.log(2), rel=1e-9)
    assert summary["replicas"] == 1
    assert summary["precision"] == "float32"
    assert summary["config"]["units"] == 16


def test_model_dir_outputs(trained):
    config, result, _ = trained
    names = set(os.listdir(config.model_dir))
    assert {"vocabulary.json", "model_config.json", "summary.json", "checkpoint",
            "train", "validation"} <= names
    assert Vocabulary.load(config.model_dir) == result.vocabulary
    assert tf.train.latest_checkpoint(config.model_dir).endswith(f"ckpt-{TOTAL_STEPS}")
    saved_steps = sorted(int(n.split("-")[1].split(".")[0]) for n in names if n.endswith(".index"))
    assert saved_steps == [10, 20, 30, 40, TOTAL_STEPS]


def test_tensorboard_scalars(trained):
    config, _, _ = trained
    train_events = read_events(os.path.join(config.model_dir, "train"))
    for tag in ("loss", "bits_per_char", "learning_rate", "chars_per_second"):
        steps = [step for step, _ in train_events[tag]]
        assert steps == list(range(5, TOTAL_STEPS, 5)) + [TOTAL_STEPS], f"{tag} at steps {steps}"
    loss = np.array([float(v) for _, v in train_events["loss"]])
    bits = np.array([float(v) for _, v in train_events["bits_per_char"]])
    np.testing.assert_allclose(bits, loss / math.log(2), rtol=1e-6)
    validation_events = read_events(os.path.join(config.model_dir, "validation"))
    assert [step for step, _ in validation_events["loss"]] == [STEPS_PER_EPOCH, TOTAL_STEPS]
    assert [step for step, _ in validation_events["bits_per_char"]] == [STEPS_PER_EPOCH, TOTAL_STEPS]


def test_text_sample_each_epoch(trained):
    config, _, _ = trained
    samples = read_events(os.path.join(config.model_dir, "validation"))["sample"]
    assert [step for step, _ in samples] == [STEPS_PER_EPOCH, TOTAL_STEPS]
    for _, value in samples:
        text = value.item().decode("utf-8")
        assert text.startswith(config.sample_prompt)
        assert len(text) == len(config.sample_prompt) + 200


def test_progress_and_validation_log_lines(trained):
    _, _, messages = trained
    progress = [m for m in messages if m.startswith("step") and "chars/s" in m]
    assert len(progress) == len(range(5, TOTAL_STEPS, 5)) + 1
    for line in progress:
        assert re.fullmatch(PROGRESS_LINE, line), line
    validation = [m for m in messages if "validation loss" in m]
    assert len(validation) == 2
    assert "nats/char" in validation[0]
    assert "bits/char" in validation[0]


def test_same_seed_same_weights(tiny_config, tmp_path):
    first = train_lib.run(tiny_config(model_dir=str(tmp_path / "first"), seed=3))
    second = train_lib.run(tiny_config(model_dir=str(tmp_path / "second"), seed=3))
    other = train_lib.run(tiny_config(model_dir=str(tmp_path / "other"), seed=4))
    assert first.summary["train_loss"] == second.summary["train_loss"]
    for a, b in zip(first.trainer.model.weights, second.trainer.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert first.summary["train_loss"] != other.summary["train_loss"]


def test_vocabulary_from_training_split(tiny_config, tmp_path):
    # "Z" and "Ω" occur only in the last 5% of the text, the validation split.
    path = tmp_path / "tail.txt"
    path.write_text("abcab " * 400 + "ZΩZΩ", encoding="utf-8")
    prepared = train_lib.prepare_data(tiny_config(text_files=(str(path),)))
    assert "Z" not in prepared.vocabulary.characters
    assert "Ω" not in prepared.vocabulary.characters
    assert UNKNOWN_ID in prepared.validation_ids
    assert UNKNOWN_ID not in prepared.train_ids


def test_min_char_count_maps_to_unknown(tiny_config, tmp_path):
    path = tmp_path / "rare.txt"
    path.write_text("ab" * 600 + "é" + "ab" * 600, encoding="utf-8")
    prepared = train_lib.prepare_data(tiny_config(text_files=(str(path),), min_char_count=2))
    assert prepared.vocabulary.characters == ["a", "b"]
    assert np.count_nonzero(prepared.train_ids == UNKNOWN_ID) == 1


def test_validation_split_size(tiny_config):
    prepared = train_lib.prepare_data(tiny_config(validation_fraction=0.2))
    total = len(prepared.corpus.text)
    assert len(prepared.validation_ids) == round(total * 0.2)
    assert len(prepared.train_ids) + len(prepared.validation_ids) == total


def test_cosine_schedule_with_warmup():
    config = TrainConfig(model_dir="", learning_rate=0.01, lr_schedule="cosine", warmup_steps=10)
    schedule = train_lib.make_learning_rate(config, total_steps=110)
    rate = lambda step: float(schedule(step))  # noqa: E731
    assert rate(0) == pytest.approx(0.0, abs=1e-9)
    assert rate(5) == pytest.approx(0.005, rel=1e-5)
    assert rate(10) == pytest.approx(0.01, rel=1e-5)
    assert rate(60) < 0.01
    # CosineDecay ends at alpha * peak with alpha = 0.1.
    assert rate(110) == pytest.approx(0.001, rel=1e-4)


def test_constant_schedule_with_warmup():
    config = TrainConfig(model_dir="", learning_rate=0.01, lr_schedule="constant", warmup_steps=4)
    schedule = train_lib.make_learning_rate(config, total_steps=100)
    assert float(schedule(2)) == pytest.approx(0.005, rel=1e-5)
    for step in (4, 50, 100):
        assert float(schedule(step)) == pytest.approx(0.01, rel=1e-5)


def test_constant_schedule_is_a_number():
    config = TrainConfig(model_dir="", learning_rate=0.01)
    assert train_lib.make_learning_rate(config, total_steps=100) == 0.01


def test_clip_scales_to_global_norm(tiny_config):
    # With plain SGD at rate 1 the update equals the gradient the trainer hands
    # to the optimizer, so its global norm shows the clip.
    trainer = train_lib.Trainer(tf.distribute.OneDeviceStrategy("/cpu:0"),
                                train_lib.model_config_for(tiny_config(), 5, "float32"),
                                global_batch_size=4, learning_rate=1.0, clip_norm=0.5)
    with trainer.strategy.scope():
        trainer.optimizer = keras.optimizers.SGD(learning_rate=1.0)
        trainer.optimizer.build(trainer.model.trainable_variables)
    before = [v.numpy() for v in trainer.model.trainable_variables]
    gradients = [tf.fill(v.shape, 3.0) for v in trainer.model.trainable_variables]

    @tf.function
    def apply(gradients):
        trainer.strategy.run(trainer.apply_gradients, args=(gradients,))

    apply(gradients)
    deltas = [b - v.numpy() for b, v in zip(before, trainer.model.trainable_variables)]
    norm = np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in deltas))
    assert norm == pytest.approx(0.5, rel=1e-5)
    # Clipping scales all gradients by one factor, so the direction is kept.
    ratios = np.concatenate([d.ravel() for d in deltas]) / 3.0
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-5)


def test_greedy_sample_is_deterministic(trained):
    config, result, _ = trained
    model, vocabulary = result.trainer.model, result.vocabulary
    first = sampling.generate_text(model, vocabulary, "the ", 30, 0.0, seed=1)
    second = sampling.generate_text(model, vocabulary, "the ", 30, 0.0, seed=99)
    assert first == second
    # The same text, one argmax at a time.
    ids = list(vocabulary.encode("the "))
    expected = []
    for _ in range(30):
        logits, _ = model(tf.constant([ids], tf.int32))
        ids.append(int(tf.argmax(logits[0, -1])))
        expected.append(ids[-1])
    assert first == vocabulary.decode(expected)


def test_final_sample_length_and_temperature(trained):
    config, result, _ = trained
    greedy = TrainConfig(**{**config.__dict__, "sample_temperature": 0.0, "sample_length": 25})
    text = train_lib.final_sample(greedy, result)
    assert len(text) == 25
    assert text == train_lib.final_sample(greedy, result)
    warm = TrainConfig(**{**config.__dict__, "sample_temperature": 1.5, "sample_length": 25})
    assert len(train_lib.final_sample(warm, result)) == 25


@pytest.mark.parametrize("preset, expected", [
    ("classic.flags", dict(input_encoding="one_hot", units=1024, batch_size=64, seq_length=100,
                           epochs=30, precision="float32", lr_schedule="constant")),
    ("quick.flags", dict(input_encoding="embedding", units=512, epochs=16, lr_schedule="cosine",
                         warmup_steps=50, precision="auto")),
])
def test_presets_parse(parse_trainer_flags, preset, expected):
    config = parse_trainer_flags(f"--flagfile={os.path.join(REPO_ROOT, 'configs', preset)}")
    for name, value in expected.items():
        assert getattr(config, name) == value, name


def test_preset_flags_can_be_overridden(parse_trainer_flags, tmp_path):
    config = parse_trainer_flags(f"--flagfile={os.path.join(REPO_ROOT, 'configs', 'classic.flags')}",
                                 f"--model_dir={tmp_path}", "--epochs=1")
    assert config.model_dir == str(tmp_path)
    assert config.epochs == 1
