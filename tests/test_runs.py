"""Nothing the user had is lost: one writer per run directory (racedit.runlock), outputs replaced only when
racedit wrote them for the same job (--overwrite forces), and what a resume may change (applied and recorded,
or refused with the list). Every refusal: exit status 2, one stderr line without a traceback naming the culprit,
and nothing on disk changed."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import make_tiny_config, run_gloo_workers
from PIL import Image

from racedit.checkpoint import latest_checkpoint
from racedit.cli import main
from racedit.config import to_yaml
from racedit.evaluation.fid import EvalSettings, check_outputs
from racedit.outputs import OutputExists
from racedit.runlock import LOCK_NAME, LockHeld, RunLock, lock_on_main, process_start

ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()


# --- shared helpers and fixtures ------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """Every file (SHA-256) and directory under `root` (and whether root exists): to compare before/after."""
    if not root.exists():
        return {}
    out = {".": "dir" if root.is_dir() else hashlib.sha256(root.read_bytes()).hexdigest()}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(capsys, argv: list[str], *culprits: str, unchanged: Path | None = None) -> str:
    """Run `racedit ARGV`: exit status 2, exactly one stderr line, no traceback, naming every culprit; nothing
    under `unchanged` touched. Returns the line."""
    before = snapshot(unchanged) if unchanged is not None else None
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for c in culprits:
        assert c in lines[0], (c, lines[0])
    if unchanged is not None:
        assert snapshot(unchanged) == before
    return lines[0]


def write_lock(directory: Path, pid: int, host: str = HOST, start: int | None = None) -> Path:
    """A lock file as racedit.runlock writes it, for a given holder."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": host, "token": "x", "started": "earlier",
                                "process_start": process_start(pid) if start is None else start,
                                "command": "racedit train ..."}))
    return path


@pytest.fixture
def sleeper():
    """A live process of this host (its PID stands for a running training)."""
    p = subprocess.Popen(["sleep", "60"])
    yield p
    p.kill()
    p.wait()


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture
def config_file(tmp_path):
    """Factory: a tiny YAML config for `racedit train --config` writing to tmp_path/run."""

    def make(*overrides: str) -> Path:
        path = tmp_path / "tiny.yaml"
        path.write_text(to_yaml(make_tiny_config(tmp_path / "run", "train.log_with=none", *overrides)))
        return path

    return make


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory) -> Path:
    """A tiny Race-DiT run of 3 steps (one checkpoint, at the end): sampling and routing-report source."""
    from racedit.training.loop import train

    out = tmp_path_factory.mktemp("runs") / "run"
    train(make_tiny_config(out, "model.name=RaceDiT-S/2-2in8", "train.steps=3", "train.ckpt_every=0",
                           "train.log_with=none"))
    return out


# --- one writer per run directory --------------------------------------------------------------------------


def test_a_live_lock_refuses_a_second_training_naming_pid_host_and_file(config_file, tmp_path, capsys, sleeper):
    config = config_file("train.steps=2")
    run = tmp_path / "run"
    lock = write_lock(run, sleeper.pid)
    line = refused(capsys, ["train", "--config", str(config)], f"PID {sleeper.pid}", HOST, str(lock),
                   unchanged=run)
    assert "in use" in line


def test_a_live_lock_refuses_a_resume_too_and_the_run_is_untouched(config_file, tmp_path, capsys, sleeper):
    config = config_file("train.steps=2", "train.ckpt_every=0")
    assert main(["train", "--config", str(config)]) == 0
    run = tmp_path / "run"
    assert not (run / LOCK_NAME).exists()  # released at the end
    write_lock(run, sleeper.pid)
    refused(capsys, ["train", "--config", str(config), "--set", "train.steps=4", "--resume"], f"PID {sleeper.pid}",
            unchanged=run)


def test_a_lock_of_another_host_refuses_and_says_how_to_remove_it(config_file, tmp_path, capsys):
    config = config_file("train.steps=2")
    lock = write_lock(tmp_path / "run", os.getpid(), host="gpu-node-17")
    line = refused(capsys, ["train", "--config", str(config)], "gpu-node-17", str(lock), unchanged=tmp_path / "run")
    assert f"delete {lock}" in line


def test_a_lock_of_a_dead_process_is_taken_over_with_a_note(config_file, tmp_path, capsys):
    config = config_file("train.steps=2", "train.ckpt_every=0")
    pid = dead_pid()
    write_lock(tmp_path / "run", pid)
    assert main(["train", "--config", str(config)]) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "stale lock" in ln]
    assert len(notes) == 1 and f"PID {pid}" in notes[0]
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_0000002"


def test_a_reused_pid_is_stale_and_a_lock_file_that_is_no_lock_refuses(tmp_path, sleeper):
    notes: list[str] = []
    # the PID runs, but it is another process than the one that took the lock (other start time)
    write_lock(tmp_path / "a", sleeper.pid, start=process_start(sleeper.pid) + 1)
    with RunLock(tmp_path / "a", note=notes.append) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert len(notes) == 1 and f"PID {sleeper.pid}" in notes[0]
    assert not (tmp_path / "a" / LOCK_NAME).exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / LOCK_NAME).write_text("mine, do not touch")
    with pytest.raises(LockHeld, match="no racedit lock file"):
        RunLock(tmp_path / "b").acquire()
    assert (tmp_path / "b" / LOCK_NAME).read_text() == "mine, do not touch"
    # a directory the lock made is removed again when the job wrote nothing into it
    RunLock(tmp_path / "c").acquire().release()
    assert not (tmp_path / "c").exists()


def test_a_release_never_removes_another_holders_lock(tmp_path, sleeper):
    lock = RunLock(tmp_path).acquire()
    write_lock(tmp_path, sleeper.pid)  # someone replaced it (e.g. a user who deleted ours, then another job)
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == sleeper.pid


def test_kill_9_of_a_training_leaves_a_lock_that_the_restart_takes_over(config_file, tmp_path, capsys):
    config = config_file("train.steps=100000", "train.ckpt_every=2", "train.log_every=100", "train.num_threads=1")
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "racedit", "train", "--config", str(config)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while latest_checkpoint(run / "checkpoints") is None:
            assert child.poll() is None, "the training subprocess ended early"
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.2)
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == child.pid
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (run / LOCK_NAME).exists()  # kill -9 runs no finally
    step = int(latest_checkpoint(run / "checkpoints").name.split("_")[1])
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--set", f"train.steps={step + 1}", "--resume"]) == 0
    captured = capsys.readouterr()
    assert f"stale lock {run / LOCK_NAME} of PID {child.pid}" in captured.err
    assert "train.steps 100000 -> " in captured.out
    assert not (run / LOCK_NAME).exists()


def lock_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    state = SimpleNamespace(is_main_process=rank == 0, num_processes=world)
    result = {}
    try:
        with lock_on_main(state, Path(out_dir) / "taken"):
            pass
    except LockHeld as e:  # a live holder: every rank refuses alike (none waits at a collective for the main)
        result["refused"] = torch.tensor(len(str(e)))
    with lock_on_main(state, Path(out_dir) / "free") as lock:
        holder = json.loads((Path(out_dir) / "free" / LOCK_NAME).read_text()) if rank == 1 else None
        dist.barrier()  # rank 1 reads while rank 0 holds
        result["holds"] = torch.tensor(lock is not None)
        if holder is not None:
            result["holder_is_other"] = torch.tensor(holder["pid"] != os.getpid())
    dist.barrier()
    dist.destroy_process_group()
    torch.save(result, f"{out_dir}/rank{rank}.pt")


def test_only_the_main_process_takes_the_lock_and_all_refuse_alike(tmp_path):
    write_lock(tmp_path / "taken", os.getpid())  # this test process: alive
    results = run_gloo_workers(lock_worker, tmp_path, world=2)
    assert [bool(r["holds"]) for r in results] == [True, False]
    assert bool(results[1]["holder_is_other"])
    assert results[0]["refused"] == results[1]["refused"] > 0
    assert not (tmp_path / "free" / LOCK_NAME).exists()


# --- what a resume may change ----------------------------------------------------------------------------------


def test_resume_applies_a_new_lr_and_weight_decay_and_records_them(config_file, tmp_path, capsys, monkeypatch):
    config = config_file("train.steps=4", "train.ckpt_every=0", "train.warmup_steps=8", "train.lr=1e-3")
    assert main(["train", "--config", str(config)]) == 0
    seen: list[list[tuple[float, float]]] = []
    step = torch.optim.AdamW.step

    def recording_step(self, *a, **k):
        seen.append([(g["lr"], g["weight_decay"]) for g in self.param_groups])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--set", "train.lr=5e-4", "train.steps=6",
                 "train.weight_decay=0.01", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "train.lr 0.001 -> 0.0005" in out and "train.steps 4 -> 6" in out and "train.weight_decay 0.0 -> 0.01" in out
    # by hand: linear warm-up over 8 steps, the optimizer step after scheduler step s runs at lr * (s + 1) / 8
    assert len(seen) == 2
    for s, groups in zip((4, 5), seen):
        assert [lr for lr, _ in groups] == pytest.approx([5e-4 * (s + 1) / 8] * len(groups), rel=1e-12)
        assert groups[0][1] == 0.01 and all(wd == 0.0 for _, wd in groups[1:])  # decay group; no-decay groups
    run = tmp_path / "run"
    for saved in (run / "config.yaml", run / "checkpoints" / "step_0000006" / "config.yaml"):
        train_cfg = yaml.safe_load(saved.read_text())["train"]
        assert (train_cfg["lr"], train_cfg["steps"], train_cfg["weight_decay"]) == (5e-4, 6, 0.01), saved


def test_resume_refuses_what_would_invalidate_the_checkpoint_listing_every_key(config_file, tmp_path, capsys):
    config = config_file("train.steps=4", "train.ckpt_every=0")
    assert main(["train", "--config", str(config)]) == 0
    run = tmp_path / "run"
    line = refused(capsys, ["train", "--config", str(config), "--set", "train.steps=6", "train.seed=1",
                            "model.depth=3", "train.betas=[0.8,0.99]", "train.lr=5e-4", "--resume"],
                   "train.seed", "model.depth", "train.betas", "train.init_from=", unchanged=run)
    assert "train.lr" not in line and "train.steps" not in line  # those alone would be applied
    refused(capsys, ["train", "--config", str(config), "--set", "train.steps=3", "--resume"], "train.steps=3",
            "step 4", unchanged=run)


# --- outputs: replaced only when racedit wrote them for this job -------------------------------------------------


def sample_args(moe_run: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", "--ckpt", str(moe_run), "--steps", "1", "--sampler", "ddim", "--out", str(out), "--device",
            "cpu", "--quiet", *extra]


def test_an_npz_that_sample_did_not_write_is_refused_unless_overwrite(moe_run, tmp_path, capsys):
    out = tmp_path / "samples.npz"
    np.savez(out, arr_0=np.zeros((2, 8, 8, 3), np.uint8))  # the user's own file
    line = refused(capsys, sample_args(moe_run, out, "--num-samples", "4"), str(out), "--overwrite",
                   unchanged=tmp_path)
    assert "not written by racedit sample" in line
    assert main(sample_args(moe_run, out, "--num-samples", "4", "--overwrite")) == 0
    assert "will be replaced" in capsys.readouterr().err  # said even under --quiet
    with np.load(out) as z:
        assert z["arr_0"].shape == (4, 8, 8, 3) and json.loads(str(z["metadata"]))["seed"] == 0
    # the same job again: nothing to do, nothing rewritten; another job: refused, naming what differs
    before = snapshot(tmp_path)
    assert main(sample_args(moe_run, out, "--num-samples", "4")) == 0
    assert snapshot(tmp_path) == before
    line = refused(capsys, sample_args(moe_run, out, "--num-samples", "4", "--seed", "1"), str(out), "seed",
                   unchanged=tmp_path)
    assert "another job" in line


def test_a_png_is_replaced_only_when_its_text_chunk_records_the_same_job(moe_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    Image.new("RGB", (4, 4), "red").save(out)
    refused(capsys, sample_args(moe_run, out, "--classes", "1", "--per-class", "2"), str(out), "--overwrite",
            unchanged=tmp_path)
    assert main(sample_args(moe_run, out, "--classes", "1", "--per-class", "2", "--overwrite")) == 0
    with Image.open(out) as img:
        meta = json.loads(img.text["racedit"])
    assert meta["classes"] == [1] and meta["per_class"] == 2 and meta["seed"] == 0
    before = snapshot(tmp_path)
    assert main(sample_args(moe_run, out, "--classes", "1", "--per-class", "2")) == 0  # same job: same bytes
    assert snapshot(tmp_path) == before
    refused(capsys, sample_args(moe_run, out, "--classes", "1", "--per-class", "2", "--cfg-scale", "1.5"),
            str(out), "cfg_scale", unchanged=tmp_path)


def fake_report(samples: Path, ref: Path | None, settings: EvalSettings) -> dict:
    """A report as racedit fid writes it (the keys the job check reads), written out by hand."""
    return {"label": "FID-4", "metrics": {"fid": 1.0}, "feature_extractor": {},
            "samples": {"path": str(samples.resolve()), "count": 4},
            "reference": None if ref is None else {"path": str(ref)}, "sampling": None,
            "settings": {"isc_splits": settings.isc_splits, "isc_shuffle": False,
                         "precision_recall_k": settings.prc_k, "kid": False, "kid_subsets": None,
                         "batch_size": 7, "device": "elsewhere"}}


def test_fid_refuses_a_report_or_stats_file_of_anything_else_before_evaluating(tmp_path, capsys):
    samples, ref = tmp_path / "s.npz", tmp_path / "ref.npz"
    np.savez(samples, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(ref, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    notes = tmp_path / "notes.json"
    notes.write_text('{"my": "notes"}')
    fid = ["fid", str(samples), "--ref", str(ref), "--inception-weights", str(tmp_path / "none.pth"), "--quiet"]
    refused(capsys, [*fid, "--out", str(notes)], str(notes), "not a report", unchanged=tmp_path)
    refused(capsys, [*fid, "--save-stats", str(notes)], str(notes), "not a statistics file", unchanged=tmp_path)
    refused(capsys, [*fid, "--save-stats", str(ref), "--overwrite"], str(ref), "an input", unchanged=tmp_path)
    # the same job (batch size and device aside) may be replaced; another reference, samples or setting not
    s = EvalSettings(isc_splits=2, prc_k=3)
    report = tmp_path / "s.fid.json"
    report.write_text(json.dumps(fake_report(samples, ref, s)))
    check_outputs(samples, ref, EvalSettings(isc_splits=2, prc_k=3, batch_size=50), report)
    for other_ref, other in ((samples, s), (ref, EvalSettings(isc_splits=3))):
        with pytest.raises(OutputExists, match="another evaluation"):
            check_outputs(samples, other_ref, other, report)
    refused(capsys, [*fid, "--isc-splits", "3"], str(report), "settings", unchanged=tmp_path)


def test_routing_report_writes_only_into_its_own_directory(moe_run, tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "thesis.tex").write_text("\\section{}")
    base = ["routing-report", "--ckpt", str(moe_run), "--out", str(out), "--timesteps", "2", "--per-class", "1",
            "--classes", "0", "1", "--device", "cpu", "--quiet"]
    refused(capsys, base, str(out), "thesis.tex", "--overwrite", unchanged=tmp_path)
    assert main([*base, "--overwrite"]) == 0
    assert (out / "thesis.tex").read_text() == "\\section{}"  # written beside, never deleted
    (out / "thesis.tex").unlink()
    before = {p.name for p in out.iterdir()}
    assert main(base) == 0  # the same job again
    assert {p.name for p in out.iterdir()} == before and json.loads((out / "report.json").read_text())["timesteps"] == 2
    refused(capsys, [*base[:6], "3", *base[7:]], str(out), "timesteps", unchanged=tmp_path)


def test_ablate_and_extract_latents_refuse_a_directory_holding_other_files(tmp_path, capsys, sleeper):
    out = tmp_path / "abl"
    out.mkdir()
    (out / "results_of_my_paper.csv").write_text("1,2\n")
    grid = str(ROOT / "configs" / "ablations" / "routing.yaml")
    refused(capsys, ["ablate", "--grid", grid, "--out", str(out)], str(out), "results_of_my_paper.csv",
            "--overwrite", unchanged=tmp_path)
    (out / "results_of_my_paper.csv").unlink()
    lock = write_lock(out, sleeper.pid)  # another ablate writes there
    refused(capsys, ["ablate", "--grid", grid, "--out", str(out)], str(lock), f"PID {sleeper.pid}",
            unchanged=tmp_path)
    latents = tmp_path / "latents"
    latents.mkdir()
    (latents / "notes.txt").write_text("keep")
    refused(capsys, ["extract-latents", "--data", str(tmp_path / "no-images"), "--vae", str(tmp_path / "no-vae"),
                     "--out", str(latents)], str(latents), "notes.txt", unchanged=tmp_path)
