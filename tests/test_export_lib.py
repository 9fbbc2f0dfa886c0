"""Specification of export_lib: inputs checked before work, strict restore, versions, atomicity."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from export import export_lib, warmup
from trainer import train_lib
from export_fixtures import tiny_train_config, write_untrained_model_dir


@pytest.fixture(scope="module")
def untrained_dir(tmp_path_factory):
    """A small initialized model directory (1 layer, 8 units) with a checkpoint at step 3."""
    model_dir = str(tmp_path_factory.mktemp("untrained") / "model")
    write_untrained_model_dir(model_dir)
    return model_dir


# ------------------------------------------------------- inputs, before work


def test_missing_model_dir_is_rejected(tmp_path):
    with pytest.raises(export_lib.ExportError, match="--model_dir=.*does not exist"):
        export_lib.export_saved_model(str(tmp_path / "absent"))


def test_model_dir_without_checkpoint_is_rejected(tmp_path):
    with pytest.raises(export_lib.ExportError, match="No checkpoint found in --model_dir"):
        export_lib.export_saved_model(str(tmp_path))


def test_missing_checkpoint_flag_path_is_rejected(untrained_dir):
    with pytest.raises(export_lib.ExportError, match=r"--checkpoint=.*ckpt-99.*not found"):
        export_lib.export_saved_model(untrained_dir, checkpoint=os.path.join(untrained_dir, "ckpt-99"))


@pytest.mark.parametrize("filename,message", [
    ("vocabulary.json", "Vocabulary file not found"),
    ("model_config.json", "Model config not found"),
])
def test_missing_training_file_is_rejected(tmp_path, untrained_dir, filename, message):
    model_dir = tmp_path / "model"
    shutil.copytree(untrained_dir, model_dir)
    os.remove(model_dir / filename)
    with pytest.raises(export_lib.ExportError, match=message):
        export_lib.export_saved_model(str(model_dir))
    assert not os.path.exists(model_dir / "export")


def test_existing_version_flag_is_rejected(tmp_path, untrained_dir):
    export_dir = tmp_path / "export"
    (export_dir / "4").mkdir(parents=True)
    with pytest.raises(export_lib.ExportError, match="Version 4 already exists"):
        export_lib.export_saved_model(untrained_dir, str(export_dir), version=4)


def test_non_positive_max_generate_chars_is_rejected(untrained_dir):
    with pytest.raises(export_lib.ExportError, match="--max_generate_chars must be a positive"):
        export_lib.export_saved_model(untrained_dir, max_generate_chars=0)


# ------------------------------------------------------------ strict restore


def test_model_only_checkpoint_is_rejected(tmp_path):
    # tf.train.Checkpoint(model=model) contains the weights but no step counter.
    model_dir = str(tmp_path / "model")
    write_untrained_model_dir(model_dir, model_only_checkpoint=True)
    with pytest.raises(export_lib.ExportError, match="not written by charlstm training"):
        export_lib.export_saved_model(model_dir)


def test_nan_weight_is_rejected(tmp_path):
    model_dir = str(tmp_path / "model")
    trainer = write_untrained_model_dir(model_dir)
    kernel = trainer.model.lstm_layers[0].cell.kernel
    kernel.assign(tf.fill(kernel.shape, float("nan")))
    tf.train.CheckpointManager(trainer.checkpoint, model_dir, max_to_keep=1).save(
        checkpoint_number=4)
    with pytest.raises(export_lib.ExportError, match=r"leaves model weights .*lstm_0.* unset or NaN"):
        export_lib.export_saved_model(model_dir)


def test_checkpoint_of_other_shape_is_rejected(tmp_path, untrained_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(untrained_dir, model_dir)
    config_path = model_dir / "model_config.json"
    config_path.write_text(config_path.read_text().replace('"units": 8', '"units": 9'))
    with pytest.raises(export_lib.ExportError, match="does not match the model"):
        export_lib.export_saved_model(str(model_dir))


@pytest.mark.parametrize("overrides", [
    dict(lr_schedule="cosine", warmup_steps=2),
    dict(precision="mixed_float16"),
], ids=["cosine_schedule", "loss_scale_optimizer"])
def test_export_ignores_optimizer_layout(tmp_path, overrides):
    # The optimizer's variables differ with the schedule and loss scaling;
    # the export reads only the model and the step.
    text_path = tmp_path / "text.txt"
    text_path.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    model_dir = str(tmp_path / "model")
    train_lib.run(tiny_train_config(model_dir, str(text_path), **overrides))
    path = export_lib.export_saved_model(model_dir)
    assert path.endswith("/5")


def test_restore_reads_every_weight(untrained_dir):
    trainer = write_untrained_model_dir(untrained_dir + "-copy")
    model, step = export_lib.restore_model(trainer.model_config,
                                           tf.train.latest_checkpoint(untrained_dir + "-copy"))
    assert step == 3
    for restored, saved in zip(model.weights, trainer.model.weights):
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(saved), err_msg=saved.path)


def test_mixed_precision_export_keeps_float32_state(tmp_path):
    model_dir = str(tmp_path / "model")
    trainer = write_untrained_model_dir(model_dir, precision="mixed_bfloat16")
    path = export_lib.export_saved_model(model_dir)
    step = tf.saved_model.load(path).signatures["step_no_xla"]
    ids = tf.constant([1, 2], tf.int32)
    state = tf.zeros([2, 1, 8], tf.float32)
    out = step(ids=ids, h=state, c=state, temperature=tf.constant([0.0, 0.0]),
               seed=tf.constant([[1, 1], [2, 2]]))
    assert out["h"].dtype == tf.float32
    expected, _ = trainer.model(ids[:, None])
    # bfloat16 keeps 8 bits of mantissa; both sides round the same way, so
    # differences stay near float32 round-off.
    np.testing.assert_allclose(out["logits"].numpy(), expected.numpy()[:, 0], atol=1e-3)


# ------------------------------------------------------------------ versions


def test_default_version_is_training_step(tmp_path):
    assert export_lib.choose_version(str(tmp_path / "absent"), 500, None) == 500


def test_default_version_follows_highest_existing(tmp_path):
    for name in ("3", "10", ".tmp-99-0123abcd", "notes"):
        (tmp_path / name).mkdir()
    assert export_lib.choose_version(str(tmp_path), 5, None) == 11


def test_untrained_default_version_is_one(tmp_path):
    assert export_lib.choose_version(str(tmp_path), 0, None) == 1


def test_version_flag_must_be_new_and_positive(tmp_path):
    (tmp_path / "4").mkdir()
    assert export_lib.choose_version(str(tmp_path), 100, 5) == 5
    with pytest.raises(export_lib.ExportError, match="Version 4 already exists"):
        export_lib.choose_version(str(tmp_path), 100, 4)
    with pytest.raises(export_lib.ExportError, match="--version must be a positive integer"):
        export_lib.choose_version(str(tmp_path), 100, 0)


def test_stale_temp_dirs_are_removed(tmp_path):
    (tmp_path / ".tmp-7-0123abcd" / "variables").mkdir(parents=True)
    (tmp_path / "7").mkdir()
    export_lib.remove_stale_temp_dirs(str(tmp_path))
    assert os.listdir(tmp_path) == ["7"]


@pytest.fixture(scope="module")
def small_export(tmp_path_factory, untrained_dir):
    """An export of the untrained model as version 42 with max_generate_chars=5.

    The export directory starts with a stale temporary directory.
    """
    export_dir = tmp_path_factory.mktemp("small_export")
    (export_dir / ".tmp-7-0123abcd" / "variables").mkdir(parents=True)
    path = export_lib.export_saved_model(untrained_dir, str(export_dir), version=42,
                                         max_generate_chars=5)
    return export_dir, path


def test_export_writes_version_layout(small_export):
    export_dir, path = small_export
    assert path == str(export_dir / "42")
    assert os.listdir(export_dir) == ["42"]
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    assert os.path.exists(os.path.join(path, "variables", "variables.index"))
    assert os.path.exists(os.path.join(path, warmup.WARMUP_DIRECTORY, warmup.WARMUP_FILENAME))


def test_max_generate_chars_is_enforced(small_export):
    _, path = small_export
    generate = tf.saved_model.load(path).signatures["generate"]
    inputs = dict(prompts=tf.constant(["a"]), temperature=tf.constant([1.0]),
                  top_k=tf.constant([0]), seed=tf.constant([[1, 2]]))
    assert generate(num_chars=tf.constant([5]), **inputs)["ids"].shape == (1, 5)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`num_chars` must be in \[0, 5\]"):
        generate(num_chars=tf.constant([6]), **inputs)


def test_failed_export_leaves_no_version(tmp_path, untrained_dir, monkeypatch):
    def fail_after_saved_model(directory, *args):
        assert os.path.exists(os.path.join(directory, "saved_model.pb"))
        raise OSError("disk full (injected)")

    monkeypatch.setattr(warmup, "write_warmup_requests", fail_after_saved_model)
    export_dir = tmp_path / "export"
    with pytest.raises(OSError, match="injected"):
        export_lib.export_saved_model(untrained_dir, str(export_dir))
    assert os.listdir(export_dir) == []


# ------------------------------------------------------ after training


def test_export_after_training_sample_matches_trainer(trained, tmp_path):
    config = tiny_train_config(trained.model_dir, trained.text_path, export=True,
                               export_dir=str(tmp_path / "export"), sample_prompt="Привет ",
                               sample_length=12)
    path, sample = export_lib.export_after_training(config, trained.result)
    assert os.path.dirname(path) == str(tmp_path / "export")
    # Both sample with trainer.sampling.sample_ids and the seeds [seed, t].
    assert sample == train_lib.final_sample(config, trained.result)
