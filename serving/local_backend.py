"""The local back end: the SavedModel loaded in this process with `tf.saved_model.load`.

It follows TF Serving's Predict rules where they matter to a client, so code
tested against it behaves the same against a server. An empty signature name
means serving_default, and an unknown signature is FAILED_PRECONDITION.
Missing or extra inputs and wrong dtypes are INVALID_ARGUMENT.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import grpc
import numpy as np
import tensorflow as tf

from serving.backend import Backend, CallFailed, ModelSpec, RetryPolicy, select_outputs

_CODE_NAMES = {status.value[0]: status.name for status in grpc.StatusCode}
_VERSION_PATTERN = re.compile(r"^\d+$")


def resolve_saved_model_dir(path: str, version: Optional[int] = None) -> str:
    """Returns the SavedModel directory for `path`.

    `path` is either a version directory (it has saved_model.pb) or a base
    path with integer version subdirectories, of which the highest is taken
    unless `version` names one, as TF Serving does.

    Raises:
      FileNotFoundError: naming the path and what it lacks.
    """
    if not tf.io.gfile.isdir(path):
        raise FileNotFoundError(f"--saved_model directory not found: {path}.")
    has_model = tf.io.gfile.exists(tf.io.gfile.join(path, "saved_model.pb"))
    if has_model and version is None:
        return path
    names = [name.rstrip("/") for name in tf.io.gfile.listdir(path)]
    versions = sorted(int(name) for name in names if _VERSION_PATTERN.match(name))
    if version is not None:
        if version not in versions:
            raise FileNotFoundError(
                f"Version {version} not found under --saved_model={path}; "
                f"versions present: {versions or 'none'}.")
        return tf.io.gfile.join(path, str(version))
    if not versions:
        raise FileNotFoundError(
            f"--saved_model={path} has neither saved_model.pb nor integer version "
            "subdirectories; point it at an export directory or one of its versions.")
    return tf.io.gfile.join(path, str(versions[-1]))


class LocalBackend(Backend):
    """Runs the SavedModel's signatures in this process.

    Args:
      path: a version directory, or a base path with version subdirectories.
      version: version subdirectory to load; default the highest.
      retry: only the retry count matters in process; the deadline is not
        enforced because a running TF function cannot be interrupted.
    """

    def __init__(self, path: str, version: Optional[int] = None,
                 retry: RetryPolicy = RetryPolicy()):
        self.saved_model_dir = resolve_saved_model_dir(path, version)
        super().__init__(self.saved_model_dir, ModelSpec("local", version), retry)
        self._loaded = tf.saved_model.load(self.saved_model_dir)

    def _predict_once(self, signature: str, inputs: Mapping[str, np.ndarray],
                      outputs: Mapping[str, np.dtype]) -> dict[str, np.ndarray]:
        name = signature or "serving_default"
        function = self._loaded.signatures.get(name)
        if function is None:
            raise CallFailed(
                "FAILED_PRECONDITION",
                f"Serving signature key \"{name}\" not found; the SavedModel has "
                f"{', '.join(sorted(self._loaded.signatures))}.")
        specs = function.structured_input_signature[1]  # input name -> tf.TensorSpec
        extra = sorted(set(inputs) - set(specs))
        missing = sorted(set(specs) - set(inputs))
        if extra or missing:
            raise CallFailed(
                "INVALID_ARGUMENT",
                f"inputs of signature {name!r} do not match: extra {extra or 'none'}, "
                f"missing {missing or 'none'}.")
        feeds = {}
        for key, spec in specs.items():
            value = np.asarray(inputs[key])
            given_dtype = tf.string if value.dtype == np.object_ or value.dtype.kind in "SU" \
                else tf.as_dtype(value.dtype)
            if given_dtype != spec.dtype:
                raise CallFailed(
                    "INVALID_ARGUMENT",
                    f"input {key!r} of signature {name!r} must be {spec.dtype.name}, "
                    f"got {given_dtype.name}.")
            feeds[key] = tf.constant(value, spec.dtype)
        try:
            result = function(**feeds)
        except tf.errors.OpError as error:
            raise CallFailed(_CODE_NAMES.get(error.error_code, "UNKNOWN"), error.message) from None
        except (ValueError, TypeError) as error:  # Shapes that do not fit the signature.
            raise CallFailed("INVALID_ARGUMENT", str(error)) from None
        return select_outputs({key: value.numpy() for key, value in result.items()}, outputs, name)
