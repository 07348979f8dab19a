"""The overwrite rule of every file and directory a racedit command writes where the user says: an existing
output is replaced only if racedit wrote it for the same job (the same inputs and settings, so the new one
says the same), or with `--overwrite`. Each command decides what "the same job" means for its output (its
metadata, job file or PNG text chunk); the refusals all read alike, one line naming the path and the flag.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

OVERWRITE_FLAG = "--overwrite"
LOCK_ENTRIES = r"\.lock(\..+)?"  # racedit.runlock's lock file and its temporaries belong to every job


class OutputExists(FileExistsError):
    """An output that exists and that racedit did not write for this job."""


def refuse_existing(path: str | Path, why: str) -> None:
    """Raise OutputExists: `path` exists and `why` it is not this job's."""
    raise OutputExists(f"{path} already exists and {why}; pass {OVERWRITE_FLAG} to replace it, or choose "
                       f"another --out")


def foreign_entries(directory: str | Path, names: Iterable[str] = (), patterns: Iterable[str] = ()) -> list[str]:
    """The entries of `directory` (none if it does not exist) that are neither one of `names` nor match a
    regular expression of `patterns` (whole names), sorted: what a job writing `names` would not own. A lock
    file (racedit.runlock) is no one's output: the lock itself decides whether the directory is in use."""
    d = Path(directory)
    if not d.is_dir():
        return []
    names, regexes = set(names), [re.compile(p) for p in (*patterns, LOCK_ENTRIES)]
    return sorted(e.name for e in d.iterdir() if e.name not in names and not any(r.fullmatch(e.name) for r in regexes))


def check_output_dir(directory: str | Path, names: Iterable[str] = (), patterns: Iterable[str] = (),
                     overwrite: bool = False, what: str = "a racedit output directory") -> None:
    """Refuse (OutputExists) an existing `directory` that holds anything but the entries `names` / `patterns`
    of the job about to write it, unless `overwrite`; a path that is a file is always refused."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise OutputExists(f"{d} is a file, not a directory; choose another --out")
    if overwrite:
        return
    other = foreign_entries(d, names, patterns)
    if other:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        refuse_existing(d, f"holds files that are not {what} ({shown})")
