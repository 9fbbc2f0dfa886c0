"""All trainer flags, in one place, with validators that run before any work."""

from __future__ import annotations

import dataclasses

from absl import flags

from trainer.config import TrainConfig

FLAGS = flags.FLAGS
_DEFAULTS = TrainConfig(model_dir="")


def define_flags() -> None:
    """Defines the trainer's flags and their validators."""
    d = _DEFAULTS
    flags.DEFINE_string("model_dir", "runs/charlstm",
                        "Directory for checkpoints, vocabulary, summaries and summary.json. "
                        "A rerun with the same directory resumes from its latest checkpoint.")
    # Corpus and vocabulary.
    flags.DEFINE_multi_string("text_files", [],
                              "Text files or globs (local, gs:// or any tf.io.gfile filesystem). "
                              "Repeat the flag or separate with commas. Default: the bundled novel.")
    flags.DEFINE_string("tfds_name", None, "TFDS text dataset to train on, e.g. tiny_shakespeare.")
    flags.DEFINE_string("tfds_split", d.tfds_split, "TFDS split to read.")
    flags.DEFINE_string("tfds_text_key", d.tfds_text_key, "TFDS feature that holds the text.")
    flags.DEFINE_string("tfds_data_dir", None, "TFDS data directory (for prepared datasets).")
    flags.DEFINE_string("encoding", d.encoding, "Text encoding of --text_files.")
    flags.DEFINE_integer("min_char_count", d.min_char_count,
                         "Characters seen fewer times than this map to the unknown id.", lower_bound=1)
    flags.DEFINE_float("validation_fraction", d.validation_fraction,
                       "Fraction of the text, from its end, held out for validation; in (0, 1).")
    # Input pipeline.
    flags.DEFINE_integer("seq_length", d.seq_length, "Characters per training sequence.", lower_bound=1)
    flags.DEFINE_integer("batch_size", d.batch_size,
                         "Global batch size: sequences per step over all replicas.", lower_bound=1)
    flags.DEFINE_integer("epochs", d.epochs, "Passes over the training text.", lower_bound=1)
    flags.DEFINE_integer("train_steps", d.train_steps,
                         "Total training steps; 0 means epochs * steps per epoch.", lower_bound=0)
    # Model.
    flags.DEFINE_enum("input_encoding", d.input_encoding, ["embedding", "one_hot"],
                      "How characters enter the first LSTM.")
    flags.DEFINE_integer("embedding_dim", d.embedding_dim, "Embedding width.", lower_bound=1)
    flags.DEFINE_integer("num_layers", d.num_layers, "Stacked LSTM layers.", lower_bound=1)
    flags.DEFINE_integer("units", d.units, "LSTM units per layer.", lower_bound=1)
    flags.DEFINE_float("dropout", d.dropout, "Dropout after each LSTM layer; in [0, 1).")
    flags.DEFINE_enum("lstm_implementation", d.lstm_implementation, ["auto", "keras", "fused"],
                      "How the LSTM layers run. keras: Keras LSTM (cuDNN on a GPU). fused: "
                      "trainer/fast_lstm.py, faster on a CPU. auto: keras with a GPU, else "
                      "fused. Both use the same variables and checkpoints.")
    # Optimization.
    flags.DEFINE_float("learning_rate", d.learning_rate, "Adam learning rate (peak, with a schedule).")
    flags.DEFINE_enum("lr_schedule", d.lr_schedule, ["constant", "cosine"],
                      "Learning rate schedule after warm-up.")
    flags.DEFINE_integer("warmup_steps", d.warmup_steps, "Linear warm-up steps.", lower_bound=0)
    flags.DEFINE_float("clip_norm", d.clip_norm,
                       "Clip gradients to this global norm; 0 turns clipping off.")
    # Distribution and precision.
    flags.DEFINE_enum("strategy", d.strategy, ["auto", "mirrored", "one_device", "multi_worker", "tpu"],
                      "tf.distribute strategy. auto: multi_worker if TF_CONFIG lists several "
                      "workers, mirrored over local GPUs if there are several, else one_device.")
    flags.DEFINE_integer("cpu_replicas", d.cpu_replicas,
                         "Split the CPU into this many logical devices (replicas) when there "
                         "is no GPU.", lower_bound=1)
    flags.DEFINE_string("tpu", d.tpu, "TPU name or address for --strategy=tpu.")
    flags.DEFINE_enum("precision", d.precision, ["auto", "float32", "mixed_float16", "mixed_bfloat16"],
                      "Compute precision. auto picks by hardware and logs its choice.")
    # Loop, checkpoints, logs.
    flags.DEFINE_integer("steps_per_loop", d.steps_per_loop,
                         "Training steps per call of the compiled loop.", lower_bound=1)
    flags.DEFINE_integer("checkpoint_every_steps", d.checkpoint_every_steps,
                         "Save a checkpoint every this many steps (and at the end).", lower_bound=1)
    flags.DEFINE_integer("max_checkpoints", d.max_checkpoints, "Checkpoints to keep.", lower_bound=1)
    flags.DEFINE_integer("log_every_steps", d.log_every_steps, "Progress line period in steps.",
                         lower_bound=1)
    flags.DEFINE_integer("eval_every_steps", d.eval_every_steps,
                         "Validation period in steps; 0 means at the end of every epoch.", lower_bound=0)
    flags.DEFINE_integer("seed", d.seed, "Seed for initialization, shuffling and dropout.")
    flags.DEFINE_bool("deterministic", d.deterministic,
                      "Enable TensorFlow op determinism so a seed reproduces a run exactly.")
    # Samples and export.
    flags.DEFINE_string("sample_prompt", d.sample_prompt, "Prompt of the samples.")
    flags.DEFINE_integer("sample_length", d.sample_length,
                         "Characters in the sample printed at the end.", lower_bound=0)
    flags.DEFINE_float("sample_temperature", d.sample_temperature,
                       "Sampling temperature; 0 means greedy (always the most likely character).")
    flags.DEFINE_string("export_dir", None,
                        "Where to export the SavedModel at the end; default <model_dir>/export.")
    flags.DEFINE_bool("export", d.export, "Export a SavedModel at the end of training.")

    flags.register_validator("validation_fraction", lambda v: 0.0 < v < 1.0,
                             message="--validation_fraction must be in (0, 1).")
    flags.register_validator("dropout", lambda v: 0.0 <= v < 1.0,
                             message="--dropout must be in [0, 1).")
    flags.register_validator("learning_rate", lambda v: v > 0.0,
                             message="--learning_rate must be positive.")
    flags.register_validator("clip_norm", lambda v: v >= 0.0,
                             message="--clip_norm must be >= 0 (0 turns clipping off).")
    flags.register_validator("sample_temperature", lambda v: v >= 0.0,
                             message="--sample_temperature must be >= 0 (0 means greedy).")
    flags.register_validator("model_dir", lambda v: bool(v), message="--model_dir must not be empty.")


def config_from_flags() -> TrainConfig:
    """Builds a TrainConfig from the parsed flags."""
    values = {}
    for field in dataclasses.fields(TrainConfig):
        value = FLAGS[field.name].value
        if field.name == "text_files":
            value = tuple(part for item in value for part in item.split(",") if part)
        values[field.name] = value
    config = TrainConfig(**values)
    config.validate()
    return config
