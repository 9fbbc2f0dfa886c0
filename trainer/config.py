"""The training configuration: one dataclass built from the flags or by tests."""

from __future__ import annotations

import dataclasses
from typing import Optional


class SetupError(ValueError):
    """Raised before any work when the flags, corpus or model directory cannot be used."""


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs; field names match the flag names."""

    model_dir: str
    # Corpus and vocabulary.
    text_files: tuple[str, ...] = ()
    tfds_name: Optional[str] = None
    tfds_split: str = "train"
    tfds_text_key: str = "text"
    tfds_data_dir: Optional[str] = None
    encoding: str = "utf-8"
    min_char_count: int = 1
    validation_fraction: float = 0.05
    # Input pipeline.
    seq_length: int = 100
    batch_size: int = 64  # global batch: sequences per step over all replicas
    epochs: int = 1
    train_steps: int = 0  # 0 means epochs * steps per epoch
    # Model.
    input_encoding: str = "embedding"
    embedding_dim: int = 128
    num_layers: int = 1
    units: int = 512
    dropout: float = 0.0
    lstm_implementation: str = "auto"
    # Optimization.
    learning_rate: float = 2e-3
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    clip_norm: float = 5.0
    # Distribution and precision.
    strategy: str = "auto"
    cpu_replicas: int = 1
    tpu: str = ""
    precision: str = "auto"
    # Loop, checkpoints, logs.
    steps_per_loop: int = 50
    checkpoint_every_steps: int = 500
    max_checkpoints: int = 3
    log_every_steps: int = 50
    eval_every_steps: int = 0  # 0 means once per epoch
    seed: int = 42
    deterministic: bool = True
    # Samples and export.
    sample_prompt: str = "The "
    sample_length: int = 500
    sample_temperature: float = 0.8
    export_dir: Optional[str] = None  # None means <model_dir>/export
    export: bool = True

    def validate(self) -> None:
        """Checks values that flag validators also check, for callers without flags.

        Raises:
          SetupError: naming the field, the value and the allowed range.
        """
        positive = ("min_char_count", "seq_length", "batch_size", "epochs", "embedding_dim",
                    "num_layers", "units", "steps_per_loop", "checkpoint_every_steps",
                    "max_checkpoints", "log_every_steps", "cpu_replicas")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SetupError(f"--{name} must be a positive integer, got {value!r}.")
        for name in ("train_steps", "warmup_steps", "eval_every_steps", "sample_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise SetupError(f"--{name} must be a non-negative integer, got {value!r}.")
        if not 0.0 < self.validation_fraction < 1.0:
            raise SetupError(
                f"--validation_fraction must be in (0, 1), got {self.validation_fraction}.")
        if not 0.0 <= self.dropout < 1.0:
            raise SetupError(f"--dropout must be in [0, 1), got {self.dropout}.")
        if not self.learning_rate > 0.0:
            raise SetupError(f"--learning_rate must be positive, got {self.learning_rate}.")
        if not self.clip_norm >= 0.0:
            raise SetupError(f"--clip_norm must be >= 0 (0 turns clipping off), got {self.clip_norm}.")
        if not self.sample_temperature >= 0.0:
            raise SetupError(
                f"--sample_temperature must be >= 0 (0 means greedy), got {self.sample_temperature}.")
        choices = {
            "input_encoding": ("embedding", "one_hot"),
            "lr_schedule": ("constant", "cosine"),
            "strategy": ("auto", "mirrored", "one_device", "multi_worker", "tpu"),
            "precision": ("auto", "float32", "mixed_float16", "mixed_bfloat16"),
            "lstm_implementation": ("auto", "keras", "fused"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise SetupError(
                    f"--{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}.")
        if self.text_files and self.tfds_name:
            raise SetupError("Set either --text_files or --tfds_name, not both.")
        if self.strategy == "one_device" and self.cpu_replicas > 1:
            raise SetupError(
                f"--cpu_replicas={self.cpu_replicas} needs --strategy=mirrored or auto; "
                "--strategy=one_device runs one replica.")
