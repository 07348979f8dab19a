"""Stopping a long job at a safe point on SIGINT (Ctrl-C), SIGTERM (how schedulers preempt and cancel jobs)
and SIGUSR1 (the warning SLURM sends with `--signal=USR1@SECONDS`).

`StopSignals` is a context manager around a job's loop (training, the npz sampling job, latent extraction).
While it is active in the main thread, the first of these signals only records itself (`.signum`) and says so
on stderr; the loop polls `.requested` between units of work (an optimizer step, a batch, a shard), finishes
the current one, keeps what is complete and raises `Interrupted`, whose text is the one line to print. A
second SIGINT raises `Interrupted` at once (Ctrl-C twice stops a job that is slow to reach its safe point).
Repeats of SIGTERM and SIGUSR1 are ignored: a scheduler signals every process of a job and a launcher
forwards the signal once more, and the scheduler's SIGKILL after its grace period is the hard stop. On leaving
the block the previous handlers come back. Outside the main thread (where Python cannot set handlers) it does
nothing. A process blocked inside one long C call (a collective waiting for a dead peer) runs no Python
handler until the call returns; only SIGKILL ends it then.

Exit status: 128 + the signal number, what a shell reports for a process that the signal killed, so job
scripts handle a stopped racedit like a killed one: 130 (SIGINT), 143 (SIGTERM), 138 (SIGUSR1).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def exit_code(signum: int) -> int:
    """The exit status of a job stopped by signal `signum`: 128 + its number (130, 143, 138)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class Interrupted(KeyboardInterrupt):
    """A job stopped by signal `signum`. `str(e)` is the one line to print: `what` (what was kept), then
    `; resume with: RESUME` when `resume` is set. `show` is False on the processes other than the main one
    (one line per job). A KeyboardInterrupt, so no `except Exception` on the way up swallows it."""

    def __init__(self, signum: int, what: str, resume: str | None = None, show: bool = True):
        super().__init__(what)
        self.signum, self.what, self.resume, self.show = int(signum), what, resume, show

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)

    def __reduce__(self):  # picklable (a worker process may hand it on)
        return Interrupted, (self.signum, self.what, self.resume, self.show)

    def __str__(self) -> str:
        return self.what + (f"; resume with: {self.resume}" if self.resume else "")


class _Abandon(BaseException):
    """Ends a `StopSignals.abandon_on_signal()` block."""


def ignore_stop_signals(*_args) -> None:
    """In a helper process (a DataLoader worker: pass as `worker_init_fn`): ignore the stop signals, which a
    terminal or a scheduler also sends to it, so that it keeps serving the main process while that one stops
    at its safe point; it ends with the main process."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class StopSignals:
    """See the module docstring. `safe_point` completes the note printed on the first signal ("stopping
    after ..."); `announce`: print that note (False on the processes other than the main one).
    `on_repeat() -> Interrupted`: what a second SIGINT raises (default: a generic line)."""

    def __init__(self, safe_point: str, announce: bool = True,
                 on_repeat: Callable[[], Interrupted] | None = None):
        self.safe_point, self.announce, self.on_repeat = safe_point, announce, on_repeat
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._abandoning = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal_name(self.signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: a handler set outside Python
        self._previous.clear()

    @contextlib.contextmanager
    def abandon_on_signal(self) -> Iterator[None]:
        """A block of optional work (a sample grid): a first signal inside it ends it at once, the stop stays
        requested. The caller skips the block when a stop is already requested."""
        self._abandoning = True
        try:
            yield
        except _Abandon:
            pass
        finally:
            self._abandoning = False

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            if self.announce:  # os.write: safe even if the signal arrived inside a print to stderr
                os.write(2, f"\nracedit: {signal_name(signum)} received: stopping after {self.safe_point} "
                            f"(Ctrl-C again exits at once)\n".encode())
            if self._abandoning:
                raise _Abandon
        elif signum == signal.SIGINT:
            if self.on_repeat is not None:
                raise self.on_repeat()
            raise Interrupted(signum, "interrupted by a second SIGINT: exited at once; the complete work is kept and "
                                      "the same command continues it")
