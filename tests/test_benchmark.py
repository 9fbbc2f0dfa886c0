"""scripts/benchmark.py runs every mode on a tiny model and prints well-formed JSON lines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "benchmark.py")
TINY = ["--units=16", "--embedding_dim=8", "--batch_size=4", "--seq_length=10", "--steps=2",
        "--warmup=1", "--num_chars=5", "--generate_batch_sizes=1,3"]


def run_benchmark(*arguments: str) -> subprocess.CompletedProcess:
    # A subprocess, because the script defines its own absl flags.
    return subprocess.run([sys.executable, SCRIPT, *arguments], capture_output=True, text=True,
                          timeout=300, cwd=REPO_ROOT)


def measurements(completed: subprocess.CompletedProcess) -> list[dict]:
    assert completed.returncode == 0, completed.stderr[-3000:]
    return [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]


def test_all_modes_print_measurements(tiny_corpus):
    lines = measurements(run_benchmark("--mode=all", f"--text={tiny_corpus}", *TINY))
    kinds = [(line["mode"], line.get("signature"), line["batch_size"]) for line in lines]
    assert kinds == [
        ("train", None, 4),
        ("step", "serving_default", 1), ("step", "step_no_xla", 1),
        ("step", "serving_default", 3), ("step", "step_no_xla", 3),
        ("generate", "generate", 1), ("generate", "generate", 3),
    ]
    for line in lines:
        assert line["chars_per_second"] > 0, line
        assert line["step_seconds_median"] > 0, line
        assert line["peak_rss_mib"] > 0, line
        assert line["steps"] == 2, line
        assert line["units"] == 16, line


def test_train_reports_its_configuration():
    (line,) = measurements(run_benchmark("--mode=train", "--lstm_implementation=keras",
                                         "--dtype=bfloat16", "--input=one_hot", "--layers=2",
                                         *TINY))
    assert line["lstm_implementation"] == "keras"
    assert line["dtype"] == "bfloat16"
    assert line["input"] == "one_hot"
    assert line["layers"] == 2
    assert line["vocab_size"] == 80  # random ids, the --vocab_size default
    assert line["strategy"] == "OneDeviceStrategy"


@pytest.mark.parametrize("argument, message", [
    ("--generate_batch_sizes=1,x", r"--generate_batch_sizes=1,x must list positive integers"),
    ("--text=/nonexistent/corpus.txt", r"--text='/nonexistent/corpus.txt' not found"),
])
def test_bad_argument_rejected(argument, message):
    completed = run_benchmark("--mode=train", argument, *TINY[:-1])
    assert completed.returncode != 0
    assert re.search(message, completed.stderr), completed.stderr[-2000:]
