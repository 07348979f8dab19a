"""One writer per directory: `<dir>/.lock`, taken when a job starts writing there and removed when it ends.

A lock file is JSON: the holder's PID, host, start time, the start time of its process as the kernel counts it
(`/proc/<pid>/stat`, field 22, where there is one) and its command line. It is created complete in one step
(written to a private temporary file, then hard-linked to `.lock`, which fails if `.lock` exists; on a
filesystem without hard links, `O_CREAT | O_EXCL`), so two starters can never both hold it.

An existing lock is judged by its holder:
- same host, the process is gone (`os.kill(pid, 0)` raises ProcessLookupError) or its PID now belongs to another
  process (another start time): stale, the holder was killed (kill -9, a node crash, OOM). It is taken over with
  a one-line note on stderr;
- same host, the process runs: refused (`LockHeld`, one line naming the PID, the host and the lock file);
- another host: refused, since this host cannot tell whether it runs; the message says to delete the file if
  that process is known to be dead.
`release()` removes the file only if it is still this holder's (a finally, so every way out but kill -9
releases it; after a kill -9 the next start finds a dead PID).

Under several processes (accelerate), only the main process takes the lock: `lock_on_main`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import secrets
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

LOCK_NAME = ".lock"
TAKEOVER_STALE_S = 30.0  # a takeover guard older than this belongs to a process that died inside a takeover


class LockHeld(RuntimeError):
    """Another live job (or one this host cannot check) writes to the directory."""


def process_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (Linux `/proc/<pid>/stat` field 22), or None
    where it cannot be read (no /proc, no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # the command name in (...) may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def command_line() -> str:
    """This process's command line as typed: `python -m PACKAGE ...` for a package run with -m."""
    argv = list(sys.argv) or [""]
    head = argv[0]
    if head.endswith("__main__.py"):
        return " ".join([f"python -m {Path(head).parent.name}", shlex.join(argv[1:])]).strip()
    return shlex.join(argv)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (one we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def _alive(pid: int, start: int | None) -> bool:
    """Whether process `pid` of this host runs and is the one that started at `start` (if recorded)."""
    if not pid_alive(pid):
        return False
    now = process_start(pid)
    return start is None or now is None or now == start


def _describe(holder: dict) -> str:
    return (f"PID {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')}: "
            f"{holder.get('command')})")


class RunLock:
    """`<directory>/.lock` for one job. `what`: how messages name the directory (e.g. "train.out_dir");
    `note`: where the takeover note goes (default stderr). Use as a context manager or acquire()/release()."""

    def __init__(self, directory: str | Path, what: str = "directory", note: Callable[[str], Any] | None = None):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.what = what
        self.note = note or (lambda text: print(text, file=sys.stderr))
        self.token = secrets.token_hex(8)
        self.held = False
        self._created_dir = False

    def content(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "token": self.token,
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "process_start": process_start(os.getpid()), "command": command_line()}

    def acquire(self) -> RunLock:
        self._created_dir = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(100):  # a few rounds only when several starters race over one stale lock
            if self._create():
                self.held = True
                return self
            holder = self._read()
            if holder is None:  # vanished meanwhile: try again
                continue
            if holder == "garbage":
                self._give_up(f"{self.path} exists but is no racedit lock file; if no job writes to {self.directory}, "
                              f"delete {self.path}")
            if holder.get("host") != socket.gethostname():
                self._give_up(f"{self.what} {self.directory} is locked by {_describe(holder)}, which this host "
                              f"cannot check; if that process is dead, delete {self.path}")
            if _alive(int(holder["pid"]), holder.get("process_start")):
                self._give_up(f"{self.what} {self.directory} is in use by {_describe(holder)}; wait for it to end "
                              f"or choose another directory (if it is not a racedit job, delete {self.path})")
            if self._take_over(holder):
                self.note(f"note: taking over the stale lock {self.path} of {_describe(holder)}: that process "
                          f"no longer runs")
            else:
                time.sleep(0.05)
        self._give_up(f"could not take the lock {self.path}: other jobs keep taking it")
        raise AssertionError  # unreachable

    def _give_up(self, message: str) -> None:
        self._remove_dir_if_made()
        raise LockHeld(message)

    def _create(self) -> bool:
        """Create the lock file complete, or return False if one exists."""
        data = json.dumps(self.content(), indent=1) + "\n"
        tmp = self.directory / f"{LOCK_NAME}.{os.getpid()}.{self.token}.tmp"
        try:
            tmp.write_text(data)
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError:  # no hard links here: exclusive create, then write
                pass
        finally:
            tmp.unlink(missing_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(data)
        return True

    def _read(self) -> dict | str | None:
        """The holder's record, "garbage" if the file is no lock, None if there is no file (any more)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return "garbage"
        try:
            holder = json.loads(text)
            int(holder["pid"])
            return holder
        except (ValueError, KeyError, TypeError):
            if not text and time.time() - self._mtime() < 5:  # being written by an exclusive create
                time.sleep(0.05)
                return None
            return "garbage"

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _take_over(self, stale: dict) -> bool:
        """Remove the stale lock `stale`, if it still is the lock file; one taker at a time (a takeover guard
        file), so that no one removes a lock another starter has just taken over."""
        guard = self.directory / f"{LOCK_NAME}.takeover"
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - guard.stat().st_mtime > TAKEOVER_STALE_S:
                    guard.unlink()
            return False
        os.close(fd)
        try:
            if self._read() != stale:
                return False
            self.path.unlink(missing_ok=True)
            return True
        finally:
            guard.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock file if it is still this holder's; remove the directory too if acquire() made it
        and nothing else was written there."""
        if self.held:
            holder = self._read()
            if isinstance(holder, dict) and holder.get("token") == self.token:
                self.path.unlink(missing_ok=True)
            self.held = False
        self._remove_dir_if_made()

    def _remove_dir_if_made(self) -> None:
        if self._created_dir:
            with contextlib.suppress(OSError):
                self.directory.rmdir()  # only if empty
            self._created_dir = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def lock_on_main(state: Any, directory: str | Path, what: str = "directory",
                 note: Callable[[str], Any] | None = None) -> Iterator[RunLock | None]:
    """Hold `<directory>/.lock` for the block on the main process of `state` (an accelerate PartialState or
    Accelerator: `is_main_process`, `num_processes`); the other processes take no lock. With several processes
    the main process's verdict is broadcast (torch.distributed), so every process raises the same LockHeld
    rather than the others waiting for it at their first collective."""
    lock, problem = None, None
    if state.is_main_process:
        try:
            lock = RunLock(directory, what, note).acquire()
        except LockHeld as e:
            problem = e
    if state.num_processes > 1:
        import torch.distributed as dist

        verdict = [None if problem is None else str(problem)]
        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None and problem is None:
            problem = LockHeld(verdict[0])
    if problem is not None:
        raise problem
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
