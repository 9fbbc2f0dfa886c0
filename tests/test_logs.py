"""Log set-up of the command-line entry points."""

from __future__ import annotations

import logging
import os

import tensorflow as tf

from trainer import logs

TENSORFLOW_FILE = os.path.join(os.path.dirname(os.path.abspath(tf.__file__)), "python", "x.py")


def record(pathname: str, level: int) -> logging.LogRecord:
    return logging.LogRecord("absl", level, pathname, 1, "message", None, None)


def test_tensorflow_info_is_dropped():
    assert not logs._DropTensorFlowInfo().filter(record(TENSORFLOW_FILE, logging.INFO))


def test_tensorflow_warning_is_kept():
    assert logs._DropTensorFlowInfo().filter(record(TENSORFLOW_FILE, logging.WARNING))


def test_project_info_is_kept():
    assert logs._DropTensorFlowInfo().filter(record(os.path.abspath(logs.__file__), logging.INFO))
