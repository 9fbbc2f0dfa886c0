"""TF Serving warm-up requests written into the export.

TF Serving replays `assets.extra/tf_serving_warmup_requests` (a TFRecord
file of `PredictionLog` protos) when it loads a version, before it serves
it, so the first client request does not pay for tracing and memory
allocation. The requests use only the signatures without XLA, so a server
started without `--xla_cpu_compilation_enabled` also loads the model.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from trainer.vocabulary import Vocabulary

WARMUP_DIRECTORY = "assets.extra"
WARMUP_FILENAME = "tf_serving_warmup_requests"
# Batch sizes of the warm-up step requests: one streaming client, and a
# small merged batch as server-side batching forms.
WARMUP_BATCH_SIZES = (1, 4)
WARMUP_GENERATE_CHARS = 4


def warmup_requests(vocabulary: Vocabulary, num_layers: int, units: int) -> list:
    """Builds the warm-up `PredictionLog`s for a model with this vocabulary and state size."""
    characters = vocabulary.characters
    prompt = "".join(characters[:3]).encode("utf-8")
    logs = []
    for batch_size in WARMUP_BATCH_SIZES:
        state = np.zeros([batch_size, num_layers, units], np.float32)
        common = {
            "h": state,
            "c": state,
            "temperature": np.full([batch_size], 0.8, np.float32),
            "seed": np.stack([np.arange(batch_size), np.zeros(batch_size)], axis=1).astype(np.int32),
        }
        logs.append(_predict_log("step_no_xla", ids=np.ones([batch_size], np.int32), **common))
        logs.append(_predict_log(
            "step_chars_no_xla",
            chars=np.array([characters[0].encode("utf-8")] * batch_size, dtype=object), **common))
        logs.append(_predict_log("initial_state", batch=np.zeros([batch_size], np.int32)))
        logs.append(_predict_log("prime", prompts=np.array([prompt] * batch_size, dtype=object)))
        logs.append(_predict_log(
            "generate",
            prompts=np.array([prompt] * batch_size, dtype=object),
            num_chars=np.full([batch_size], WARMUP_GENERATE_CHARS, np.int32),
            temperature=common["temperature"],
            top_k=np.zeros([batch_size], np.int32),
            seed=common["seed"]))
    logs.append(_predict_log("metadata", batch=np.zeros([1], np.int32)))
    return logs


def _predict_log(signature_name: str, **inputs) -> prediction_log_pb2.PredictionLog:
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(signature_name=signature_name))
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request))


def write_warmup_requests(saved_model_dir: str, vocabulary: Vocabulary, num_layers: int,
                          units: int) -> str:
    """Writes the warm-up file into `saved_model_dir`; returns its path."""
    directory = tf.io.gfile.join(saved_model_dir, WARMUP_DIRECTORY)
    tf.io.gfile.makedirs(directory)
    path = tf.io.gfile.join(directory, WARMUP_FILENAME)
    with tf.io.TFRecordWriter(path) as writer:
        for log in warmup_requests(vocabulary, num_layers, units):
            writer.write(log.SerializeToString())
    return path


def read_warmup_requests(path: str) -> list:
    """Reads back the `PredictionLog`s of a warm-up file."""
    logs = []
    for record in tf.data.TFRecordDataset(path):
        logs.append(prediction_log_pb2.PredictionLog.FromString(record.numpy()))
    return logs
