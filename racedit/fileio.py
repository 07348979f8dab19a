"""Small file helpers shared across racedit: atomic writes, file hashes, manifests, JSON-safe values, I/O
errors in words.

An atomic write goes to a hidden temporary file next to the target (same filesystem, named after the
process) and is renamed over the target only when complete, so a reader or a crash sees either the old
file or the whole new one.

A manifest (`manifest.json`) lists the size and SHA-256 of every file of a directory that racedit wrote as
one unit (a checkpoint), plus a SHA-256 of its own entries, so a changed file and an edited manifest are
both found. `RACEDIT_VERIFY` is the one switch of every such check (see `verify_level`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
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


def sha256_of(path: str | Path, chunk: int = 1 << 22, fsync: bool = False) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks; `fsync`: also flush the file to disk (one pass)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (the names renamed into or created in it) to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it where /proc says it (Linux), else set and restored."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give a file (0666) or directory (0777) the mode the umask makes, as `open`/`mkdir` would have: for files
    that a library created private (safetensors writes 0600) and directories made by `tempfile` (0700)."""
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~current_umask())


# --- verification: the switch, cached digests, manifests ---------------------------------------------------

VERIFY_ENV = "RACEDIT_VERIFY"
VERIFY_LEVELS = {"0": "skip every integrity check", "1": "verify checkpoints and sample batches (default)",
                 "2": "also hash every latent shard when training opens a latent directory"}


def verify_level() -> int:
    """`RACEDIT_VERIFY`: 0 skips integrity checks (checkpoint manifests, sample batch digests), 1 (the default)
    verifies them, 2 also checks the SHA-256 of latent shards when a latent directory is opened (sizes are
    checked always). `--no-verify` on a command sets 0 for that command."""
    value = os.environ.get(VERIFY_ENV, "1").strip() or "1"
    if value not in VERIFY_LEVELS:
        raise ValueError(f"{VERIFY_ENV}={value!r}: allowed " + ", ".join(f"{k} ({v})" for k, v in VERIFY_LEVELS.items()))
    return int(value)


@contextlib.contextmanager
def verification(enabled: bool = True) -> Iterator[None]:
    """With `enabled` False, `verify_level()` is 0 inside the block (the `--no-verify` flag); else no change."""
    if enabled:
        yield
        return
    old = os.environ.get(VERIFY_ENV)
    os.environ[VERIFY_ENV] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(VERIFY_ENV, None)
        else:
            os.environ[VERIFY_ENV] = old


_DIGESTS: dict[tuple, str] = {}  # (path, device, inode, size, mtime, ctime) -> SHA-256: a file is hashed once


def _stat_key(path: str | Path) -> tuple:
    st = os.stat(path)
    return os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def cached_sha256(path: str | Path) -> str:
    """SHA-256 of a file, hashed once per process while the file is unchanged (same inode, size, mtime and
    ctime): verifying a checkpoint and then loading it, or choosing it for a resume, reads it once for the hash."""
    key = _stat_key(path)
    if key not in _DIGESTS:
        if len(_DIGESTS) > 256:
            _DIGESTS.clear()
        _DIGESTS[key] = sha256_of(path)
    return _DIGESTS[key]


MANIFEST = "manifest.json"


def _entries_digest(fmt: str, files: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"format": fmt, "files": files}, sort_keys=True).encode()).hexdigest()


def file_entry(path: str | Path) -> dict:
    """A manifest entry {bytes, sha256} of a file, fsynced in the same pass that hashes it."""
    digest = sha256_of(path, fsync=True)
    return {"bytes": Path(path).stat().st_size, "sha256": digest}


def write_manifest(directory: str | Path, names: list[str], fmt: str, known: Mapping[str, dict] | None = None) -> dict:
    """Hash (and fsync) each file `names` of `directory` in one streaming pass, then write and fsync
    `directory/manifest.json`: {format, files: {name: {bytes, sha256}}, manifest_sha256}. Call it last,
    before the rename that publishes the directory. `known`: entries (`file_entry`) already made, by the
    processes that wrote those files, in parallel. Returns the manifest."""
    directory = Path(directory)
    known = known or {}
    files = {}
    for name in names:
        files[name] = dict(known[name]) if name in known else file_entry(directory / name)
    manifest = {"format": fmt, "files": files, "manifest_sha256": _entries_digest(fmt, files)}
    with open(directory / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return manifest


def read_manifest(directory: str | Path, fmt: str) -> dict | None:
    """`directory/manifest.json`, checked against its own digest; None when there is none. ValueError with
    the problem when it is unreadable, of another format, or edited (its entries no longer match its digest)."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        ok = (manifest["format"] == fmt and isinstance(files, dict)
              and manifest["manifest_sha256"] == _entries_digest(fmt, files)
              and all(isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str) for v in files.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{MANIFEST} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not ok:
        raise ValueError(f"{MANIFEST} is damaged or was edited (its entries do not match its own digest or "
                         f"its format is not {fmt!r})")
    return manifest


def file_problem(directory: str | Path, name: str, manifest: dict) -> str | None:
    """None when `directory/name` has the size and SHA-256 that `manifest` records, else what is wrong
    (missing, not listed, size, hash). The size is compared first, so a truncated file costs no hashing."""
    entry = manifest["files"].get(name)
    path = Path(directory) / name
    if entry is None:
        return f"{name} is not listed in {MANIFEST} (the manifest is damaged)"
    if not path.is_file():
        return f"{name} is missing (the manifest lists it)"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{name} has {size} bytes, {MANIFEST} says {entry['bytes']} (truncated or replaced)"
    if cached_sha256(path) != entry["sha256"]:
        return f"{name} does not match its SHA-256 in {MANIFEST} (its bytes changed after it was written)"
    return None



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
