"""The gRPC back end: TF Serving's PredictionService on port 8500 by default."""

from __future__ import annotations

from typing import Mapping, Optional

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from serving import errors
from serving.backend import Backend, CallFailed, ModelSpec, RetryPolicy, select_outputs

# gRPC's own default limit on a received message is 4 MiB. A step call for a
# batch of 64 with 3 layers of 1024 units sends 2 * 64 * 3 * 1024 floats
# (1.5 MiB) each way, so the default of 64 MiB leaves room for large batches.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def read_file_bytes(path: str, flag: str) -> bytes:
    """Reads a certificate or key file, naming `flag` when it is missing."""
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{flag} file not found: {path}.")
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


class GrpcBackend(Backend):
    """Calls TF Serving's Predict over gRPC, optionally with TLS.

    Args:
      address: host:port of the server's gRPC port.
      model: which model, version or label to call.
      retry: deadline and retries per call.
      root_cert: PEM file of the CA that signed the server's certificate;
        setting it turns TLS on. Without it the channel is plain text.
      client_cert, client_key: PEM files for mutual TLS, both or neither.
      tls_server_name: name to check the server's certificate against when it
        differs from the host in `address` (gRPC's
        grpc.ssl_target_name_override).
      max_message_bytes: maximum size of a sent or received message.
    """

    def __init__(self, address: str, model: ModelSpec, retry: RetryPolicy = RetryPolicy(), *,
                 root_cert: Optional[str] = None, client_cert: Optional[str] = None,
                 client_key: Optional[str] = None, tls_server_name: Optional[str] = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        super().__init__(address, model, retry)
        if max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}.")
        if bool(client_cert) != bool(client_key):
            raise ValueError("Set both --client_cert and --client_key for mutual TLS, or neither.")
        if (client_cert or tls_server_name) and not root_cert:
            raise ValueError("--client_cert, --client_key and --tls_server_name need --root_cert "
                             "(TLS is on only with a root certificate).")
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        if root_cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=read_file_bytes(root_cert, "--root_cert"),
                private_key=read_file_bytes(client_key, "--client_key") if client_key else None,
                certificate_chain=read_file_bytes(client_cert, "--client_cert") if client_cert else None)
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._predictions = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)

    def _fill_model_spec(self, spec) -> None:
        spec.name = self.model.name
        if self.model.version is not None:
            spec.version.value = self.model.version
        elif self.model.label:
            spec.version_label = self.model.label

    def _predict_once(self, signature: str, inputs: Mapping[str, np.ndarray],
                      outputs: Mapping[str, np.dtype]) -> dict[str, np.ndarray]:
        request = predict_pb2.PredictRequest()
        self._fill_model_spec(request.model_spec)
        request.model_spec.signature_name = signature
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        request.output_filter.extend(outputs)
        try:
            response = self._predictions.Predict(request, timeout=self.retry.deadline)
        except grpc.RpcError as error:
            raise CallFailed(error.code().name, error.details() or str(error)) from None
        decoded = {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}
        return select_outputs(decoded, outputs, signature)

    def model_status(self) -> dict[int, str]:
        """Returns version -> state name ("AVAILABLE", ...) from GetModelStatus.

        Raises:
          errors.ServingError: when the call fails (no retries).
        """
        request = get_model_status_pb2.GetModelStatusRequest()
        self._fill_model_spec(request.model_spec)
        try:
            response = self._models.GetModelStatus(request, timeout=self.retry.deadline)
        except grpc.RpcError as error:
            raise errors.error_for_code(error.code().name, error.details() or str(error),
                                        server=self.server, model=str(self.model),
                                        signature="GetModelStatus") from None
        state_names = get_model_status_pb2.ModelVersionStatus.State
        return {status.version: state_names.Name(status.state)
                for status in response.model_version_status}

    def close(self) -> None:
        self._channel.close()
