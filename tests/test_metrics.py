"""Metrics through accelerate's trackers (train.log_with): the TensorBoard events hold what metrics.csv holds,
bad tracker names fail when the config loads, a missing package fails at start in one line, every way out
of train() closes the trackers, and log_with=none imports no TensorBoard.

References: metrics.csv read back with the csv module, the event files read back with TensorBoard's own
EventAccumulator, and a recording tracker registered with accelerate.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, get_available_trackers
from conftest import make_tiny_config

import racedit.training.loop as loop_mod
from racedit.config import ConfigError, log_with_names
from racedit.training.loop import TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]


def csv_rows(out_dir: Path) -> list[dict[str, str]]:
    with (Path(out_dir) / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_tensorboard_events_hold_the_csv_rows_across_a_resume(tiny_config):
    """Interrupted after step 6, resumed from the step-4 checkpoint: TensorBoard shows each step once, with
    the values of metrics.csv (steps 5 and 6 of the first attempt are purged, as in the CSV)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config("train.steps=8")
    first = train(cfg, stop_after=6)
    assert first.step == 6
    train(cfg, resume=True)
    rows = csv_rows(cfg.train.out_dir)
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    events = EventAccumulator(str(Path(cfg.train.out_dir) / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = [k for k in rows[0] if k != "step"]
    assert {"loss", "grad_norm", "lr", "skipped_steps"} <= set(tags)
    assert set(events.Tags()["scalars"]) == set(tags)
    for tag in tags:
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        # TensorBoard stores float32
        assert logged == [(int(r["step"]), np.float32(float(r[tag]))) for r in rows], tag


def test_unknown_tracker_is_refused_when_the_config_loads(tmp_path):
    for value in ("tensorbord", "[tensorboard,wandbb]", "all"):
        with pytest.raises(ConfigError) as info:
            make_tiny_config(tmp_path, f"train.log_with={value}")
        msg = str(info.value)
        assert "\n" not in msg and "'train.log_with'" in msg and "'tensorboard'" in msg and "'none'" in msg
    with pytest.raises(ConfigError, match="'train.log_with'"):
        make_tiny_config(tmp_path, "train.log_with=3")


def test_one_name_a_list_comma_separated_or_none(tmp_path):
    names = lambda value: log_with_names(make_tiny_config(tmp_path, f"train.log_with={value}").train.log_with)
    assert names("tensorboard") == names("[tensorboard]") == names("tensorboard,tensorboard") == ["tensorboard"]
    assert names("none") == names("''") == names("[]") == names("null") == []
    assert names("[tensorboard,mlflow]") == names("tensorboard, mlflow") == ["tensorboard", "mlflow"]


def test_tracker_without_its_package_fails_at_start_in_one_line(tiny_config):
    available = {str(t) for t in get_available_trackers()}
    missing = sorted(set(LOGGER_TYPE_TO_CLASS) - available)
    if not missing:
        pytest.skip("every tracker accelerate knows is installed here")
    cfg = tiny_config(f"train.log_with=[tensorboard,{missing[0]}]")
    with pytest.raises(ConfigError) as info:
        train(cfg)
    msg = str(info.value)
    assert "\n" not in msg and f"pip install {missing[0]}" in msg and "'train.log_with'" in msg
    assert not (Path(cfg.train.out_dir) / "metrics.csv").exists()  # refused before anything ran


class Recording(GeneralTracker):
    """A tracker that keeps what it is given, registered under its name as a user's own tracker would be."""

    name = "recording"
    requires_logging_directory = False
    runs: list[dict] = []

    def __init__(self, run_name: str, **kwargs):
        super().__init__()
        self.run = {"name": run_name, "config": None, "rows": [], "finished": False}
        Recording.runs.append(self.run)

    @property
    def tracker(self):
        return self.run

    def store_init_configuration(self, values: dict):
        self.run["config"] = values

    def log(self, values: dict, step: int | None = None, **kwargs):
        self.run["rows"].append((step, dict(values)))

    def finish(self):
        self.run["finished"] = True


@pytest.fixture
def recording(monkeypatch):
    monkeypatch.setitem(LOGGER_TYPE_TO_CLASS, Recording.name, Recording)
    monkeypatch.setattr(Recording, "runs", [])
    return Recording.runs


@pytest.mark.parametrize("ending", ["done", "diverged", "interrupted"])
def test_every_way_out_closes_the_trackers(tiny_config, monkeypatch, recording, ending):
    """The trackers get the rows of metrics.csv and the resolved, flattened config, and are finished whether
    the run ends, diverges or is interrupted (at step 3)."""
    real, calls = loop_mod.training_losses, []

    def failing(*args, **kwargs):
        calls.append(1)
        terms = real(*args, **kwargs)
        if len(calls) == 3 and ending == "interrupted":
            raise KeyboardInterrupt
        if len(calls) >= 3 and ending == "diverged":
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(loop_mod, "training_losses", failing)
    cfg = tiny_config("train.steps=4", "train.log_with=recording", "train.max_nonfinite=2")
    if ending == "done":
        train(cfg)
    else:
        with pytest.raises({"diverged": TrainingDiverged, "interrupted": KeyboardInterrupt}[ending]):
            train(cfg)
    [run] = recording
    assert run["finished"]
    assert run["name"] == Path(cfg.train.out_dir).name
    rows = csv_rows(cfg.train.out_dir)
    assert [step for step, _ in run["rows"]] == [int(r["step"]) for r in rows] == {
        "done": [1, 2, 3, 4], "diverged": [1, 2, 3], "interrupted": [1, 2]}[ending]
    assert all(v == float(r[k]) for (_, logged), r in zip(run["rows"], rows) for k, v in logged.items())
    config = run["config"]
    assert json.loads(json.dumps(config)) == config  # JSON-safe
    assert config["model.depth"] == 2 and config["model.moe_experts"] == 0  # preset values resolved
    assert config["train.betas"] == "[0.9, 0.999]" and config["train.log_with"] == "recording"
    assert not (Path(cfg.train.out_dir) / "tensorboard").exists()


def test_log_with_none_imports_no_tensorboard(tmp_path):
    """A fresh interpreter trains with log_with=none: metrics.csv is written, and neither tensorboard nor
    torch.utils.tensorboard is ever imported."""
    code = (
        "import sys; from conftest import make_tiny_config; from racedit.training.loop import train; "
        f"train(make_tiny_config({str(tmp_path / 'run')!r}, 'train.steps=2', 'train.log_with=none')); "
        "loaded = [m for m in ('tensorboard', 'torch.utils.tensorboard') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["step"] for r in csv_rows(tmp_path / "run")] == ["1", "2"]
    assert not (tmp_path / "run" / "tensorboard").exists()
