"""Shared tiny fixtures for the test suite: a short corpus and a small TrainConfig."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from trainer.config import TrainConfig  # noqa: E402

# A repetitive text that a 16-unit LSTM learns within tens of steps. With the
# tiny_config sizes it gives 68 steps per epoch.
TINY_TEXT = "the cat sat on the mat. the dog sat on the log. " * 60


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> str:
    """Path of a UTF-8 file containing TINY_TEXT. Tests must not modify it."""
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def make_tiny_config(tiny_corpus):
    """Factory of small TrainConfigs that train in about a second on one CPU core.

    `model_dir` is required; other keyword arguments override fields.
    """

    def make(model_dir: str, **overrides) -> TrainConfig:
        values = dict(
            model_dir=str(model_dir),
            text_files=(tiny_corpus,),
            seq_length=10,
            batch_size=4,
            train_steps=6,
            embedding_dim=8,
            units=16,
            learning_rate=0.01,
            precision="float32",
            steps_per_loop=3,
            log_every_steps=3,
            checkpoint_every_steps=3,
            sample_length=20,
            export=False,
        )
        values.update(overrides)
        return TrainConfig(**values)

    return make


@pytest.fixture
def tiny_config(tmp_path, make_tiny_config):
    """Like make_tiny_config, with `model_dir` defaulting to `tmp_path/model`."""

    def make(**overrides) -> TrainConfig:
        overrides.setdefault("model_dir", str(tmp_path / "model"))
        return make_tiny_config(**overrides)

    return make


@pytest.fixture
def parse_trainer_flags():
    """Parses trainer command-line arguments into a TrainConfig, then resets the flags.

    The trainer defines its flags on the global absl FLAGS, so every parse in
    this process shares them; the fixture unparses them afterwards.
    """
    from absl import flags

    from trainer import flags as trainer_flags

    if "model_dir" not in flags.FLAGS:
        trainer_flags.define_flags()

    def parse(*arguments: str) -> TrainConfig:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["trainer", *arguments])
        return trainer_flags.config_from_flags()

    yield parse
    flags.FLAGS.unparse_flags()


@pytest.fixture
def no_model_build(monkeypatch):
    """Makes building a train_lib.Trainer an error, to show a check ran before it."""
    from trainer import train_lib

    def fail(*args, **kwargs):
        raise AssertionError("the Trainer was built before the bad input was rejected")

    monkeypatch.setattr(train_lib.Trainer, "__init__", fail)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A 2-layer, 16-unit model trained 5 steps on multilingual text, and its export."""
    from export_fixtures import trained_export

    root = tmp_path_factory.getbasetemp() / "export_shared"
    root.mkdir(exist_ok=True)
    return trained_export(str(root))
