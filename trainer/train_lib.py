"""The training library: set-up checks, the replica step, the compiled loop, the outer loop.

Division of work:
  * `Trainer.replica_step` runs on one replica: forward, loss, gradients.
  * `Trainer.apply_gradients` (also per replica) all-reduces, clips and
    applies the gradients.
  * `Trainer.train_loop` is the compiled cross-replica function: it runs
    `steps_per_loop` steps with `strategy.run` inside a `tf.range` loop.
  * `run` is the outer Python loop; only it checkpoints, evaluates, writes
    summaries and logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import tempfile
import time
from typing import Any, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer import corpus as corpus_lib
from trainer import data
from trainer import distribution
from trainer import preemption
from trainer import sampling
from trainer.config import SetupError, TrainConfig
from trainer.model import CharLSTM, ModelConfig, build_model, load_model_config, save_model_config, MODEL_CONFIG_FILENAME
from trainer.vocabulary import VOCABULARY_FILENAME, Vocabulary, VocabularyError, atomic_write_text

SUMMARY_FILENAME = "summary.json"
LN2 = math.log(2.0)


@dataclasses.dataclass
class PreparedData:
    """The corpus, its vocabulary and the encoded splits."""

    corpus: corpus_lib.Corpus
    vocabulary: Vocabulary
    train_ids: np.ndarray
    validation_ids: np.ndarray
    steps_per_epoch: int


def prepare_data(config: TrainConfig) -> PreparedData:
    """Reads the corpus and checks it against the config and the model directory.

    Raises:
      SetupError: for an unusable corpus, a corpus too short for one global
        batch, or a vocabulary or model that differs from the one already in
        `model_dir`.
    """
    try:
        corpus = corpus_lib.load_corpus(config.text_files, config.tfds_name, config.encoding,
                                        config.tfds_split, config.tfds_text_key, config.tfds_data_dir)
    except corpus_lib.CorpusError as error:
        raise SetupError(str(error)) from error

    # The vocabulary comes from the training split only: validation
    # characters never seen in training map to the unknown id.
    num_validation = int(round(len(corpus.text) * config.validation_fraction))
    train_text = corpus.text[:len(corpus.text) - num_validation]
    vocabulary = Vocabulary.build(train_text, config.min_char_count, corpus.name)
    if vocabulary.size < 2:
        raise SetupError(
            f"--min_char_count={config.min_char_count} leaves no character of corpus "
            f"{corpus.name!r} in the vocabulary: no character occurs that often in its "
            f"{len(train_text)} training characters. Lower --min_char_count.")
    check_model_dir(config, vocabulary)

    ids = vocabulary.encode(corpus.text)
    train_ids, validation_ids = data.split_train_validation(ids, config.validation_fraction)
    steps = data.steps_per_epoch(len(train_ids), config.seq_length, config.batch_size)
    if steps == 0:
        needed = (config.batch_size + 1) * config.seq_length
        raise SetupError(
            f"Corpus {corpus.name!r} is too short: its training split has {len(train_ids)} "
            f"characters, but one global batch of --batch_size={config.batch_size} windows of "
            f"--seq_length={config.seq_length} needs at least {needed}. Use a longer text or "
            "lower --batch_size or --seq_length.")
    if len(validation_ids) < config.seq_length + 1:
        raise SetupError(
            f"The validation split has {len(validation_ids)} characters, fewer than one "
            f"window of --seq_length={config.seq_length} + 1. Raise --validation_fraction "
            f"(now {config.validation_fraction}) or lower --seq_length.")
    return PreparedData(corpus, vocabulary, train_ids, validation_ids, steps)


def check_model_dir(config: TrainConfig, vocabulary: Vocabulary) -> None:
    """Checks that an existing model directory contains the same corpus and model.

    Raises:
      SetupError: naming what differs and how to proceed.
    """
    vocabulary_path = tf.io.gfile.join(config.model_dir, VOCABULARY_FILENAME)
    if tf.io.gfile.exists(vocabulary_path):
        try:
            saved = Vocabulary.load(config.model_dir)
        except VocabularyError as error:
            raise SetupError(str(error)) from error
        if saved.corpus_fingerprint != vocabulary.corpus_fingerprint or saved != vocabulary:
            added = sorted(set(vocabulary.characters) - set(saved.characters))
            removed = sorted(set(saved.characters) - set(vocabulary.characters))
            raise SetupError(
                f"--model_dir={config.model_dir!r} was trained on corpus {saved.corpus_name!r} "
                f"and this run reads {vocabulary.corpus_name!r}, a different text (vocabulary "
                f"size {saved.size} vs {vocabulary.size}; characters added {added[:20]!r}, "
                f"removed {removed[:20]!r}). The check covers the training split, so a "
                "changed --validation_fraction also counts as a different text. Resume with "
                "the original corpus, --min_char_count and --validation_fraction, or train "
                "into a new --model_dir.")
    config_path = tf.io.gfile.join(config.model_dir, MODEL_CONFIG_FILENAME)
    if tf.io.gfile.exists(config_path):
        saved_config = load_model_config(config.model_dir)
        wanted = model_config_for(config, vocabulary.size, saved_config.precision)
        for field in dataclasses.fields(ModelConfig):
            if field.name in ("precision", "lstm_implementation"):
                # Checkpoints keep float32 variables under every policy, and
                # both LSTM implementations use the same variables.
                continue
            old, new = getattr(saved_config, field.name), getattr(wanted, field.name)
            if old != new:
                raise SetupError(
                    f"--model_dir={config.model_dir!r} contains a model with {field.name}={old!r}, "
                    f"but this run asks for {new!r}. Pass --{field.name}={old!r} to resume, or "
                    "train into a new --model_dir.")


def model_config_for(config: TrainConfig, vocab_size: int, precision: str) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, input_encoding=config.input_encoding,
                       embedding_dim=config.embedding_dim, num_layers=config.num_layers,
                       units=config.units, dropout=config.dropout, precision=precision,
                       lstm_implementation=config.lstm_implementation)


def make_learning_rate(config: TrainConfig, total_steps: int):
    if config.lr_schedule == "cosine":
        decay_steps = max(1, total_steps - config.warmup_steps)
        if config.warmup_steps:
            return keras.optimizers.schedules.CosineDecay(
                0.0, decay_steps, alpha=0.1, warmup_target=config.learning_rate,
                warmup_steps=config.warmup_steps)
        return keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps, alpha=0.1)
    if config.warmup_steps:
        return keras.optimizers.schedules.CosineDecay(
            0.0, 1, alpha=1.0, warmup_target=config.learning_rate, warmup_steps=config.warmup_steps)
    return config.learning_rate


class Trainer:
    """The model, optimizer and compiled step functions under one strategy."""

    def __init__(self, strategy: tf.distribute.Strategy, model_config: ModelConfig,
                 global_batch_size: int, learning_rate, clip_norm: float):
        self.strategy = strategy
        self.global_batch_size = global_batch_size
        self.clip_norm = clip_norm
        self.model_config = model_config
        with strategy.scope():
            self.model: CharLSTM = build_model(model_config)
            optimizer = keras.optimizers.Adam(learning_rate)
            if model_config.precision == "mixed_float16":
                # float16 gradients underflow, so the loss is scaled up before
                # backprop and the gradients scaled down before the update.
                # A step with non-finite gradients is skipped.
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            # A Keras 3 optimizer must create its slots inside the strategy
            # scope before the first compiled step, or that step fails.
            optimizer.build(self.model.trainable_variables)
            self.optimizer = optimizer
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                              step=self.step)
        self._train_loop = None
        self._evaluate = None

    @property
    def uses_loss_scaling(self) -> bool:
        return isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)

    def compute_loss(self, inputs, targets, training: bool = True):
        """Returns this replica's share of the global-batch mean loss.

        The per-sequence loss is the mean cross-entropy over its characters,
        in nats per character. `compute_average_loss` divides the sum over this
        replica's sequences by the global batch size, so summing the replicas'
        values (and gradients) gives the mean over the global batch.
        """
        logits, _ = self.model(inputs, training=training)  # [batch, time, vocab] float32
        per_char = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
        per_sequence = tf.reduce_mean(per_char, axis=1)  # [batch]
        return tf.nn.compute_average_loss(per_sequence, global_batch_size=self.global_batch_size)

    def replica_step(self, inputs, targets):
        """One training step on one replica; returns its share of the loss."""
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            loss = self.compute_loss(inputs, targets, training=True)
            scaled_loss = self.optimizer.scale_loss(loss) if self.uses_loss_scaling else loss
        gradients = tape.gradient(scaled_loss, variables)
        self.apply_gradients(gradients)
        return loss

    def apply_gradients(self, gradients):
        """All-reduces, clips by global norm, and applies gradients (replica context).

        The clip has to see the global-batch gradient, not one replica's, or
        runs with different replica counts would diverge. So the gradients are
        summed here, clipped, and handed to the optimizer divided by the replica
        count: the optimizer sums over replicas again, and the sum is the
        clipped global gradient. That costs a second all-reduce.

        Keras's LossScaleOptimizer decides whether to skip a step from the
        gradients of the first replica only, so under loss scaling the sum is
        taken even without clipping: a non-finite gradient on any replica then
        makes every replica skip. With --clip_norm=0 and no loss scaling the
        first all-reduce is skipped.
        """
        variables = self.model.trainable_variables
        gradients = [tf.convert_to_tensor(g) for g in gradients]
        if self.clip_norm > 0 or self.uses_loss_scaling:
            context = tf.distribute.get_replica_context()
            gradients = context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)
            factor = 1.0 / self.strategy.num_replicas_in_sync
            if self.clip_norm > 0:
                norm = tf.linalg.global_norm(gradients)
                if self.uses_loss_scaling:
                    norm = norm / tf.cast(self.optimizer.dynamic_scale, norm.dtype)
                # min(1, clip / norm); an infinite or NaN norm leaves non-finite
                # gradients, which the loss scale optimizer then skips.
                factor *= self.clip_norm / tf.maximum(norm, self.clip_norm)
            gradients = [g * tf.cast(factor, g.dtype) for g in gradients]
        self.optimizer.apply_gradients(zip(gradients, variables))

    def train_loop(self, iterator, num_steps: tf.Tensor) -> tf.Tensor:
        """Runs `num_steps` steps in one compiled call; returns their mean loss."""
        if self._train_loop is None:
            @tf.function
            def loop(iterator, num_steps):
                total = tf.constant(0.0, tf.float32)
                for _ in tf.range(num_steps):
                    inputs, targets = next(iterator)
                    per_replica_loss = self.strategy.run(self.replica_step, args=(inputs, targets))
                    total += self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_loss, axis=None)
                    self.step.assign_add(1)
                return total / tf.cast(num_steps, tf.float32)
            self._train_loop = loop
        return self._train_loop(iterator, num_steps)

    def evaluate(self, distributed_dataset) -> float:
        """Returns the mean validation loss in nats per character."""
        if self._evaluate is None:
            def replica_eval(inputs, targets):
                logits, _ = self.model(inputs, training=False)
                per_char = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)
                return tf.reduce_sum(per_char), tf.cast(tf.size(per_char), tf.float32)

            @tf.function
            def evaluate(dataset):
                total = tf.constant(0.0)
                count = tf.constant(0.0)
                for inputs, targets in dataset:
                    loss_sum, char_count = self.strategy.run(replica_eval, args=(inputs, targets))
                    total += self.strategy.reduce(tf.distribute.ReduceOp.SUM, loss_sum, axis=None)
                    count += self.strategy.reduce(tf.distribute.ReduceOp.SUM, char_count, axis=None)
                return total / tf.maximum(count, 1.0)
            self._evaluate = evaluate
        return float(self._evaluate(distributed_dataset))


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _write_dir(model_dir: str, strategy: tf.distribute.Strategy) -> str:
    """Returns where this worker writes: `model_dir` on the chief, a temporary directory elsewhere.

    MultiWorkerMirroredStrategy needs every worker to take part in saving;
    non-chief workers save to a throwaway directory that `run` deletes.
    """
    if distribution.is_chief(strategy):
        return model_dir
    resolver = strategy.cluster_resolver
    return tempfile.mkdtemp(prefix=f"charlstm-{resolver.task_type}-{resolver.task_id}-")


@dataclasses.dataclass
class RunResult:
    """The result of `run`: the summary written to summary.json, and the live objects."""

    summary: dict[str, Any]
    trainer: Trainer
    vocabulary: Vocabulary


def run(config: TrainConfig) -> RunResult:
    """Trains a model as configured by `config`, or resumes it from `config.model_dir`.

    Raises:
      SetupError: for bad input, before the model is built and before anything
        is written to `config.model_dir`.
      preemption.TrainingPreempted: after saving a checkpoint on SIGTERM; a
        `SystemExit` with code `preemption.PREEMPTED_EXIT_CODE`.
    """
    # Closes the summary writers, the SIGTERM watcher and a non-chief
    # worker's temporary directory however `_run` ends.
    with contextlib.ExitStack() as cleanup:
        return _run(config, cleanup)


def _run(config: TrainConfig, cleanup: contextlib.ExitStack) -> RunResult:
    config.validate()
    distribution.configure_cpu_replicas(config.cpu_replicas)
    prepared = prepare_data(config)
    try:
        strategy = distribution.create_strategy(config.strategy, config.cpu_replicas, config.tpu)
    except ValueError as error:  # An invalid TF_CONFIG.
        raise SetupError(str(error)) from error
    try:
        distribution.check_same_vocabulary(strategy, vocabulary_fingerprint(prepared.vocabulary))
    except ValueError as error:
        raise SetupError(str(error)) from error
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise SetupError(
            f"--batch_size={config.batch_size} is not divisible by the {replicas} replicas in "
            f"sync. Use a multiple of {replicas}.")
    precision = distribution.resolve_precision(config.precision)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()

    steps_per_epoch = prepared.steps_per_epoch
    total_steps = config.train_steps or config.epochs * steps_per_epoch
    eval_every = config.eval_every_steps or steps_per_epoch
    model_config = model_config_for(config, prepared.vocabulary.size, precision)
    chief = distribution.is_chief(strategy)
    write_dir = _write_dir(config.model_dir, strategy)
    if not chief:
        cleanup.callback(tf.io.gfile.rmtree, write_dir)

    trainer = Trainer(strategy, model_config, config.batch_size,
                      make_learning_rate(config, total_steps), config.clip_norm)
    manager = tf.train.CheckpointManager(trainer.checkpoint, write_dir,
                                         max_to_keep=config.max_checkpoints,
                                         step_counter=trainer.step)
    # Resume reads the chief's real directory on every worker.
    try:
        latest = preemption.restore_latest(trainer.checkpoint, config.model_dir)
    except preemption.CheckpointRestoreError as error:
        raise SetupError(str(error)) from error
    if latest:
        logging.info("Resumed from %s at step %d.", latest, int(trainer.step.numpy()))
    try:
        distribution.check_same_step(strategy, int(trainer.step.numpy()))
    except ValueError as error:
        raise SetupError(str(error)) from error
    if chief:
        tf.io.gfile.makedirs(config.model_dir)
        prepared.vocabulary.save(config.model_dir)
        save_model_config(model_config, config.model_dir)

    start_step = int(trainer.step.numpy())
    dataset = strategy.distribute_datasets_from_function(
        lambda context: data.make_train_dataset(prepared.train_ids, config.seq_length,
                                                config.batch_size, config.seed, context,
                                                start_step=start_step))
    iterator = iter(dataset)
    validation = strategy.distribute_datasets_from_function(
        lambda context: data.make_validation_dataset(prepared.validation_ids, config.seq_length,
                                                     config.batch_size, context))
    train_writer = tf.summary.create_file_writer(tf.io.gfile.join(write_dir, "train"))
    validation_writer = tf.summary.create_file_writer(tf.io.gfile.join(write_dir, "validation"))
    cleanup.callback(train_writer.close)
    cleanup.callback(validation_writer.close)
    watcher = preemption.PreemptionWatcher(strategy, manager, trainer.step)
    cleanup.callback(watcher.close)

    logging.info("Corpus %r: %d training and %d validation characters, vocabulary %d, "
                 "%d steps per epoch, %d steps in all, global batch %d over %d replicas, "
                 "precision %s.", prepared.corpus.name, len(prepared.train_ids),
                 len(prepared.validation_ids), prepared.vocabulary.size, steps_per_epoch,
                 total_steps, config.batch_size, replicas, precision)

    chars_per_step = config.batch_size * config.seq_length
    step = start_step
    train_loss = float("nan")
    validation_loss = float("nan")
    run_start = time.perf_counter()
    window_start, window_steps = run_start, 0
    if step >= total_steps:
        logging.info("Training already reached step %d of %d; nothing to train.", step, total_steps)
    while step < total_steps:
        # Run up to the next step where something has to happen.
        boundaries = [total_steps, step + config.steps_per_loop]
        for period in (config.log_every_steps, config.checkpoint_every_steps, eval_every):
            boundaries.append((step // period + 1) * period)
        num_steps = min(boundaries) - step
        loss = trainer.train_loop(iterator, tf.constant(num_steps, tf.int32))
        train_loss = float(loss)
        new_step = int(trainer.step.numpy())
        if new_step != step + num_steps:
            raise RuntimeError(f"Step counter went from {step} to {new_step}, expected {step + num_steps}.")
        step = new_step
        window_steps += num_steps
        if not math.isfinite(train_loss) and not trainer.uses_loss_scaling:
            raise FloatingPointError(
                f"Training loss is {train_loss} at step {step}. Lower --learning_rate "
                f"(now {config.learning_rate}) or --clip_norm, or use --precision=float32.")

        if step % config.log_every_steps == 0 or step == total_steps:
            now = time.perf_counter()
            chars_per_second = window_steps * chars_per_step / max(now - window_start, 1e-9)
            _log_progress(trainer, train_writer, chief, step, total_steps, train_loss,
                          chars_per_second, chars_per_step)
            window_start, window_steps = now, 0

        if step % eval_every == 0 or step == total_steps:
            validation_loss = trainer.evaluate(validation)
            with_sample = step % steps_per_epoch == 0 or step == total_steps
            _log_validation(config, trainer, prepared.vocabulary, validation_writer, chief, step,
                            total_steps, validation_loss, with_sample)

        if step % config.checkpoint_every_steps == 0 or step == total_steps:
            manager.save(checkpoint_number=step)
        # Saves and raises TrainingPreempted after a SIGTERM; a collective
        # call with several workers, so it runs on all of them every time.
        watcher.check()

    elapsed = time.perf_counter() - run_start
    trained_steps = step - start_step
    if math.isnan(validation_loss):
        validation_loss = trainer.evaluate(validation)
    summary = {
        "steps": step,
        "steps_this_run": trained_steps,
        "epochs": step / steps_per_epoch,
        "train_loss": train_loss,
        "validation_loss": validation_loss,
        "validation_bits_per_char": validation_loss / LN2,
        "seconds": elapsed,
        "chars_per_second": trained_steps * chars_per_step / elapsed if trained_steps else 0.0,
        "replicas": replicas,
        "precision": precision,
        "corpus": prepared.corpus.name,
        "vocabulary_size": prepared.vocabulary.size,
        "config": dataclasses.asdict(config),
    }
    if chief:
        atomic_write_text(tf.io.gfile.join(config.model_dir, SUMMARY_FILENAME),
                          json.dumps(summary, indent=1, default=str))
    return RunResult(summary=summary, trainer=trainer, vocabulary=prepared.vocabulary)


def _log_progress(trainer: Trainer, writer, chief: bool, step: int, total_steps: int,
                  train_loss: float, chars_per_second: float, chars_per_step: int) -> None:
    """Writes the progress line (chief only) and the training scalars."""
    remaining = (total_steps - step) * chars_per_step / max(chars_per_second, 1e-9)
    if chief:
        logging.info("step %6d/%d | loss %.4f | %9.0f chars/s | eta %s", step, total_steps,
                     train_loss, chars_per_second, format_duration(remaining))
    with writer.as_default(step=step):
        tf.summary.scalar("loss", train_loss)
        tf.summary.scalar("bits_per_char", train_loss / LN2)
        tf.summary.scalar("learning_rate", _current_learning_rate(trainer))
        tf.summary.scalar("chars_per_second", chars_per_second)


def _log_validation(config: TrainConfig, trainer: Trainer, vocabulary: Vocabulary, writer,
                    chief: bool, step: int, total_steps: int, validation_loss: float,
                    with_sample: bool) -> None:
    """Logs the validation loss (chief only) and writes it, with a text sample per epoch."""
    if chief:
        logging.info("step %6d/%d | validation loss %.4f nats/char, %.4f bits/char",
                     step, total_steps, validation_loss, validation_loss / LN2)
    with writer.as_default(step=step):
        tf.summary.scalar("loss", validation_loss)
        tf.summary.scalar("bits_per_char", validation_loss / LN2)
        if with_sample:
            sample = sampling.generate_text(trainer.model, vocabulary, config.sample_prompt, 200,
                                            config.sample_temperature, config.seed)
            tf.summary.text("sample", config.sample_prompt + sample)


def vocabulary_fingerprint(vocabulary: Vocabulary) -> str:
    """Returns a SHA-256 hex digest of the vocabulary's characters and source text."""
    content = json.dumps([vocabulary.characters, vocabulary.corpus_fingerprint])
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


def _current_learning_rate(trainer: Trainer) -> float:
    optimizer = trainer.optimizer
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def final_sample(config: TrainConfig, result: RunResult) -> str:
    """Returns the end-of-training sample of `config.sample_length` characters."""
    return sampling.generate_text(result.trainer.model, result.vocabulary, config.sample_prompt,
                                  config.sample_length, config.sample_temperature, config.seed)
