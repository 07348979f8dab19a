"""Metrics from the main process: `metrics.csv` (one row per logged step) and the experiment trackers of
`train.log_with` (TensorBoard by default), fed through accelerate's `Accelerator.log`; and reading a run's
metrics.csv back (`read_metrics`)."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path
from typing import Any

from accelerate.tracking import LOGGER_TYPE_TO_CLASS, TensorBoardTracker, get_available_trackers
from accelerate.utils import LoggerType

from racedit.config import ConfigError, log_with_names
from racedit.fileio import atomic_path, writing


def trackers(log_with: Any, out_dir: str | Path) -> list | None:
    """The Accelerator's `log_with` for `train.log_with`: accelerate's tracker names, TensorBoard as an
    instance of accelerate's tracker writing to `<out_dir>/tensorboard/` (given by name, it would write to
    `<logging_dir>/<project name>/`). Nothing is imported here: each tracker imports its package when started.

    Raises ConfigError naming the tracker and its pip package when that is not installed (accelerate would
    skip the tracker silently).
    """
    # accelerate's availability checks, plus any tracker registered by name (register_tracker_class)
    available = {str(t) for t in get_available_trackers()} | (set(LOGGER_TYPE_TO_CLASS) - set(LoggerType.list()))
    out: list = []
    for name in log_with_names(log_with):
        if name not in available:
            raise ConfigError(f"bad value for 'train.log_with': the {name} tracker needs the '{name}' package, "
                              f"which is not installed (or not a version accelerate supports): pip install {name}, "
                              "or set train.log_with=none")
        out.append(TensorBoardTracker("", str(Path(out_dir) / "tensorboard")) if name == "tensorboard" else name)
    return out or None  # None, not []: accelerate warns that an empty list found no tracker installed


def flat_config(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as `{"train.lr": 0.0001, ...}`: scalars as they are, lists as JSON text, since some
    trackers (TensorBoard's hparams) take scalars only."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else value
    return out


class MetricsLogger:
    """Appends rows of scalars; the CSV header grows if a later row brings new names.

    On resume at step s, rows after s (logged after the checkpoint, before a crash) are dropped, so the
    file stays a faithful record of one continuous run; TensorBoard is told to hide them too (purge_step).
    With an `accelerator`, its trackers are started here (project name: the run directory's name, with
    `config`) and get every row; `accelerator.end_training()` closes them.
    """

    def __init__(self, out_dir: str | Path, resume_step: int | None = None, accelerator=None,
                 config: dict | None = None):
        self.path = Path(out_dir) / "metrics.csv"
        self.rows: list[dict] = []
        if resume_step is not None and self.path.exists():
            with self.path.open() as f:
                self.rows = [r for r in csv.DictReader(f) if int(float(r["step"])) <= resume_step]
        self.fields: list[str] = list(self.rows[0].keys()) if self.rows else ["step"]
        self._rewrite()
        self.accelerator = accelerator
        if accelerator is not None:
            for tracker in accelerator.log_with:
                if isinstance(tracker, TensorBoardTracker):  # the instance `trackers` made
                    # TensorBoard hides the events at steps >= purge_step; step s itself is kept, as in the CSV
                    tracker.init_kwargs["purge_step"] = None if resume_step is None else resume_step + 1
            accelerator.init_trackers(Path(out_dir).resolve().name, config=config)

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            w.writeheader()
            w.writerows(self.rows)

    def log(self, step: int, values: dict[str, float]) -> None:
        values = {k: float(v) for k, v in values.items()}
        row = {"step": step, **values}
        new = [k for k in row if k not in self.fields]
        self.rows.append(row)
        if new:
            self.fields += new
            self._rewrite()
        else:
            with writing(self.path), self.path.open("a", newline="") as f:  # a full disk names the file
                csv.DictWriter(f, fieldnames=self.fields).writerow(row)
        if self.accelerator is not None:
            self.accelerator.log(values, step=step)


def read_metrics(run_dir: str | Path) -> tuple[list[str], list[dict[str, float]]]:
    """(header, rows) of a run's metrics.csv, values as floats (empty cells left out)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return [], []
    with path.open() as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = []
        for r in reader:
            row = {}
            for k, v in r.items():
                if k is None or v in (None, ""):
                    continue
                with contextlib.suppress(ValueError):
                    row[k] = float(v)
            rows.append(row)
    return header, rows


def loss_column(header: list[str]) -> str:
    """The diffusion loss column: "loss/diffusion" when auxiliary losses are on (then "loss" is the total)."""
    return "loss/diffusion" if "loss/diffusion" in header else "loss"
