"""Exports a charlstm checkpoint as a SavedModel version for TF Serving.

Usage:
  python -m export --model_dir=runs/quick
  python -m export --model_dir=runs/quick --export_dir=/srv/models/charlstm --version=3
  charlstm-export --model_dir=gs://bucket/run1 --checkpoint=gs://bucket/run1/ckpt-2000
"""

from __future__ import annotations

from absl import app
from absl import flags
from absl import logging

from export import export_lib
from trainer import logs

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the export flags; called only when this module runs as the program."""
    flags.DEFINE_string("model_dir", None,
                        "Training directory with checkpoints, vocabulary.json and "
                        "model_config.json.")
    flags.DEFINE_string("checkpoint", None,
                        "Checkpoint prefix to export, e.g. <model_dir>/ckpt-500. Default: the "
                        "latest checkpoint in --model_dir.")
    flags.DEFINE_string("export_dir", None,
                        "Parent directory of the numbered SavedModel versions that TF Serving "
                        "watches. Default: <model_dir>/export.")
    flags.DEFINE_integer("max_generate_chars", export_lib.DEFAULT_MAX_GENERATE_CHARS,
                         "Largest num_chars per row that the generate signature accepts.",
                         lower_bound=1)
    flags.DEFINE_integer("version", None,
                         "Version number (directory name) to write; it must not exist yet. "
                         "Default: the training step, or one more than the highest existing "
                         "version if that is larger.", lower_bound=1)
    flags.mark_flag_as_required("model_dir")


def main(argv: list[str]) -> int:
    logs.quiet_tensorflow_info()
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}. All options are --flags.")
    try:
        path = export_lib.export_saved_model(
            FLAGS.model_dir, FLAGS.export_dir, checkpoint=FLAGS.checkpoint,
            max_generate_chars=FLAGS.max_generate_chars, version=FLAGS.version)
    except export_lib.ExportError as error:
        logging.error("%s", error)
        return 2
    print(path)
    return 0


def run_main() -> None:
    """Console-script entry point (`charlstm-export`)."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run_main()
