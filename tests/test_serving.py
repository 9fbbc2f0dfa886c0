"""Specification of the serving clients against TF Serving stand-ins on 127.0.0.1.

Every test uses the real export of a tiny trained model. The gRPC and REST
stand-ins load it with the TF1 session loader as TF Serving does; the local
back end loads it with `tf.saved_model.load`.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
import tensorflow as tf

from serving import errors
from serving.backend import ModelSpec, RetryPolicy
from serving.grpc_backend import GrpcBackend
from serving.local_backend import LocalBackend
from serving.rest_backend import RestBackend
from serving.sampler import Sampler, Signatures, seed_pair, step_seed_array
from trainer.sampling import step_seeds
from trainer.vocabulary import UNKNOWN_CHARACTER
from standin_servers import GrpcStandin, ModelRepository, RestStandin

MODEL = "charlstm"
PROMPT = "Привет, café 🙂 "
# Retries fast enough for tests; every loop below ends after a bounded count.
FAST_RETRY = RetryPolicy(deadline=10.0, retries=2, initial_backoff=0.01, max_backoff=0.05)
NO_XLA = Signatures(step="step_no_xla")


@pytest.fixture(scope="module")
def base_path(trained):
    return os.path.dirname(trained.export_path)


@pytest.fixture(scope="module")
def version(trained):
    return int(os.path.basename(trained.export_path))


@pytest.fixture(scope="module")
def repository(base_path, version):
    repository = ModelRepository(MODEL, base_path, labels={"stable": version})
    yield repository
    repository.close()


@pytest.fixture(scope="module")
def grpc_server(repository):
    server = GrpcStandin(repository)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rest_server(repository):
    server = RestStandin(repository)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local_backend(base_path):
    return LocalBackend(base_path, retry=FAST_RETRY)


@pytest.fixture(autouse=True)
def clean_faults(repository):
    repository.delay_seconds = 0.0
    repository.fail_next(0)
    yield
    repository.delay_seconds = 0.0


def make_backend(kind, grpc_server, rest_server, local_backend, model=ModelSpec(MODEL),
                 retry=FAST_RETRY):
    if kind == "grpc":
        return GrpcBackend(grpc_server.address, model, retry)
    if kind == "rest":
        return RestBackend(rest_server.url, model, retry)
    return local_backend


def step_inputs(trained, temperature=1.0):
    state = np.zeros([1, trained.num_layers, trained.units], np.float32)
    return {"ids": np.array([1], np.int32), "h": state, "c": state,
            "temperature": np.array([temperature], np.float32),
            "seed": np.array([[1, 2]], np.int32)}


# ------------------------------------------------------------- same text


@pytest.mark.parametrize("kind", ["grpc", "rest", "local"])
def test_stream_equals_generate(kind, grpc_server, rest_server, local_backend):
    expected, = Sampler(local_backend).generate([PROMPT], 40, temperature=1.0, seed=(5, 2**31 - 20))
    sampler = Sampler(make_backend(kind, grpc_server, rest_server, local_backend), NO_XLA)

    streamed = "".join(sampler.stream(PROMPT, 40, temperature=1.0, seed=(5, 2**31 - 20)))
    generated, = sampler.generate([PROMPT], 40, temperature=1.0, seed=(5, 2**31 - 20))

    assert len(streamed) == 40
    assert streamed == expected
    assert generated == expected


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_xla_step_stream_equals_generate(temperature, grpc_server):
    sampler = Sampler(GrpcBackend(grpc_server.address, ModelSpec(MODEL), FAST_RETRY))
    expected, = sampler.generate([PROMPT], 30, temperature=temperature, seed=3)

    assert sampler.signatures.step == "serving_default"
    assert "".join(sampler.stream(PROMPT, 30, temperature=temperature, seed=3)) == expected


def test_top_k_stream_equals_generate(local_backend):
    sampler = Sampler(local_backend, NO_XLA)
    expected, = sampler.generate([PROMPT], 30, temperature=1.5, top_k=3, seed=9)

    assert "".join(sampler.stream(PROMPT, 30, temperature=1.5, top_k=3, seed=9)) == expected


def test_step_seeds_match_trainer_rule():
    seeds = np.array([[1, 2], [-5, 2**31 - 2], [7, -2**31]], np.int32)

    for step in (0, 1, 5, 1000):
        np.testing.assert_array_equal(step_seed_array(seeds, step), step_seeds(seeds, step).numpy())


def test_seed_pair_rejects_bad_values():
    assert seed_pair(7) == (7, 0)
    assert seed_pair([3, 4]) == (3, 4)
    with pytest.raises(ValueError, match=r"seed must be an integer or a pair"):
        seed_pair("7")
    with pytest.raises(ValueError, match=r"must fit in int32"):
        seed_pair(2**31)


def test_generate_rejects_negative_temperature(local_backend):
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0 .*, got -1"):
        Sampler(local_backend).generate(["a"], 5, temperature=-1)


# ----------------------------------------------------------- concurrency


@pytest.mark.parametrize("kind, clients, num_chars", [("grpc", 8, 30), ("rest", 4, 20)])
def test_concurrent_streams_are_independent(kind, clients, num_chars, grpc_server, rest_server,
                                            local_backend):
    prompts = [f"{PROMPT[:i + 1]}" for i in range(clients)]
    solo = [Sampler(local_backend).generate([prompt], num_chars, temperature=1.0, seed=(i, 0))[0]
            for i, prompt in enumerate(prompts)]
    sampler = Sampler(make_backend(kind, grpc_server, rest_server, local_backend), NO_XLA)
    start = threading.Barrier(clients, timeout=30)

    def run(i):
        start.wait()
        return "".join(sampler.stream(prompts[i], num_chars, temperature=1.0, seed=(i, 0)))

    with futures.ThreadPoolExecutor(clients) as pool:
        streamed = list(pool.map(run, range(clients), timeout=120))

    for i in range(clients):
        assert streamed[i] == solo[i], f"client {i}"


# -------------------------------------------------- faults and deadlines


def test_server_gone_mid_stream_fails_after_retries(repository):
    server = GrpcStandin(repository)
    backend = GrpcBackend(server.address, ModelSpec(MODEL), FAST_RETRY)
    stream = Sampler(backend, NO_XLA).stream(PROMPT, 20, temperature=1.0, seed=1)
    first = [next(stream) for _ in range(5)]
    server.stop()

    with pytest.raises(errors.ServerUnavailableError) as caught:
        next(stream)

    assert len(first) == 5
    assert caught.value.attempts == FAST_RETRY.retries + 1
    assert caught.value.server == server.address
    assert caught.value.signature == "step_no_xla"
    assert re.search(r"UNAVAILABLE: signature 'step_no_xla' of model 'charlstm' on 127\.0\.0\.1:\d+ "
                     r"failed after 3 attempts", str(caught.value))


def test_stream_survives_transient_unavailable(grpc_server, repository, local_backend):
    expected, = Sampler(local_backend).generate([PROMPT], 12, temperature=1.0, seed=4)
    sampler = Sampler(GrpcBackend(grpc_server.address, ModelSpec(MODEL), FAST_RETRY), NO_XLA)
    stream = sampler.stream(PROMPT, 12, temperature=1.0, seed=4)
    head = "".join(next(stream) for _ in range(4))
    calls_before = repository.predict_calls
    repository.fail_next(2, "UNAVAILABLE")

    tail = "".join(stream)

    assert head + tail == expected
    assert repository.predict_calls - calls_before == 8 + 2  # 8 steps plus 2 failed attempts


@pytest.mark.parametrize("kind", ["grpc", "rest"])
def test_deadline_exceeded_after_retries(kind, grpc_server, rest_server, local_backend, repository):
    repository.delay_seconds = 2.0
    retry = RetryPolicy(deadline=0.3, retries=1, initial_backoff=0.01)
    sampler = Sampler(make_backend(kind, grpc_server, rest_server, local_backend, retry=retry))

    with pytest.raises(errors.DeadlineExceededError, match=r"DEADLINE_EXCEEDED: signature "
                       r"'generate' .* failed after 2 attempts") as caught:
        sampler.generate(["a"], 3)

    assert caught.value.attempts == 2


@pytest.mark.parametrize("kind", ["grpc", "rest", "local"])
def test_invalid_argument_is_not_retried(kind, trained, grpc_server, rest_server, local_backend,
                                         repository):
    backend = make_backend(kind, grpc_server, rest_server, local_backend)
    calls_before = repository.predict_calls

    with pytest.raises(errors.InvalidArgumentError, match=r"temperature. must be >= 0") as caught:
        backend.predict("serving_default", step_inputs(trained, temperature=-1.0), {"ids": np.int32})

    assert caught.value.attempts == 1
    if kind != "local":
        assert repository.predict_calls - calls_before == 1


@pytest.mark.parametrize("kind", ["grpc", "rest"])
def test_other_codes_are_not_retried(kind, grpc_server, rest_server, local_backend, repository):
    repository.fail_next(1, "INTERNAL", "disk on fire")
    sampler = Sampler(make_backend(kind, grpc_server, rest_server, local_backend))

    with pytest.raises(errors.ServingError, match=r"INTERNAL: .*disk on fire") as caught:
        sampler.generate(["a"], 3)

    assert caught.value.attempts == 1


# ------------------------------------------------------ TF Serving's rules


@pytest.mark.parametrize("kind", ["grpc", "rest"])
def test_unknown_model_is_not_found(kind, grpc_server, rest_server, local_backend):
    sampler = Sampler(make_backend(kind, grpc_server, rest_server, local_backend, ModelSpec("nope")))

    with pytest.raises(errors.ModelNotFoundError, match=r"NOT_FOUND: .*model 'nope'.*--model_name"):
        sampler.generate(["a"], 3)


@pytest.mark.parametrize("kind", ["grpc", "rest"])
@pytest.mark.parametrize("spec", [ModelSpec(MODEL, version=999), ModelSpec(MODEL, label="canary")])
def test_unknown_version_or_label_is_not_found(kind, spec, grpc_server, rest_server, local_backend):
    sampler = Sampler(make_backend(kind, grpc_server, rest_server, local_backend, spec))

    with pytest.raises(errors.ModelNotFoundError, match=r"NOT_FOUND"):
        sampler.generate(["a"], 3)


@pytest.mark.parametrize("kind", ["grpc", "rest"])
def test_version_and_label_select_model(kind, version, grpc_server, rest_server, local_backend):
    expected = Sampler(local_backend).generate(["ab"], 5, temperature=1.0, seed=2)
    for spec in (ModelSpec(MODEL, version=version), ModelSpec(MODEL, label="stable")):
        backend = make_backend(kind, grpc_server, rest_server, local_backend, spec)

        assert Sampler(backend).generate(["ab"], 5, temperature=1.0, seed=2) == expected
        assert backend.model_status() == {version: "AVAILABLE"}


@pytest.mark.parametrize("kind", ["grpc", "rest", "local"])
def test_unknown_signature_is_failed_precondition(kind, grpc_server, rest_server, local_backend):
    sampler = Sampler(make_backend(kind, grpc_server, rest_server, local_backend),
                      Signatures(generate="generate_v2"))

    with pytest.raises(errors.SignatureNotFoundError,
                       match=r"FAILED_PRECONDITION: signature 'generate_v2'.*not found"):
        sampler.generate(["a"], 3)


@pytest.mark.parametrize("kind", ["grpc", "rest", "local"])
def test_extra_and_missing_inputs_are_invalid(kind, trained, grpc_server, rest_server,
                                              local_backend):
    backend = make_backend(kind, grpc_server, rest_server, local_backend)
    inputs = step_inputs(trained)
    inputs["top_k"] = np.array([1], np.int32)
    del inputs["seed"]

    with pytest.raises(errors.InvalidArgumentError, match=r"extra.*top_k.*[Mm]issing.*seed"):
        backend.predict("step_no_xla", inputs, {"ids": np.int32})


@pytest.mark.parametrize("kind", ["grpc", "local"])
def test_wrong_dtype_is_invalid(kind, trained, grpc_server, rest_server, local_backend):
    backend = make_backend(kind, grpc_server, rest_server, local_backend)
    inputs = step_inputs(trained)
    inputs["ids"] = np.array([1.0], np.float32)

    with pytest.raises(errors.InvalidArgumentError, match=r"'ids'.*int32.*float"):
        backend.predict("step_no_xla", inputs, {"ids": np.int32})


def test_rest_rejects_float_for_int_input(trained, rest_server):
    backend = RestBackend(rest_server.url, ModelSpec(MODEL), FAST_RETRY)
    inputs = step_inputs(trained)
    inputs["ids"] = np.array([1.5], np.float32)

    with pytest.raises(errors.InvalidArgumentError, match=r"1\.5 not of expected type int32"):
        backend.predict("step_no_xla", inputs, {"ids": np.int32})


def test_grpc_output_filter_is_honoured(trained, grpc_server, repository):
    stub_inputs = step_inputs(trained)
    servable = repository.find(MODEL, None, "")
    typed = {name: (tf.as_dtype(value.dtype).as_datatype_enum, value)
             for name, value in stub_inputs.items()}

    outputs = servable.run("step_no_xla", typed, ["ids", "h"])
    with pytest.raises(Exception, match=r"output tensor alias not found in signature: bogus"):
        servable.run("step_no_xla", typed, ["bogus"])

    assert sorted(outputs) == ["h", "ids"]


@pytest.mark.parametrize("kind", ["grpc", "rest"])
def test_generate_over_cap_names_num_chars(kind, grpc_server, rest_server, local_backend):
    sampler = Sampler(make_backend(kind, grpc_server, rest_server, local_backend))
    cap = sampler.metadata()["max_generate_chars"]

    with pytest.raises(errors.InvalidArgumentError, match=r"num_chars"):
        sampler.generate(["a"], cap + 1)


# ------------------------------------------------------ unknown characters


@pytest.mark.parametrize("kind", ["grpc", "rest"])
def test_unknown_characters_map_to_unknown_id(kind, grpc_server, rest_server, local_backend):
    sampler = Sampler(make_backend(kind, grpc_server, rest_server, local_backend), NO_XLA)
    facts = sampler.metadata()

    texts = sampler.generate(["ab字", "abΩ", "ab\ufffd"], 20, temperature=1.0, seed=6)
    streamed = "".join(sampler.stream("ab字", 20, temperature=1.0, seed=6))

    assert facts["unknown_id"] == 0
    assert sampler.vocabulary()[0] == UNKNOWN_CHARACTER
    assert texts[0] == texts[1]
    assert streamed == texts[0]


def test_rest_sends_invalid_utf8_as_b64(grpc_server, rest_server):
    prompts = {"prompts": np.array([b"ab\xff", "abΩ".encode("utf-8")], dtype=object)}
    requested_outputs = {"ids": np.int32, "h": np.float32}
    over_rest = RestBackend(rest_server.url, ModelSpec(MODEL), FAST_RETRY).predict(
        "prime", prompts, requested_outputs)
    over_grpc = GrpcBackend(grpc_server.address, ModelSpec(MODEL), FAST_RETRY).predict(
        "prime", prompts, requested_outputs)

    np.testing.assert_array_equal(over_rest["ids"], [0, 0])
    np.testing.assert_array_equal(over_rest["ids"], over_grpc["ids"])
    np.testing.assert_array_equal(over_rest["h"], over_grpc["h"])


# --------------------------------------------------------------- options


def test_tls_with_root_certificate(tmp_path, repository):
    key, cert = tmp_path / "server.key", tmp_path / "server.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=charlstm-test", "-addext", "subjectAltName=DNS:charlstm-test",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    server = GrpcStandin(repository, server_credentials=credentials)
    try:
        secure = GrpcBackend(server.address, ModelSpec(MODEL), FAST_RETRY, root_cert=str(cert),
                             tls_server_name="charlstm-test")
        plain = GrpcBackend(server.address, ModelSpec(MODEL),
                            RetryPolicy(deadline=5.0, retries=0))

        assert len(Sampler(secure).generate(["ab"], 4)[0]) == 4
        with pytest.raises(errors.ServerUnavailableError):
            Sampler(plain).generate(["ab"], 4)
    finally:
        server.stop()


def test_missing_root_cert_names_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--root_cert file not found: .*missing\.pem"):
        GrpcBackend("127.0.0.1:1", ModelSpec(MODEL), root_cert=str(tmp_path / "missing.pem"))


def test_small_max_message_size_rejects_large_reply(grpc_server):
    backend = GrpcBackend(grpc_server.address, ModelSpec(MODEL), FAST_RETRY, max_message_bytes=64)

    with pytest.raises(errors.ServingError, match=r"RESOURCE_EXHAUSTED") as caught:
        Sampler(backend).generate(["ab"], 50)

    assert caught.value.attempts == 1


def test_options_reject_bad_values():
    with pytest.raises(ValueError, match=r"Set a model version \(3\) or a label \('x'\)"):
        ModelSpec(MODEL, version=3, label="x")
    with pytest.raises(ValueError, match=r"Retries must be >= 0, got -1"):
        RetryPolicy(retries=-1)
    with pytest.raises(ValueError, match=r"Deadline must be a positive number"):
        RetryPolicy(deadline=0)
    with pytest.raises(ValueError, match=r"is not an http\(s\) URL"):
        RestBackend("localhost:8501", ModelSpec(MODEL))
    with pytest.raises(ValueError, match=r"has a path or query"):
        RestBackend("http://localhost:8501/v1/models/charlstm", ModelSpec(MODEL))


def test_local_backend_rejects_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--saved_model directory not found"):
        LocalBackend(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match=r"neither saved_model.pb nor integer version"):
        LocalBackend(str(tmp_path))
