"""Exporting a trained charlstm checkpoint as a versioned SavedModel for TF Serving.

Layout under the export directory:

    <export_dir>/<version>/saved_model.pb
    <export_dir>/<version>/variables/...
    <export_dir>/<version>/assets.extra/tf_serving_warmup_requests

TF Serving loads the highest integer-named version. A version is written to
a hidden `.tmp-<version>-<random>` directory beside it and renamed into place
only when complete, so a failed or killed export never leaves a partial
version that TF Serving could load.
"""

from __future__ import annotations

import re
import uuid
from typing import Optional

import tensorflow as tf
from absl import logging

from export import warmup
from export.serving_module import CharLSTMServing, ExportMetadata
from trainer import distribution
from trainer.model import MODEL_CONFIG_FILENAME, CharLSTM, build_model, load_model_config
from trainer.vocabulary import VOCABULARY_FILENAME, Vocabulary, VocabularyError

DEFAULT_MAX_GENERATE_CHARS = 2000
EXPORT_SUBDIR = "export"
TEMP_PREFIX = ".tmp-"
_VERSION_PATTERN = re.compile(r"^\d+$")


class ExportError(ValueError):
    """Raised, before any export work where possible, when the inputs of an export cannot be used."""


# ------------------------------------------------------------------ inputs


def default_export_dir(model_dir: str) -> str:
    return tf.io.gfile.join(model_dir, EXPORT_SUBDIR)


def resolve_checkpoint(model_dir: str, checkpoint: Optional[str]) -> str:
    """Returns the checkpoint prefix to export: `checkpoint`, or the latest one in `model_dir`.

    Raises:
      ExportError: if `model_dir` or the checkpoint does not exist.
    """
    if not tf.io.gfile.isdir(model_dir):
        raise ExportError(
            f"--model_dir={model_dir!r} does not exist or is not a directory. Pass the "
            "directory that training wrote checkpoints to.")
    if checkpoint:
        if not tf.io.gfile.exists(checkpoint + ".index"):
            raise ExportError(
                f"--checkpoint={checkpoint!r} not found: {checkpoint}.index does not exist. Pass "
                "a checkpoint prefix such as <model_dir>/ckpt-500, or omit the flag to export "
                "the latest checkpoint.")
        return checkpoint
    latest = tf.train.latest_checkpoint(model_dir)
    if latest is None:
        raise ExportError(
            f"No checkpoint found in --model_dir={model_dir!r}. Train first, or pass "
            "--checkpoint with a checkpoint prefix.")
    return latest


def load_training_artifacts(model_dir: str) -> tuple:
    """Reads the vocabulary and model config that training saved in `model_dir`.

    Returns:
      (Vocabulary, ModelConfig).

    Raises:
      ExportError: if either file is missing or invalid, or they disagree.
    """
    try:
        vocabulary = Vocabulary.load(model_dir)
    except VocabularyError as error:
        raise ExportError(
            f"{error} Export needs {VOCABULARY_FILENAME} from the training run in "
            f"--model_dir={model_dir!r}.") from error
    try:
        model_config = load_model_config(model_dir)
    except FileNotFoundError as error:
        raise ExportError(
            f"{error} Export needs {MODEL_CONFIG_FILENAME} from the training run.") from error
    except (ValueError, TypeError) as error:
        raise ExportError(
            f"Invalid {MODEL_CONFIG_FILENAME} in --model_dir={model_dir!r}: {error}") from error
    if vocabulary.size != model_config.vocab_size:
        raise ExportError(
            f"{VOCABULARY_FILENAME} has {vocabulary.size} ids but {MODEL_CONFIG_FILENAME} sets "
            f"vocab_size={model_config.vocab_size} in --model_dir={model_dir!r}. The files come "
            "from different runs; retrain or restore the matching files.")
    return vocabulary, model_config


def restore_model(model_config, checkpoint: str) -> tuple[CharLSTM, int]:
    """Builds the model and restores every one of its weights from `checkpoint`.

    Only the model and the step counter are read. The training checkpoint
    also contains the optimizer, which serving does not need, and whose
    variables depend on training flags such as the learning rate schedule. Every float
    weight is set to NaN first and checked afterwards, so a weight that the
    checkpoint does not reach is an error here, never a silent random weight.

    Returns:
      (model, training step stored in the checkpoint).

    Raises:
      ExportError: if the checkpoint does not match the model config, or a
        model weight is not restored.
    """
    model = build_model(model_config)
    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    weights = [v for v in model.weights if tf.as_dtype(v.dtype).is_floating]
    for variable in weights:
        variable.assign(tf.fill(variable.shape, float("nan")))
    try:
        status = tf.train.Checkpoint(model=model, step=step).read(checkpoint)
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as error:
        # The loader's message lists unmatched variables with their values;
        # its start names the problem.
        detail = str(error)
        if len(detail) > 400:
            detail = detail[:400] + " ..."
        raise ExportError(
            f"Checkpoint {checkpoint} does not match the model in {MODEL_CONFIG_FILENAME} "
            f"({model_config}), or was not written by charlstm training: {detail}") from error
    status.expect_partial()
    not_restored = [v.path for v in weights if bool(tf.reduce_any(tf.math.is_nan(v)))]
    if not_restored:
        raise ExportError(
            f"Checkpoint {checkpoint} leaves model weights {not_restored} unset or NaN. Either "
            f"it does not come from a model with {model_config}, or training diverged; export "
            "an earlier checkpoint with --checkpoint.")
    return model, int(step.numpy())


# ---------------------------------------------------------------- versions


def list_versions(export_dir: str) -> list[int]:
    """Returns the integer version numbers present in `export_dir`, sorted."""
    if not tf.io.gfile.isdir(export_dir):
        return []
    names = [name.rstrip("/") for name in tf.io.gfile.listdir(export_dir)]
    return sorted(int(name) for name in names if _VERSION_PATTERN.match(name))


def choose_version(export_dir: str, training_step: int, version: Optional[int]) -> int:
    """Returns the version number to write.

    By default this is the training step, raised to one more than the highest
    existing version if that is larger, so TF Serving always picks up the new
    export. An explicit `version` must not exist yet.

    Raises:
      ExportError: for a non-positive or already existing explicit version.
    """
    existing = list_versions(export_dir)
    if version is not None:
        if version < 1:
            raise ExportError(f"--version must be a positive integer, got {version}.")
        if version in existing:
            raise ExportError(
                f"Version {version} already exists in --export_dir={export_dir!r}. Pick another "
                "--version or omit it to use the next free one.")
        return version
    highest = existing[-1] if existing else 0
    return max(training_step, highest + 1)


def remove_stale_temp_dirs(export_dir: str) -> None:
    """Deletes `.tmp-*` directories that earlier exports left when they were killed.

    NOTE: this also deletes the temporary directory of an export that is
    running at the same time into the same export_dir, which then fails at
    its rename. Run one export per export_dir at a time.
    """
    if not tf.io.gfile.isdir(export_dir):
        return
    for name in tf.io.gfile.listdir(export_dir):
        name = name.rstrip("/")
        if name.startswith(TEMP_PREFIX):
            path = tf.io.gfile.join(export_dir, name)
            logging.info("Removing %s, left by an earlier export that did not finish.", path)
            tf.io.gfile.rmtree(path)


def _rename_into_place(temp_dir: str, final_dir: str) -> None:
    # A directory rename is atomic on local POSIX filesystems. On object stores
    # such as GCS, tf.io.gfile copies object by object, so there a server
    # polling the directory can see a partial version during the copy.
    tf.io.gfile.rename(temp_dir, final_dir, overwrite=False)


# ------------------------------------------------------------------ export


def export_saved_model(model_dir: str, export_dir: Optional[str] = None,
                       checkpoint: Optional[str] = None,
                       max_generate_chars: int = DEFAULT_MAX_GENERATE_CHARS,
                       version: Optional[int] = None) -> str:
    """Exports a checkpoint of `model_dir` as `<export_dir>/<version>/`.

    Args:
      model_dir: the training directory, with checkpoints, vocabulary.json and
        model_config.json.
      export_dir: parent of the version directories; default `<model_dir>/export`.
      checkpoint: checkpoint prefix; default the latest in `model_dir`.
      max_generate_chars: the largest `num_chars` that the `generate`
        signature accepts per row.
      version: the version number; default see `choose_version`.

    Returns:
      The path of the new version directory.

    Raises:
      ExportError: for missing or inconsistent inputs, before the model is built.
    """
    if max_generate_chars < 1:
        raise ExportError(
            f"--max_generate_chars must be a positive integer, got {max_generate_chars}.")
    checkpoint = resolve_checkpoint(model_dir, checkpoint)
    vocabulary, model_config = load_training_artifacts(model_dir)
    export_dir = export_dir or default_export_dir(model_dir)
    if version is not None:
        choose_version(export_dir, 0, version)  # Rejects a bad --version before the restore.

    model, training_step = restore_model(model_config, checkpoint)
    metadata = ExportMetadata(training_step=training_step, corpus_name=vocabulary.corpus_name,
                              precision=model_config.precision)
    module = CharLSTMServing(model, vocabulary, metadata, max_generate_chars)
    signatures = module.signatures()

    tf.io.gfile.makedirs(export_dir)
    remove_stale_temp_dirs(export_dir)
    version = choose_version(export_dir, training_step, version)
    final_dir = tf.io.gfile.join(export_dir, str(version))
    temp_dir = tf.io.gfile.join(export_dir, f"{TEMP_PREFIX}{version}-{uuid.uuid4().hex}")
    logging.info("Exporting %s (step %d) to %s.", checkpoint, training_step, final_dir)
    try:
        tf.saved_model.save(module, temp_dir, signatures=signatures)
        warmup.write_warmup_requests(temp_dir, vocabulary, model_config.num_layers,
                                     model_config.units)
        _rename_into_place(temp_dir, final_dir)
    except BaseException:
        if tf.io.gfile.exists(temp_dir):
            tf.io.gfile.rmtree(temp_dir)
        raise
    logging.info("Exported SavedModel version %d to %s.", version, final_dir)
    return final_dir


# ------------------------------------------------------------------ sampling


def sample_from_saved_model(path: str, prompt: str, num_chars: int, temperature: float,
                            seed: int, signature: str = "step_no_xla") -> str:
    """Generates `num_chars` characters after `prompt` with an exported model, in process.

    Args:
      path: a version directory written by `export_saved_model`.
      prompt: the prompt; its characters outside the vocabulary map to the
        unknown id.
      num_chars: characters to generate.
      temperature: sampling temperature, 0 for greedy.
      seed: the first seed word; the seed of row 0 is `[seed, 0]`.
      signature: `step_no_xla` or `serving_default` to call the step once per
        character and carry the state, as a streaming client does. `generate`
        makes one call, so `num_chars` must be within the export's
        max_generate_chars.

    Returns:
      The generated continuation, without the prompt.
    """
    if signature not in ("step_no_xla", "serving_default", "generate"):
        raise ValueError(
            f"signature must be 'step_no_xla', 'serving_default' or 'generate', got {signature!r}.")
    if num_chars < 0:
        raise ValueError(f"num_chars must be >= 0, got {num_chars}.")
    loaded = tf.saved_model.load(path)
    signatures = loaded.signatures
    seeds = tf.constant([[seed, 0]], tf.int32)
    temperatures = tf.constant([temperature], tf.float32)
    prompts = tf.constant([prompt.encode("utf-8")])
    if signature == "generate":
        result = signatures["generate"](
            prompts=prompts, num_chars=tf.constant([num_chars], tf.int32),
            temperature=temperatures, top_k=tf.constant([0], tf.int32), seed=seeds)
        return result["text"].numpy()[0].decode("utf-8")

    primed = signatures["prime"](prompts=prompts)
    ids, h, c = primed["ids"], primed["h"], primed["c"]
    step = signatures[signature]
    pieces = []
    for t in range(num_chars):
        # Step t uses the seed [seed, t], which is trainer.sampling.step_seeds([[seed, 0]], t).
        out = step(ids=ids, h=h, c=c, temperature=temperatures,
                   seed=seeds + tf.constant([[0, t]], tf.int32))
        ids, h, c = out["ids"], out["h"], out["c"]
        pieces.append(out["chars"].numpy()[0].decode("utf-8"))
    return "".join(pieces)


def export_after_training(config, result) -> tuple[Optional[str], str]:
    """Exports the trained model on the chief and samples from the export.

    Args:
      config: the run's `trainer.config.TrainConfig`.
      result: the `trainer.train_lib.RunResult` of that run.

    Returns:
      (version directory, or None on non-chief workers, and the final sample of
      `config.sample_length` characters). Non-chief workers sample from the
      in-memory model as before, because only the chief exports.
    """
    from trainer import train_lib  # Imported here because train_lib pulls in the data pipeline.

    if not distribution.is_chief(result.trainer.strategy):
        return None, train_lib.final_sample(config, result)
    export_dir = config.export_dir or default_export_dir(config.model_dir)
    path = export_saved_model(config.model_dir, export_dir)
    logging.info("The final sample comes from the export at %s.", path)
    # The exported `generate` signature caps num_chars, so the sample streams
    # through the step signature instead, which has no cap.
    sample = sample_from_saved_model(path, config.sample_prompt, config.sample_length,
                                     config.sample_temperature, config.seed)
    return path, sample


