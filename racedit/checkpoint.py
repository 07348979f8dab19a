"""Checkpoints that a crash cannot damage.

Layout of one checkpoint directory `checkpoints/step_XXXXXXX/`:
  model.safetensors   live weights (buffers such as routing thresholds included)
  ema.safetensors     EMA weights (sampling uses these by default)
  state.pt            optimizer, LR schedule, step, RNG states, data position; loads with weights_only=True
  config.yaml         the resolved run config
It is written into a temporary directory beside it and renamed into place, then `checkpoints/last` (a
symbolic link) is switched atomically. A crash mid-save leaves at most a stray `.tmp-*` directory, never
a damaged `last`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from racedit.config import Config, ConfigError, from_yaml_text, to_yaml
from racedit.fileio import writing
from racedit.models import create_model

_STEP_DIR = re.compile(r"step_(\d+)")
FILES = ("model.safetensors", "ema.safetensors", "state.pt", "config.yaml")


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


def save_checkpoint(ckpt_root: str | Path, step: int, *, model_state: dict, ema_state: dict, train_state: dict,
                    config: Config, keep_last: int = 2) -> Path:
    """Write checkpoint `step` under `ckpt_root` atomically, point `last` at it, prune old ones."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    old = root / f".old-{final.name}-{os.getpid()}"
    try:
        # writing(): an I/O error (a full disk) names the file; torch.save to a Python file keeps its errno
        with writing(final / "model.safetensors"):
            save_file(_contiguous_cpu(model_state), tmp / "model.safetensors")
        with writing(final / "ema.safetensors"):
            save_file(_contiguous_cpu(ema_state), tmp / "ema.safetensors")
        with writing(final / "state.pt"), open(tmp / "state.pt", "wb") as f:
            torch.save(train_state, f)
        with writing(final / "config.yaml"):
            (tmp / "config.yaml").write_text(to_yaml(config))
        if final.exists():
            # Re-saving a step: a directory cannot be replaced in one rename, so `last` names the new copy
            # while the old one moves aside; at every moment `last` or the step directory is complete.
            _point_last(root, tmp.name)
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        if old.exists() and not final.exists():
            os.replace(old, final)
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


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    steps = sorted((s, p) for p in root.iterdir() if (s := step_of(p)) is not None and p.is_dir())
    for _, path in steps[:-max(keep_last, 1)]:
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)


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
    try:
        return from_yaml_text(f.read_text())
    except ConfigError as e:  # edited by hand, or written by another racedit version
        raise CheckpointError(f"{f} is not a valid racedit config: {e}") from None


def load_weights(ckpt: Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """Weights ("ema" or "model") of a checkpoint, on CPU."""
    f = ckpt / f"{which}.safetensors"
    if not f.exists():
        raise CheckpointError(f"{f} is missing")
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors' own error for a truncated or foreign file
        raise CheckpointError(f"{f} cannot be read ({type(e).__name__}: {e}); the file is damaged") from None


def load_train_state(ckpt: Path) -> dict:
    """Optimizer, schedule, step, RNG and data position; loaded with weights_only=True (no code runs)."""
    f = ckpt / "state.pt"
    if not f.exists():
        raise CheckpointError(f"{f} is missing")
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
