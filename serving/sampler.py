"""Text generation over any back end: whole continuations or streamed characters.

Streaming keeps the LSTM state on the client. `prime` returns the state
after the prompt, and every step call sends the state in (`h`, `c`) and gets
the next state back. The server keeps nothing between calls, so any replica
can serve any step, and a retried step gives the same result.

Step t of a stream samples with seed `[seed0, seed1 + t]` (int32 wrap-around),
the rule of `trainer.sampling.step_seeds`. The export's `generate` signature
uses the same rule, so a streamed text equals the `generate` text for the
same seed, temperature and prompt.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from serving.backend import Backend

INT32_MIN, INT32_MAX = -2**31, 2**31 - 1

SeedLike = Union[int, Sequence[int]]
_STATE_OUTPUTS = {"h": np.float32, "c": np.float32}


@dataclasses.dataclass(frozen=True)
class Signatures:
    """Signature names of the export; change them only for a renamed export.

    Attributes:
      step: one sampling step from ids; `step_no_xla` runs the same step
        without XLA.
      prime: prompts to the state after them and the last prompt character.
      generate: whole continuations in one call, capped per row by the
        export's max_generate_chars.
      metadata: vocabulary and model facts.
    """

    step: str = "serving_default"
    prime: str = "prime"
    generate: str = "generate"
    metadata: str = "metadata"


def seed_pair(seed: SeedLike, name: str = "seed") -> tuple[int, int]:
    """Returns `seed` as two int32 words; an integer `s` becomes `(s, 0)`.

    Raises:
      ValueError: naming `name` for a value that is not one or two int32 integers.
    """
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        words = (int(seed), 0)
    elif (isinstance(seed, (list, tuple)) and len(seed) == 2
          and all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) for w in seed)):
        words = (int(seed[0]), int(seed[1]))
    else:
        raise ValueError(f"{name} must be an integer or a pair of integers, got {seed!r}.")
    for word in words:
        if not INT32_MIN <= word <= INT32_MAX:
            raise ValueError(f"{name} words must fit in int32, got {seed!r}.")
    return words


def step_seed_array(seeds: np.ndarray, step: int) -> np.ndarray:
    """Returns the seeds of stream step `step`: `[seed0, seed1 + step]` with int32 wrap-around.

    This is `trainer.sampling.step_seeds` in numpy, so clients need no TF op for it.
    """
    seeds = np.asarray(seeds, np.int64)  # [batch, 2]
    second = (seeds[:, 1] + step - INT32_MIN) % 2**32 + INT32_MIN  # wraps as int32 addition does
    return np.stack([seeds[:, 0], second], axis=1).astype(np.int32)


def check_temperature(value: float, name: str = "temperature") -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0 (0 means greedy), got {value!r}.")
    return float(value)


def check_count(value: int, name: str, minimum: int = 0) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _per_row(value, batch_size: int, name: str) -> list:
    """Repeats `value` for every row, or checks a list of one value per row.

    Only a list means "one value per row", so a tuple `(seed0, seed1)` is one
    seed pair for all rows.
    """
    if isinstance(value, (list, np.ndarray)):
        if len(value) != batch_size:
            raise ValueError(f"{name} has {len(value)} values for {batch_size} prompts; give one "
                             "value, or a list with one value per prompt.")
        return list(value)
    return [value] * batch_size


def _encode(texts: Sequence[str]) -> np.ndarray:
    for text in texts:
        if not isinstance(text, str):
            raise ValueError(f"Prompts must be strings, got {text!r}.")
    return np.array([text.encode("utf-8") for text in texts], dtype=object)  # [batch]


class Sampler:
    """Generates text from a charlstm export through a `Backend`.

    Example:
      sampler = Sampler(GrpcBackend("localhost:8500", ModelSpec("charlstm")))
      for character in sampler.stream("The ", num_chars=200, temperature=0.8, seed=7):
          print(character, end="", flush=True)
    """

    def __init__(self, backend: Backend, signatures: Signatures = Signatures()):
        self.backend = backend
        self.signatures = signatures
        self._vocabulary: Optional[list[str]] = None

    def generate(self, prompts: Sequence[str], num_chars, temperature=0.0, top_k=0,
                 seed: SeedLike = 0) -> list[str]:
        """Returns the continuation of every prompt, from one `generate` call.

        Args:
          prompts: the prompts, any Unicode; characters outside the vocabulary
            map to the unknown id (see the export's metadata).
          num_chars, temperature, top_k, seed: one value for all prompts or a
            list with one value per prompt. A seed is an integer `s` (the pair
            `[s, 0]`) or a tuple of two int32 words.

        Raises:
          ValueError: for a bad argument, before any call.
          errors.ServingError: when the call fails; `num_chars` over the
            export's cap is an `InvalidArgumentError`.
        """
        prompts = list(prompts)
        batch_size = len(prompts)
        if batch_size == 0:
            return []
        num_chars = [check_count(v, "num_chars") for v in _per_row(num_chars, batch_size, "num_chars")]
        temperature = [check_temperature(v) for v in _per_row(temperature, batch_size, "temperature")]
        top_k = [check_count(v, "top_k") for v in _per_row(top_k, batch_size, "top_k")]
        seeds = [seed_pair(v) for v in _per_row(seed, batch_size, "seed")]
        result = self.backend.predict(
            self.signatures.generate,
            {
                "prompts": _encode(prompts),  # [batch]
                "num_chars": np.array(num_chars, np.int32),  # [batch]
                "temperature": np.array(temperature, np.float32),  # [batch]
                "top_k": np.array(top_k, np.int32),  # [batch]
                "seed": np.array(seeds, np.int32),  # [batch, 2]
            },
            {"text": np.object_})
        return [text.decode("utf-8") for text in result["text"]]

    def stream(self, prompt: str, num_chars: int, temperature: float = 0.0, top_k: int = 0,
               seed: SeedLike = 0) -> Iterator[str]:
        """Yields the continuation of `prompt` one character at a time.

        One prime call, then one step call per character. With `top_k` > 0
        the client samples from the step's logits itself (the step
        signatures have no top_k input), with the same rule as the export.

        Raises:
          ValueError: for a bad argument, before any call.
          errors.ServingError: when a call fails after its retries.
        """
        for characters in self.stream_batch([prompt], num_chars, temperature, top_k, seed):
            yield characters[0]

    def stream_batch(self, prompts: Sequence[str], num_chars: int, temperature=0.0, top_k=0,
                     seed: SeedLike = 0) -> Iterator[list[str]]:
        """Yields, per step, the next character of every prompt (one list per step)."""
        prompts = list(prompts)
        batch_size = len(prompts)
        num_chars = check_count(num_chars, "num_chars")
        temperatures = np.array(
            [check_temperature(v) for v in _per_row(temperature, batch_size, "temperature")],
            np.float32)  # [batch]
        top_ks = np.array([check_count(v, "top_k") for v in _per_row(top_k, batch_size, "top_k")],
                          np.int32)  # [batch]
        seeds = np.array([seed_pair(v) for v in _per_row(seed, batch_size, "seed")],
                         np.int32)  # [batch, 2]
        if batch_size == 0 or num_chars == 0:
            return
        client_sampling = bool(np.any(top_ks > 0))
        vocabulary = self.vocabulary() if client_sampling else None

        primed = self.backend.predict(self.signatures.prime, {"prompts": _encode(prompts)},
                                      {"ids": np.int32, **_STATE_OUTPUTS})
        ids, h, c = primed["ids"], primed["h"], primed["c"]
        requested_outputs = {"ids": np.int32, "chars": np.object_, **_STATE_OUTPUTS}
        if client_sampling:
            requested_outputs["logits"] = np.float32
        for t in range(num_chars):
            step_seeds = step_seed_array(seeds, t)
            result = self.backend.predict(
                self.signatures.step,
                {"ids": ids, "h": h, "c": c, "temperature": temperatures, "seed": step_seeds},
                requested_outputs)
            h, c = result["h"], result["c"]
            if client_sampling:
                ids = _sample_top_k(result["logits"], temperatures, step_seeds, top_ks)
                yield [vocabulary[i] for i in ids]
            else:
                ids = result["ids"]
                yield [chars.decode("utf-8") for chars in result["chars"]]

    def vocabulary(self) -> list[str]:
        """Returns the export's characters by id (id 0 is U+FFFD), fetched once."""
        if self._vocabulary is None:
            result = self.backend.predict(self.signatures.metadata,
                                          {"batch": np.zeros([1], np.int32)},
                                          {"vocabulary": np.object_})
            self._vocabulary = [item.decode("utf-8") for item in result["vocabulary"][0]]
        return self._vocabulary

    def metadata(self) -> dict[str, object]:
        """Returns the export's model facts (vocab_size, num_layers, units, ...), one value each."""
        names = {"vocab_size": np.int32, "num_layers": np.int32, "units": np.int32,
                 "training_step": np.int64, "corpus_name": np.object_, "precision": np.object_,
                 "unknown_id": np.int32, "unknown_character_policy": np.object_,
                 "max_generate_chars": np.int32}
        result = self.backend.predict(self.signatures.metadata,
                                      {"batch": np.zeros([1], np.int32)}, names)
        facts = {}
        for name, value in result.items():
            item = value[0]
            facts[name] = item.decode("utf-8") if isinstance(item, bytes) else int(item)
        return facts


def _sample_top_k(logits: np.ndarray, temperatures: np.ndarray, seeds: np.ndarray,
                  top_ks: np.ndarray) -> np.ndarray:
    """Samples ids from step logits with the export's own sampling function."""
    # Imported here: TF and the trainer are needed only for top_k streaming.
    from trainer.sampling import sample_ids

    return sample_ids(logits, temperatures, seeds, top_ks).numpy()
