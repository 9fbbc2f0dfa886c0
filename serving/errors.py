"""Errors raised by the serving clients.

Every error names the server, the model and the signature of the failed call,
so a log line alone shows where to look. Status codes use gRPC's names, which
TF Serving returns over gRPC and maps to HTTP statuses over REST.
"""

from __future__ import annotations

from typing import Optional

# TF Serving's mapping from a status code to an HTTP status (its REST API
# returns these with a body {"error": "..."}).
HTTP_STATUS_BY_CODE = {
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}

# Codes worth another try: the server was down or too slow, and the request
# itself may be fine. Every other code would fail the same way again.
RETRYABLE_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})


class ServingError(Exception):
    """A failed call to a model server or a local SavedModel.

    Attributes:
      code: gRPC status code name, such as "NOT_FOUND".
      server: address of the server, or the SavedModel path.
      model: model name (with version or label when one was requested).
      signature: signature name of the call.
      detail: the server's own message.
      attempts: how many times the call was sent.
    """

    def __init__(self, code: str, detail: str, *, server: str, model: str, signature: str,
                 attempts: int = 1, hint: str = ""):
        self.code = code
        self.detail = detail
        self.server = server
        self.model = model
        self.signature = signature
        self.attempts = attempts
        self.hint = hint
        super().__init__(self._message())

    def _message(self) -> str:
        tries = f" after {self.attempts} attempts" if self.attempts > 1 else ""
        message = (f"{self.code}: signature {self.signature!r} of model {self.model!r} "
                   f"on {self.server} failed{tries}: {self.detail}")
        if self.hint:
            message += f" {self.hint}"
        return message


class ModelNotFoundError(ServingError):
    """The server has no such model, version or label (NOT_FOUND)."""


class SignatureNotFoundError(ServingError):
    """The model has no signature of that name (FAILED_PRECONDITION in TF Serving)."""


class InvalidArgumentError(ServingError):
    """The server rejected the request's inputs (INVALID_ARGUMENT)."""


class ServerUnavailableError(ServingError):
    """The server could not be reached, even after the retries (UNAVAILABLE)."""


class DeadlineExceededError(ServingError):
    """The call did not finish within its deadline, even after the retries."""


def error_for_code(code: str, detail: str, *, server: str, model: str, signature: str,
                   attempts: int = 1) -> ServingError:
    """Builds the `ServingError` subclass that matches `code`, with a hint on what to do."""
    if code == "NOT_FOUND":
        return ModelNotFoundError(
            code, detail, server=server, model=model, signature=signature, attempts=attempts,
            hint="Check --model_name and --model_version/--model_label against the server's "
                 "model config.")
    if code == "FAILED_PRECONDITION" and _mentions_signature(detail):
        return SignatureNotFoundError(
            code, detail, server=server, model=model, signature=signature, attempts=attempts,
            hint="Check the signature names against `saved_model_cli show --dir EXPORT_DIR --all`.")
    if code == "INVALID_ARGUMENT":
        return InvalidArgumentError(code, detail, server=server, model=model, signature=signature,
                                    attempts=attempts)
    if code == "UNAVAILABLE":
        return ServerUnavailableError(
            code, detail, server=server, model=model, signature=signature, attempts=attempts,
            hint="Check that the server is running and the address and port are right.")
    if code == "DEADLINE_EXCEEDED":
        return DeadlineExceededError(
            code, detail, server=server, model=model, signature=signature, attempts=attempts,
            hint="Raise --deadline or ask for fewer characters per call.")
    return ServingError(code, detail, server=server, model=model, signature=signature,
                        attempts=attempts)


def _mentions_signature(detail: Optional[str]) -> bool:
    return bool(detail) and "signature" in detail.lower()
