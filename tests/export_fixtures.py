"""Shared set-up for the export tests: one tiny trained model directory and its export.

Training and exporting take several seconds each, so the first test that
requests them builds them once per pytest session and later tests reuse
them (`functools.cache` keyed by the session's temporary root).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib

import numpy as np
import tensorflow as tf

from export import export_lib
from trainer import train_lib
from trainer.config import TrainConfig
from trainer.model import ModelConfig, save_model_config
from trainer.vocabulary import Vocabulary

# Cyrillic, accented Latin letters and an emoji (outside the Basic
# Multilingual Plane, so 4 bytes in UTF-8). Repeated to give enough windows.
MULTILINGUAL_TEXT = (
    "Привет, мир! Съешь же ещё этих мягких булок.\n"
    "Café, déjà vu, naïve façade, Ça va? 🙂\n"
    "The quick brown fox jumps over the lazy dog.\n"
) * 12
# Characters that never occur in MULTILINGUAL_TEXT.
UNSEEN_CHARACTERS = "字Ω"
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
PYTHON = str(REPO_ROOT / ".venv" / "bin" / "python")
if not os.path.exists(PYTHON):
    import sys

    PYTHON = sys.executable


@dataclasses.dataclass
class TrainedExport:
    """A trained model directory, its export and the live training objects."""

    model_dir: str
    export_path: str
    text_path: str
    result: train_lib.RunResult
    vocabulary: Vocabulary
    num_layers: int
    units: int


def tiny_train_config(model_dir: str, text_path: str, **overrides) -> TrainConfig:
    values = dict(
        model_dir=model_dir, text_files=(text_path,), seq_length=20, batch_size=8,
        train_steps=5, embedding_dim=8, units=16, num_layers=2, precision="float32",
        steps_per_loop=5, log_every_steps=5, checkpoint_every_steps=5, sample_length=20,
        deterministic=False, export=False)
    values.update(overrides)
    return TrainConfig(**values)


@functools.cache
def trained_export(root: str) -> TrainedExport:
    """Trains a 2-layer, 16-unit model for 5 steps under `root` and exports it."""
    root_path = pathlib.Path(root)
    text_path = root_path / "multilingual.txt"
    text_path.write_text(MULTILINGUAL_TEXT, encoding="utf-8")
    model_dir = str(root_path / "model")
    config = tiny_train_config(model_dir, str(text_path))
    result = train_lib.run(config)
    export_path = export_lib.export_saved_model(model_dir)
    return TrainedExport(model_dir=model_dir, export_path=export_path, text_path=str(text_path),
                         result=result, vocabulary=result.vocabulary,
                         num_layers=config.num_layers, units=config.units)


def write_untrained_model_dir(model_dir: str, precision: str = "float32",
                              model_only_checkpoint: bool = False) -> train_lib.Trainer:
    """Writes a model directory with an initialized (untrained) checkpoint at step 3.

    Args:
      model_dir: directory to create.
      precision: the Keras dtype policy of the model.
      model_only_checkpoint: save `tf.train.Checkpoint(model=model)` instead of
        the trainer's model + optimizer + step checkpoint, so it lacks the step.

    Returns:
      The trainer whose model was saved.
    """
    vocabulary = Vocabulary.build("abcй🙂 \n")
    config = ModelConfig(vocab_size=vocabulary.size, embedding_dim=8, num_layers=1, units=8,
                         precision=precision)
    trainer = train_lib.Trainer(tf.distribute.get_strategy(), config, global_batch_size=1,
                                learning_rate=1e-3, clip_norm=0.0)
    trainer.step.assign(3)
    tf.io.gfile.makedirs(model_dir)
    vocabulary.save(model_dir)
    save_model_config(config, model_dir)
    checkpoint = (tf.train.Checkpoint(model=trainer.model) if model_only_checkpoint
                  else trainer.checkpoint)
    manager = tf.train.CheckpointManager(checkpoint, model_dir, max_to_keep=1)
    manager.save(checkpoint_number=3)
    return trainer


def zero_state(batch_size: int, num_layers: int, units: int) -> np.ndarray:
    return np.zeros([batch_size, num_layers, units], np.float32)


def seeds(batch_size: int, first: int = 11) -> np.ndarray:
    """Distinct seeds [batch, 2]: row i gets [first + i, 100 * i]."""
    rows = np.arange(batch_size)
    return np.stack([first + rows, 100 * rows], axis=1).astype(np.int32)


def utf8(values) -> tf.Tensor:
    return tf.constant([value.encode("utf-8") for value in values], tf.string)
