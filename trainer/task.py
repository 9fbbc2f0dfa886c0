"""Trains a character-level LSTM language model.

Usage:
  python -m trainer.task --flagfile=configs/quick.flags --model_dir=runs/quick
  python -m trainer.task --text_files='gs://bucket/texts/*.txt' --model_dir=gs://bucket/run1
"""

from __future__ import annotations

from absl import app
from absl import logging

from export import export_lib
from trainer import flags as trainer_flags
from trainer import logs
from trainer import train_lib

trainer_flags.define_flags()

# Exit codes: 1 for invalid flags found while parsing (absl) or a crash,
# 2 for a SetupError, 3 for a failed export after training, and 75 for a
# preempted run (trainer.preemption).
SETUP_ERROR_EXIT_CODE = 2
EXPORT_FAILED_EXIT_CODE = 3


def main(argv: list[str]) -> int:
    logs.quiet_tensorflow_info()
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}. All options are --flags.")
    try:
        config = trainer_flags.config_from_flags()
        result = train_lib.run(config)
    except train_lib.SetupError as error:
        logging.error("%s", error)
        return SETUP_ERROR_EXIT_CODE
    if config.export:
        try:
            _, sample = export_lib.export_after_training(config, result)
        except export_lib.ExportError as error:
            logging.error("Training finished, but the export failed: %s", error)
            return EXPORT_FAILED_EXIT_CODE
    else:
        sample = train_lib.final_sample(config, result)
    print(f"\n--- sample ({config.sample_length} characters, temperature "
          f"{config.sample_temperature}) ---\n{config.sample_prompt}{sample}\n")
    return 0


def run_main() -> None:
    """Console-script entry point (`charlstm-train`)."""
    app.run(main)


if __name__ == "__main__":
    app.run(main)
