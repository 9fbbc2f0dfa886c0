"""Checking request tensors against a SignatureDef before they are sent.

TensorFlow's session reports a feed of the wrong dtype by argument position
("input #2 ... was expected to be a int32 tensor"), not by input name, and
the TF1 `Session.run` casts numpy feeds silently. A client that checks its
request against the SignatureDef first gets an error that names the input.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2


class RequestError(ValueError):
    """Raised for a request whose inputs do not match the signature."""


def _numpy_dtype(value) -> tf.DType:
    array = np.asarray(value)
    if array.dtype.kind in ("U", "S", "O"):
        return tf.string
    return tf.as_dtype(array.dtype)


def check_request_inputs(signature_name: str, signature: meta_graph_pb2.SignatureDef,
                         inputs: Mapping[str, object]) -> None:
    """Checks names, dtypes, ranks and fixed dimensions of `inputs` against `signature`.

    Raises:
      RequestError: naming the first input that is missing, unexpected, or of
        the wrong dtype or shape, and what the signature expects.
    """
    expected = set(signature.inputs)
    given = set(inputs)
    if given != expected:
        raise RequestError(
            f"Signature {signature_name!r} takes inputs {sorted(expected)}; the request has "
            f"{sorted(given)} (missing {sorted(expected - given)}, unexpected "
            f"{sorted(given - expected)}).")
    for name, info in signature.inputs.items():
        want_dtype = tf.as_dtype(info.dtype)
        have_dtype = _numpy_dtype(inputs[name])
        if have_dtype != want_dtype:
            raise RequestError(
                f"Input `{name}` of signature {signature_name!r} must be {want_dtype.name}, got "
                f"{have_dtype.name}.")
        want_shape = [dim.size for dim in info.tensor_shape.dim]
        have_shape = list(np.shape(inputs[name]))
        fits = len(have_shape) == len(want_shape) and all(
            want in (-1, have) for want, have in zip(want_shape, have_shape))
        if not fits:
            readable = ["batch" if dim == -1 else dim for dim in want_shape]
            raise RequestError(
                f"Input `{name}` of signature {signature_name!r} must have shape {readable}, "
                f"got {have_shape}.")
