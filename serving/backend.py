"""The transport-neutral part of a back end: model spec, retries, error mapping.

A back end sends one Predict call (a signature name, named input arrays and
the names of the requested outputs) and returns numpy arrays. Back ends keep no
state between calls, so any call can be retried or sent to another replica.
"""

from __future__ import annotations

import abc
import dataclasses
import random
import time
from typing import Mapping, Optional, Sequence

import numpy as np
from absl import logging

from serving import errors


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model, and optionally its version or label, that a call goes to.

    Attributes:
      name: model name in the server's model config.
      version: integer version directory to use; None lets the server pick
        (TF Serving picks the highest loaded version).
      label: version label, such as "stable"; set at most one of version and
        label.
    """

    name: str
    version: Optional[int] = None
    label: Optional[str] = None

    def __post_init__(self):
        if not self.name:
            raise ValueError("Model name must not be empty; set --model_name.")
        if self.version is not None and self.label:
            raise ValueError(
                f"Set a model version ({self.version}) or a label ({self.label!r}), not both.")
        if self.version is not None and self.version < 0:
            raise ValueError(f"Model version must be >= 0, got {self.version}.")

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}/versions/{self.version}"
        if self.label:
            return f"{self.name}/labels/{self.label}"
        return self.name


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Deadline and retries for every call.

    Only UNAVAILABLE and DEADLINE_EXCEEDED are retried. The wait before retry
    n (1-based) is `min(max_backoff, initial_backoff * multiplier**(n-1))`,
    scaled by a random factor in [0.8, 1.2] so that many clients do not retry
    in step.

    Attributes:
      deadline: seconds allowed for each attempt; None waits forever.
      retries: attempts after the first one.
      initial_backoff: seconds before the first retry.
      max_backoff: cap on the wait between attempts, in seconds.
      multiplier: growth of the wait per retry.
    """

    deadline: Optional[float] = 30.0
    retries: int = 3
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self):
        if self.deadline is not None and not self.deadline > 0:
            raise ValueError(f"Deadline must be a positive number of seconds, got {self.deadline}.")
        if self.retries < 0:
            raise ValueError(f"Retries must be >= 0, got {self.retries}.")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError(
                "Backoff must have initial_backoff >= 0, max_backoff >= 0 and multiplier >= 1, "
                f"got {self.initial_backoff}, {self.max_backoff} and {self.multiplier}.")

    def backoff(self, retry: int) -> float:
        """Returns the seconds to wait before retry number `retry` (1-based)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        return base * random.uniform(0.8, 1.2)


class CallFailed(Exception):
    """One attempt failed with a status code; `Backend.predict` decides on retries."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class Backend(abc.ABC):
    """Sends Predict calls to one model.

    Subclasses implement `_predict_once`; `predict` adds retries and turns
    failures into `errors.ServingError` subclasses.
    """

    def __init__(self, server: str, model: ModelSpec, retry: RetryPolicy):
        self.server = server
        self.model = model
        self.retry = retry

    def predict(self, signature: str, inputs: Mapping[str, np.ndarray],
                outputs: Mapping[str, np.dtype]) -> dict[str, np.ndarray]:
        """Runs `signature` on `inputs` and returns the outputs named in `outputs`.

        Args:
          signature: signature name; "" means serving_default.
          inputs: input name to a batch-first numpy array. String inputs are
            object arrays of UTF-8 bytes.
          outputs: output name to its numpy dtype (np.object_ for strings,
            which come back as bytes).

        Raises:
          errors.ServingError: a subclass for the status code, after the
            retries for UNAVAILABLE and DEADLINE_EXCEEDED are used up.
        """
        attempts = 0
        while True:
            attempts += 1
            try:
                return self._predict_once(signature, inputs, outputs)
            except CallFailed as failure:
                if failure.code not in errors.RETRYABLE_CODES or attempts > self.retry.retries:
                    raise errors.error_for_code(
                        failure.code, failure.detail, server=self.server, model=str(self.model),
                        signature=signature or "serving_default", attempts=attempts) from None
                wait = self.retry.backoff(attempts)
                logging.warning("%s from %s (model %s, signature %s), attempt %d of %d; "
                                "retrying in %.2f s: %s", failure.code, self.server, self.model,
                                signature, attempts, self.retry.retries + 1, wait, failure.detail)
                time.sleep(wait)

    @abc.abstractmethod
    def _predict_once(self, signature: str, inputs: Mapping[str, np.ndarray],
                      outputs: Mapping[str, np.dtype]) -> dict[str, np.ndarray]:
        """Sends one attempt; raises `CallFailed` with the status code on failure."""

    def close(self) -> None:
        """Releases connections; the back end cannot be used afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def select_outputs(result: Mapping[str, object], outputs: Mapping[str, np.dtype],
                   signature: str) -> dict[str, np.ndarray]:
    """Picks the requested outputs out of a response and casts them to their dtypes.

    Raises:
      CallFailed: INTERNAL when the response lacks a requested output, which
        means the export does not have the signature this client expects.
    """
    missing = [name for name in outputs if name not in result]
    if missing:
        raise CallFailed(
            "INTERNAL",
            f"the response of signature {signature!r} has no output {', '.join(missing)} "
            f"(it has {', '.join(sorted(result)) or 'none'}); the export does not match "
            "this client's signature contract")
    return {name: as_array(result[name], dtype) for name, dtype in outputs.items()}


def as_array(value: object, dtype: np.dtype) -> np.ndarray:
    """Converts a decoded tensor to a numpy array of `dtype`; strings become bytes."""
    if np.dtype(dtype) == np.object_:
        array = np.asarray(value, dtype=object)
        flat = [item.encode("utf-8") if isinstance(item, str) else item for item in array.ravel()]
        return np.array(flat, dtype=object).reshape(array.shape)
    return np.asarray(value, dtype=dtype)

