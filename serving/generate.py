r"""Generate text from a charlstm export over gRPC, REST or in process.

One prompt:

    python -m serving.generate --server=localhost:8500 --prompt="The " \
        --num_chars=200 --temperature=0.8 --seed=7 --stream

A batch job (JSON Lines in and out, resumable; see serving/batch.py):

    python -m serving.generate --rest_url=http://localhost:8501 \
        --prompts_file=prompts.jsonl --output=results.jsonl --batch_size=32
"""

from __future__ import annotations

import re
import sys

from absl import app, flags, logging

_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):(\d{1,5})$")

flags.DEFINE_string("server", None, "gRPC address host:port of TF Serving (port 8500 by default).")
flags.DEFINE_string("rest_url", None, "REST base URL of TF Serving, such as http://localhost:8501.")
flags.DEFINE_string("saved_model", None,
                    "Export directory (with version subdirectories) or one version directory, "
                    "loaded in this process instead of calling a server.")
flags.DEFINE_string("model_name", "charlstm", "Model name in the server's model config.")
flags.DEFINE_integer("model_version", None, "Model version to call; default the server's latest.",
                     lower_bound=0)
flags.DEFINE_string("model_label", None, "Model version label to call, such as 'stable'.")

flags.DEFINE_string("prompt", "", "Prompt for one generation (not with --prompts_file). An "
                    "empty prompt is primed as a newline.")
flags.DEFINE_integer("num_chars", 200, "Characters to generate per prompt.", lower_bound=0)
flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 means greedy.", lower_bound=0.0)
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely characters; 0 keeps all.",
                     lower_bound=0)
flags.DEFINE_integer("seed", 0, "Sampling seed; the seed pair is [seed, 0]. The same seed, "
                     "prompt and settings give the same text.",
                     lower_bound=-2**31, upper_bound=2**31 - 1)
flags.DEFINE_bool("stream", False, "Print characters as they arrive (one step call per "
                  "character) instead of one generate call.")

flags.DEFINE_float("deadline", 30.0, "Seconds allowed for each call attempt.")
flags.DEFINE_integer("retries", 3, "Retries after UNAVAILABLE or DEADLINE_EXCEEDED, with "
                     "exponential backoff; other errors are not retried.", lower_bound=0)
flags.DEFINE_float("initial_backoff", 0.1, "Seconds before the first retry; doubles per retry.",
                   lower_bound=0.0)
flags.DEFINE_float("max_backoff", 5.0, "Maximum seconds between retries.", lower_bound=0.0)
flags.DEFINE_string("root_cert", None, "PEM file of the CA that signed the server's "
                    "certificate; turns TLS on for --server, and is the CA for an https --rest_url.")
flags.DEFINE_string("client_cert", None, "PEM certificate chain for mutual TLS with --server.")
flags.DEFINE_string("client_key", None, "PEM private key for mutual TLS with --server.")
flags.DEFINE_string("tls_server_name", None,
                    "Name to check the server certificate against, when it differs from the host.")
flags.DEFINE_integer("max_message_mb", 64, "Maximum gRPC message size in MiB, sent and received.",
                     lower_bound=1)

flags.DEFINE_string("step_signature", "serving_default",
                    "Step signature for --stream: serving_default (XLA) or step_no_xla.")
flags.DEFINE_string("prime_signature", "prime", "Signature that primes the state with prompts.")
flags.DEFINE_string("generate_signature", "generate", "Signature for whole continuations.")
flags.DEFINE_string("metadata_signature", "metadata", "Signature with the vocabulary and limits.")

flags.DEFINE_string("prompts_file", None, "JSON Lines file of prompts, one object with 'id' and "
                    "'prompt' per line (optional num_chars, temperature, top_k, seed).")
flags.DEFINE_string("output", None, "Local JSON Lines file for --prompts_file results; a rerun "
                    "skips ids already in it.")
flags.DEFINE_integer("batch_size", 16, "Prompts per generate call in a batch job.", lower_bound=1)
flags.DEFINE_enum("on_bad_line", "fail", ["fail", "skip"],
                  "What a bad line of --prompts_file does: stop the job before any call, or be "
                  "logged with its line number and skipped.")

FLAGS = flags.FLAGS


@flags.multi_flags_validator(["server", "rest_url", "saved_model"],
                             message="Set exactly one of --server (gRPC host:port), --rest_url "
                                     "(http://host:port) or --saved_model (export directory).")
def _check_one_backend(values) -> bool:
    return sum(bool(value) for value in values.values()) == 1


@flags.validator("server", message="--server must be host:port, such as localhost:8500.")
def _check_server(value) -> bool:
    return value is None or bool(_ADDRESS.match(value))


@flags.validator("deadline", message="--deadline must be a positive number of seconds.")
def _check_deadline(value) -> bool:
    return value > 0


@flags.multi_flags_validator(["model_version", "model_label"],
                             message="Set --model_version or --model_label, not both.")
def _check_version_or_label(values) -> bool:
    return values["model_version"] is None or not values["model_label"]


@flags.multi_flags_validator(["prompts_file", "output"],
                             message="--prompts_file and --output go together: set both or neither.")
def _check_job_files(values) -> bool:
    return bool(values["prompts_file"]) == bool(values["output"])


@flags.multi_flags_validator(["prompts_file", "stream", "prompt"],
                             message="--stream and --prompt are for one prompt; a --prompts_file "
                                     "job takes its prompts from the file.")
def _check_job_mode(values) -> bool:
    return not values["prompts_file"] or not (values["stream"] or values["prompt"])


def build_backend():
    """Builds the back end that the flags select."""
    from serving.backend import ModelSpec, RetryPolicy  # Imported late: they import TF.

    retry = RetryPolicy(deadline=FLAGS.deadline, retries=FLAGS.retries,
                        initial_backoff=FLAGS.initial_backoff, max_backoff=FLAGS.max_backoff)
    if FLAGS.saved_model:
        from serving.local_backend import LocalBackend

        return LocalBackend(FLAGS.saved_model, FLAGS.model_version, retry)
    model = ModelSpec(FLAGS.model_name, FLAGS.model_version, FLAGS.model_label)
    if FLAGS.server:
        from serving.grpc_backend import GrpcBackend

        return GrpcBackend(FLAGS.server, model, retry, root_cert=FLAGS.root_cert,
                           client_cert=FLAGS.client_cert, client_key=FLAGS.client_key,
                           tls_server_name=FLAGS.tls_server_name,
                           max_message_bytes=FLAGS.max_message_mb * 1024 * 1024)
    from serving.rest_backend import RestBackend

    return RestBackend(FLAGS.rest_url, model, retry, root_cert=FLAGS.root_cert)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}. Use --prompt=TEXT.")
    from serving import batch, errors
    from serving.sampler import Sampler, Signatures

    try:
        records = None
        if FLAGS.prompts_file:
            # Checked before the model loads or a server is called.
            defaults = batch.Settings(FLAGS.num_chars, FLAGS.temperature, FLAGS.top_k,
                                      (FLAGS.seed, 0))
            records = batch.read_prompts(FLAGS.prompts_file, defaults, FLAGS.on_bad_line)
            batch.check_output_path(FLAGS.output)
        signatures = Signatures(step=FLAGS.step_signature, prime=FLAGS.prime_signature,
                                generate=FLAGS.generate_signature,
                                metadata=FLAGS.metadata_signature)
        with build_backend() as backend:
            sampler = Sampler(backend, signatures)
            if records is not None:
                cap = sampler.metadata()["max_generate_chars"]
                summary = batch.run_job(sampler, records, FLAGS.output, FLAGS.batch_size, cap)
                logging.info("Wrote %d results to %s in %.1f s (%d were already there).",
                             summary.written, FLAGS.output, summary.seconds, summary.already_done)
            elif FLAGS.stream:
                for character in sampler.stream(FLAGS.prompt, FLAGS.num_chars, FLAGS.temperature,
                                                FLAGS.top_k, FLAGS.seed):
                    sys.stdout.write(character)
                    sys.stdout.flush()
                sys.stdout.write("\n")
            else:
                # Checked here so the error names the flag, not a graph assertion.
                cap = int(sampler.metadata()["max_generate_chars"])
                if FLAGS.num_chars > cap:
                    raise ValueError(
                        f"--num_chars={FLAGS.num_chars} is over the export's max_generate_chars "
                        f"{cap}. Lower it, pass --stream (one call per character, no cap), or "
                        "export with a larger --max_generate_chars.")
                text, = sampler.generate([FLAGS.prompt], FLAGS.num_chars, FLAGS.temperature,
                                         FLAGS.top_k, FLAGS.seed)
                print(text)
    except (errors.ServingError, batch.BadLineError, ValueError, FileNotFoundError) as error:
        logging.error("%s", error)
        sys.exit(1)


def run_main() -> None:
    """Entry point of the `charlstm-generate` console script."""
    app.run(main)


if __name__ == "__main__":
    run_main()
