"""The REST back end: TF Serving's JSON API on port 8501 by default.

Requests use the columnar form, `{"signature_name": ..., "inputs": {name:
value}}`. String tensors travel as JSON strings when they are valid UTF-8 and
as `{"b64": ...}` otherwise, as TF Serving's REST API documents. TF Serving
returns a single-output signature as a bare `"outputs": value` without the
name; `select_outputs` gets the name back from the request.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Mapping, Optional

import numpy as np

from serving import errors
from serving.backend import Backend, CallFailed, ModelSpec, RetryPolicy, select_outputs

_CODE_BY_HTTP_STATUS = {status: code for code, status in errors.HTTP_STATUS_BY_CODE.items()}
# 400 and 409 and 500 carry several codes; pick the most common one.
_CODE_BY_HTTP_STATUS.update({400: "INVALID_ARGUMENT", 409: "ABORTED", 500: "INTERNAL"})
_SIGNATURE_NOT_FOUND = re.compile(r"signature key .* not found", re.IGNORECASE)
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def encode_json_value(value: np.ndarray) -> object:
    """Converts a numpy array to TF Serving's JSON tensor encoding."""
    if value.dtype == np.object_ or value.dtype.kind in "SU":
        return _encode_strings(value.tolist())
    return value.tolist()


def _encode_strings(item: object) -> object:
    if isinstance(item, list):
        return [_encode_strings(element) for element in item]
    if isinstance(item, str):
        return item
    try:
        return item.decode("utf-8")
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(item).decode("ascii")}


def decode_json_value(value: object) -> object:
    """Undoes `{"b64": ...}` objects inside a JSON tensor."""
    if isinstance(value, list):
        return [decode_json_value(element) for element in value]
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    return value


class RestBackend(Backend):
    """Calls TF Serving's `/v1/models/NAME[/versions/N|/labels/L]:predict`.

    Args:
      base_url: scheme, host and port, such as "http://localhost:8501".
      model: which model, version or label to call.
      retry: deadline and retries per call.
      root_cert: PEM file of the CA to trust for an https URL; without it the
        system's CAs are used.
    """

    def __init__(self, base_url: str, model: ModelSpec, retry: RetryPolicy = RetryPolicy(), *,
                 root_cert: Optional[str] = None):
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(
                f"--rest_url={base_url!r} is not an http(s) URL; use the form "
                "http://HOST:8501 (scheme, host and port only).")
        if parsed.path not in ("", "/") or parsed.query:
            raise ValueError(
                f"--rest_url={base_url!r} has a path or query; give only scheme, host and port, "
                "the client adds /v1/models/NAME:predict itself.")
        super().__init__(base_url.rstrip("/"), model, retry)
        self.model_url = f"{self.server}/v1/models/{urllib.parse.quote(model.name, safe='')}"
        if model.version is not None:
            self.model_url += f"/versions/{model.version}"
        elif model.label:
            self.model_url += f"/labels/{urllib.parse.quote(model.label, safe='')}"
        handlers: list = []
        if parsed.hostname in _LOOPBACK_HOSTS:
            # A proxy from the environment cannot reach this machine's loopback.
            handlers.append(urllib.request.ProxyHandler({}))
        if parsed.scheme == "https":
            context = ssl.create_default_context(cafile=root_cert)
            handlers.append(urllib.request.HTTPSHandler(context=context))
        elif root_cert:
            raise ValueError(f"--root_cert needs an https --rest_url, got {base_url!r}.")
        self._opener = urllib.request.build_opener(*handlers)

    def _predict_once(self, signature: str, inputs: Mapping[str, np.ndarray],
                      outputs: Mapping[str, np.dtype]) -> dict[str, np.ndarray]:
        body = {"inputs": {name: encode_json_value(value) for name, value in inputs.items()}}
        if signature:
            body["signature_name"] = signature
        payload = self._request("POST", f"{self.model_url}:predict",
                                json.dumps(body).encode("utf-8"))
        if "outputs" not in payload:
            raise CallFailed("INTERNAL", f"response has no 'outputs' field: {str(payload)[:200]}")
        result = payload["outputs"]
        if not isinstance(result, dict):
            if len(outputs) != 1:
                raise CallFailed(
                    "INTERNAL", f"signature {signature!r} returned a single unnamed output, "
                    f"but this client expects {', '.join(outputs)}")
            result = {next(iter(outputs)): result}
        decoded = {name: decode_json_value(value) for name, value in result.items()}
        return select_outputs(decoded, outputs, signature)

    def model_status(self) -> dict[int, str]:
        """Returns version -> state name from `GET /v1/models/NAME` (no retries)."""
        try:
            payload = self._request("GET", self.model_url, None)
        except CallFailed as failure:
            raise errors.error_for_code(failure.code, failure.detail, server=self.server,
                                        model=str(self.model), signature="GetModelStatus") from None
        return {int(item["version"]): item["state"]
                for item in payload.get("model_version_status", [])}

    def _request(self, method: str, url: str, data: Optional[bytes]) -> dict:
        request = urllib.request.Request(url, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        # NOTE: urllib applies the timeout to the connect and to each socket
        # read, not to the whole exchange, so a server that trickles bytes
        # can take longer than the deadline.
        try:
            with self._opener.open(request, timeout=self.retry.deadline) as response:
                text = response.read()
        except urllib.error.HTTPError as error:
            detail = _error_text(error)
            code = _CODE_BY_HTTP_STATUS.get(error.code, "UNKNOWN")
            if error.code == 400 and _SIGNATURE_NOT_FOUND.search(detail):
                code = "FAILED_PRECONDITION"  # HTTP 400 also carries this code.
            raise CallFailed(code, detail) from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, (socket.timeout, TimeoutError)):
                raise CallFailed("DEADLINE_EXCEEDED", f"no response within {self.retry.deadline} s") from None
            raise CallFailed("UNAVAILABLE", f"cannot connect: {error.reason}") from None
        except (socket.timeout, TimeoutError):
            raise CallFailed("DEADLINE_EXCEEDED", f"no response within {self.retry.deadline} s") from None
        except (ConnectionError, http.client.HTTPException) as error:
            raise CallFailed("UNAVAILABLE", f"connection failed: {error!r}") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise CallFailed("INTERNAL", f"response is not JSON ({error}): {text[:200]!r}") from None


def _error_text(error: urllib.error.HTTPError) -> str:
    body = error.read()
    try:
        return str(json.loads(body)["error"])
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        return f"HTTP {error.code} {error.reason}: {body[:200]!r}"
