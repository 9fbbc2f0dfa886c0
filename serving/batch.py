"""Batch generation jobs: JSON Lines prompts in, JSON Lines results out, resumable.

Input, one JSON object per line (blank lines are ignored):

    {"id": "q1", "prompt": "The ", "num_chars": 100, "temperature": 0.8, "top_k": 0, "seed": 7}

`id` (a string or an integer) and `prompt` are required; the other fields
default to the command-line flags. A seed is an integer `s` (the pair
`[s, 0]`) or a pair `[s0, s1]`.

Output, one JSON object per finished prompt, in the order the prompts were
generated:

    {"id": "q1", "prompt": "The ", "text": "...", "settings": {...}, "timing": {...}}

A job appends every batch to the output file, then flushes and fsyncs it, so
a killed job loses at most the batch in flight. A rerun with the same output
file skips the ids already there, and drops a last line that a kill cut off
before its newline.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import time
from typing import Iterable, Optional, Sequence, Union

import tensorflow as tf
from absl import logging

from serving.sampler import Sampler, seed_pair

PromptId = Union[str, int]
_ALLOWED_FIELDS = ("id", "prompt", "num_chars", "temperature", "top_k", "seed")


class BadLineError(ValueError):
    """A line of the prompts file or the output file that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sampling settings of one prompt; the flags give the defaults."""

    num_chars: int
    temperature: float
    top_k: int
    seed: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One prompt of a job, with the line it came from."""

    id: PromptId
    prompt: str
    settings: Settings
    line_number: int

    @property
    def key(self) -> str:
        return id_key(self.id)


def id_key(prompt_id: PromptId) -> str:
    """Returns a key that keeps the id 1 and the id "1" apart."""
    return json.dumps(prompt_id)


def parse_prompt_line(text: str, line_number: int, path: str, defaults: Settings) -> PromptRecord:
    """Parses one line of a prompts file.

    Raises:
      BadLineError: naming the file, the line number and the field at fault.
    """
    where = f"{path} line {line_number}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadLineError(f"{where}: invalid JSON ({error.msg} at column {error.colno}).") from None
    if not isinstance(data, dict):
        raise BadLineError(f"{where}: expected a JSON object with 'id' and 'prompt', "
                           f"got {type(data).__name__}.")
    unknown = sorted(set(data) - set(_ALLOWED_FIELDS))
    if unknown:
        raise BadLineError(f"{where}: unknown field {', '.join(unknown)}; allowed fields are "
                           f"{', '.join(_ALLOWED_FIELDS)}.")
    prompt_id = data.get("id")
    if isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, int)) or prompt_id == "":
        raise BadLineError(f"{where}: 'id' must be a non-empty string or an integer, "
                           f"got {prompt_id!r}.")
    prompt = data.get("prompt")
    if not isinstance(prompt, str):
        raise BadLineError(f"{where}: 'prompt' must be a string, got {prompt!r}.")

    num_chars = data.get("num_chars", defaults.num_chars)
    if isinstance(num_chars, bool) or not isinstance(num_chars, int) or num_chars < 0:
        raise BadLineError(f"{where}: 'num_chars' must be an integer >= 0, got {num_chars!r}.")
    temperature = data.get("temperature", defaults.temperature)
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature) or temperature < 0):
        raise BadLineError(f"{where}: 'temperature' must be a number >= 0 (0 means greedy), "
                           f"got {temperature!r}.")
    top_k = data.get("top_k", defaults.top_k)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise BadLineError(f"{where}: 'top_k' must be an integer >= 0 (0 keeps all), got {top_k!r}.")
    try:
        seed = seed_pair(data["seed"], "'seed'") if "seed" in data else defaults.seed
    except ValueError as error:
        raise BadLineError(f"{where}: {error}") from None
    return PromptRecord(prompt_id, prompt,
                        Settings(num_chars, float(temperature), top_k, seed), line_number)


def read_prompts(path: str, defaults: Settings, on_bad_line: str = "fail") -> list[PromptRecord]:
    """Reads and checks a whole prompts file before any generation.

    Args:
      path: JSON Lines file; any path tf.io.gfile reads.
      defaults: settings for fields a line leaves out.
      on_bad_line: "fail" raises on the first bad line; "skip" logs it with
        its line number and goes on.

    Raises:
      FileNotFoundError: for a missing file.
      BadLineError: for a bad line when on_bad_line is "fail", and for a
        duplicate id whatever on_bad_line is.
    """
    if on_bad_line not in ("fail", "skip"):
        raise ValueError(f"on_bad_line must be 'fail' or 'skip', got {on_bad_line!r}.")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"--prompts_file not found: {path}.")
    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
    records: list[PromptRecord] = []
    first_line: dict[str, int] = {}
    skipped = 0
    for line_number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
            record = parse_prompt_line(text, line_number, path, defaults)
        except (BadLineError, UnicodeDecodeError) as error:
            if isinstance(error, UnicodeDecodeError):
                error = BadLineError(f"{path} line {line_number}: not valid UTF-8 ({error.reason}).")
            if on_bad_line == "fail":
                raise error from None
            skipped += 1
            logging.warning("Skipping bad line (--on_bad_line=skip): %s", error)
            continue
        if record.key in first_line:
            raise BadLineError(
                f"{path} line {line_number}: id {record.id!r} already appeared on line "
                f"{first_line[record.key]}; ids must be unique because a rerun uses them to skip "
                "finished prompts.")
        first_line[record.key] = line_number
        records.append(record)
    if skipped:
        logging.warning("Skipped %d bad lines of %s.", skipped, path)
    return records


def check_output_path(path: str) -> None:
    """Rejects output paths that cannot be appended to and fsynced."""
    if "://" in path:
        raise ValueError(
            f"--output={path!r} must be a local file: resuming needs append and fsync, which "
            "object stores such as gs:// do not offer. Copy the file there after the job.")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Directory of --output not found: {directory}.")


def load_finished_ids(path: str) -> set[str]:
    """Returns the id keys already in the output file, after dropping a torn last line.

    A last line without its newline is what a kill during a write leaves, so
    it is cut off (the file is truncated to the last newline) and its prompt
    runs again.

    Raises:
      BadLineError: for a complete line that is not a result object, naming
        the line. Such a file was not written by a job, or was edited.
    """
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        logging.warning("Dropping the torn last line of %s (%d bytes without a newline), "
                        "left by a job that was killed while writing.", path, len(data) - end)
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    finished = set()
    for line_number, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
        try:
            result = json.loads(raw)
            finished.add(id_key(result["id"]))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise BadLineError(
                f"--output {path} line {line_number} is not a result line with an 'id'. Use a "
                "new --output file, or remove that line to resume.") from None
    return finished


class ProgressLog:
    """Logs done/total, rate and ETA to stderr, at most once per `interval` seconds and at the end."""

    def __init__(self, total: int, interval: float = 2.0):
        self.total = total
        self.done = 0
        self.interval = interval
        self._start = time.monotonic()
        self._last_log = -math.inf

    def update(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self._last_log < self.interval and self.done < self.total:
            return
        self._last_log = now
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        remaining = (self.total - self.done) / rate if rate > 0 else math.inf
        eta = "unknown" if math.isinf(remaining) else str(datetime.timedelta(seconds=round(remaining)))
        percent = 100.0 * self.done / self.total if self.total else 100.0
        logging.info("Generated %d/%d prompts (%.1f%%), %.2f prompts/s, ETA %s.",
                     self.done, self.total, percent, rate, eta)


@dataclasses.dataclass(frozen=True)
class JobSummary:
    total: int
    already_done: int
    written: int
    seconds: float


def _batches(records: Sequence[PromptRecord], size: int) -> Iterable[Sequence[PromptRecord]]:
    for start in range(0, len(records), size):
        yield records[start:start + size]


def run_job(sampler: Sampler, records: Sequence[PromptRecord], output_path: str,
            batch_size: int, max_num_chars: Optional[int] = None) -> JobSummary:
    """Generates every record not yet in `output_path`, `batch_size` prompts per call.

    Args:
      sampler: where the `generate` calls go.
      records: the prompts, from `read_prompts`.
      output_path: local JSON Lines file, appended to.
      batch_size: prompts per `generate` call.
      max_num_chars: the export's cap on num_chars; lines over it are
        rejected before any call.

    Raises:
      BadLineError: for a line over `max_num_chars`, before any call.
      errors.ServingError: when a call fails; the batches before it stay
        written.
    """
    if batch_size < 1:
        raise ValueError(f"--batch_size must be a positive integer, got {batch_size}.")
    check_output_path(output_path)
    if max_num_chars is not None:
        for record in records:
            if record.settings.num_chars > max_num_chars:
                raise BadLineError(
                    f"Prompts line {record.line_number} (id {record.id!r}): num_chars "
                    f"{record.settings.num_chars} is over the export's max_generate_chars "
                    f"{max_num_chars}; lower it or export with a larger --max_generate_chars.")
    finished = load_finished_ids(output_path)
    pending = [record for record in records if record.key not in finished]
    already_done = len(records) - len(pending)
    if already_done:
        logging.info("Resuming: %d of %d prompts are already in %s.", already_done, len(records),
                     output_path)
    start = time.monotonic()
    progress = ProgressLog(len(pending))
    model = str(sampler.backend.model)
    with open(output_path, "a", encoding="utf-8") as output:
        for batch in _batches(pending, batch_size):
            batch_start = time.monotonic()
            texts = sampler.generate(
                [record.prompt for record in batch],
                num_chars=[record.settings.num_chars for record in batch],
                temperature=[record.settings.temperature for record in batch],
                top_k=[record.settings.top_k for record in batch],
                seed=[record.settings.seed for record in batch])
            seconds = time.monotonic() - batch_start
            finished_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            lines = []
            for record, text in zip(batch, texts):
                result = {
                    "id": record.id,
                    "prompt": record.prompt,
                    "text": text,
                    "settings": {**dataclasses.asdict(record.settings),
                                 "seed": list(record.settings.seed), "model": model,
                                 "server": sampler.backend.server},
                    "timing": {"batch_seconds": round(seconds, 4), "batch_size": len(batch),
                               "finished_at": finished_at},
                }
                lines.append(json.dumps(result, ensure_ascii=False) + "\n")
            # One write per batch, then flush and fsync. After a kill the file
            # contains complete lines plus at most one torn last line, which a
            # rerun drops.
            output.write("".join(lines))
            output.flush()
            os.fsync(output.fileno())
            progress.update(len(batch))
    return JobSummary(len(records), already_done, len(pending), time.monotonic() - start)
