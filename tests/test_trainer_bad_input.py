"""Bad input fails before the model is built, names the fix, and writes nothing."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from trainer import train_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_bytes(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def snapshot(directory: str) -> dict[str, tuple[int, str]]:
    """Returns {relative path: (mtime in ns, SHA-256)} of every file under `directory`."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            files[os.path.relpath(path, directory)] = (os.stat(path).st_mtime_ns, digest)
    return files


# Corpus problems.

def test_missing_file(tiny_config, tmp_path, no_model_build):
    missing = str(tmp_path / "nope" / "missing.txt")
    with pytest.raises(train_lib.SetupError, match=r"--text_files: '.*missing\.txt' matches no "
                                                   r"file\. Check the path or glob"):
        train_lib.run(tiny_config(text_files=(missing,)))


def test_glob_matching_nothing(tiny_config, tmp_path, no_model_build):
    with pytest.raises(train_lib.SetupError, match=r"'.*\*\.txt' matches no file"):
        train_lib.run(tiny_config(text_files=(str(tmp_path / "empty_dir" / "*.txt"),)))


def test_directory_instead_of_file(tiny_config, tmp_path, no_model_build):
    (tmp_path / "texts").mkdir()
    with pytest.raises(train_lib.SetupError, match=r"'.*texts' is a directory\. Name the files "
                                                   r"inside it, for example '.*texts/\*\.txt'"):
        train_lib.run(tiny_config(text_files=(str(tmp_path / "texts"),)))


def test_empty_corpus(tiny_config, tmp_path, no_model_build):
    empty = write_bytes(tmp_path, "empty.txt", b"")
    with pytest.raises(train_lib.SetupError, match=r"Corpus 'empty\.txt' \(.*empty\.txt\) is empty"):
        train_lib.run(tiny_config(text_files=(empty,)))


def test_bom_only_corpus_is_empty(tiny_config, tmp_path, no_model_build):
    bom_only = write_bytes(tmp_path, "bom.txt", b"\xef\xbb\xbf")
    with pytest.raises(train_lib.SetupError, match=r"'bom\.txt'.* is empty"):
        train_lib.run(tiny_config(text_files=(bom_only,)))


def test_corpus_shorter_than_global_batch(tiny_config, tmp_path, no_model_build):
    # batch 4 of windows of 10 needs (4 + 1) * 10 = 50 training characters.
    short = write_bytes(tmp_path, "short.txt", b"abcdefghij" * 5)
    with pytest.raises(train_lib.SetupError,
                       match=r"'short\.txt' is too short: its training split has 48 characters, "
                             r"but one global batch of --batch_size=4 windows of --seq_length=10 "
                             r"needs at least 50\..*lower --batch_size or --seq_length"):
        train_lib.run(tiny_config(text_files=(short,)))


def test_validation_split_too_short(tiny_config, tmp_path, no_model_build):
    text = write_bytes(tmp_path, "text.txt", b"abcdefghij" * 100)
    with pytest.raises(train_lib.SetupError,
                       match=r"validation split has 10 characters.*Raise --validation_fraction "
                             r"\(now 0\.01\)"):
        train_lib.run(tiny_config(text_files=(text,), validation_fraction=0.01))


def test_invalid_utf8_names_byte_offset(tiny_config, tmp_path, no_model_build):
    data = "привет ".encode("utf-8") * 3 + b"\xff" + b"tail"
    bad = write_bytes(tmp_path, "bad.txt", data)
    with pytest.raises(train_lib.SetupError,
                       match=r"bad\.txt: byte b'\\xff' at offset 39 is not valid utf-8 .*"
                             r"Set --encoding to the file's real encoding"):
        train_lib.run(tiny_config(text_files=(bad,)))


def test_invalid_bytes_in_second_file(tiny_config, tmp_path, no_model_build):
    good = write_bytes(tmp_path, "a.txt", b"fine text")
    bad = write_bytes(tmp_path, "b.txt", b"ab\xc3(")
    with pytest.raises(train_lib.SetupError, match=r"b\.txt: byte b'\\xc3' at offset 2"):
        train_lib.run(tiny_config(text_files=(good, bad)))


def test_unknown_encoding(tiny_config, no_model_build):
    with pytest.raises(train_lib.SetupError,
                       match=r"--encoding='utf-9' is not a known text encoding\. Use a Python "
                             r"codec name"):
        train_lib.run(tiny_config(encoding="utf-9"))


def test_unknown_encoding_with_default_corpus(tiny_config, no_model_build):
    with pytest.raises(train_lib.SetupError, match=r"--encoding='klingon'"):
        train_lib.run(tiny_config(text_files=(), encoding="klingon"))


def test_min_char_count_leaving_no_characters(tiny_config, no_model_build):
    with pytest.raises(train_lib.SetupError,
                       match=r"--min_char_count=100000 leaves no character.*Lower --min_char_count"):
        train_lib.run(tiny_config(min_char_count=100_000))


# Invalid flag values.

@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, r"--batch_size must be a positive integer, got 0"),
    ("seq_length", -3, r"--seq_length must be a positive integer, got -3"),
    ("units", 0, r"--units must be a positive integer, got 0"),
    ("epochs", 0, r"--epochs must be a positive integer, got 0"),
    ("steps_per_loop", 0, r"--steps_per_loop must be a positive integer, got 0"),
    ("checkpoint_every_steps", 0, r"--checkpoint_every_steps must be a positive integer"),
    ("min_char_count", 0, r"--min_char_count must be a positive integer, got 0"),
    ("train_steps", -1, r"--train_steps must be a non-negative integer, got -1"),
    ("validation_fraction", 0.0, r"--validation_fraction must be in \(0, 1\), got 0\.0"),
    ("validation_fraction", 1.0, r"--validation_fraction must be in \(0, 1\), got 1\.0"),
    ("validation_fraction", 1.5, r"--validation_fraction must be in \(0, 1\), got 1\.5"),
    ("dropout", 1.0, r"--dropout must be in \[0, 1\), got 1\.0"),
    ("learning_rate", 0.0, r"--learning_rate must be positive, got 0\.0"),
    ("clip_norm", -1.0, r"--clip_norm must be >= 0 \(0 turns clipping off\), got -1\.0"),
    ("sample_temperature", -0.5, r"--sample_temperature must be >= 0 \(0 means greedy\)"),
    ("precision", "half", r"--precision='half' is not one of auto, float32, mixed_float16, "
                          r"mixed_bfloat16"),
    ("strategy", "horovod", r"--strategy='horovod' is not one of auto, mirrored, one_device"),
    ("lr_schedule", "step", r"--lr_schedule='step' is not one of constant, cosine"),
    ("input_encoding", "bytes", r"--input_encoding='bytes' is not one of embedding, one_hot"),
])
def test_invalid_flag_value(tiny_config, no_model_build, field, value, message):
    with pytest.raises(train_lib.SetupError, match=message):
        train_lib.run(tiny_config(**{field: value}))


def test_text_files_and_tfds_together(tiny_config, no_model_build):
    with pytest.raises(train_lib.SetupError, match=r"Set either --text_files or --tfds_name"):
        train_lib.run(tiny_config(tfds_name="tiny_shakespeare"))


def test_one_device_with_cpu_replicas(tiny_config, no_model_build):
    with pytest.raises(train_lib.SetupError,
                       match=r"--cpu_replicas=2 needs --strategy=mirrored or auto"):
        train_lib.run(tiny_config(strategy="one_device", cpu_replicas=2))


# A failed start leaves an existing model directory as it was.

@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, make_tiny_config):
    model_dir = tmp_path_factory.mktemp("trained") / "model"
    train_lib.run(make_tiny_config(model_dir, train_steps=3))
    return str(model_dir)


def failing_starts(tmp_path):
    other = write_bytes(tmp_path, "other.txt", "другой текст ".encode("utf-8") * 100)
    bad_bytes = write_bytes(tmp_path, "bad.txt", b"abc\xff" * 100)
    short = write_bytes(tmp_path, "short.txt", b"abc")
    return {
        "other corpus": dict(text_files=(other,)),
        "invalid bytes": dict(text_files=(bad_bytes,)),
        "short corpus": dict(text_files=(short,)),
        "missing file": dict(text_files=(str(tmp_path / "missing.txt"),)),
        "other units": dict(units=32),
        "other layers": dict(num_layers=2),
        "invalid flag": dict(batch_size=0),
        "unknown encoding": dict(encoding="utf-9"),
    }


def test_failed_starts_leave_model_dir_unchanged(trained_dir, make_tiny_config, tmp_path,
                                                 no_model_build):
    before = snapshot(trained_dir)
    assert "vocabulary.json" in before
    assert "checkpoint" in before
    for case, overrides in failing_starts(tmp_path).items():
        with pytest.raises(train_lib.SetupError):
            train_lib.run(make_tiny_config(trained_dir, **overrides))
        assert snapshot(trained_dir) == before, f"{case} changed the model directory"


def test_failed_start_creates_no_model_dir(tiny_config, tmp_path, no_model_build):
    model_dir = tmp_path / "fresh"
    with pytest.raises(train_lib.SetupError):
        train_lib.run(tiny_config(model_dir=str(model_dir), text_files=(str(tmp_path / "x"),)))
    assert not model_dir.exists()


# The command line. Each subprocess imports TensorFlow, so there are only two.

def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "trainer.task", *arguments], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_cli_rejects_zero_batch_size(tmp_path):
    process = run_cli("--batch_size=0", f"--model_dir={tmp_path / 'model'}")
    assert process.returncode != 0
    assert "flag --batch_size=0: 0 is not a positive integer" in process.stderr
    assert not (tmp_path / "model").exists()


def test_cli_setup_error_exits_2(tmp_path):
    process = run_cli(f"--text_files={tmp_path / 'missing.txt'}", "--strategy=one_device",
                      f"--model_dir={tmp_path / 'model'}")
    assert process.returncode == 2, process.stderr[-2000:]
    assert "missing.txt' matches no file" in process.stderr
    assert "Traceback" not in process.stderr
    assert not (tmp_path / "model").exists()
