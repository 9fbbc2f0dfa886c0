"""Specification of batch jobs, the charlstm-generate command and scripts/serve.sh.

The command runs in subprocesses: its absl flags share names (seed,
batch_size) with the trainer's, so it cannot be imported into the pytest
process next to trainer.flags.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from serving import batch
from serving.backend import ModelSpec, RetryPolicy
from serving.grpc_backend import GrpcBackend
from serving.local_backend import LocalBackend
from serving.sampler import Sampler
from export_fixtures import PYTHON, REPO_ROOT, trained_export
from standin_servers import GrpcStandin, ModelRepository

DEFAULTS = batch.Settings(num_chars=6, temperature=1.0, top_k=0, seed=(0, 0))
SERVE_SH = str(REPO_ROOT / "scripts" / "serve.sh")
# Upper bound for one subprocess run; the loops below stop by themselves.
SUBPROCESS_TIMEOUT = 180


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "export_shared"
    root.mkdir(exist_ok=True)
    return os.path.dirname(trained_export(str(root)).export_path)


@pytest.fixture(scope="module")
def sampler(base_path):
    return Sampler(LocalBackend(base_path))


def write_prompts(path, rows) -> str:
    lines = [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def read_results(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run_cli(*args, timeout=SUBPROCESS_TIMEOUT):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([PYTHON, "-m", "serving.generate", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------- prompts file


def test_prompt_line_settings_override_defaults(tmp_path):
    path = write_prompts(tmp_path / "p.jsonl", [
        {"id": "a", "prompt": "Привет 🙂"},
        {"id": 2, "prompt": "", "num_chars": 3, "temperature": 0, "top_k": 4, "seed": [5, 6]},
    ])

    first, second = batch.read_prompts(path, DEFAULTS)

    assert first.settings == DEFAULTS
    assert first.prompt == "Привет 🙂"
    assert second.settings == batch.Settings(3, 0.0, 4, (5, 6))
    assert second.line_number == 2


@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "prompt": ', r"line 2: invalid JSON"),
    ('["a", "b"]', r"line 2: expected a JSON object"),
    ('{"id": "", "prompt": "x"}', r"line 2: 'id' must be a non-empty string or an integer"),
    ('{"id": "b"}', r"line 2: 'prompt' must be a string"),
    ('{"id": "b", "prompt": "x", "temprature": 1}', r"line 2: unknown field temprature"),
    ('{"id": "b", "prompt": "x", "num_chars": -1}', r"line 2: 'num_chars' must be an integer >= 0"),
    ('{"id": "b", "prompt": "x", "temperature": -0.5}', r"line 2: 'temperature' must be a number"),
    ('{"id": "b", "prompt": "x", "seed": [1]}', r"line 2: 'seed' must be an integer or a pair"),
])
def test_bad_line_names_line_number(tmp_path, line, message):
    path = write_prompts(tmp_path / "p.jsonl", [{"id": "a", "prompt": "x"}, line])

    with pytest.raises(batch.BadLineError, match=message):
        batch.read_prompts(path, DEFAULTS)
    assert [r.id for r in batch.read_prompts(path, DEFAULTS, on_bad_line="skip")] == ["a"]


def test_duplicate_id_is_an_error_even_when_skipping(tmp_path):
    path = write_prompts(tmp_path / "p.jsonl", [
        {"id": "a", "prompt": "x"}, {"id": 1, "prompt": "y"}, {"id": "a", "prompt": "z"}])

    with pytest.raises(batch.BadLineError, match=r"line 3: id 'a' already appeared on line 1"):
        batch.read_prompts(path, DEFAULTS, on_bad_line="skip")


def test_missing_prompts_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--prompts_file not found: .*nope\.jsonl"):
        batch.read_prompts(str(tmp_path / "nope.jsonl"), DEFAULTS)


# ------------------------------------------------------------- job runs


def test_job_writes_each_prompt_once(tmp_path, sampler):
    rows = [{"id": i, "prompt": f"ab{i}", "seed": i} for i in range(5)]
    records = batch.read_prompts(write_prompts(tmp_path / "p.jsonl", rows), DEFAULTS)
    output = tmp_path / "out.jsonl"

    summary = batch.run_job(sampler, records, str(output), batch_size=2)
    results = read_results(output)

    assert summary.written == 5
    assert [r["id"] for r in results] == [0, 1, 2, 3, 4]
    for row, result in zip(rows, results):
        expected, = sampler.generate([row["prompt"]], 6, temperature=1.0, seed=row["seed"])
        assert result["text"] == expected
        assert result["settings"]["seed"] == [row["seed"], 0]
        assert result["timing"]["batch_size"] == (2 if row["id"] < 4 else 1)


class FailingAfter:
    """Wraps a sampler; its `generate` raises after `calls` successful calls."""

    def __init__(self, sampler, calls):
        self.backend = sampler.backend
        self._sampler = sampler
        self._calls_left = calls

    def generate(self, *args, **kwargs):
        if self._calls_left == 0:
            raise RuntimeError("injected failure")
        self._calls_left -= 1
        return self._sampler.generate(*args, **kwargs)


def test_failed_job_resumes_without_repeats(tmp_path, sampler):
    rows = [{"id": f"q{i}", "prompt": "Привет"[:i + 1]} for i in range(6)]
    records = batch.read_prompts(write_prompts(tmp_path / "p.jsonl", rows), DEFAULTS)
    output = str(tmp_path / "out.jsonl")
    with pytest.raises(RuntimeError, match="injected failure"):
        batch.run_job(FailingAfter(sampler, 2), records, output, batch_size=2)
    written_first = read_results(output)

    summary = batch.run_job(sampler, records, output, batch_size=2)
    results = read_results(output)

    assert [r["id"] for r in written_first] == ["q0", "q1", "q2", "q3"]
    assert summary.already_done == 4
    assert [r["id"] for r in results] == [f"q{i}" for i in range(6)]
    assert results[:4] == written_first


def test_torn_last_line_is_dropped_and_redone(tmp_path, sampler):
    rows = [{"id": i, "prompt": "ab"} for i in range(3)]
    records = batch.read_prompts(write_prompts(tmp_path / "p.jsonl", rows), DEFAULTS)
    output = tmp_path / "out.jsonl"
    batch.run_job(sampler, records[:2], str(output), batch_size=2)
    complete = output.read_bytes()
    output.write_bytes(complete + b'{"id": 2, "prompt": "a')  # A kill in mid-write.

    batch.run_job(sampler, records, str(output), batch_size=2)
    results = read_results(output)

    assert output.read_bytes().startswith(complete)
    assert [r["id"] for r in results] == [0, 1, 2]


def test_corrupt_output_line_is_an_error(tmp_path, sampler):
    records = batch.read_prompts(write_prompts(tmp_path / "p.jsonl", [{"id": 1, "prompt": "a"}]),
                                 DEFAULTS)
    output = tmp_path / "out.jsonl"
    output.write_text('{"id": 0}\nnot json\n', encoding="utf-8")

    with pytest.raises(batch.BadLineError, match=r"--output .* line 2 is not a result line"):
        batch.run_job(sampler, records, str(output), batch_size=1)


def test_num_chars_over_cap_fails_before_calls(tmp_path, sampler):
    rows = [{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b", "num_chars": 11}]
    records = batch.read_prompts(write_prompts(tmp_path / "p.jsonl", rows), DEFAULTS)
    output = tmp_path / "out.jsonl"

    with pytest.raises(batch.BadLineError, match=r"line 2 \(id 2\): num_chars 11 is over .* 10"):
        batch.run_job(sampler, records, str(output), batch_size=1, max_num_chars=10)
    assert not output.exists()


def test_remote_output_is_rejected(tmp_path, sampler):
    with pytest.raises(ValueError, match=r"--output='gs://b/out.jsonl' must be a local file"):
        batch.run_job(sampler, [], "gs://b/out.jsonl", batch_size=1)


# ------------------------------------------------------------ the command


def test_cli_killed_job_resumes_each_id_once(tmp_path, base_path):
    repository = ModelRepository("charlstm", base_path)
    server = GrpcStandin(repository)
    try:
        rows = [{"id": f"p{i}", "prompt": f"café {i} 🙂", "seed": i} for i in range(12)]
        prompts = write_prompts(tmp_path / "p.jsonl", rows)
        output = tmp_path / "out.jsonl"
        args = [f"--server={server.address}", f"--prompts_file={prompts}", f"--output={output}",
                "--batch_size=2", "--num_chars=8", "--temperature=1"]
        repository.delay_seconds = 0.5  # Slow calls, so the kill lands mid-job.
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
        job = subprocess.Popen([PYTHON, "-m", "serving.generate", *args], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(1200):  # At most 120 s.
                if output.exists() and output.read_bytes().count(b"\n") >= 4:
                    break
                if job.poll() is not None:
                    break
                time.sleep(0.1)
            job.send_signal(signal.SIGKILL)
        finally:
            job.wait(30)
        killed_lines = output.read_bytes().count(b"\n")
        repository.delay_seconds = 0.0

        rerun = run_cli(*args)
        ids = [result["id"] for result in read_results(output)]
    finally:
        server.stop()
        repository.close()

    assert 4 <= killed_lines < 12, "the kill should land between batches"
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sorted(ids) == sorted(row["id"] for row in rows)
    assert len(ids) == len(set(ids))


def test_cli_stream_equals_generate(base_path, sampler):
    expected, = sampler.generate(["Привет"], 12, temperature=1.0, seed=5)

    streamed = run_cli(f"--saved_model={base_path}", "--prompt=Привет", "--num_chars=12",
                       "--temperature=1", "--seed=5", "--stream")

    assert streamed.returncode == 0, streamed.stderr[-2000:]
    assert streamed.stdout == expected + "\n"


def test_cli_names_num_chars_over_cap(base_path, sampler):
    cap = int(sampler.metadata()["max_generate_chars"])

    result = run_cli(f"--saved_model={base_path}", "--prompt=a", f"--num_chars={cap + 1}")

    assert result.returncode == 1
    assert f"--num_chars={cap + 1} is over the export's max_generate_chars {cap}" in result.stderr


def test_cli_rejects_two_backends():
    result = run_cli("--server=127.0.0.1:1", "--saved_model=/tmp", timeout=60)

    assert result.returncode != 0
    assert "Set exactly one of --server" in result.stderr


def test_cli_rejects_bad_server_address():
    result = run_cli("--server=http://localhost:8500", timeout=60)

    assert result.returncode != 0
    assert "--server must be host:port" in result.stderr


def test_cli_names_missing_prompts_file(tmp_path):
    result = run_cli("--saved_model=/nonexistent", f"--prompts_file={tmp_path}/none.jsonl",
                     f"--output={tmp_path}/out.jsonl")

    assert result.returncode == 1
    assert "--prompts_file not found" in result.stderr
    assert "none.jsonl" in result.stderr


def test_cli_reports_bad_line_before_loading(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"id": 1, "prompt": "a"}, "{oops"])

    result = run_cli("--saved_model=/nonexistent", f"--prompts_file={prompts}",
                     f"--output={tmp_path}/out.jsonl")

    assert result.returncode == 1
    assert "p.jsonl line 2: invalid JSON" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_unreachable_server_fails_after_retries():
    result = run_cli("--server=127.0.0.1:1", "--prompt=a", "--num_chars=2", "--retries=1",
                     "--initial_backoff=0.01")

    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr
    assert "on 127.0.0.1:1 failed after 2 attempts" in result.stderr


# --------------------------------------------------------------- serve.sh


def run_serve(*args):
    return subprocess.run(["bash", SERVE_SH, *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, TMPDIR=os.environ.get("TMPDIR", "/tmp")))


def test_serve_prints_docker_command(base_path):
    result = run_serve(f"--export_dir={base_path}", "--model_name=chars", "--print")
    command = result.stdout.split()

    assert result.returncode == 0, result.stderr
    assert command[:2] == ["docker", "run"]
    assert "8500:8500" in command
    assert "8501:8501" in command
    assert f"type=bind\\,source={os.path.realpath(base_path)}\\,target=/models/chars\\,readonly" in command
    assert "MODEL_NAME=chars" in command
    assert "tensorflow/serving:latest" in command
    assert "--xla_cpu_compilation_enabled=true" in command
    assert "--enable_batching=true" in command
    assert "--batching_parameters_file=/config/batching.config" in command


def test_serve_options_change_command(base_path):
    result = run_serve(f"--export_dir={base_path}", "--grpc_port=9000", "--rest_port=9001",
                       "--no_batching", "--gpu", "--print", "--", "--rest_api_timeout_in_ms=500")
    command = result.stdout.split()

    assert result.returncode == 0, result.stderr
    assert "9000:8500" in command
    assert "9001:8501" in command
    assert "--enable_batching=true" not in command
    assert "tensorflow/serving:latest-gpu" in command
    assert command[-1] == "--rest_api_timeout_in_ms=500"


@pytest.mark.parametrize("args, message", [
    ((), r"--export_dir is required"),
    (("--export_dir=/nonexistent",), r"--export_dir=/nonexistent not found"),
    (("--bogus",), r"unknown argument '--bogus'"),
])
def test_serve_rejects_bad_arguments(args, message):
    result = run_serve(*args, "--print")

    assert result.returncode == 2
    assert message.replace("\\", "") in result.stderr


def test_serve_rejects_version_directory(base_path):
    version_dir = os.path.join(base_path, sorted(os.listdir(base_path))[-1])

    result = run_serve(f"--export_dir={version_dir}", "--print")

    assert result.returncode == 2
    assert "is a version directory; pass its parent" in result.stderr


def test_serve_help_lists_options():
    result = run_serve("--help")

    assert result.returncode == 0
    assert "--export_dir=DIR" in result.stdout
    assert "--print" in result.stdout
