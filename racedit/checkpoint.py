"""Checkpoints that a crash cannot damage and that prove their integrity.

Layout of one checkpoint directory `checkpoints/step_XXXXXXX/`:
  model.safetensors   live weights (buffers such as routing thresholds included)
  ema.safetensors     EMA weights (sampling uses these by default)
  state.pt            optimizer, LR schedule, step, RNG states, data position; loads with weights_only=True
  config.yaml         the resolved run config
  shards/             only with train.distributed=fsdp: the sharded model, EMA and optimizer state written by
                      torch.distributed.checkpoint, one `__<rank>_0.distcp` per process and `.metadata`
                      (state.pt then holds no optimizer); model/ema.safetensors are the consolidated weights
  manifest.json       the size and SHA-256 of each file above, and a digest of its own entries; written last
It is written into a temporary directory beside it (`.tmp-<pid>-step_XXXXXXX`), every file and the
directory fsynced, and renamed into place (the parent fsynced after); then `checkpoints/last` (a symbolic
link) is switched atomically. A crash mid-save leaves at most a stray `.tmp-*` directory, never a damaged
`last`; the next training run in that directory removes such leftovers (`clean_leftovers`). The directory
and its files get the modes the umask gives.

Every reader (`load_config_of`, `load_weights`, `load_train_state`, hence `load_model` and the training
loop's resume) first checks the file it reads against the manifest (size, then SHA-256, each file hashed
once per process) and raises `CheckpointError` naming the file, what is wrong and the newest checkpoint
beside it that verifies. A checkpoint of an older racedit (no manifest) loads with a one-line warning.
`RACEDIT_VERIFY=0` (or a command's `--no-verify`) skips the checks (`racedit.fileio.verify_level`).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from racedit.config import Config, ConfigError, from_yaml_text, to_yaml
from racedit.fileio import (
    MANIFEST,
    apply_umask,
    file_problem,
    fsync_dir,
    read_manifest,
    verify_level,
    write_manifest,
    writing,
)
from racedit.models import create_model
from racedit.runlock import pid_alive

_STEP_DIR = re.compile(r"step_(\d+)")
FILES = ("model.safetensors", "ema.safetensors", "state.pt", "config.yaml")
SHARDS = "shards"  # the directory of a sharded checkpoint's per-process files
FORMAT = "racedit-checkpoint/1"  # the manifest's format, also in the safetensors headers' metadata


def step_dir_name(step: int) -> str:
    """The name of checkpoint `step`'s directory: step_XXXXXXX (zero-padded, so names sort by step)."""
    return f"step_{step:07d}"


def step_of(path: str | Path | None) -> int | None:
    """The step of a checkpoint directory named by `step_dir_name`; None for another name or no path."""
    m = _STEP_DIR.fullmatch(Path(path).name) if path is not None else None
    return int(m.group(1)) if m else None


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the model; the message says which."""


def _contiguous_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def staging_dir(ckpt_root: str | Path, step: int, pid: int | None = None) -> Path:
    """The temporary directory checkpoint `step` is written into before it is renamed into place, named after
    the publishing process (`pid`, default this one): `clean_leftovers` removes only dead writers' copies."""
    return Path(ckpt_root) / f".tmp-{os.getpid() if pid is None else pid}-{step_dir_name(step)}"


def start_staging(ckpt_root: str | Path, step: int) -> Path:
    """Make (afresh) this process's staging directory of checkpoint `step`, for files other processes write
    into it before `save_checkpoint(..., staged=...)` publishes it (the shards of a sharded checkpoint)."""
    Path(ckpt_root).mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(ckpt_root, step)
    shutil.rmtree(tmp, ignore_errors=True)  # this process's own earlier attempt (a pid names one writer)
    tmp.mkdir()  # mode 0777 & ~umask
    return tmp


def save_checkpoint(ckpt_root: str | Path, step: int, *, model_state: dict, ema_state: dict, train_state: dict,
                    config: Config, keep_last: int = 2, staged: Path | None = None,
                    shard_entries: dict[str, dict] | None = None) -> Path:
    """Write checkpoint `step` under `ckpt_root` atomically, point `last` at it, prune old ones.

    `staged`: the `start_staging` directory, already holding the `shards/` that every process wrote; they are
    listed in the manifest with the files written here and published with them in the one rename.
    `shard_entries`: their manifest entries, hashed and fsynced by the processes that wrote them."""
    root = Path(ckpt_root)
    final = root / step_dir_name(step)
    tmp = staged if staged is not None else start_staging(root, step)
    old = root / f".old-{final.name}-{os.getpid()}"
    try:
        # writing(): an I/O error (a full disk) names the file; torch.save to a Python file keeps its errno
        with writing(final / "model.safetensors"):
            save_file(_contiguous_cpu(model_state), tmp / "model.safetensors", metadata={"format": FORMAT})
        with writing(final / "ema.safetensors"):
            save_file(_contiguous_cpu(ema_state), tmp / "ema.safetensors", metadata={"format": FORMAT})
        with writing(final / "state.pt"), open(tmp / "state.pt", "wb") as f:
            torch.save(train_state, f)
        with writing(final / "config.yaml"):
            (tmp / "config.yaml").write_text(to_yaml(config))
        shards = sorted(p.relative_to(tmp).as_posix() for p in (tmp / SHARDS).rglob("*") if p.is_file())
        for name in (*FILES, *shards):
            apply_umask(tmp / name)  # safetensors creates its files 0600
        with writing(final / "manifest.json"):
            # last: hashes and fsyncs every file (but the shards hashed already), then itself
            write_manifest(tmp, [*FILES, *shards], FORMAT, known=shard_entries)
        if shards:
            fsync_dir(tmp / SHARDS)
        fsync_dir(tmp)
        if final.exists():
            # Re-saving a step: a directory cannot be replaced in one rename, so `last` names the new copy
            # while the old one moves aside; at every moment `last` or the step directory is complete.
            _point_last(root, tmp.name)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        if old.exists() and not final.exists():
            os.replace(old, final)
        if final.exists() and (root / "last").is_symlink() and os.readlink(root / "last") == tmp.name:
            _point_last(root, final.name)  # not left naming the copy removed below
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point_last(root, final.name)
    shutil.rmtree(old, ignore_errors=True)
    _prune(root, keep_last, keep=final)
    return final


def _point_last(root: Path, name: str) -> None:
    """Atomically make `root/last` a symbolic link to `name` (a directory in `root`)."""
    link_tmp = root / f".last-{os.getpid()}"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    os.symlink(name, link_tmp)
    os.replace(link_tmp, root / "last")
    fsync_dir(root)


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    # only steps up to the one just saved count: a later one (left by a run that was resumed from an earlier,
    # e.g. because the later one is damaged) must not push out the good checkpoints it was resumed from
    upto = step_of(keep)
    steps = sorted((s, p) for p in root.iterdir()
                   if (s := step_of(p)) is not None and p.is_dir() and (upto is None or s <= upto))
    for _, path in steps[:-max(keep_last, 1)]:
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)


# --- leftovers of crashed saves ---------------------------------------------------------------------------

# what a save that was killed can leave in checkpoints/, with the pid of the process that was saving
_LEFTOVER = re.compile(r"\.tmp-(?P<pid>\d+)-(?P<step>.+)|\.old-(?P<old>step_\d+)-(?P<oldpid>\d+)|"
                       r"\.last-(?P<lastpid>\d+)")
_LEGACY_TMP = re.compile(r"\.tmp-[a-z0-9_]{8}")  # tempfile.mkdtemp's names (older racedit): no pid


def clean_leftovers(ckpt_root: str | Path) -> list[str]:
    """Remove what crashed saves left in `ckpt_root` (`.tmp-<pid>-*`, `.old-*-<pid>`, `.last-<pid>`) whose
    process is no longer alive, and the pid-less `.tmp-*` of older racedit versions; returns their names.

    Call it at the start of a training run, which is the directory's one writer. A leftover of a live process
    is kept. A save killed while re-writing a step can leave `last` naming its complete temporary copy; that
    copy is renamed into place first, so no checkpoint is lost."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    last = root / "last"
    target = os.readlink(last) if last.is_symlink() else None
    m = _LEFTOVER.fullmatch(target or "")
    if m and step_of(m["step"]) is not None and not pid_alive(int(m["pid"])) and (root / target).is_dir():
        if not (root / m["step"]).exists():
            os.replace(root / target, root / m["step"])
        _point_last(root, m["step"])  # the step directory is complete whenever it exists
        target = m["step"]
    removed = []
    for path in sorted(root.iterdir()):
        m = _LEFTOVER.fullmatch(path.name)
        pid = next((int(v) for k in ("pid", "oldpid", "lastpid") if m and (v := m[k])), None)
        dead = pid is not None and not pid_alive(pid)
        if path.name == target or not (dead or _LEGACY_TMP.fullmatch(path.name)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


# --- integrity ----------------------------------------------------------------------------------------------

_WARNED: set[Path] = set()  # checkpoints without a manifest already warned about in this process


def _written_with_manifest(ckpt: Path) -> bool:
    """Whether a safetensors header of `ckpt` says it was saved with a manifest (so a missing one was deleted)."""
    for name in ("model.safetensors", "ema.safetensors"):
        try:
            with safe_open(str(ckpt / name), "pt") as f:
                if (f.metadata() or {}).get("format") == FORMAT:
                    return True
        except Exception:  # missing or damaged: the reader of that file reports it
            continue
    return False


def checkpoint_problem(ckpt: str | Path, names: tuple[str, ...] | list[str] | None = None) -> str | None:
    """None when the files `names` of checkpoint `ckpt` (default: all, FILES and any shards) match its
    manifest, else what is wrong, starting with the file's name. Also None with verification off (RACEDIT_VERIFY=0) and for a checkpoint of an older
    racedit (no manifest, none expected), which is warned about once on stderr."""
    ckpt = Path(ckpt)
    if verify_level() == 0:
        return None
    try:
        manifest = read_manifest(ckpt, FORMAT)
    except ValueError as e:
        return str(e)
    if manifest is None:
        if _written_with_manifest(ckpt):
            return f"{MANIFEST} is missing (this checkpoint was saved with one: it was deleted)"
        if ckpt not in _WARNED:
            _WARNED.add(ckpt)
            print(f"warning: {ckpt} has no {MANIFEST} (saved by an older racedit): its files are not verified",
                  file=sys.stderr)
        return None
    if names is None:
        names = [*FILES, *(n for n in sorted(manifest["files"]) if n.startswith(f"{SHARDS}/"))]
    elif SHARDS in names:  # the shards: every file the manifest lists under shards/
        names = [n for n in sorted(manifest["files"]) if n.startswith(f"{SHARDS}/")]
    for name in names:
        if problem := file_problem(ckpt, name, manifest):
            return problem
    return None


def _complete(ckpt: Path) -> bool:
    return ckpt.is_dir() and all((ckpt / f).exists() for f in FILES)


def _candidates(ckpt_root: Path) -> list[Path]:
    """The checkpoints of `ckpt_root`, newest first: the one `last` names, then step directories by step."""
    last = ckpt_root / "last"
    found = [last.resolve()] if last.is_dir() else []
    steps = sorted(((s, p) for p in ckpt_root.iterdir() if (s := step_of(p)) is not None and p.is_dir()),
                   reverse=True) if ckpt_root.is_dir() else []
    return found + [p.resolve() for _, p in steps if p.resolve() not in found]


def newest_verified_checkpoint(ckpt_root: str | Path, exclude: Path | None = None) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint in `ckpt_root` that is complete and verifies, or None; one line per newer one
    skipped: "step_XXXXXXX: <problem>"). `exclude` is not considered (the one that just failed)."""
    skipped = []
    for c in _candidates(Path(ckpt_root)):
        if exclude is not None and c == Path(exclude).resolve():
            continue
        problem = checkpoint_problem(c) if _complete(c) else "incomplete (" + ", ".join(
            f for f in FILES if not (c / f).exists()) + " missing)"
        if problem is None:
            return c, skipped
        skipped.append(f"{c.name}: {problem}")
    return None, skipped


def verify_checkpoint(ckpt: str | Path, names: tuple[str, ...] | list[str] | None = None) -> None:
    """Raise CheckpointError unless the files `names` of `ckpt` verify (see `checkpoint_problem`). The one line
    names the file, what is wrong and what to do: the newest checkpoint beside it that verifies, or delete it."""
    ckpt = Path(ckpt)
    problem = checkpoint_problem(ckpt, names)
    if problem is None:
        return
    other, _ = newest_verified_checkpoint(ckpt.parent, exclude=ckpt) if step_of(ckpt) is not None else (None, [])
    if other is not None:
        # names, not paths: the line stays short, and both directories are the one named first
        advice = f"the newest checkpoint beside it that verifies is {other.name}: pass --ckpt with it, or delete this one"
    else:
        advice = "no checkpoint beside it verifies: restore it from a copy, or delete it"
    if problem.startswith(MANIFEST):
        advice += "; to load its files unchecked, pass --no-verify (RACEDIT_VERIFY=0)"
    raise CheckpointError(f"{ckpt}/{problem}; {advice}")


def resume_checkpoint(ckpt_root: str | Path, say=print) -> Path | None:
    """The checkpoint `--resume` (no path) continues from: the newest in `ckpt_root` that verifies, after one
    line through `say` per newer one skipped and why; None when there is none at all. CheckpointError when
    there are checkpoints but none verifies."""
    ckpt, skipped = newest_verified_checkpoint(ckpt_root)
    for line in skipped:
        say(f"resume: skipped {line}")
    if ckpt is None and skipped:
        raise CheckpointError(f"no checkpoint in {ckpt_root} verifies ({'; '.join(skipped)}); delete them to train "
                              f"from scratch, or pass --no-verify (RACEDIT_VERIFY=0) to resume unchecked")
    return ckpt


def last_good_checkpoint(candidate: Path | None, ckpt_root: str | Path) -> Path | None:
    """`candidate` if it is complete and verifies now, else the newest checkpoint in `ckpt_root` that does."""
    if candidate is not None and _complete(Path(candidate)) and checkpoint_problem(candidate) is None:
        return candidate
    return newest_verified_checkpoint(ckpt_root)[0]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a path to it, to `last`, or to a run directory / its `checkpoints/`."""
    p = Path(path)
    for candidate in (p, p / "last", p / "checkpoints" / "last"):
        if candidate.is_dir() and (candidate / "model.safetensors").exists():
            return candidate.resolve()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    raise CheckpointError(f"{path} is not a racedit checkpoint: expected a directory with {list(FILES)} "
                          f"(or a run directory containing checkpoints/last)")


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The checkpoint `last` points to under `ckpt_root`, or None.

    Without a usable `last` (a crash between renaming a new checkpoint into place and switching the link,
    or a filesystem without symbolic links), the newest complete `step_*` directory (all of FILES present).
    """
    root = Path(ckpt_root)
    last = root / "last"
    if last.is_dir():
        return last.resolve()
    if not root.is_dir():
        return None
    complete = [(s, p) for p in root.iterdir()
                if (s := step_of(p)) is not None and p.is_dir() and all((p / f).exists() for f in FILES)]
    return max(complete)[1].resolve() if complete else None


def load_config_of(ckpt: Path) -> Config:
    """The resolved config saved beside a checkpoint."""
    f = ckpt / "config.yaml"
    if not f.exists():
        raise CheckpointError(f"{ckpt} has no config.yaml; it is not a complete racedit checkpoint")
    verify_checkpoint(ckpt, ["config.yaml"])
    try:
        return from_yaml_text(f.read_text())
    except ConfigError as e:  # edited by hand, or written by another racedit version
        raise CheckpointError(f"{f} is not a valid racedit config: {e}") from None


def load_weights(ckpt: Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """Weights ("ema" or "model") of a checkpoint, on CPU."""
    f = ckpt / f"{which}.safetensors"
    if not f.exists():
        raise CheckpointError(f"{f} is missing")
    verify_checkpoint(ckpt, [f.name])
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors' own error for a truncated or foreign file
        raise CheckpointError(f"{f} cannot be read ({type(e).__name__}: {e}); the file is damaged") from None


def load_train_state(ckpt: Path) -> dict:
    """Optimizer, schedule, step, RNG and data position; loaded with weights_only=True (no code runs)."""
    f = ckpt / "state.pt"
    if not f.exists():
        raise CheckpointError(f"{f} is missing")
    verify_checkpoint(ckpt, ["state.pt"])
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, or one holding more than tensors and plain containers
        raise CheckpointError(f"{f} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model` strictly, turning shape/key mismatches into a readable CheckpointError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        lines = [f"{source} does not fit this model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
        if wrong:
            lines.append(f"  shape mismatches ({len(wrong)}): {wrong[:4]}")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state)


def load_model(path: str | Path, which: str = "ema") -> tuple[torch.nn.Module, Config, Path]:
    """The model a checkpoint's config describes with its `which` ("ema" or "model") weights loaded, in eval
    mode on the CPU: (model, config, checkpoint dir). Raises CheckpointError for a missing or unfit one."""
    ckpt = resolve_checkpoint(path)
    cfg = load_config_of(ckpt)
    model = create_model(cfg.model)
    load_into(model, load_weights(ckpt, which), f"checkpoint {ckpt} ({which} weights)")
    return model.eval(), cfg, ckpt
