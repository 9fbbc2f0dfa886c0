"""Time charlstm's own training step and its exported sampler.

Prints one JSON line per measurement with the configuration,
`step_seconds_median`, `chars_per_second` and the process's peak resident
memory so far (`peak_rss_mib`, from resource.getrusage).

Modes:
  train     the real compiled trainer loop (`Trainer.train_loop` under the
            strategy `--strategy` picks), one step per timed call.
  step      the exported single-step signature called from a Python loop
            that carries the state, at each of `--generate_batch_sizes`.
  generate  the exported server-side `generate` signature, at each of
            `--generate_batch_sizes`.
  sample    step and generate, from one export.
  all       train, step and generate.

The flags that set the model and batch have the same names as those of the
reference scripts it is compared with (`--units --layers --input
--embedding_dim --batch_size --seq_length --dtype --steps --warmup`).

Example:
  python scripts/benchmark.py --mode=train --units=1024 --dtype=bfloat16
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from trainer import data, distribution, fast_lstm  # noqa: E402
from trainer.model import ModelConfig  # noqa: E402

FLAGS = flags.FLAGS
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}

flags.DEFINE_enum("mode", "train", ["train", "step", "generate", "sample", "all"],
                  "What to time: sample is step and generate, all adds train.")
flags.DEFINE_string("text", None,
                    "UTF-8 corpus file for the training batches; default: random ids over a "
                    "vocabulary of --vocab_size.")
flags.DEFINE_integer("vocab_size", 80, "Vocabulary size when --text is not given.", lower_bound=2)
flags.DEFINE_integer("units", 1024, "LSTM units per layer.", lower_bound=1)
flags.DEFINE_integer("layers", 1, "Stacked LSTM layers.", lower_bound=1)
flags.DEFINE_enum("input", "embedding", ["embedding", "one_hot"], "Input encoding.")
flags.DEFINE_integer("embedding_dim", 256, "Embedding width.", lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "Training sequences per step (global batch).", lower_bound=1)
flags.DEFINE_integer("seq_length", 100, "Characters per training sequence.", lower_bound=1)
flags.DEFINE_enum("dtype", "float32", list(PRECISIONS),
                  "Compute dtype: float32, or the 16-bit type of a Keras mixed policy.")
flags.DEFINE_enum("lstm_implementation", "auto", list(fast_lstm.IMPLEMENTATIONS),
                  "LSTM implementation (see ModelConfig.lstm_implementation).")
flags.DEFINE_string("strategy", "auto", "tf.distribute strategy, as the trainer's --strategy.")
flags.DEFINE_integer("cpu_replicas", 1, "Logical CPU devices, as the trainer's --cpu_replicas.",
                     lower_bound=1)
flags.DEFINE_integer("steps", 5, "Timed steps (train) or timed repeats (step, generate).",
                     lower_bound=1)
flags.DEFINE_integer("warmup", 2, "Untimed steps or repeats first (tracing, allocation).",
                     lower_bound=0)
flags.DEFINE_list("generate_batch_sizes", ["1", "64"],
                  "Batch sizes for the step and generate modes.")
flags.DEFINE_integer("num_chars", 300, "Characters generated per timed repeat (step, generate).",
                     lower_bound=1)


def peak_rss_mib() -> float:
    """Returns this process's peak resident set size in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def model_settings() -> dict[str, Any]:
    return {
        "units": FLAGS.units, "layers": FLAGS.layers, "input": FLAGS.input,
        "embedding_dim": FLAGS.embedding_dim, "dtype": FLAGS.dtype,
        "lstm_implementation": fast_lstm.resolve_implementation(FLAGS.lstm_implementation),
    }


def emit(mode: str, settings: dict[str, Any], durations: list[float], chars_per_call: int) -> None:
    """Prints one measurement as a JSON line."""
    median = statistics.median(durations)
    print(json.dumps({
        "impl": "charlstm", "mode": mode, "tensorflow": tf.__version__, **settings,
        "steps": len(durations),
        "step_seconds_median": round(median, 5),
        "chars_per_second": round(chars_per_call / median, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }), flush=True)


def time_calls(call: Callable[[], Any], warmup: int, steps: int) -> list[float]:
    """Returns the wall seconds of `steps` calls of `call` after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    durations = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        durations.append(time.perf_counter() - start)
    return durations


def load_ids() -> tuple[np.ndarray, int]:
    """Returns the training ids and the vocabulary size."""
    needed = (FLAGS.batch_size + 1) * FLAGS.seq_length + 1
    if FLAGS.text is None:
        rng = np.random.default_rng(0)
        return rng.integers(0, FLAGS.vocab_size, size=max(needed, 100_000), dtype=np.int32), FLAGS.vocab_size
    from trainer.vocabulary import Vocabulary

    with tf.io.gfile.GFile(FLAGS.text, "r") as f:
        text = f.read()
    vocabulary = Vocabulary.build(text, 1, FLAGS.text)
    ids = vocabulary.encode(text)
    if len(ids) < needed:
        raise app.UsageError(
            f"--text={FLAGS.text!r} has {len(ids)} characters; one batch of --batch_size="
            f"{FLAGS.batch_size} windows of --seq_length={FLAGS.seq_length} needs {needed}.")
    return ids, vocabulary.size


def benchmark_train() -> None:
    """Times `Trainer.train_loop`, one step per call, on the real strategy."""
    from trainer import train_lib

    distribution.configure_cpu_replicas(FLAGS.cpu_replicas)
    ids, vocab_size = load_ids()
    strategy = distribution.create_strategy(FLAGS.strategy, FLAGS.cpu_replicas)
    model_config = ModelConfig(
        vocab_size=vocab_size, input_encoding=FLAGS.input, embedding_dim=FLAGS.embedding_dim,
        num_layers=FLAGS.layers, units=FLAGS.units, precision=PRECISIONS[FLAGS.dtype],
        lstm_implementation=FLAGS.lstm_implementation)
    tf.keras.utils.set_random_seed(0)
    trainer = train_lib.Trainer(strategy, model_config, FLAGS.batch_size, 2e-3, clip_norm=5.0)
    dataset = strategy.distribute_datasets_from_function(
        lambda context: data.make_train_dataset(ids, FLAGS.seq_length, FLAGS.batch_size, 0, context))
    iterator = iter(dataset)
    one_step = tf.constant(1, tf.int32)

    def call():
        float(trainer.train_loop(iterator, one_step))  # float() waits for the step to finish

    durations = time_calls(call, FLAGS.warmup, FLAGS.steps)
    settings = {**model_settings(), "batch_size": FLAGS.batch_size, "seq_length": FLAGS.seq_length,
                "vocab_size": vocab_size, "strategy": type(strategy).__name__,
                "replicas": strategy.num_replicas_in_sync}
    emit("train", settings, durations, FLAGS.batch_size * FLAGS.seq_length)


def export_untrained_model(work_dir: str) -> str:
    """Saves an untrained model as a training run would, exports it, and returns the version dir.

    Sampling speed does not depend on the weights' values, so the benchmark
    skips training.
    """
    from export import export_lib
    from trainer import train_lib
    from trainer.model import save_model_config
    from trainer.vocabulary import Vocabulary

    if FLAGS.text is None:
        # Letters from U+0100 on: vocab_size - 1 distinct characters, plus the unknown id.
        text = "".join(chr(0x100 + index) for index in range(FLAGS.vocab_size - 1))
        vocabulary = Vocabulary.build(text, 1, "random")
    else:
        with tf.io.gfile.GFile(FLAGS.text, "r") as f:
            vocabulary = Vocabulary.build(f.read(), 1, FLAGS.text)
    model_dir = os.path.join(work_dir, "model")
    model_config = ModelConfig(
        vocab_size=vocabulary.size, input_encoding=FLAGS.input, embedding_dim=FLAGS.embedding_dim,
        num_layers=FLAGS.layers, units=FLAGS.units, precision=PRECISIONS[FLAGS.dtype],
        lstm_implementation=FLAGS.lstm_implementation)
    trainer = train_lib.Trainer(tf.distribute.get_strategy(), model_config, 1, 1e-3, clip_norm=0.0)
    tf.io.gfile.makedirs(model_dir)
    trainer.checkpoint.save(os.path.join(model_dir, "ckpt"))
    vocabulary.save(model_dir)
    save_model_config(model_config, model_dir)
    return export_lib.export_saved_model(model_dir, os.path.join(work_dir, "export"))


def benchmark_step(loaded, settings: dict[str, Any]) -> None:
    """Times the exported step signatures called from a Python loop that carries the state."""
    for batch_size in (int(value) for value in FLAGS.generate_batch_sizes):
        for name in ("serving_default", "step_no_xla"):
            step = loaded.signatures[name]
            zeros = tf.zeros([batch_size, FLAGS.layers, FLAGS.units], tf.float32)
            temperature = tf.fill([batch_size], 0.8)
            # Every step's seeds are made before the timing, so the timed
            # loop contains only the signature calls.
            seeds_per_step = [tf.stack([tf.range(batch_size), tf.fill([batch_size], t)], axis=1)
                              for t in range(FLAGS.num_chars)]  # num_chars x [batch, 2]

            def call():
                ids, h, c = tf.ones([batch_size], tf.int32), zeros, zeros
                for t in range(FLAGS.num_chars):
                    outputs = step(ids=ids, h=h, c=c, temperature=temperature,
                                   seed=seeds_per_step[t])
                    ids, h, c = outputs["ids"], outputs["h"], outputs["c"]
                ids.numpy()

            durations = time_calls(call, FLAGS.warmup, FLAGS.steps)
            emit("step", {**settings, "signature": name, "batch_size": batch_size,
                          "num_chars": FLAGS.num_chars},
                 durations, batch_size * FLAGS.num_chars)


def benchmark_generate(loaded, settings: dict[str, Any]) -> None:
    """Times the exported server-side `generate` signature."""
    generate = loaded.signatures["generate"]
    for batch_size in (int(value) for value in FLAGS.generate_batch_sizes):
        inputs = dict(
            prompts=tf.constant(["The "] * batch_size),
            num_chars=tf.fill([batch_size], FLAGS.num_chars),
            temperature=tf.fill([batch_size], 0.8),
            top_k=tf.zeros([batch_size], tf.int32),
            seed=tf.stack([tf.range(batch_size), tf.zeros([batch_size], tf.int32)], axis=1))

        def call():
            generate(**inputs)["ids"].numpy()

        durations = time_calls(call, FLAGS.warmup, FLAGS.steps)
        emit("generate", {**settings, "signature": "generate", "batch_size": batch_size,
                          "num_chars": FLAGS.num_chars},
             durations, batch_size * FLAGS.num_chars)


def benchmark_sampler(modes: set[str]) -> None:
    """Exports an untrained model to a temporary directory and times its signatures."""
    with tempfile.TemporaryDirectory(prefix="charlstm-benchmark-") as work_dir:
        version_dir = export_untrained_model(work_dir)
        loaded = tf.saved_model.load(version_dir)
        settings = model_settings()
        if "step" in modes:
            benchmark_step(loaded, settings)
        if "generate" in modes:
            benchmark_generate(loaded, settings)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {' '.join(argv[1:])}. "
                             "Pass settings as --flags.")
    logging.set_verbosity(logging.WARNING)
    for value in FLAGS.generate_batch_sizes:
        if not value.isdigit() or int(value) < 1:
            raise app.UsageError(
                f"--generate_batch_sizes={','.join(FLAGS.generate_batch_sizes)} must list "
                f"positive integers; {value!r} is not one.")
    if FLAGS.text is not None and not tf.io.gfile.exists(FLAGS.text):
        raise app.UsageError(f"--text={FLAGS.text!r} not found. Pass a UTF-8 text file, or omit "
                             "the flag to train on random ids.")
    if FLAGS.mode in ("train", "all"):
        benchmark_train()
    modes = {"step", "generate"} if FLAGS.mode in ("sample", "all") else {FLAGS.mode}
    if modes & {"step", "generate"}:
        benchmark_sampler(modes)


if __name__ == "__main__":
    app.run(main)
