"""Scale-out: multi-worker training, input sharding, preemption and remote storage.

Multi-worker tests start real worker processes with TF_CONFIG on 127.0.0.1
ports, and each subprocess has a timeout; children are killed in `finally`.
Child processes point TensorFlow's GCE metadata probe (made when
PreemptionCheckpointHandler starts) at a closed 127.0.0.1 port, so it fails
at once and no other host is contacted.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import REPO_ROOT, TINY_TEXT
from trainer import data
from trainer import distribution
from trainer import preemption
from trainer import train_lib
from trainer.config import TrainConfig
from trainer.model import load_model_config

# A worker pair starts in about 10-30 s on a busy 2-core machine.
PROCESS_TIMEOUT_S = 240
# Summation order differs between one replica and two, so losses and
# weights agree to float32 rounding, not bit for bit.
RTOL, ATOL = 1e-5, 1e-6


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _child_env(tmp_path, tf_config: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=REPO_ROOT,
        TF_CPP_MIN_LOG_LEVEL="2",
        CUDA_VISIBLE_DEVICES="",
        GCE_METADATA_IP=f"127.0.0.1:{_free_ports(1)[0]}",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        TMPDIR=str(tmp_path / "child-tmp"),
    )
    os.makedirs(env["TMPDIR"], exist_ok=True)
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def _task_args(config: TrainConfig) -> list[str]:
    """Returns the `python -m trainer.task` command line for `config`."""
    args = [sys.executable, "-m", "trainer.task"]
    for field in dataclasses.fields(TrainConfig):
        value = getattr(config, field.name)
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(f"--{'' if value else 'no'}{field.name}")
        elif isinstance(value, tuple):
            args.extend(f"--{field.name}={item}" for item in value)
        else:
            args.append(f"--{field.name}={value}")
    return args


def _start(config: TrainConfig, env: dict, log_path) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen(_task_args(config), cwd=REPO_ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def _kill(processes) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def _start_workers(tmp_path, configs: list[TrainConfig]) -> list[subprocess.Popen]:
    ports = _free_ports(len(configs))
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    processes = []
    for index, config in enumerate(configs):
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        env = _child_env(tmp_path, tf_config)
        processes.append(_start(config, env, tmp_path / f"worker{index}.log"))
    return processes


def _wait(processes) -> list[int]:
    return [process.wait(timeout=PROCESS_TIMEOUT_S) for process in processes]


def _run_workers(tmp_path, configs: list[TrainConfig]) -> list[int]:
    """Runs one worker process per config to the end; returns their exit codes."""
    processes = _start_workers(tmp_path, configs)
    try:
        return _wait(processes)
    finally:
        _kill(processes)


def _read_log(path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _logged_losses(model_dir: str) -> dict[int, float]:
    """Returns {step: loss} from the train summaries in `model_dir`."""
    losses = {}
    for path in tf.io.gfile.glob(tf.io.gfile.join(model_dir, "train", "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "loss":
                    losses[event.step] = float(tf.make_ndarray(value.tensor))
    return losses


def _checkpoint_tensors(prefix: str) -> dict[str, np.ndarray]:
    """Returns the saved values of a checkpoint, without its bookkeeping entries."""
    reader = tf.train.load_checkpoint(prefix)
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
            if "_CHECKPOINTABLE_OBJECT_GRAPH" not in key and not key.startswith("save_counter")}


def _assert_same_tensors(actual: dict, expected: dict, rtol=0.0, atol=0.0) -> None:
    assert sorted(actual) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], rtol=rtol, atol=atol, err_msg=key)


def _restore_into_new_trainer(model_dir: str, strategy_name: str = "one_device"):
    strategy = distribution.create_strategy(strategy_name)
    trainer = train_lib.Trainer(strategy, load_model_config(model_dir), 4, 0.01, 5.0)
    path = preemption.restore_latest(trainer.checkpoint, model_dir)
    return trainer, path


# ---------------------------------------------------------------- input sharding


@pytest.mark.parametrize("replicas", [2, 4])
def test_worker_shards_disjoint_and_cover(replicas):
    seq_length, global_batch, seed = 5, 8, 3
    ids = np.arange(400, dtype=np.int32)  # id == position, so inputs[0] is a window start
    steps = data.steps_per_epoch(len(ids), seq_length, global_batch)

    def starts_per_step(dataset, batches_per_step):
        batches = [inputs[:, 0].numpy() for inputs, _ in
                   dataset.take(steps * batches_per_step)]
        return [set(np.concatenate(batches[i:i + batches_per_step]))
                for i in range(0, len(batches), batches_per_step)]

    shards = []
    for pipeline in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline,
                                             num_replicas_in_sync=replicas)
        dataset = data.make_train_dataset(ids, seq_length, global_batch, seed, context)
        shards.append(starts_per_step(dataset, replicas // 2))
    whole = starts_per_step(data.make_train_dataset(ids, seq_length, global_batch, seed), 1)

    epoch = set(data.epoch_window_starts(len(ids), seq_length, global_batch, seed, 0).numpy())
    for step in range(steps):
        assert not shards[0][step] & shards[1][step]
        assert shards[0][step] | shards[1][step] == whole[step]
    assert set().union(*shards[0], *shards[1]) == epoch


# ---------------------------------------------------------------- TF_CONFIG checks


def test_tf_config_index_out_of_range(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
         "task": {"type": "worker", "index": 2}}))
    with pytest.raises(ValueError, match=r"TF_CONFIG task index 2 is out of range.*0 to 1"):
        distribution.check_tf_config()


def test_tf_config_invalid_json(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{cluster: }")
    with pytest.raises(ValueError, match=r"TF_CONFIG is not valid JSON"):
        distribution.check_tf_config()


def test_tf_config_unknown_task_type(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "ps", "index": 0}}))
    with pytest.raises(ValueError, match=r"task type 'ps' is not 'chief' or 'worker'"):
        distribution.check_tf_config()


# ---------------------------------------------------------------- two workers


def test_two_workers_match_one_process(tmp_path, tiny_config):
    shared = dict(train_steps=6, steps_per_loop=2, log_every_steps=1, checkpoint_every_steps=3,
                  eval_every_steps=6, sample_length=0)
    worker_config = tiny_config(model_dir=str(tmp_path / "two"), strategy="multi_worker",
                                **shared)
    processes = _start_workers(tmp_path, [worker_config, worker_config])
    try:
        reference = train_lib.run(tiny_config(model_dir=str(tmp_path / "one"),
                                              strategy="one_device", **shared))
        exit_codes = _wait(processes)
    finally:
        _kill(processes)
    chief_log = _read_log(tmp_path / "worker0.log")
    assert exit_codes == [0, 0], chief_log[-3000:]
    assert "task worker:0 of 2 workers, 2 replicas in sync" in chief_log
    assert reference.summary["replicas"] == 1

    expected = _logged_losses(str(tmp_path / "one"))
    actual = _logged_losses(str(tmp_path / "two"))
    assert sorted(actual) == [1, 2, 3, 4, 5, 6]
    assert sorted(expected) == sorted(actual)
    for step in expected:
        assert actual[step] == pytest.approx(expected[step], rel=RTOL), step

    _assert_same_tensors(_checkpoint_tensors(str(tmp_path / "two" / "ckpt-6")),
                         _checkpoint_tensors(str(tmp_path / "one" / "ckpt-6")), RTOL, ATOL)
    # The non-chief worker wrote its checkpoints into TMPDIR and removed them.
    assert os.listdir(tmp_path / "child-tmp") == []


def test_workers_reject_different_text(tmp_path, tiny_config, tiny_corpus):
    other = tmp_path / "other.txt"
    other.write_text(TINY_TEXT.replace("dog", "fox"), encoding="utf-8")
    configs = [tiny_config(model_dir=str(tmp_path / "model"), strategy="multi_worker",
                           text_files=(path,), sample_length=0)
               for path in (tiny_corpus, str(other))]
    exit_codes = _run_workers(tmp_path, configs)
    chief_log = _read_log(tmp_path / "worker0.log")
    assert exit_codes == [2, 2], chief_log[-3000:]
    assert "Worker 1 built a different vocabulary from worker 0" in chief_log
    assert not glob.glob(str(tmp_path / "model" / "ckpt-*"))


def _wait_for_file(pattern: str, processes, timeout_s: float = PROCESS_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not glob.glob(pattern):
        if any(process.poll() is not None for process in processes):
            raise AssertionError(f"A process exited before {pattern} appeared.")
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern} did not appear within {timeout_s} s.")
        time.sleep(0.02)


def test_sigterm_to_one_worker_stops_all(tmp_path, tiny_config):
    config = tiny_config(model_dir=str(tmp_path / "model"), strategy="multi_worker",
                         train_steps=3000, steps_per_loop=1, log_every_steps=1000,
                         checkpoint_every_steps=5, eval_every_steps=3000, sample_length=0)
    processes = _start_workers(tmp_path, [config, config])
    try:
        _wait_for_file(str(tmp_path / "model" / "ckpt-5.index"), processes)
        processes[1].send_signal(signal.SIGTERM)
        exit_codes = _wait(processes)
    finally:
        _kill(processes)
    logs = [_read_log(tmp_path / f"worker{i}.log") for i in range(2)]
    assert exit_codes == [preemption.PREEMPTED_EXIT_CODE] * 2, logs[0][-3000:]
    latest = tf.train.latest_checkpoint(str(tmp_path / "model"))
    step = int(latest.rsplit("-", 1)[1])
    assert 5 <= step < 3000
    for log in logs:
        assert f"at step {step}. Exiting with code {preemption.PREEMPTED_EXIT_CODE}" in log

    resumed_config = dataclasses.replace(config, train_steps=step + 3)
    exit_codes = _run_workers(tmp_path, [resumed_config, resumed_config])
    logs = [_read_log(tmp_path / f"worker{i}.log") for i in range(2)]
    assert exit_codes == [0, 0], logs[0][-3000:]
    for log in logs:
        assert f"Resumed from {latest} at step {step}." in log
    with open(tmp_path / "model" / "summary.json") as f:
        assert json.load(f)["steps_this_run"] == 3


def test_workers_reject_different_checkpoints(tmp_path, tiny_config):
    # Only worker 1 can read a checkpoint, as with a --model_dir on one
    # machine's local disk.
    train_lib.run(tiny_config(model_dir=str(tmp_path / "worker1"), strategy="one_device"))
    configs = [tiny_config(model_dir=str(tmp_path / f"worker{i}"), strategy="multi_worker",
                           sample_length=0) for i in range(2)]
    exit_codes = _run_workers(tmp_path, configs)
    chief_log = _read_log(tmp_path / "worker0.log")
    assert exit_codes == [2, 2], chief_log[-3000:]
    assert "Worker 1 restored step 6 but worker 0 restored step 0" in chief_log
    assert not glob.glob(str(tmp_path / "worker0" / "ckpt-*"))


# ---------------------------------------------------------------- SIGTERM on one machine


def test_sigterm_saves_and_resume_matches(tmp_path, tiny_config):
    total = 300  # Leaves the child hundreds of steps after ckpt-10 to receive SIGTERM.
    shared = dict(train_steps=total, steps_per_loop=1, log_every_steps=100,
                  checkpoint_every_steps=10, eval_every_steps=total, sample_length=0,
                  strategy="one_device")
    config = tiny_config(model_dir=str(tmp_path / "preempted"), **shared)
    process = _start(config, _child_env(tmp_path), tmp_path / "train.log")
    try:
        _wait_for_file(str(tmp_path / "preempted" / "ckpt-10.index"), [process])
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=PROCESS_TIMEOUT_S)
    finally:
        _kill([process])
    log = _read_log(tmp_path / "train.log")
    assert exit_code == preemption.PREEMPTED_EXIT_CODE, log[-3000:]
    preempted_step = int(tf.train.latest_checkpoint(config.model_dir).rsplit("-", 1)[1])
    assert 10 <= preempted_step < total
    assert f"at step {preempted_step}. Exiting with code 75" in log

    resumed = train_lib.run(config)
    assert resumed.summary["steps"] == total
    assert resumed.summary["steps_this_run"] == total - preempted_step
    reference = train_lib.run(tiny_config(model_dir=str(tmp_path / "reference"), **shared))
    assert reference.summary["steps"] == total
    _assert_same_tensors(_checkpoint_tensors(os.path.join(config.model_dir, f"ckpt-{total}")),
                         _checkpoint_tensors(str(tmp_path / "reference" / f"ckpt-{total}")))


def test_watcher_restores_previous_handler(tiny_config):
    previous = signal.getsignal(signal.SIGTERM)
    strategy = distribution.create_strategy("one_device")
    step = tf.Variable(0, dtype=tf.int64)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(step=step), "ram://watcher", 1)
    watcher = preemption.PreemptionWatcher(strategy, manager, step)
    assert signal.getsignal(signal.SIGTERM) != previous
    watcher.close()
    assert signal.getsignal(signal.SIGTERM) == previous


def test_watcher_saves_current_step_on_sigterm(tmp_path):
    strategy = distribution.create_strategy("one_device")
    step = tf.Variable(7, dtype=tf.int64)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(step=step), str(tmp_path), 2)
    watcher = preemption.PreemptionWatcher(strategy, manager, step)
    try:
        watcher.check()
        assert manager.latest_checkpoint is None
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(preemption.TrainingPreempted, match=r"preempted at step 7") as raised:
            watcher.check()
    finally:
        watcher.close()
    assert raised.value.code == preemption.PREEMPTED_EXIT_CODE
    assert manager.latest_checkpoint.endswith("ckpt-7")


# ---------------------------------------------------------------- interrupted checkpoint writes


def _copy_truncated(source: str, target: str, keep_fraction: float) -> None:
    with open(source, "rb") as f:
        content = f.read()
    with open(target, "wb") as f:
        f.write(content[:int(len(content) * keep_fraction)])


def test_torn_write_resumes_from_previous(tmp_path, tiny_config, caplog):
    config = tiny_config()
    train_lib.run(config)  # Saves ckpt-3 and ckpt-6.
    # A save of step 9 killed before TensorFlow updated the `checkpoint` state file.
    model_dir = config.model_dir
    for suffix in (".index", ".data-00000-of-00001"):
        _copy_truncated(os.path.join(model_dir, "ckpt-6" + suffix),
                        os.path.join(model_dir, "ckpt-9" + suffix), 0.5)
    caplog.set_level(logging.INFO, logger="absl")

    result = train_lib.run(dataclasses.replace(config, train_steps=9))

    assert "does not list, left by a save that did not finish: ckpt-9.data" in caplog.text
    assert f"Resumed from {os.path.join(model_dir, 'ckpt-6')} at step 6" in caplog.text
    assert result.summary["steps_this_run"] == 3
    assert _restore_into_new_trainer(model_dir)[1].endswith("ckpt-9")


def test_corrupt_latest_falls_back_to_previous(tmp_path, tiny_config, caplog):
    config = tiny_config()
    train_lib.run(config)
    data_file = os.path.join(config.model_dir, "ckpt-6.data-00000-of-00001")
    _copy_truncated(data_file, data_file, 0.5)
    caplog.set_level(logging.INFO, logger="absl")

    result = train_lib.run(dataclasses.replace(config, train_steps=9))

    assert "ckpt-6 cannot be restored" in caplog.text
    assert f"Resumed from {os.path.join(config.model_dir, 'ckpt-3')} at step 3" in caplog.text
    assert result.summary["steps_this_run"] == 6


def test_all_checkpoints_corrupt_is_setup_error(tmp_path, tiny_config):
    config = tiny_config()
    train_lib.run(config)
    for data_file in glob.glob(os.path.join(config.model_dir, "ckpt-*.data-*")):
        _copy_truncated(data_file, data_file, 0.5)
    with pytest.raises(train_lib.SetupError, match=r"lists 2 checkpoints and none can be restored"):
        train_lib.run(dataclasses.replace(config, train_steps=9))


# ---------------------------------------------------------------- storage other than a local disk


def test_ram_filesystem_end_to_end(tmp_path, tiny_config):
    root = f"ram://scaleout-{os.getpid()}-{time.monotonic_ns()}"
    corpus = f"{root}/corpus/tiny.txt"
    tf.io.gfile.makedirs(f"{root}/corpus")
    with tf.io.gfile.GFile(corpus, "w") as f:
        f.write("Привет, café 🙂\n" + TINY_TEXT)
    config = tiny_config(model_dir=f"{root}/model", text_files=(corpus,))

    first = train_lib.run(config)
    resumed = train_lib.run(dataclasses.replace(config, train_steps=9))

    assert first.summary["steps"] == 6
    assert resumed.summary["steps_this_run"] == 3
    for name in ("vocabulary.json", "model_config.json", "summary.json", "checkpoint",
                 "ckpt-9.index"):
        assert tf.io.gfile.exists(f"{root}/model/{name}"), name
    assert tf.io.gfile.glob(f"{root}/model/train/events.out.tfevents.*")
    assert "🙂" in first.vocabulary.characters
    assert not os.path.exists(os.path.join(REPO_ROOT, "ram:"))


def test_ram_filesystem_export(tmp_path, tiny_config):
    export_lib = pytest.importorskip("export.export_lib")
    root = f"ram://scaleout-export-{os.getpid()}-{time.monotonic_ns()}"
    config = tiny_config(model_dir=f"{root}/model")
    train_lib.run(config)

    export_lib.export_saved_model(config.model_dir, f"{root}/export")

    assert tf.io.gfile.glob(f"{root}/export/**/saved_model.pb") or tf.io.gfile.exists(
        f"{root}/export/saved_model.pb")


# ---------------------------------------------------------------- replica counts

_TWO_REPLICA_PROBE = """
import sys
from trainer import distribution, preemption, train_lib
from trainer.model import load_model_config
model_dir, out_prefix = sys.argv[1:3]
distribution.configure_cpu_replicas(2)
strategy = distribution.create_strategy("mirrored", cpu_replicas=2)
assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
trainer = train_lib.Trainer(strategy, load_model_config(model_dir), 4, 0.01, 5.0)
preemption.restore_latest(trainer.checkpoint, model_dir)
for variable in trainer.model.variables + trainer.optimizer.variables + [trainer.step]:
    copies = [v.numpy() for v in strategy.experimental_local_results(variable)]
    assert all((c == copies[0]).all() for c in copies), variable.name
trainer.checkpoint.write(out_prefix)
print("step", int(trainer.step.numpy()))
"""


def test_two_replica_checkpoint_restores_on_one(tmp_path, tiny_config):
    config = tiny_config(strategy="mirrored", cpu_replicas=2, sample_length=0)
    process = _start(config, _child_env(tmp_path), tmp_path / "train.log")
    try:
        exit_code = process.wait(timeout=PROCESS_TIMEOUT_S)
    finally:
        _kill([process])
    assert exit_code == 0, _read_log(tmp_path / "train.log")[-3000:]
    assert "2 replicas in sync" in _read_log(tmp_path / "train.log")

    trainer, path = _restore_into_new_trainer(config.model_dir)
    written = trainer.checkpoint.write(str(tmp_path / "restored" / "ckpt"))

    assert int(trainer.step.numpy()) == 6
    saved = _checkpoint_tensors(path)
    assert sum(key.startswith("optimizer/") for key in saved) > 2 * len(trainer.model.weights)
    _assert_same_tensors(_checkpoint_tensors(written), saved)


def test_one_replica_checkpoint_restores_on_two(tmp_path, tiny_config):
    config = tiny_config(strategy="one_device")
    train_lib.run(config)
    out_prefix = str(tmp_path / "restored" / "ckpt")
    completed = subprocess.run(
        [sys.executable, "-c", _TWO_REPLICA_PROBE, config.model_dir, out_prefix],
        cwd=REPO_ROOT, env=_child_env(tmp_path), capture_output=True, text=True,
        timeout=PROCESS_TIMEOUT_S)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "step 6" in completed.stdout

    _assert_same_tensors(_checkpoint_tensors(out_prefix),
                         _checkpoint_tensors(os.path.join(config.model_dir, "ckpt-6")))
