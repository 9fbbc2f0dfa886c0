"""`python -m export` and the export at the end of `python -m trainer.task`, run as programs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap

import pytest

from export import export_lib
from export_fixtures import PYTHON, REPO_ROOT, trained_export

TIMEOUT_S = 240


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "export_shared"
    root.mkdir(exist_ok=True)
    return trained_export(str(root))


def run_python(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    completed = subprocess.run([PYTHON, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=TIMEOUT_S, env=env)
    if check:
        assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def test_cli_export_runs_without_training_files(trained, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(trained.model_dir, model_dir, ignore=shutil.ignore_patterns("export"))
    export_dir = tmp_path / "serving"
    completed = run_python("-m", "export", f"--model_dir={model_dir}", f"--export_dir={export_dir}",
                           "--version=9", "--max_generate_chars=50")
    assert completed.stdout.strip() == str(export_dir / "9")

    # Only the SavedModel is left: no checkpoints, vocabulary.json or model_config.json.
    shutil.rmtree(model_dir)
    script = textwrap.dedent(f"""
        import json
        from export import export_lib
        print(json.dumps(export_lib.sample_from_saved_model({str(export_dir / "9")!r}, "Привет",
                                                            8, 0.0, 1, "generate")))
    """)
    completed = run_python("-c", script)
    sample = json.loads(completed.stdout.strip().splitlines()[-1])
    assert isinstance(sample, str)
    assert len(sample) == 8


def test_cli_rejects_missing_model_dir(tmp_path):
    completed = run_python("-m", "export", f"--model_dir={tmp_path / 'absent'}", check=False)
    assert completed.returncode == 2
    assert "--model_dir=" in completed.stderr
    assert "does not exist" in completed.stderr


def test_cli_requires_model_dir():
    completed = run_python("-m", "export", check=False)
    assert completed.returncode != 0
    assert "--model_dir" in completed.stderr


def test_killed_export_leaves_no_version(trained, tmp_path):
    export_dir = tmp_path / "serving"
    # The child kills itself with SIGKILL at the worst moment: the SavedModel
    # and warm-up file are complete in the temporary directory, and the
    # rename into the version directory has not happened.
    script = textwrap.dedent(f"""
        import os, signal
        from export import export_lib
        export_lib._rename_into_place = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
        export_lib.export_saved_model({trained.model_dir!r}, {str(export_dir)!r})
    """)
    completed = run_python("-c", script, check=False)
    assert completed.returncode == -signal.SIGKILL
    left = os.listdir(export_dir)
    assert not [name for name in left if name.isdigit()]
    assert len(left) == 1
    assert left[0].startswith(export_lib.TEMP_PREFIX)

    path = export_lib.export_saved_model(trained.model_dir, str(export_dir))
    assert os.listdir(export_dir) == [os.path.basename(path)]


def test_training_job_exports_and_samples(trained, tmp_path):
    model_dir = tmp_path / "model"
    export_dir = tmp_path / "serving"
    completed = run_python(
        "-m", "trainer.task", f"--model_dir={model_dir}", f"--text_files={trained.text_path}",
        "--seq_length=20", "--batch_size=8", "--train_steps=2", "--embedding_dim=8",
        "--units=16", "--precision=float32", "--steps_per_loop=2", "--sample_length=10",
        "--sample_prompt=Привет", "--nodeterministic", f"--export_dir={export_dir}")
    assert os.listdir(export_dir) == ["2"]
    assert f"The final sample comes from the export at {export_dir / '2'}" in completed.stderr
    assert "--- sample (10 characters" in completed.stdout
