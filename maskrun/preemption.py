"""Preemption: SIGTERM and SIGUSR1, as SLURM sends them before it preempts, cancels or times out a job.

While fine-tuning checkpoints (maskrun.checkpoint), a signal is only noted: the loop checkpoints at the end of the
current step and raises Preempted, so the rerun of the same command resumes from that step. Anywhere else the signal
raises Preempted at once, as Ctrl-C raises KeyboardInterrupt: the cache publishes whole entries only, so the rerun
redoes at most the stage that was running. Either way the job records status failed, then passes the signal on to
whatever handled it before the job: by default it ends the process (exit 128 + its number); submitit's handler
(with SUBMITIT_PREEMPT_SIGNAL=USR1) requeues the job, whose rerun resumes.

No torch here: the job installs the handlers before it knows whether it will compute anything.
"""

import signal
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """A preemption signal ended the job; the message says what was checkpointed."""


class _Listener:
    received: signal.Signals | None = None  # the signal that arrived during this job, if any
    deferring = False  # the fine-tuning loop checkpoints before it stops


_listener = _Listener()


def received() -> signal.Signals | None:
    return _listener.received


def _handle(signum: int, frame) -> None:
    _listener.received = signal.Signals(signum)
    if not _listener.deferring:
        raise Preempted(f"{_listener.received.name} received outside fine-tuning: nothing to checkpoint, the cached "
                        "stages are kept; rerun the same command to go on")


@contextmanager
def handled():
    """The job's scope: the preemption signals raise Preempted (or are deferred, see `deferred`), then the handlers
    that were there before come back. Signal handlers belong to the main thread: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _listener.received = None
    previous = {signum: signal.signal(signum, _handle) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def noted(signum: signal.Signals, message: str) -> Preempted:
    """A signal that something else handled for the job (the launcher of its worker processes), noted as received."""
    _listener.received = signum
    return Preempted(message)


def pass_on(signum: signal.Signals) -> None:
    """After the job: the signal goes to the handler that was there before it (restored by `handled`)."""
    signal.raise_signal(signum)


@contextmanager
def deferred():
    """The fine-tuning loop's scope: a signal is only noted, for the loop to checkpoint and stop at the end of its
    step. One that arrives after the last step stops the job when the loop ends. (One before the loop has already
    stopped the job: what `received` holds at the start is another job's.)"""
    _listener.received, _listener.deferring = None, True
    try:
        yield
    finally:
        _listener.deferring = False
    if _listener.received is not None:
        raise Preempted(f"{_listener.received.name} received after the last fine-tuning step; the rerun of the same "
                        "command resumes from the last checkpoint")
