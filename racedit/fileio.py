"""Small file helpers shared across racedit: atomic writes, file hashes, JSON-safe values, I/O errors in words.

An atomic write goes to a hidden temporary file next to the target (same filesystem, named after the
process) and is renamed over the target only when complete, so a reader or a crash sees either the old
file or the whole new one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write `path`'s new content to; on success it replaces `path`, on an
    exception it is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with writing(path):  # a full disk names `path`
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256_of(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def json_safe(x: Any) -> Any:
    """`x` as plain JSON values, so `json.dumps(..., allow_nan=False)` accepts it.

    The one rule for every JSON file racedit writes: non-finite floats (NaN, +-inf) become None (`null`,
    valid JSON, unlike the `NaN` that json.dumps writes by default); numpy scalars and arrays and torch
    tensors become Python numbers and lists (anything with `.tolist()`); paths become strings; mappings
    (keys as strings) and sequences are converted element by element. Readers show None as missing.
    """
    if isinstance(x, Mapping):
        return {k if isinstance(k, str) else str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # numpy scalar or array, torch tensor
        return json_safe(x.tolist())
    return x


# --- I/O errors in words ------------------------------------------------------------------------------------

# errno -> the cause in words, for the one-line error reports of racedit.cli (os.strerror for the others)
CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (over the file-size limit: ulimit -f)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.EISDIR: "a directory where a file was expected",
    errno.EEXIST: "already exists (a file where a directory was expected?)",
    errno.EIO: "input/output error (a failing disk or network file system)",
    errno.ESTALE: "stale file handle (the network file system lost the file)",
    errno.EMFILE: "too many open files (ulimit -n)",
}
# the errnos that only a write gives: an OSError without a file name that has one is about what was being written
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_RUST_ERRNO = re.compile(r"\(os error (\d+)\)")  # how Rust's std::io::Error ends (safetensors' messages)
_SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")  # numpy's tofile on a full disk (no errno)


def _os_error_in(e: BaseException) -> OSError | None:
    """The OSError behind an exception that a writer library raised: itself, one in its __cause__/__context__
    chain (torch.save to a Python file), or one that Rust's "(os error N)" names (safetensors)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and (e.errno or _SHORT_WRITE.fullmatch(str(e))):
            return e
        m = _RUST_ERRNO.search(str(e))
        if m:
            return OSError(int(m.group(1)), os.strerror(int(m.group(1))))
        e = e.__cause__ or e.__context__
    return None


def write_error(e: BaseException, path: str | Path) -> OSError | None:
    """The OSError naming `path` that `e`, raised while writing `path`, stands for; None if `e` is no I/O error
    of that write (racedit's own exceptions never are; an OSError that names a file already is its own answer).

    Writer libraries hide the errno: safetensors raises SafetensorError("... (os error 28)"), torch.save a
    RuntimeError whose __context__ is the OSError, and a full disk's OSError carries no file name."""
    if type(e).__module__.startswith("racedit") or (isinstance(e, OSError) and e.filename is not None):
        return None
    if not isinstance(e, (OSError, RuntimeError)) and not type(e).__module__.startswith("safetensors"):
        return None
    found = _os_error_in(e)
    if found is None or (found is e and found.errno not in WRITE_ERRNOS and not _SHORT_WRITE.fullmatch(str(e))):
        return None
    if found.filename is not None:
        return found
    if not found.errno:  # a short write: keep numpy's counts in words
        short = _SHORT_WRITE.fullmatch(str(found))
        return OSError(None, f"a short write ({short.group(2)} of {short.group(1)} written: is the disk or the "
                             f"quota full?)", os.fspath(path))
    return OSError(found.errno, found.strerror, os.fspath(path))


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Around the code that writes `path`: an I/O failure that does not say which file it hit (a full disk,
    safetensors' and torch's wrapped errors) is raised again as an OSError naming `path` (see `write_error`);
    anything else passes unchanged."""
    try:
        yield
    except Exception as e:
        err = write_error(e, path)
        if err is None or err is e:
            raise
        raise err from e


def os_error_text(e: OSError) -> str:
    """An OSError in words, with its path: "no space left on device while writing runs/x/metrics.csv",
    "permission denied: runs/x"."""
    short = _SHORT_WRITE.fullmatch(str(e)) if not e.errno else None
    if short:
        cause = f"a short write ({short.group(2)} of {short.group(1)} written: is the disk or the quota full?)"
    else:
        cause = CAUSES.get(e.errno) or (e.strerror or str(e) or type(e).__name__)
        if e.errno:  # os.strerror's capital, as the sentence goes on (a library's own message is kept as it is)
            cause = cause[:1].lower() + cause[1:]
        short = cause.startswith("a short write")
    if e.filename is None:
        return cause
    path = os.fsdecode(e.filename) if isinstance(e.filename, (str, bytes, os.PathLike)) else str(e.filename)
    if e.filename2 is not None:
        return f"{cause}: {path} -> {os.fsdecode(e.filename2)}"
    if short or e.errno in WRITE_ERRNOS:
        return f"{cause} while writing {path}"
    return f"{cause}: {path}"
