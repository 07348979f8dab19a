"""Metrics to `metrics.csv` (one row per logged step) and to TensorBoard, from the main process only; and
reading a run's metrics.csv back (`read_metrics`)."""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path

from racedit.fileio import atomic_path


class MetricsLogger:
    """Appends rows of scalars; the CSV header grows if a later row brings new names.

    On resume at step s, rows after s (logged after the checkpoint, before a crash) are dropped, so the
    file stays a faithful record of one continuous run.
    """

    def __init__(self, out_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(out_dir) / "metrics.csv"
        self.rows: list[dict] = []
        if resume_step is not None and self.path.exists():
            with self.path.open() as f:
                self.rows = [r for r in csv.DictReader(f) if int(float(r["step"])) <= resume_step]
        self.fields: list[str] = list(self.rows[0].keys()) if self.rows else ["step"]
        self._rewrite()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step)

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            w.writeheader()
            w.writerows(self.rows)

    def log(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, **{k: float(v) for k, v in values.items()}}
        new = [k for k in row if k not in self.fields]
        self.rows.append(row)
        if new:
            self.fields += new
            self._rewrite()
        else:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields).writerow(row)
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, float(v), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
