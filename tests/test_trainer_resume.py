"""Resuming from the checkpoints in model_dir."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from trainer import train_lib


def checkpoint_values(model_dir: str) -> dict[str, np.ndarray]:
    """Returns every variable of the latest checkpoint in `model_dir`, by checkpoint key."""
    path = tf.train.latest_checkpoint(model_dir)
    reader = tf.train.load_checkpoint(path)
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
            if not key.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, make_tiny_config):
    """An uninterrupted 6-step run, and a run stopped at step 3 and restarted to 6."""
    root = tmp_path_factory.mktemp("resume")
    whole = make_tiny_config(root / "whole", train_steps=6)
    train_lib.run(whole)

    split_dir = root / "split"
    first = train_lib.run(make_tiny_config(split_dir, train_steps=3))
    with open(split_dir / "vocabulary.json", encoding="utf-8") as f:
        vocabulary_after_first = f.read()
    second = train_lib.run(make_tiny_config(split_dir, train_steps=6))
    return dict(whole=whole, first=first, second=second, split_dir=str(split_dir),
                vocabulary_after_first=vocabulary_after_first)


def test_resume_matches_uninterrupted_run(runs):
    expected = checkpoint_values(runs["whole"].model_dir)
    resumed = checkpoint_values(runs["split_dir"])
    assert set(resumed) == set(expected)
    # Both runs execute the same ops on the same data under op determinism,
    # so the weights and Adam's slots match exactly.
    for key, value in expected.items():
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)
    assert any("optimizer" in key for key in expected), "optimizer state is not checkpointed"


def test_resume_continues_step_count(runs):
    assert runs["first"].summary["steps"] == 3
    assert runs["second"].summary["steps"] == 6
    assert runs["second"].summary["steps_this_run"] == 3
    assert int(runs["second"].trainer.step.numpy()) == 6
    assert tf.train.latest_checkpoint(runs["split_dir"]).endswith("ckpt-6")


def test_resume_reuses_saved_vocabulary(runs):
    assert runs["second"].vocabulary == runs["first"].vocabulary
    with open(os.path.join(runs["split_dir"], "vocabulary.json"), encoding="utf-8") as f:
        assert f.read() == runs["vocabulary_after_first"]


def test_finished_run_trains_no_more(runs):
    again = train_lib.run(runs["whole"])
    assert again.summary["steps"] == 6
    assert again.summary["steps_this_run"] == 0
    assert np.isfinite(again.summary["validation_loss"])


def test_resume_with_other_corpus_fails(runs, make_tiny_config, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("Совсем другой текст, другой алфавит. " * 80, encoding="utf-8")
    with pytest.raises(train_lib.SetupError,
                       match=r"was trained on corpus 'tiny\.txt'.*reads 'other\.txt', a different "
                             r"text.*train into a new --model_dir"):
        train_lib.run(make_tiny_config(runs["split_dir"], text_files=(str(other),)))


def test_resume_with_edited_corpus_fails(runs, make_tiny_config, tiny_corpus, tmp_path):
    # Same file name and characters, different text: the fingerprint catches it.
    edited = tmp_path / "tiny.txt"
    with open(tiny_corpus, encoding="utf-8") as f:
        edited.write_text(f.read().replace("cat", "tac"), encoding="utf-8")
    with pytest.raises(train_lib.SetupError, match=r"'tiny\.txt', a different text"):
        train_lib.run(make_tiny_config(runs["split_dir"], text_files=(str(edited),)))


def test_resume_with_other_validation_fraction_fails(runs, make_tiny_config):
    with pytest.raises(train_lib.SetupError,
                       match=r"a changed --validation_fraction also counts as a different text"):
        train_lib.run(make_tiny_config(runs["split_dir"], validation_fraction=0.1))


def test_resume_with_other_units_fails(runs, make_tiny_config):
    with pytest.raises(train_lib.SetupError, match=r"units=16.*asks for 32.*--units=16"):
        train_lib.run(make_tiny_config(runs["split_dir"], units=32))


def test_resume_with_other_min_char_count_fails(runs, make_tiny_config):
    with pytest.raises(train_lib.SetupError, match=r"--min_char_count"):
        train_lib.run(make_tiny_config(runs["split_dir"], min_char_count=1000))
