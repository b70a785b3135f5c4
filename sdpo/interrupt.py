"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) without losing a step.

Inside the training loop (`StopRequests`) the first signal only asks the run to stop: the loop finishes the step in
progress, writes a checkpoint of it (unless one of that step exists) and raises `RunStopped`, whose message says
where the run stopped and the command that continues it. The first signal puts back the handlers that were there
before, so a second one stops at once (as Megatron-LM's `--exit-signal-handler` and TorchElastic do, a run is meant
to be stopped and continued).

Outside the loop (building the trainer, loading weights, starting a server) the command-line scripts stop at once on
either signal: `raise_at_once` turns SIGTERM into the same `StopNow` (a `KeyboardInterrupt`) that SIGINT raises, so
that clean-up (`atexit`: a started server, scoring workers) runs for both.

A checkpoint save is never cut short by a first signal; a second one (or SIGKILL) may cut it, which loses only that
save: its staging directory is ignored and the previous checkpoint stays usable (sdpo/checkpoint.py).

Python runs a signal's handler in the main thread, between bytecodes: a native call that waits long in the main
thread (a process-group call whose peer never takes part) holds every signal off until it returns. Such a wait runs
in a thread while the main thread waits in Python (the weight sync with a server: `ServerEngine._beside`).
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import logging
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopNow(KeyboardInterrupt):
    """A signal that stops the process at once (outside the training loop, or the second one inside it)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum


class RunStopped(Exception):
    """The run stopped cleanly after a signal, at the end of step `step`; `checkpoint` holds that step."""

    def __init__(self, signum: int, step: int, total_steps: int, checkpoint: Any, how_to_continue: str) -> None:
        where = f"after step {step} of {total_steps}" if step else f"before the first of {total_steps} steps"
        saved = f"checkpoint {checkpoint}" if checkpoint is not None else "nothing to save"
        super().__init__(f"stopped by {signal_name(signum)} {where} ({saved}); {how_to_continue}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by the signal


def raise_at_once(signum: int, frame: FrameType | None) -> None:
    raise StopNow(signum)


class StopRequests:
    """Within the block, SIGINT / SIGTERM set `requested` (the signal's number) instead of stopping the process; the
    first one puts back the previous handlers. Outside the main thread (where Python cannot install handlers) it
    does nothing."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is None:
            self.requested = signum
            self._restore()
            log.warning("%s: stopping after the step in progress and its checkpoint (a second signal stops at once)",
                        signal_name(signum))

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> StopRequests:
        self.requested = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
            for signum in SIGNALS:
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM held back inside the block (delivered when it ends): for the few renames that put a
    checkpoint in place, which must not be cut between taking the old copy away and putting the new one there.

    The handlers are swapped for one that only notes the signal, and the noted ones are raised again after the
    block. Blocking the signals (`pthread_sigmask`) would hold them back only while this is the process's one thread:
    the kernel hands a signal that the main thread blocks to another thread (a trainer has many), and Python then
    runs the handler in the main thread at its next bytecode, inside the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    for signum in SIGNALS:
        signal.signal(signum, lambda signum, frame: noted.append(signum))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: a handler set outside Python
        for signum in noted:
            signal.raise_signal(signum)  # to this thread: the handler runs before the next line of the caller
