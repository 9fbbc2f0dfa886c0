"""Specification of the exported SavedModel's signatures, loaded in process."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from export import export_lib
from export.serving_module import GENERATE_PADDING_ID, UNKNOWN_CHARACTER_POLICY
from export.signature_check import RequestError, check_request_inputs
from trainer.sampling import step_seeds
from trainer.vocabulary import UNKNOWN_CHARACTER
from export_fixtures import UNSEEN_CHARACTERS, seeds, utf8, zero_state

# Stepping one character at a time and running a whole sequence at once add
# up the same float32 products in different orders. Observed differences are
# below 1e-6, so 1e-4 leaves room without hiding a wrong state.
TEACHER_FORCING_ATOL = 1e-4
# XLA fuses and reorders float32 maths; observed differences are below 1e-6.
XLA_ATOL = 1e-5
# Rows of different batch sizes can take different matmul kernels.
BATCH_ATOL = 1e-5


@pytest.fixture(scope="module")
def signatures(trained):
    return tf.saved_model.load(trained.export_path).signatures


def step_inputs(trained, ids, temperature=1.0, first_seed=11, state=None):
    batch_size = len(ids)
    h = zero_state(batch_size, trained.num_layers, trained.units) if state is None else state[0]
    c = zero_state(batch_size, trained.num_layers, trained.units) if state is None else state[1]
    return dict(ids=tf.constant(ids, tf.int32), h=tf.constant(h), c=tf.constant(c),
                temperature=tf.fill([batch_size], float(temperature)),
                seed=tf.constant(seeds(batch_size, first_seed)))


def generate(signatures, prompts, num_chars, temperature=1.0, top_k=0, first_seed=11,
             seed=None):
    batch_size = len(prompts)
    return signatures["generate"](
        prompts=utf8(prompts),
        num_chars=tf.constant(num_chars if isinstance(num_chars, list) else [num_chars] * batch_size,
                              tf.int32),
        temperature=tf.fill([batch_size], float(temperature)),
        top_k=tf.fill([batch_size], top_k),
        seed=tf.constant(seeds(batch_size, first_seed) if seed is None else seed, tf.int32))


def texts(tensor) -> list[str]:
    return [value.decode("utf-8") for value in tensor.numpy()]


def stream(signatures, step_name, prompt, num_chars, temperature, seed):
    """Primes with `prompt` and calls the step signature `num_chars` times with step_seeds."""
    primed = signatures["prime"](prompts=utf8([prompt]))
    ids, h, c = primed["ids"], primed["h"], primed["c"]
    pieces, sampled = [], []
    for t in range(num_chars):
        out = signatures[step_name](ids=ids, h=h, c=c, temperature=tf.constant([temperature]),
                                    seed=step_seeds(tf.constant([seed], tf.int32), t))
        ids, h, c = out["ids"], out["h"], out["c"]
        pieces.append(out["chars"].numpy()[0].decode("utf-8"))
        sampled.append(int(ids.numpy()[0]))
    return "".join(pieces), sampled


# --------------------------------------------------------------- maths


@pytest.mark.parametrize("step_name", ["step_no_xla", "serving_default"])
def test_step_teacher_forcing_matches_model(trained, signatures, step_name):
    text = "Привет, Café 🙂 fox"
    ids = trained.vocabulary.encode(text)
    expected, _ = trained.result.trainer.model(tf.constant(ids[None], tf.int32))  # [1, time, vocab]
    state = (zero_state(1, trained.num_layers, trained.units),) * 2
    for t, char_id in enumerate(ids):
        out = signatures[step_name](**step_inputs(trained, [char_id], state=state))
        state = (out["h"].numpy(), out["c"].numpy())
        np.testing.assert_allclose(out["logits"].numpy()[0], expected.numpy()[0, t],
                                   atol=TEACHER_FORCING_ATOL, err_msg=f"position {t}")


def test_xla_step_matches_no_xla(trained, signatures):
    rng = np.random.default_rng(0)
    shape = [3, trained.num_layers, trained.units]
    state = (rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32))
    inputs = step_inputs(trained, [1, 5, 9], state=state)
    compiled = signatures["serving_default"](**inputs)
    plain = signatures["step_no_xla"](**inputs)
    for name in ("logits", "h", "c"):
        np.testing.assert_allclose(compiled[name].numpy(), plain[name].numpy(), atol=XLA_ATOL,
                                   err_msg=name)
    np.testing.assert_array_equal(compiled["ids"].numpy(), plain["ids"].numpy())


def test_step_state_is_float32(signatures, trained):
    out = signatures["step_no_xla"](**step_inputs(trained, [1]))
    assert out["h"].dtype == tf.float32
    assert out["c"].dtype == tf.float32
    assert out["logits"].dtype == tf.float32


def test_temperature_zero_is_argmax(trained, signatures):
    out = signatures["serving_default"](**step_inputs(trained, [1, 2, 3], temperature=0.0))
    np.testing.assert_array_equal(out["ids"].numpy(), np.argmax(out["logits"].numpy(), axis=1))


def test_step_chars_decodes_ids(trained, signatures):
    out = signatures["step_no_xla"](**step_inputs(trained, [1, 2, 3]))
    expected = [trained.vocabulary.decode([i]) for i in out["ids"].numpy()]
    assert texts(out["chars"]) == expected


def test_step_chars_equals_step_on_ids(trained, signatures):
    characters = ["П", "é", "🙂"]
    ids = [int(trained.vocabulary.encode(char)[0]) for char in characters]
    by_id = step_inputs(trained, ids)
    by_char = dict(by_id, chars=utf8(characters))
    del by_char["ids"]
    for ids_name, chars_name in (("step_no_xla", "step_chars_no_xla"),
                                 ("serving_default", "step_chars")):
        expected = signatures[ids_name](**by_id)
        actual = signatures[chars_name](**by_char)
        np.testing.assert_allclose(actual["logits"].numpy(), expected["logits"].numpy(), atol=0)
        np.testing.assert_array_equal(actual["ids"].numpy(), expected["ids"].numpy())


def test_initial_state_is_zero_per_row(trained, signatures):
    out = signatures["initial_state"](batch=tf.constant([7, 7, 7], tf.int32))
    for name in ("h", "c"):
        assert out[name].shape == (3, trained.num_layers, trained.units)
        assert out[name].dtype == tf.float32
        assert not np.any(out[name].numpy())


# --------------------------------------------------------------- prime


def test_prime_matches_model_state(trained, signatures):
    prompt = "Съешь 🙂 déjà"
    ids = trained.vocabulary.encode(prompt)
    _, state = trained.result.trainer.model(tf.constant(ids[None, :-1], tf.int32))
    primed = signatures["prime"](prompts=utf8([prompt]))
    for layer, (h, c) in enumerate(state):
        np.testing.assert_allclose(primed["h"].numpy()[0, layer], h.numpy()[0],
                                   atol=TEACHER_FORCING_ATOL)
        np.testing.assert_allclose(primed["c"].numpy()[0, layer], c.numpy()[0],
                                   atol=TEACHER_FORCING_ATOL)
    assert int(primed["ids"].numpy()[0]) == ids[-1]
    assert int(primed["lengths"].numpy()[0]) == len(prompt)


def test_prime_batch_equals_each_alone(signatures):
    prompts = ["П", "Привет, мир!", "Ça va? 🙂", "The quick brown fox jumps", "ab"]
    together = signatures["prime"](prompts=utf8(prompts))
    for row, prompt in enumerate(prompts):
        alone = signatures["prime"](prompts=utf8([prompt]))
        for name in ("h", "c"):
            np.testing.assert_allclose(together[name].numpy()[row], alone[name].numpy()[0],
                                       atol=BATCH_ATOL, err_msg=f"{name} of {prompt!r}")
        assert together["ids"].numpy()[row] == alone["ids"].numpy()[0]
        assert together["lengths"].numpy()[row] == len(prompt)


def test_prime_empty_prompt_is_newline(signatures):
    empty = signatures["prime"](prompts=utf8(["", "\n"]))
    np.testing.assert_array_equal(empty["h"].numpy()[0], empty["h"].numpy()[1])
    assert empty["ids"].numpy()[0] == empty["ids"].numpy()[1]
    assert list(empty["lengths"].numpy()) == [0, 1]


def test_prime_single_character_is_zero_state(signatures):
    primed = signatures["prime"](prompts=utf8(["П"]))
    assert not np.any(primed["h"].numpy())
    assert not np.any(primed["c"].numpy())


# ------------------------------------------------ unknown characters


def test_unknown_prompt_characters_map_to_unknown_id(trained, signatures):
    assert all(char not in trained.vocabulary.characters for char in UNSEEN_CHARACTERS)
    primed = signatures["prime"](prompts=utf8([UNSEEN_CHARACTERS[0], "a" + UNSEEN_CHARACTERS]))
    assert list(primed["ids"].numpy()) == [0, 0]
    # The unseen character in the middle of the second prompt acts as id 0.
    reference = signatures["prime"](prompts=utf8(["a" + UNKNOWN_CHARACTER + "x"]))
    if UNKNOWN_CHARACTER not in trained.vocabulary.characters:
        np.testing.assert_array_equal(primed["h"].numpy()[1], reference["h"].numpy()[0])


def test_unknown_step_char_maps_to_unknown_id(trained, signatures):
    inputs = step_inputs(trained, [0])
    by_char = dict(inputs, chars=utf8([UNSEEN_CHARACTERS[0]]))
    del by_char["ids"]
    expected = signatures["step_no_xla"](**inputs)
    actual = signatures["step_chars_no_xla"](**by_char)
    np.testing.assert_array_equal(actual["logits"].numpy(), expected["logits"].numpy())


def test_invalid_utf8_maps_to_unknown_id(signatures):
    primed = signatures["prime"](prompts=tf.constant([b"ab\xff"]))
    assert int(primed["ids"].numpy()[0]) == 0


def test_unknown_id_decodes_to_replacement_character(trained, signatures):
    out = signatures["generate"](
        prompts=utf8(["a"]), num_chars=tf.constant([3]), temperature=tf.constant([0.0]),
        top_k=tf.constant([0]), seed=tf.constant([[1, 2]]))
    for char_id, char in zip(out["ids"].numpy()[0], texts(out["text"])[0]):
        assert char == (UNKNOWN_CHARACTER if char_id == 0 else trained.vocabulary.decode([char_id]))


# ------------------------------------------------------------- generate


@pytest.mark.parametrize("step_name", ["step_no_xla", "serving_default"])
@pytest.mark.parametrize("prompt,temperature", [
    ("Привет", 1.0), ("", 0.7), ("Ça va? 🙂" + UNSEEN_CHARACTERS, 1.3), ("q", 0.0)])
def test_generate_equals_prime_then_steps(signatures, step_name, prompt, temperature):
    seed = [5, 40]
    streamed_text, streamed_ids = stream(signatures, step_name, prompt, 25, temperature, seed)
    out = generate(signatures, [prompt], 25, temperature, seed=[seed])
    assert texts(out["text"])[0] == streamed_text
    assert list(out["ids"].numpy()[0]) == streamed_ids


def test_generate_same_seed_same_text(signatures):
    first = generate(signatures, ["Привет", "fox"], 30, first_seed=3)
    second = generate(signatures, ["Привет", "fox"], 30, first_seed=3)
    assert texts(first["text"]) == texts(second["text"])


def test_generate_other_seed_other_text(signatures):
    first = generate(signatures, ["Привет"], 40, first_seed=3)
    second = generate(signatures, ["Привет"], 40, first_seed=4)
    assert texts(first["text"]) != texts(second["text"])


def test_generate_row_independent_of_batch(signatures):
    prompt, seed = "Café ", [21, 7]
    alone = texts(generate(signatures, [prompt], 20, seed=[seed])["text"])[0]
    rng = np.random.default_rng(1)
    others = ["", "Привет, мир!", "🙂", "The lazy dog"]
    for batch_size in (3, 64):
        prompts = [others[i % len(others)] for i in range(batch_size)]
        batch_seeds = rng.integers(0, 1000, size=[batch_size, 2]).astype(np.int32)
        row = batch_size // 2
        prompts[row], batch_seeds[row] = prompt, seed
        out = generate(signatures, prompts, 20, seed=batch_seeds)
        assert texts(out["text"])[row] == alone, f"batch size {batch_size}"


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_signatures_accept_batch_size(trained, signatures, batch_size):
    step = signatures["serving_default"](**step_inputs(trained, [1] * batch_size))
    assert step["ids"].shape == (batch_size,)
    assert step["logits"].shape == (batch_size, trained.vocabulary.size)
    out = generate(signatures, ["fox"] * batch_size, 4)
    assert out["ids"].shape == (batch_size, 4)
    assert len(texts(out["text"])) == batch_size


def test_generate_pads_short_rows(signatures):
    out = generate(signatures, ["a", "b", "c"], [0, 2, 5])
    ids = out["ids"].numpy()
    assert ids.shape == (3, 5)
    assert list(ids[0]) == [GENERATE_PADDING_ID] * 5
    assert list(ids[1, 2:]) == [GENERATE_PADDING_ID] * 3
    assert [len(text) for text in texts(out["text"])] == [0, 2, 5]


def test_generate_top_k_one_is_greedy(signatures):
    sampled = generate(signatures, ["Привет"], 15, temperature=5.0, top_k=1)
    greedy = generate(signatures, ["Привет"], 15, temperature=0.0)
    assert texts(sampled["text"]) == texts(greedy["text"])


def test_generate_zero_chars_in_all_rows(signatures):
    out = generate(signatures, ["a", "b"], 0)
    assert out["ids"].shape == (2, 0)
    assert texts(out["text"]) == ["", ""]


def test_sample_from_saved_model_paths_agree(trained):
    by_step = export_lib.sample_from_saved_model(trained.export_path, "Привет", 20, 0.8, 9)
    by_generate = export_lib.sample_from_saved_model(trained.export_path, "Привет", 20, 0.8, 9,
                                                     "generate")
    assert len(by_step) == 20
    assert by_step == by_generate


# ------------------------------------------------------------- metadata


def test_metadata_describes_model(trained, signatures):
    out = signatures["metadata"](batch=tf.constant([0, 0], tf.int32))
    vocabulary = [value.decode("utf-8") for value in out["vocabulary"].numpy()[1]]
    assert vocabulary == [UNKNOWN_CHARACTER] + trained.vocabulary.characters
    assert list(out["vocab_size"].numpy()) == [trained.vocabulary.size] * 2
    assert list(out["num_layers"].numpy()) == [trained.num_layers] * 2
    assert list(out["units"].numpy()) == [trained.units] * 2
    assert list(out["training_step"].numpy()) == [5, 5]
    assert texts(out["corpus_name"]) == [trained.vocabulary.corpus_name] * 2
    assert texts(out["precision"]) == ["float32"] * 2
    assert texts(out["unknown_character_policy"])[0] == UNKNOWN_CHARACTER_POLICY
    assert list(out["max_generate_chars"].numpy()) == [export_lib.DEFAULT_MAX_GENERATE_CHARS] * 2


# ------------------------------------------------------------ bad calls


@pytest.mark.parametrize("temperature", [-0.5, math.nan])
def test_step_rejects_bad_temperature(trained, signatures, temperature):
    inputs = step_inputs(trained, [1, 2])
    inputs["temperature"] = tf.constant([1.0, temperature])
    for name in ("serving_default", "step_no_xla"):
        with pytest.raises(tf.errors.InvalidArgumentError, match="`temperature` must be >= 0"):
            signatures[name](**inputs)


@pytest.mark.parametrize("temperature", [-1.0, math.nan])
def test_generate_rejects_bad_temperature(signatures, temperature):
    with pytest.raises(tf.errors.InvalidArgumentError, match="`temperature` must be >= 0"):
        generate(signatures, ["a"], 3, temperature=temperature)


@pytest.mark.parametrize("name", ["h", "c", "temperature", "seed"])
def test_step_rejects_mismatched_batch(trained, signatures, name):
    inputs = step_inputs(trained, [1, 2])
    inputs[name] = step_inputs(trained, [1, 2, 3])[name]
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"`{name}` must have"):
        signatures["serving_default"](**inputs)


def test_step_rejects_out_of_range_ids(trained, signatures):
    for name in ("serving_default", "step_no_xla"):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"`ids` must be in \[0, "):
            signatures[name](**step_inputs(trained, [1, trained.vocabulary.size]))
        with pytest.raises(tf.errors.InvalidArgumentError, match="`ids` must be"):
            signatures[name](**step_inputs(trained, [-1]))


@pytest.mark.parametrize("chars", [["ab"], [""]])
def test_step_chars_rejects_not_one_character(trained, signatures, chars):
    inputs = step_inputs(trained, [1])
    del inputs["ids"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="`chars` must hold exactly one"):
        signatures["step_chars"](chars=utf8(chars), **inputs)


@pytest.mark.parametrize("num_chars", [export_lib.DEFAULT_MAX_GENERATE_CHARS + 1, -1])
def test_generate_rejects_num_chars_outside_cap(signatures, num_chars):
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"`num_chars` must be in \[0, {export_lib.DEFAULT_MAX_GENERATE_CHARS}\]"):
        generate(signatures, ["a"], num_chars)


def test_generate_rejects_negative_top_k(signatures):
    with pytest.raises(tf.errors.InvalidArgumentError, match="`top_k` must be >= 0"):
        generate(signatures, ["a"], 3, top_k=-2)


@pytest.mark.parametrize("name", ["num_chars", "top_k", "seed"])
def test_generate_rejects_mismatched_batch(signatures, name):
    inputs = dict(prompts=utf8(["a", "b"]), num_chars=tf.constant([2, 2]),
                  temperature=tf.constant([1.0, 1.0]), top_k=tf.constant([0, 0]),
                  seed=tf.constant(seeds(2)))
    inputs[name] = tf.concat([inputs[name], inputs[name][:1]], axis=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"`{name}` must"):
        signatures["generate"](**inputs)


def test_request_check_names_wrong_dtype(trained):
    signature_def = _signature_defs(trained.export_path)["serving_default"]
    inputs = {key: value.numpy() for key, value in step_inputs(trained, [1]).items()}
    inputs["ids"] = inputs["ids"].astype(np.float32)
    with pytest.raises(RequestError, match="Input `ids` .* must be int32, got float32"):
        check_request_inputs("serving_default", signature_def, inputs)


def test_request_check_names_missing_input(trained):
    signature_def = _signature_defs(trained.export_path)["serving_default"]
    inputs = {key: value.numpy() for key, value in step_inputs(trained, [1]).items()}
    del inputs["seed"]
    with pytest.raises(RequestError, match=r"missing \['seed'\]"):
        check_request_inputs("serving_default", signature_def, inputs)


def test_request_check_names_wrong_state_shape(trained):
    signature_def = _signature_defs(trained.export_path)["serving_default"]
    inputs = {key: value.numpy() for key, value in step_inputs(trained, [1]).items()}
    inputs["h"] = np.zeros([1, trained.num_layers, trained.units + 1], np.float32)
    with pytest.raises(RequestError, match=r"Input `h` .* shape \['batch', 2, 16\]"):
        check_request_inputs("serving_default", signature_def, inputs)


def _signature_defs(path: str) -> dict:
    from tensorflow.python.tools import saved_model_utils

    return dict(saved_model_utils.get_meta_graph_def(path, "serve").signature_def)
