"""Preemption-safe training: SIGTERM handling and checkpoint recovery.

Cloud VMs and Kubernetes send SIGTERM before they stop a machine. On SIGTERM
the trainer finishes the compiled loop call it is in, saves a checkpoint at the
exact current step and exits with `PREEMPTED_EXIT_CODE`. Rerunning the same
command resumes from that checkpoint, and the data pipeline skips to the same
step, so no step is lost or repeated.

Two mechanisms, chosen by the strategy:
  * MultiWorkerMirroredStrategy with a cluster in TF_CONFIG uses TensorFlow's
    `tf.distribute.experimental.PreemptionCheckpointHandler`. It notifies every
    worker about a SIGTERM that reached one of them and makes all of them save
    after the same loop call, then exit.
  * Every other strategy (OneDevice, Mirrored, TPU) uses a plain signal handler
    that sets a flag, which `PreemptionWatcher.check` reads between loop calls.

A restart also survives a checkpoint write that was cut short (SIGKILL, a lost
machine): `restore_latest` ignores checkpoint files that the `checkpoint`
state file does not list, and falls back to an older listed checkpoint when
the newest one cannot be read.
"""

from __future__ import annotations

import re
import signal
import threading
from typing import Optional

import tensorflow as tf
from absl import logging

# EX_TEMPFAIL from BSD sysexits.h: "temporary failure, try again". It signals a
# supervisor that a checkpoint was saved and a restart resumes the run. A
# process killed by an unhandled SIGTERM gets 143 (128 + 15) from the shell
# instead, and may have lost the steps since its last periodic checkpoint.
PREEMPTED_EXIT_CODE = 75

_CHECKPOINT_FILE = re.compile(r"^ckpt-(\d+)(?:\.|_temp|$)")


class TrainingPreempted(SystemExit):
    """Raised once the preemption checkpoint is saved.

    It is a `SystemExit` with code `PREEMPTED_EXIT_CODE`, so when nothing
    catches it the process exits with that code. Library callers can catch it
    like any exception.

    Attributes:
      step: the global step of the saved checkpoint.
      checkpoint_path: the checkpoint prefix this worker wrote.
    """

    def __init__(self, step: int, checkpoint_path: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step
        self.checkpoint_path = checkpoint_path

    def __str__(self) -> str:
        return (f"Training preempted at step {self.step}; checkpoint {self.checkpoint_path}. "
                f"Exit code {PREEMPTED_EXIT_CODE}: rerun the same command to resume.")


class CheckpointRestoreError(ValueError):
    """Raised when a model directory lists checkpoints but none can be restored."""


def _uses_cluster(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and resolver is not None and bool(resolver.cluster_spec().as_dict()))


def _checkpoint_step(path: Optional[str]) -> Optional[int]:
    match = _CHECKPOINT_FILE.match(path.rsplit("/", 1)[-1]) if path else None
    return int(match.group(1)) if match else None


class PreemptionWatcher:
    """Saves a checkpoint and raises `TrainingPreempted` after a SIGTERM.

    Call `check` after every compiled loop call and `close` when training
    ends. `close` puts back the SIGTERM handler that was installed before.

    Args:
      strategy: the training strategy.
      manager: the CheckpointManager of this worker (the chief's writes to
        the model directory, other workers' to their temporary directory).
      step: the global step variable that the checkpoint numbers follow.
    """

    def __init__(self, strategy: tf.distribute.Strategy, manager: tf.train.CheckpointManager,
                 step: tf.Variable):
        self._manager = manager
        self._step = step
        self._received = threading.Event()
        self._previous_handler = None
        self._handler = None
        self._installed = threading.current_thread() is threading.main_thread()
        if not self._installed:
            # signal.signal only works in the main thread of the interpreter.
            logging.warning("Training runs outside the main thread, so SIGTERM is not handled: "
                            "a preempted run resumes from its last periodic checkpoint.")
            return
        self._previous_handler = signal.getsignal(signal.SIGTERM)
        if _uses_cluster(strategy):
            self._handler = self._create_cluster_handler(strategy)
        else:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _create_cluster_handler(self, strategy):
        # The handler restores its own loop-call counter from this manager's
        # directory when it starts. The directory is never written (saving
        # goes through save_fn), so the counter starts at 0 on every worker
        # after every restart and the workers stay aligned. The model itself
        # is restored from the model directory by `restore_latest`.
        counter_directory = tf.io.gfile.join(self._manager.directory, "preemption-counter-unused")
        counter_manager = tf.train.CheckpointManager(tf.train.Checkpoint(), counter_directory,
                                                     max_to_keep=1)
        termination_config = tf.distribute.experimental.TerminationConfig(
            exit_fn=self._exit, save_fn=self._save)
        # NOTE: TensorFlow 2.21 queries the GCE metadata server whether it runs on
        # Google Cloud here. On GCE CPU-only VMs it then disables itself and
        # SIGTERM is not handled; the run resumes from its last periodic
        # checkpoint instead.
        return tf.distribute.experimental.PreemptionCheckpointHandler(
            strategy.cluster_resolver, counter_manager, termination_config=termination_config)

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame  # Unused: the flag is all a signal handler should set.
        self._received.set()

    @property
    def preempted(self) -> bool:
        """Whether this process received SIGTERM (single-machine strategies only)."""
        return self._received.is_set()

    def _save(self) -> str:
        step = int(self._step.numpy())
        latest = self._manager.latest_checkpoint
        if _checkpoint_step(latest) == step:
            return latest  # The periodic save already wrote this step.
        return self._manager.save(checkpoint_number=step)

    def _exit(self) -> None:
        step = int(self._step.numpy())
        path = self._manager.latest_checkpoint or ""
        logging.warning("Preempted: saved checkpoint %s at step %d. Exiting with code %d; "
                        "rerun the same command to resume.", path, step, PREEMPTED_EXIT_CODE)
        raise TrainingPreempted(step, path)

    def check(self) -> None:
        """Saves and raises `TrainingPreempted` if a SIGTERM arrived.

        With a multi-worker cluster this is a collective step: every worker
        must call it after each loop call, or the workers that do wait for
        the others.
        """
        if self._handler is not None:
            self._handler.save_checkpoint_if_preempted()
        elif self._received.is_set():
            logging.warning("SIGTERM received; saving a checkpoint at step %d.",
                            int(self._step.numpy()))
            self._save()
            self._exit()

    def close(self) -> None:
        """Stops watching and restores the previous SIGTERM handler."""
        if not self._installed:
            return
        self._installed = False
        if self._handler is not None:
            # The handler's watcher threads keep it referenced, so its __del__,
            # which stops them, never runs by itself. Without this the first
            # worker to exit closes the coordination service under a thread
            # still waiting on it. TensorFlow 2.21 has no public method for it.
            self._handler._stop_cluster_wise_termination_watcher_thread()  # pylint: disable=protected-access
            self._handler._stop_poll_termination_signal_thread()  # pylint: disable=protected-access
            self._handler = None
        signal.signal(signal.SIGTERM, self._previous_handler)
        if self._received.is_set():
            logging.info("SIGTERM arrived after the last training step; the run finished.")


def _stray_checkpoint_files(model_dir: str, listed_steps: set[int]) -> list[str]:
    names = []
    for path in tf.io.gfile.glob(tf.io.gfile.join(model_dir, "ckpt-*")):
        name = path.rsplit("/", 1)[-1]
        step = _checkpoint_step(name)
        if step is not None and step not in listed_steps:
            names.append(name)
    return sorted(names)


def restore_latest(checkpoint: tf.train.Checkpoint, model_dir: str) -> Optional[str]:
    """Restores the newest readable checkpoint that the state file lists.

    TensorFlow writes the `checkpoint` state file only after a checkpoint's
    data and index files are complete. So checkpoint files that the state file
    does not list come from a save that was cut short, and are skipped with a
    warning. A listed checkpoint that fails to restore (truncated or corrupt
    files) is skipped with a warning, and the next older one is tried.

    Args:
      checkpoint: the object to restore into; every existing object must
        have a value in the checkpoint.
      model_dir: the directory with the checkpoints, any tf.io.gfile path.

    Returns:
      The restored checkpoint prefix, or None when `model_dir` lists none.

    Raises:
      CheckpointRestoreError: if checkpoints are listed but none restores.
    """
    state = tf.train.get_checkpoint_state(model_dir)
    listed = list(state.all_model_checkpoint_paths) if state else []
    if state and state.model_checkpoint_path and state.model_checkpoint_path not in listed:
        listed.append(state.model_checkpoint_path)
    listed_steps = {step for step in map(_checkpoint_step, listed) if step is not None}
    stray = _stray_checkpoint_files(model_dir, listed_steps)
    if stray:
        logging.warning("Ignoring checkpoint files in %s that the checkpoint state file does not "
                        "list, left by a save that did not finish: %s.", model_dir,
                        ", ".join(stray))
    failures = []
    for path in reversed(listed):
        try:
            checkpoint.restore(path).assert_existing_objects_matched()
        # TensorFlow 2.21 raises IndexError ("Read less bytes than requested")
        # for a truncated data file, an OpError for a damaged index, and
        # AssertionError for a checkpoint that lacks some of the variables.
        except (tf.errors.OpError, ValueError, AssertionError, IndexError) as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            logging.warning("Checkpoint %s cannot be restored (%s); trying the previous one.",
                            path, message)
            failures.append(f"{path}: {message}")
            continue
        if failures:
            logging.warning("Resumed from %s, the newest checkpoint that restores; %d newer "
                            "ones were skipped.", path, len(failures))
        return path
    if failures:
        raise CheckpointRestoreError(
            f"--model_dir={model_dir!r} lists {len(failures)} checkpoints and none can be "
            f"restored: {'; '.join(failures)}. Restore the files from a backup, or train into "
            "a new --model_dir.")
    return None
