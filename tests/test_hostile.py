"""The hostile-input table: one row per way a user, a cluster or bad luck can break a run, each through the
`racedit` entry point as a user would type it.

Every row asserts the exit status, that stderr is one short line without a traceback that names the
culprit (the file, key or flag), and that nothing on disk changed (the run directory hashed before and after).
The classes: damaged files (truncated, bit-flipped, emptied, replaced by a pickle), bad values of every kind
(config keys, flags, YAML), conflicting runs (a live lock, an occupied run directory, a resume that would
change the model, outputs racedit did not write) and signals. The detailed cases of each class are in
test_integrity.py, test_validation.py, test_runs.py, test_signals.py and test_errors.py; this table keeps one
representative of each in one place, against one shared trained run.
"""
# ruff: noqa: F811  (the `run` fixture is imported by name; its name is also every helper's argument)

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_config

# `trained` (one tiny run per module) and `run` (a private copy of it) are test_integrity's fixtures, shared here
from test_integrity import bit_flipped, emptied, pickled, run, trained, tree_digest, truncated  # noqa: F401

import racedit.training.loop as loop_mod
from racedit.checkpoint import verify_checkpoint
from racedit.cli import main
from racedit.config import to_yaml
from racedit.runlock import process_start


def ckpt(run: Path, step: int = 8) -> Path:
    return run / "checkpoints" / f"step_{step:07d}"


def sample_argv(run: Path, *extra: str, out: str = "g.png") -> list[str]:
    return ["sample", "--ckpt", str(ckpt(run)), "--out", str(run / out), "--classes", "1", "--per-class", "1",
            "--steps", "1", "--device", "cpu", "--quiet", *extra]


def train_argv(run: Path, *sets: str, resume: bool = False) -> list[str]:
    return ["train", "--config", str(run / "train.yaml"), *(["--resume"] if resume else []),
            *(["--set", *sets] if sets else [])]


# --- ways to break things: each prepares `run` and returns the argv and the culprit's name -------------------


@dataclass
class Case:
    name: str
    prepare: Callable[[Path], tuple[list[str], str]]  # run dir -> (argv, a text the error line must contain)
    code: int = 2


def damaged(file: str, how: Callable[[Path], None], reader: str) -> Callable:
    def prepare(run: Path):
        target = ckpt(run) / file
        how(target)
        argv = sample_argv(run) if reader == "sample" else ["train", "--config", str(run / "train.yaml"),
                                                            "--ckpt", str(ckpt(run))]
        return argv, str(target)
    return prepare


def bad_set(key: str, value: str) -> Callable:
    return lambda run: (train_argv(run, f"{key}={value}"), key)


def bad_flag(flag: str, value: str) -> Callable:
    return lambda run: (sample_argv(run, flag, value), flag)


def yaml_text(text: str, culprit: str) -> Callable:
    def prepare(run: Path):
        (run / "bad.yaml").write_text(text)
        return ["train", "--config", str(run / "bad.yaml")], culprit
    return prepare


def truncated_npz(run: Path):
    npz = run / "samples.npz"
    np.savez(npz, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    truncated(npz)
    return ["fid", str(npz), "--ref", str(npz), "--device", "cpu", "--quiet"], str(npz)


def live_lock(run: Path):
    """Another training of this host holds the run directory (a sleeping process stands for it)."""
    sleeper = subprocess.Popen(["sleep", "60"])
    (run / ".sleeper").write_text(str(sleeper.pid))  # killed by the test after the command
    (run / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "token": "x",
                                           "started": "earlier", "process_start": process_start(sleeper.pid),
                                           "command": "racedit train ..."}))
    return train_argv(run, resume=True), f"PID {sleeper.pid}"


def occupied_run_dir(run: Path):
    return train_argv(run), str(run)


def resume_changing_the_model(run: Path):
    return train_argv(run, "model.depth=3", resume=True), "model.depth"


def foreign_npz(run: Path):
    np.savez(run / "mine.npz", arr_0=np.ones((2, 8, 8, 3), np.uint8))
    return ["sample", "--ckpt", str(ckpt(run)), "--out", str(run / "mine.npz"), "--num-samples", "2", "--steps",
            "1", "--device", "cpu", "--quiet"], "mine.npz"


def foreign_png(run: Path):
    (run / "g.png").write_bytes(b"\x89PNG\r\n\x1a\n not a racedit grid")
    return sample_argv(run), "g.png"


def damaged_latent_manifest(run: Path):
    (run / "latents").mkdir()
    (run / "latents" / "manifest.json").write_text('{"format": "racedit-lat')  # cut short
    return train_argv(run, "data.kind=latents", f"data.latents={run / 'latents'}", "model.in_channels=4",
                      "model.input_size=8", "model.num_classes=3", f"train.out_dir={run / 'latent-run'}"), \
        str(run / "latents" / "manifest.json")


def missing_latents(run: Path):
    (run / "latents").mkdir()
    return train_argv(run, "data.kind=latents", f"data.latents={run / 'latents'}", "model.in_channels=4",
                      "model.input_size=8", "model.num_classes=3", f"train.out_dir={run / 'latent-run'}"), \
        str(run / "latents")


CASES = [
    # damaged files of each kind, for the readers that use them
    Case("model.safetensors truncated, resume", damaged("model.safetensors", truncated, "train")),
    Case("ema.safetensors bit-flipped, sample", damaged("ema.safetensors", bit_flipped, "sample")),
    Case("state.pt emptied, resume", damaged("state.pt", emptied, "train")),
    Case("config.yaml replaced by a pickle, sample", damaged("config.yaml", pickled, "sample")),
    Case("npz truncated, fid", truncated_npz),
    Case("latent directory without a manifest, train", missing_latents),
    Case("latent manifest cut short, train", damaged_latent_manifest),
    # bad values: config keys, flags, YAML
    Case("train.lr=nan", bad_set("train.lr", "nan")),
    Case("train.log_every=0", bad_set("train.log_every", "0")),
    Case("sample.cfg_scale=nan", bad_set("sample.cfg_scale", "nan")),
    Case("model.hidden_size=0", bad_set("model.hidden_size", "0")),
    Case("train.grad_accum not dividing the batch", bad_set("train.grad_accum", "3")),
    Case("--cfg-scale nan", bad_flag("--cfg-scale", "nan")),
    Case("--steps 0", bad_flag("--steps", "0")),
    Case("YAML syntax error", yaml_text("train:\n  steps: 3\n   lr: 1\n", "bad.yaml:3:")),
    Case("empty config file", yaml_text("", "empty")),
    # conflicting runs and outputs racedit did not write
    Case("a live lock on the run directory", live_lock),
    Case("a new run into a directory with checkpoints", occupied_run_dir),
    Case("a resume that changes the model", resume_changing_the_model),
    Case("an npz racedit did not write", foreign_npz),
    Case("a png racedit did not write", foreign_png),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_is_one_line_and_changes_nothing(case, run, capsys):
    argv, culprit = case.prepare(run)
    before = tree_digest(run)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse refuses a bad flag this way
        code = e.code
    finally:
        sleeper = run / ".sleeper"
        if sleeper.exists():
            os.kill(int(sleeper.read_text()), signal.SIGKILL)
    err = capsys.readouterr().err
    assert code == case.code, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) < 600, err
    assert culprit in lines[0], err
    assert tree_digest(run) == before, "a refused command changed the run directory"
    assert not (run / "PWNED").exists()


def test_a_preempted_run_loses_nothing(run, capsys, monkeypatch):
    """SIGTERM during a resumed step: the step finishes, its checkpoint is written and verifies, the earlier
    checkpoints are untouched, and the one interrupted line (after the one-line notice) names the resume
    command; exit status 143."""
    before = {p: tree_digest(p) for p in (ckpt(run, 8),)}  # step 4 goes by train.keep_last=2, as always
    (run / "train.yaml").write_text(to_yaml(make_tiny_config(run, "train.steps=12")))
    real, calls = loop_mod.training_losses, []

    def signalling(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_mod, "training_losses", signalling)
    capsys.readouterr()
    code = main(train_argv(run, resume=True))
    err = capsys.readouterr().err
    assert code == 143 and "Traceback" not in err, err
    last = [ln for ln in err.strip().splitlines() if ln.startswith("interrupted")]
    assert len(last) == 1 and "step_0000010" in last[0] and "--resume" in last[0], err
    verify_checkpoint(ckpt(run, 10))
    assert {p: tree_digest(p) for p in before} == before
