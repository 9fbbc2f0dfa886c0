"""The export loaded the way TF Serving loads it: the TF1 SavedModel loader and a Session.

TF Serving restores the MetaGraphDef tagged "serve" into a Session, runs its
init op (which fills the vocabulary table), and feeds each request to the
tensor names of the SignatureDef. The TF1 `Session.run` casts numpy feeds to
the placeholder dtype silently, and TF Serving does not, so every feed here
is checked against the SignatureDef's dtypes first.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from export import warmup
from export.signature_check import check_request_inputs
from export_fixtures import seeds, zero_state

NON_XLA_SIGNATURES = {"step_no_xla", "step_chars_no_xla", "initial_state", "prime", "generate",
                      "metadata"}
ALL_SIGNATURES = NON_XLA_SIGNATURES | {"serving_default", "step_chars"}


@pytest.fixture(scope="module")
def session(trained):
    # The session is not entered as a context manager, because that would
    # make its graph the default one and turn off eager mode in the tests.
    graph = tf.Graph()
    sess = tf.compat.v1.Session(graph=graph)
    with graph.as_default():
        meta_graph = tf.compat.v1.saved_model.loader.load(sess, ["serve"], trained.export_path)
    yield sess, meta_graph
    sess.close()


@pytest.fixture(scope="module")
def loaded_signatures(trained):
    return tf.saved_model.load(trained.export_path).signatures


def run_signature(session, name: str, inputs: dict) -> dict:
    """Runs signature `name` by its tensor names, checking input and output dtypes."""
    sess, meta_graph = session
    signature = meta_graph.signature_def[name]
    check_request_inputs(name, signature, inputs)
    feeds = {signature.inputs[key].name: value for key, value in inputs.items()}
    fetches = {key: info.name for key, info in signature.outputs.items()}
    outputs = sess.run(fetches, feeds)
    for key, value in outputs.items():
        want = tf.as_dtype(signature.outputs[key].dtype)
        have = tf.string if value.dtype == object else tf.as_dtype(value.dtype)
        assert have == want, f"output {key} of {name} is {have.name}, SignatureDef says {want.name}"
    return outputs


def step_request(trained, batch_size: int, ids=True) -> dict:
    state = zero_state(batch_size, trained.num_layers, trained.units)
    request = dict(h=state, c=state, temperature=np.full([batch_size], 0.9, np.float32),
                   seed=seeds(batch_size))
    if ids:
        request["ids"] = np.arange(1, batch_size + 1, dtype=np.int32)
    else:
        request["chars"] = np.array(["П".encode("utf-8")] * batch_size, dtype=object)
    return request


def test_serve_tag_has_all_signatures(session):
    _, meta_graph = session
    assert set(meta_graph.signature_def) - {"__saved_model_init_op"} == ALL_SIGNATURES


def test_signature_inputs_are_batch_first(session):
    _, meta_graph = session
    for name in ALL_SIGNATURES:
        for key, info in meta_graph.signature_def[name].inputs.items():
            assert info.tensor_shape.dim[0].size == -1, f"{name}.{key}"


@pytest.mark.parametrize("name", ["serving_default", "step_no_xla"])
def test_session_step_matches_loaded_function(trained, session, loaded_signatures, name):
    request = step_request(trained, 3)
    outputs = run_signature(session, name, request)
    reference = loaded_signatures[name](
        **{key: tf.constant(value) for key, value in request.items()})
    np.testing.assert_allclose(outputs["logits"], reference["logits"].numpy(), atol=1e-6)
    np.testing.assert_array_equal(outputs["ids"], reference["ids"].numpy())


@pytest.mark.parametrize("name", ["step_chars", "step_chars_no_xla"])
def test_session_runs_step_chars(trained, session, name):
    outputs = run_signature(session, name, step_request(trained, 2, ids=False))
    assert outputs["h"].shape == (2, trained.num_layers, trained.units)
    assert outputs["chars"].shape == (2,)


def test_session_runs_initial_state_and_metadata(trained, session):
    state = run_signature(session, "initial_state", {"batch": np.zeros([4], np.int32)})
    assert state["h"].shape == (4, trained.num_layers, trained.units)
    metadata = run_signature(session, "metadata", {"batch": np.zeros([1], np.int32)})
    assert metadata["vocabulary"].shape == (1, trained.vocabulary.size)


def test_session_generate_streams_like_steps(trained, session):
    prompt = "Привет 🙂".encode("utf-8")
    generated = run_signature(session, "generate", dict(
        prompts=np.array([prompt], dtype=object), num_chars=np.array([12], np.int32),
        temperature=np.array([1.0], np.float32), top_k=np.array([0], np.int32),
        seed=np.array([[8, 1]], np.int32)))
    primed = run_signature(session, "prime", {"prompts": np.array([prompt], dtype=object)})
    ids, h, c = primed["ids"], primed["h"], primed["c"]
    pieces = []
    for t in range(12):
        out = run_signature(session, "serving_default", dict(
            ids=ids, h=h, c=c, temperature=np.array([1.0], np.float32),
            seed=np.array([[8, 1 + t]], np.int32)))
        ids, h, c = out["ids"], out["h"], out["c"]
        pieces.append(out["chars"][0])
    assert b"".join(pieces) == generated["text"][0]


def test_session_rejects_negative_temperature(trained, session):
    request = step_request(trained, 1)
    request["temperature"] = np.array([-1.0], np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="`temperature` must be >= 0"):
        run_signature(session, "step_no_xla", request)


def test_warmup_requests_use_non_xla_signatures(trained):
    path = os.path.join(trained.export_path, warmup.WARMUP_DIRECTORY, warmup.WARMUP_FILENAME)
    logs = warmup.read_warmup_requests(path)
    names = {log.predict_log.request.model_spec.signature_name for log in logs}
    assert names == NON_XLA_SIGNATURES


def test_warmup_requests_run_in_session(trained, session):
    path = os.path.join(trained.export_path, warmup.WARMUP_DIRECTORY, warmup.WARMUP_FILENAME)
    for log in warmup.read_warmup_requests(path):
        request = log.predict_log.request
        inputs = {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
        outputs = run_signature(session, request.model_spec.signature_name, inputs)
        batch_size = len(next(iter(inputs.values())))
        for key, value in outputs.items():
            assert value.shape[0] == batch_size, f"{request.model_spec.signature_name}.{key}"


def test_saved_model_cli_shows_export(trained):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    if not os.path.exists(cli):
        cli = "saved_model_cli"
    completed = subprocess.run([cli, "show", "--all", "--dir", trained.export_path],
                               capture_output=True, text=True, timeout=120,
                               env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert completed.returncode == 0, completed.stderr[-2000:]
    for name in ALL_SIGNATURES:
        assert f"signature_def['{name}']" in completed.stdout
