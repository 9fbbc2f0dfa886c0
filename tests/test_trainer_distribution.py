"""Two CPU replicas under MirroredStrategy train exactly like one replica.

Logical CPU devices must be configured before TensorFlow initializes its
devices, once per process, and the pytest process must keep its single CPU
device for the other tests. So one subprocess (this file run as a script)
computes everything on 2 logical CPUs and writes JSON, and the tests below
check that JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Float32 sums in a different order (two halves, then the halves added) may
# differ in the last bits, so losses and weights are compared to this tolerance.
RTOL = 1e-5
ATOL = 1e-6
# Small enough that the first steps clip: their global gradient norm is about 0.1.
CLIP_NORM = 0.01


def _compare_trainers(clip_norm: float, steps: int = 3) -> dict:
    """Trains one and two replicas from the same weights on the same batches."""
    import numpy as np
    import tensorflow as tf

    from trainer import data, distribution, train_lib
    from trainer.model import ModelConfig

    ids = (np.arange(600) * 7 % 11 + 1).astype(np.int32)
    config = ModelConfig(vocab_size=12, embedding_dim=8, units=16)
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    two = distribution.create_strategy("mirrored", cpu_replicas=2)
    trainers = [train_lib.Trainer(strategy, config, 8, learning_rate=0.01, clip_norm=clip_norm)
                for strategy in (one, two)]
    for source, target in zip(trainers[0].model.weights, trainers[1].model.weights):
        target.assign(source.numpy())

    # The unclipped global gradient norm of the first batch, to show the clip acts.
    inputs, targets = next(iter(data.make_train_dataset(ids, 10, 8, seed=1)))
    with tf.GradientTape() as tape:
        loss = trainers[0].compute_loss(inputs, targets)
    gradients = tape.gradient(loss, trainers[0].model.trainable_variables)
    first_norm = float(tf.linalg.global_norm(gradients))

    losses = []
    for trainer in trainers:
        dataset = trainer.strategy.distribute_datasets_from_function(
            lambda context: data.make_train_dataset(ids, 10, 8, 1, context))
        iterator = iter(dataset)
        losses.append([float(trainer.train_loop(iterator, tf.constant(1))) for _ in range(steps)])
    weight_diff = max(float(np.max(np.abs(a.numpy() - b.numpy())))
                      for a, b in zip(trainers[0].model.weights, trainers[1].model.weights))
    weight_scale = max(float(np.max(np.abs(a.numpy()))) for a in trainers[0].model.weights)
    return dict(replicas=[t.strategy.num_replicas_in_sync for t in trainers], losses=losses,
                first_norm=first_norm, weight_diff=weight_diff, weight_scale=weight_scale)


def _nan_on_one_replica(clip_norm: float) -> dict:
    """Applies a gradient that is non-finite on replica 1 only, under float16 loss scaling."""
    import numpy as np
    import tensorflow as tf

    from trainer import distribution, train_lib
    from trainer.model import ModelConfig

    strategy = distribution.create_strategy("mirrored", cpu_replicas=2)
    config = ModelConfig(vocab_size=6, embedding_dim=4, units=8, precision="mixed_float16")
    trainer = train_lib.Trainer(strategy, config, 4, learning_rate=0.01, clip_norm=clip_norm)
    variables = trainer.model.trainable_variables
    before = [v.numpy() for v in variables]
    scale_before = float(tf.identity(trainer.optimizer.dynamic_scale.value))

    def replica_fn():
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        poison = tf.where(replica == 1, float("nan"), 0.0)
        gradients = [tf.ones_like(v) for v in variables]
        gradients[0] = gradients[0] + poison
        trainer.apply_gradients(gradients)

    tf.function(lambda: strategy.run(replica_fn))()
    changed = [not np.array_equal(b, v.numpy()) for b, v in zip(before, variables)]
    finite = [bool(np.all(np.isfinite(v.numpy()))) for v in variables]
    return dict(changed=any(changed), finite=all(finite), scale_before=scale_before,
                scale_after=float(tf.identity(trainer.optimizer.dynamic_scale.value)))


def _compare_runs(work_dir: str) -> dict:
    """Runs train_lib.run with --cpu_replicas=1 and 2 on the same corpus."""
    from trainer import train_lib
    from trainer.config import TrainConfig

    corpus = os.path.join(work_dir, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("the cat sat on the mat. the dog sat on the log. " * 30)
    summaries = {}
    for replicas, strategy in ((1, "one_device"), (2, "auto")):
        config = TrainConfig(
            model_dir=os.path.join(work_dir, f"replicas_{replicas}"), text_files=(corpus,),
            seq_length=10, batch_size=4, train_steps=4, embedding_dim=8, units=16,
            learning_rate=0.01, clip_norm=0.5, precision="float32", strategy=strategy,
            cpu_replicas=replicas, steps_per_loop=2, log_every_steps=2,
            checkpoint_every_steps=4, sample_length=10, export=False)
        summaries[replicas] = train_lib.run(config).summary
    odd = TrainConfig(model_dir=os.path.join(work_dir, "odd"), text_files=(corpus,),
                      seq_length=10, batch_size=5, cpu_replicas=2, precision="float32")
    try:
        train_lib.run(odd)
        odd_error = None
    except train_lib.SetupError as error:
        odd_error = str(error)
    return dict(summaries=summaries, odd_batch_error=odd_error,
                odd_dir_exists=os.path.exists(odd.model_dir))


def _worker(output_path: str, work_dir: str) -> None:
    from trainer import distribution

    distribution.configure_cpu_replicas(2)
    result = dict(clipped=_compare_trainers(clip_norm=CLIP_NORM), unclipped=_compare_trainers(0.0),
                  nan_clipped=_nan_on_one_replica(5.0), nan_unclipped=_nan_on_one_replica(0.0),
                  runs=_compare_runs(work_dir))
    with open(output_path, "w", encoding="utf-8") as f:
        json.dump(result, f)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    output = root / "results.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=REPO_ROOT)
    process = subprocess.run([sys.executable, os.path.abspath(__file__), str(output), str(root)],
                             cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-4000:]
    return json.loads(output.read_text(encoding="utf-8"))


def test_two_replicas_are_in_sync(results):
    assert results["clipped"]["replicas"] == [1, 2]


@pytest.mark.parametrize("case", ["clipped", "unclipped"])
def test_two_replicas_same_losses(results, case):
    one, two = results[case]["losses"]
    assert two == pytest.approx(one, rel=RTOL)


@pytest.mark.parametrize("case", ["clipped", "unclipped"])
def test_two_replicas_same_weights(results, case):
    assert results[case]["weight_diff"] <= ATOL + RTOL * results[case]["weight_scale"]


def test_clip_was_active(results):
    # The clip acts on the global gradient. Had each replica clipped its own
    # share instead, the weights above would differ: the shares sum to the
    # global gradient, so one of them has a norm above 2 * CLIP_NORM and
    # would be clipped on its own.
    assert results["clipped"]["first_norm"] > 4 * CLIP_NORM


def test_nan_on_one_replica_skips_step(results):
    for case in ("nan_clipped", "nan_unclipped"):
        outcome = results[case]
        assert not outcome["changed"], f"{case}: weights changed"
        assert outcome["finite"], f"{case}: weights became non-finite"
        assert outcome["scale_after"] == outcome["scale_before"] / 2, case


def test_run_with_two_cpu_replicas(results):
    one, two = results["runs"]["summaries"]["1"], results["runs"]["summaries"]["2"]
    assert one["replicas"] == 1
    assert two["replicas"] == 2
    assert two["steps"] == one["steps"] == 4
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=RTOL)
    assert two["validation_loss"] == pytest.approx(one["validation_loss"], rel=RTOL)


def test_batch_not_divisible_by_replicas(results):
    error = results["runs"]["odd_batch_error"]
    assert error is not None
    assert "--batch_size=5 is not divisible by the 2 replicas in sync. Use a multiple of 2." in error
    assert not results["runs"]["odd_dir_exists"]


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
