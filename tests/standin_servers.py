"""Stand-ins for TF Serving's gRPC and REST servers, for tests on 127.0.0.1.

The real tensorflow_model_server cannot be installed here, so these servers
load the SavedModel the way it does, through the TF1 session loader
(`tf.compat.v1.saved_model.loader.load(sess, ["serve"], version_dir)`), and
follow its Predict rules:

- the highest integer version under the base path is loaded (or all
  versions, on request), and labels map to loaded versions;
- an empty signature name means serving_default;
- an unknown model, version or label is NOT_FOUND;
- an unknown signature is FAILED_PRECONDITION;
- extra or missing inputs, unknown output_filter names and wrong dtypes are
  INVALID_ARGUMENT. The dtype check is done here because Python's
  `Session.run` casts feeds silently where the C++ server rejects them;
- REST uses the columnar JSON form, strings as UTF-8 JSON strings or
  {"b64": ...}, a bare "outputs" value for a single-output signature, and
  {"error": ...} bodies with TF Serving's HTTP statuses.

Tests can add a delay to every Predict and make the next calls fail with a
status code, to exercise deadlines and retries.

NOTE: the REST stand-in accepts only the columnar "inputs" form, not the row
form "instances" that TF Serving also accepts.
"""

from __future__ import annotations

import base64
import http.server
import json
import re
import threading
from concurrent import futures
from typing import Mapping, Optional, Sequence

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from serving.errors import HTTP_STATUS_BY_CODE

_VERSION_PATTERN = re.compile(r"^\d+$")
DEFAULT_SIGNATURE = "serving_default"


class StandinError(Exception):
    """A Predict failure with a gRPC status code name."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ServableVersion:
    """One loaded SavedModel version: a TF1 session and its signature defs."""

    def __init__(self, version: int, version_dir: str):
        self.version = version
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph)
        with self.graph.as_default():
            meta_graph = tf.compat.v1.saved_model.loader.load(self.session, ["serve"], version_dir)
        self.signatures = dict(meta_graph.signature_def)

    def signature(self, name: str):
        name = name or DEFAULT_SIGNATURE
        if name not in self.signatures:
            raise StandinError("FAILED_PRECONDITION", f'Serving signature key "{name}" not found.')
        return name, self.signatures[name]

    def run(self, signature_name: str, inputs: Mapping[str, tuple[int, np.ndarray]],
            output_filter: Sequence[str]) -> dict[str, np.ndarray]:
        """Runs a signature on inputs given as (DataType enum, array) pairs."""
        name, signature = self.signature(signature_name)
        expected = set(signature.inputs)
        sent = set(inputs)
        if expected != sent:
            raise StandinError(
                "INVALID_ARGUMENT",
                f"input size does not match signature: {len(sent)}!={len(expected)} "
                f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
                f"Sent extra: {{{','.join(sorted(sent - expected))}}}. "
                f"Missing but required: {{{','.join(sorted(expected - sent))}}}.")
        feeds = {}
        for alias, (dtype_enum, value) in inputs.items():
            info = signature.inputs[alias]
            if dtype_enum != info.dtype:
                raise StandinError(
                    "INVALID_ARGUMENT",
                    f"Expects arg {alias!r} to be {tf.as_dtype(info.dtype).name} but "
                    f"{tf.as_dtype(dtype_enum).name} is provided")
            feeds[info.name] = value
        names = list(output_filter) or sorted(signature.outputs)
        for alias in names:
            if alias not in signature.outputs:
                raise StandinError(
                    "INVALID_ARGUMENT",
                    f"output tensor alias not found in signature: {alias} Outputs expected to be "
                    f"in the set {{{','.join(sorted(signature.outputs))}}}.")
        if len(set(names)) != len(names):
            raise StandinError("INVALID_ARGUMENT", f"duplicate output tensor alias in {names}")
        fetches = [signature.outputs[alias].name for alias in names]
        try:
            values = self.session.run(fetches, feed_dict=feeds)
        except tf.errors.OpError as error:
            raise StandinError(_code_name(error.error_code), error.message) from None
        except (ValueError, TypeError) as error:  # Python-side feed shape checks.
            raise StandinError("INVALID_ARGUMENT", str(error)) from None
        return dict(zip(names, values))

    def close(self) -> None:
        self.session.close()


def _code_name(error_code: int) -> str:
    return {status.value[0]: status.name for status in grpc.StatusCode}.get(error_code, "UNKNOWN")


class ModelRepository:
    """The models a stand-in serves, with TF Serving's version policy.

    Args:
      name: model name clients must use.
      base_path: directory with integer version subdirectories.
      all_versions: load every version instead of only the highest.
      labels: version label -> version number, like a model config's
        version_labels.
    """

    def __init__(self, name: str, base_path: str, all_versions: bool = False,
                 labels: Optional[Mapping[str, int]] = None):
        self.name = name
        names = [entry.rstrip("/") for entry in tf.io.gfile.listdir(base_path)]
        versions = sorted(int(entry) for entry in names if _VERSION_PATTERN.match(entry))
        if not versions:
            raise ValueError(f"No integer version directory under {base_path}.")
        chosen = versions if all_versions else versions[-1:]
        self.versions = {v: ServableVersion(v, tf.io.gfile.join(base_path, str(v))) for v in chosen}
        self.labels = dict(labels or {})
        for label, version in self.labels.items():
            if version not in self.versions:
                raise ValueError(f"Label {label!r} points at version {version}, which is not loaded.")
        # Fault injection, shared by every thread of a server.
        self.delay_seconds = 0.0
        self._lock = threading.Lock()
        self._failures: list[tuple[str, str]] = []
        self._stopping = threading.Event()
        self.predict_calls = 0

    def fail_next(self, count: int, code: str = "UNAVAILABLE", message: str = "injected failure"):
        """Makes the next `count` Predict calls fail with `code`."""
        with self._lock:
            self._failures.extend([(code, message)] * count)

    def find(self, name: str, version: Optional[int], label: str) -> ServableVersion:
        if name != self.name:
            raise StandinError("NOT_FOUND", f"Servable not found for request: Latest({name})")
        if version is not None:
            if version not in self.versions:
                raise StandinError("NOT_FOUND",
                                   f"Servable not found for request: Specific({name}, {version})")
            return self.versions[version]
        if label:
            if label not in self.labels:
                raise StandinError("NOT_FOUND", f"Unrecognized servable version label: {label}")
            return self.versions[self.labels[label]]
        return self.versions[max(self.versions)]

    def predict(self, name: str, version: Optional[int], label: str, signature: str,
                inputs: Mapping[str, tuple[int, np.ndarray]],
                output_filter: Sequence[str] = ()) -> dict[str, np.ndarray]:
        with self._lock:
            self.predict_calls += 1
            failure = self._failures.pop(0) if self._failures else None
        if self.delay_seconds:
            # Wakes early when the repository closes, so teardown never waits it out.
            self._stopping.wait(self.delay_seconds)
        if failure:
            raise StandinError(*failure)
        return self.find(name, version, label).run(signature, inputs, output_filter)

    def close(self) -> None:
        self._stopping.set()
        for servable in self.versions.values():
            servable.close()


# ----------------------------------------------------------------------- gRPC


class _PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, repository: ModelRepository):
        self.repository = repository

    def Predict(self, request, context):
        spec = request.model_spec
        version = spec.version.value if spec.HasField("version") else None
        inputs = {alias: (proto.dtype, tf.make_ndarray(proto)) for alias, proto in request.inputs.items()}
        try:
            outputs = self.repository.predict(spec.name, version, spec.version_label,
                                              spec.signature_name, inputs, list(request.output_filter))
        except StandinError as error:
            context.abort(grpc.StatusCode[error.code], error.message)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = spec.name
        for alias, value in outputs.items():
            response.outputs[alias].CopyFrom(tf.make_tensor_proto(value))
        return response


class _ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, repository: ModelRepository):
        self.repository = repository

    def GetModelStatus(self, request, context):
        spec = request.model_spec
        version = spec.version.value if spec.HasField("version") else None
        try:
            if version is None and not spec.version_label:
                self.repository.find(spec.name, None, "")
                versions = sorted(self.repository.versions)
            else:
                versions = [self.repository.find(spec.name, version, spec.version_label).version]
        except StandinError as error:
            context.abort(grpc.StatusCode[error.code], error.message)
        response = get_model_status_pb2.GetModelStatusResponse()
        for number in versions:
            status = response.model_version_status.add()
            status.version = number
            status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        return response


class GrpcStandin:
    """A gRPC server on 127.0.0.1 with PredictionService and ModelService.

    Args:
      repository: the models to serve.
      max_workers: size of the bounded thread pool that runs calls.
      port: 0 picks a free ephemeral port; a fixed port lets a test restart
        a server at the same address.
      server_credentials: grpc.ssl_server_credentials for a TLS port.
    """

    def __init__(self, repository: ModelRepository, max_workers: int = 8, port: int = 0,
                 server_credentials=None):
        self.repository = repository
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                                   options=[("grpc.so_reuseport", 0)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            _PredictionServicer(repository), self._server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelServicer(repository),
                                                                  self._server)
        target = f"127.0.0.1:{port}"
        if server_credentials is None:
            self.port = self._server.add_insecure_port(target)
        else:
            self.port = self._server.add_secure_port(target, server_credentials)
        if not self.port:
            raise OSError(f"Cannot bind the gRPC stand-in to {target}.")
        self._server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stops at once: calls in flight fail with UNAVAILABLE or CANCELLED."""
        self._server.stop(grace=None).wait(5)


# ----------------------------------------------------------------------- REST

_PREDICT_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<verb>:predict)?$")
_JSON_TYPES = {
    tf.int32: (int,), tf.int64: (int,), tf.float32: (int, float), tf.float64: (int, float),
}


def json_to_array(value: object, dtype: tf.DType, alias: str) -> np.ndarray:
    """Decodes one JSON tensor into an array of `dtype`, checking every element's JSON type."""

    def check(item):
        if isinstance(item, list):
            return [check(element) for element in item]
        if dtype == tf.string:
            if isinstance(item, str):
                return item.encode("utf-8")
            if isinstance(item, dict) and set(item) == {"b64"}:
                return base64.b64decode(item["b64"])
        elif isinstance(item, _JSON_TYPES.get(dtype, ())) and not isinstance(item, bool):
            return item
        raise StandinError(
            "INVALID_ARGUMENT",
            f"JSON Value: {json.dumps(item)} not of expected type {dtype.name} for input {alias!r}")

    checked = check(value)
    try:
        if dtype == tf.string:
            return np.array(checked, dtype=object)
        return np.array(checked, dtype=dtype.as_numpy_dtype)
    except ValueError as error:  # Ragged nesting.
        raise StandinError("INVALID_ARGUMENT",
                           f"Input {alias!r} is not a rectangular tensor: {error}") from None


def array_to_json(value: np.ndarray, alias: str) -> object:
    """Encodes an output array as TF Serving does: strings as UTF-8 text or {"b64": ...}."""
    if value.dtype != np.object_:
        return value.tolist()

    def encode(item):
        if isinstance(item, list):
            return [encode(element) for element in item]
        if alias.endswith("_bytes"):
            return {"b64": base64.b64encode(item).decode("ascii")}
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            # NOTE: TF Serving writes such bytes without checking them; the
            # stand-in sends b64 instead so that the JSON stays valid.
            return {"b64": base64.b64encode(item).decode("ascii")}

    return encode(value.tolist())


class _RestHandler(http.server.BaseHTTPRequestHandler):
    server: "RestStandinServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # Quiet: pytest shows failures anyway.
        pass

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, error: StandinError) -> None:
        self._send(HTTP_STATUS_BY_CODE.get(error.code, 500), {"error": error.message})

    def _route(self):
        match = _PREDICT_PATH.match(self.path)
        if not match:
            raise StandinError("NOT_FOUND", f"Malformed request: {self.command} {self.path}")
        version = int(match["version"]) if match["version"] else None
        return match["name"], version, match["label"] or "", bool(match["verb"])

    def do_GET(self):
        try:
            name, version, label, is_predict = self._route()
            if is_predict:
                raise StandinError("INVALID_ARGUMENT", "Predict needs POST")
            repository = self.server.repository
            if version is None and not label:
                repository.find(name, None, "")
                versions = sorted(repository.versions)
            else:
                versions = [repository.find(name, version, label).version]
        except StandinError as error:
            self._send_error(error)
            return
        self._send(200, {"model_version_status": [
            {"version": str(v), "state": "AVAILABLE",
             "status": {"error_code": "OK", "error_message": ""}} for v in versions]})

    def do_POST(self):
        try:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            name, version, label, is_predict = self._route()
            if not is_predict:
                raise StandinError("NOT_FOUND", f"Malformed request: POST {self.path}")
            self._send(200, self._predict(name, version, label, body))
        except StandinError as error:
            self._send_error(error)

    def _predict(self, name: str, version: Optional[int], label: str, body: bytes) -> dict:
        repository = self.server.repository
        try:
            request = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise StandinError("INVALID_ARGUMENT", f"JSON Parse error: {error}") from None
        if not isinstance(request, dict) or "inputs" not in request:
            raise StandinError("INVALID_ARGUMENT",
                               "Missing 'inputs' key (the stand-in supports only the columnar form)")

        # Looked up first, so a bad model or signature gives its own error.
        servable = repository.find(name, version, label)
        signature_name, signature = servable.signature(request.get("signature_name", ""))
        raw_inputs = request["inputs"]
        if not isinstance(raw_inputs, dict):
            if len(signature.inputs) != 1:
                raise StandinError("INVALID_ARGUMENT",
                                   "Bare 'inputs' value needs a signature with exactly one input")
            raw_inputs = {next(iter(signature.inputs)): raw_inputs}

        inputs = {}
        for alias, value in raw_inputs.items():
            if alias not in signature.inputs:
                continue  # Reported as "extra" by the shared input check.
            dtype = tf.as_dtype(signature.inputs[alias].dtype)
            inputs[alias] = (signature.inputs[alias].dtype, json_to_array(value, dtype, alias))
        for alias in set(raw_inputs) - set(signature.inputs):
            inputs[alias] = (0, np.zeros([0]))

        outputs = repository.predict(name, version, label, signature_name, inputs)
        encoded = {alias: array_to_json(value, alias) for alias, value in outputs.items()}
        if len(encoded) == 1:
            return {"outputs": next(iter(encoded.values()))}
        return {"outputs": encoded}


class RestStandinServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, repository: ModelRepository, port: int = 0):
        self.repository = repository
        super().__init__(("127.0.0.1", port), _RestHandler)


class RestStandin:
    """TF Serving's REST API on 127.0.0.1, served from a background thread."""

    def __init__(self, repository: ModelRepository, port: int = 0):
        self.repository = repository
        self._server = RestStandinServer(repository, port)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
