"""Small file helpers shared across racedit: atomic writes, file hashes, JSON-safe values.

An atomic write goes to a hidden temporary file next to the target (same filesystem, named after the
process) and is renamed over the target only when complete, so a reader or a crash sees either the old
file or the whole new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
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
