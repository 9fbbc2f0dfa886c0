"""Log set-up shared by the command-line entry points."""

from __future__ import annotations

import logging as std_logging
import os
import warnings

import tensorflow as tf
from absl import logging

_TENSORFLOW_DIR = os.path.dirname(os.path.abspath(tf.__file__)) + os.sep


class _DropTensorFlowInfo(std_logging.Filter):
    """Drops INFO records that TensorFlow's own modules write through absl logging."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or not record.pathname.startswith(_TENSORFLOW_DIR)


def quiet_tensorflow_info() -> None:
    """Hides TensorFlow's INFO lines, keeping its warnings and errors.

    TensorFlow logs checkpoint sharding times, renamed signature inputs and
    asset writes at INFO level through absl, and they would bury the progress
    lines. Its `tf.data` options UserWarning, raised when a distributed
    dataset is built in graph mode, is hidden too.
    """
    tf.get_logger().setLevel("WARNING")
    logging.get_absl_handler().addFilter(_DropTensorFlowInfo())
    warnings.filterwarnings("ignore", message="To make it possible to preserve tf.data options")
