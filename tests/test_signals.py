"""SIGTERM, SIGINT and SIGUSR1: training stops after the current step with its checkpoint, prints one line with
the resume command and exits with 128 + the signal number; the printed command resumes and the run ends as an
uninterrupted one does, bit for bit. Sampling to an npz and latent extraction keep their complete batches and
shards. Two gloo processes stop at the same step. A second SIGINT exits at once; Ctrl-C elsewhere in the CLI
is one line and status 130.

Real signals throughout: `os.kill` from the test (at a marker: rows in metrics.csv) or from inside a step
(a wrapped `training_losses`), never a simulated handler call. The training chain starts with one real
`python -m racedit train` process; its resumes run `racedit.cli.main` in processes forked from the test (no
interpreter start-up), each slowed by 20 ms a step so that the test's signal lands while it is stepping.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_tiny_config, run_gloo_workers

import racedit.training.loop as loop_mod
from racedit.checkpoint import load_train_state, load_weights
from racedit.cli import main
from racedit.config import to_yaml
from racedit.data.latent_extract import extract_latents
from racedit.data.latent_store import read_manifest
from racedit.signals import Interrupted, StopSignals, exit_code
from racedit.testing import save_standin_vae, write_standin_image_folder
from racedit.training.loop import train

REPO = Path(__file__).resolve().parents[1]
STEPS = 40
# one tiny run for every test here: no periodic checkpoint (the interruption writes it), a row every step
RUN = (f"train.steps={STEPS}", "train.ckpt_every=0", "train.num_threads=1")
LINE = re.compile(r"^interrupted by (SIG[A-Z0-9]+) at step (\d+): saved (\S+); resume with: (racedit train .+)$")


def tiny_yaml(tmp_path: Path) -> tuple[Path, Path]:
    """(config file, run directory) of the shared tiny run."""
    run = tmp_path / "run"
    path = tmp_path / "tiny.yaml"
    path.write_text(to_yaml(make_tiny_config(run, *RUN)))
    return path, run


def rows(run: Path) -> int:
    try:
        return max(sum(1 for _ in (run / "metrics.csv").open()) - 1, 0)
    except OSError:
        return 0


def signal_at_rows(pid: int, poll, run: Path, at_least: int, signum: int, timeout: float = 120) -> None:
    """Send `signum` to `pid` once metrics.csv has `at_least` rows; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while rows(run) < at_least:
        assert poll() is None, f"the run ended before {at_least} rows (it must still be stepping when signalled)"
        assert time.monotonic() < deadline, "the run did not start stepping"
        time.sleep(0.005)
    os.kill(pid, signum)


def fork_cli(argv: list[str], log: Path, step_delay: float = 0.02) -> int:
    """`racedit.cli.main(argv)` in a forked process, stdout and stderr to `log`; each training step takes
    `step_delay` s longer. Returns the pid; its exit status is main's return value."""
    pid = os.fork()
    if pid:
        return pid
    code = 99
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the child ends below)
        real = loop_mod.training_losses

        def slowed(*args, **kwargs):
            time.sleep(step_delay)
            return real(*args, **kwargs)

        loop_mod.training_losses = slowed
        code = main(argv)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        os._exit(code)


def forked_poll(pid: int):
    """A `Popen.poll` for a forked child: None while it runs."""
    return lambda: None if os.waitpid(pid, os.WNOHANG) == (0, 0) else "ended"


def wait_exit(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def the_line(output: str) -> re.Match:
    """The one interruption line of a run's output (progress bars and the banner aside), parsed."""
    assert "Traceback" not in output, output
    lines = [ln for ln in re.split(r"[\r\n]+", output) if ln.startswith("interrupted")]
    assert len(lines) == 1, output
    match = LINE.match(lines[0])
    assert match, lines[0]
    return match


def check_stopped_at(match: re.Match, run: Path, signame: str) -> int:
    """The line names `signame` and a checkpoint of that step that loads; returns the step."""
    assert match[1] == signame
    step, ckpt = int(match[2]), Path(match[3])
    assert ckpt == run / "checkpoints" / f"step_{step:07d}"
    assert load_train_state(ckpt)["step"] == step and load_weights(ckpt, "ema")
    assert match[4] == f"racedit train --config {run / 'config.yaml'} --resume"
    return step


# --- training, end to end -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_usr1_int_each_save_and_the_printed_command_resumes_bit_for_bit(tmp_path):
    config, run = tiny_yaml(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "racedit", "train", "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    signal_at_rows(proc.pid, proc.poll, run, 1, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    step = check_stopped_at(match := the_line(out + err), run, "SIGTERM")
    resume = shlex.split(match[4])[1:]  # what follows `racedit`

    for signum, name in ((signal.SIGUSR1, "SIGUSR1"), (signal.SIGINT, "SIGINT")):
        log = tmp_path / f"{name}.log"
        pid = fork_cli(resume, log)
        signal_at_rows(pid, forked_poll(pid), run, step + 2, signum)
        assert wait_exit(pid) == exit_code(signum)
        new_step = check_stopped_at(match := the_line(log.read_text()), run, name)
        assert new_step > step and shlex.split(match[4])[1:] == resume
        step = new_step
    assert step < STEPS
    pid = fork_cli(resume, tmp_path / "last.log")
    assert wait_exit(pid) == 0, (tmp_path / "last.log").read_text()

    reference = train(make_tiny_config(tmp_path / "reference", *RUN))
    for which in ("model", "ema"):
        got, want = load_weights(run / "checkpoints" / "last", which), load_weights(reference.checkpoint, which)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), which
    assert (run / "metrics.csv").read_text().count("\n") == STEPS + 1  # each step logged once


def losses_signalling(monkeypatch, at_call: int, *signums: int, nan: bool = False) -> list:
    """Wrap the loop's `training_losses` to send `signums` to this process in its `at_call`-th call (1-based:
    optimizer step `at_call` at grad_accum 1), and with `nan` make that step's loss NaN. Returns the list of
    calls, one entry per call."""
    real, calls = loop_mod.training_losses, []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            for s in signums:
                os.kill(os.getpid(), s)
        terms = real(*args, **kwargs)
        if nan and len(calls) == at_call:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(loop_mod, "training_losses", wrapped)
    return calls


def test_the_step_in_flight_finishes_and_is_the_checkpoint(tiny_config, monkeypatch):
    """A signal inside step 3 (with a periodic checkpoint at 4 not yet due): the run ends at step 3, exactly,
    with its checkpoint, and the handlers of the process are the ones it had before."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    calls = losses_signalling(monkeypatch, 3, signal.SIGTERM, signal.SIGTERM)  # a repeat changes nothing
    cfg = tiny_config()
    with pytest.raises(Interrupted) as info:
        train(cfg)
    assert len(calls) == 3 and info.value.exit_code == 143
    ckpt = Path(cfg.train.out_dir) / "checkpoints" / "step_0000003"
    assert str(info.value) == (f"interrupted by SIGTERM at step 3: saved {ckpt}; resume with: racedit train "
                               f"--config {Path(cfg.train.out_dir) / 'config.yaml'} --resume")
    assert load_train_state(ckpt)["step"] == 3
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last", "step_0000003"]
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_non_finite_step_is_not_saved_and_the_last_good_checkpoint_is_named(tiny_config, monkeypatch):
    losses_signalling(monkeypatch, 6, signal.SIGUSR1, nan=True)
    cfg = tiny_config()
    with pytest.raises(Interrupted) as info:
        train(cfg)
    root = Path(cfg.train.out_dir) / "checkpoints"
    assert info.value.exit_code == 138
    assert str(info.value).startswith(f"interrupted by SIGUSR1 at step 6: not saved, the last 1 step(s) were "
                                      f"non-finite; the last good checkpoint is {root / 'step_0000004'}; resume")
    assert not (root / "step_0000006").exists()


def test_a_second_sigint_exits_at_once_without_saving(tiny_config, monkeypatch):
    calls = losses_signalling(monkeypatch, 6, signal.SIGINT, signal.SIGINT)
    cfg = tiny_config()
    with pytest.raises(Interrupted) as info:
        train(cfg)
    assert len(calls) == 6 and info.value.exit_code == 130  # step 6's forward never returned
    root = Path(cfg.train.out_dir) / "checkpoints"
    assert str(info.value).startswith(f"interrupted by a second SIGINT at step 5: exited without saving; the last "
                                      f"checkpoint is {root / 'step_0000004'}; resume with: racedit train")
    assert sorted(p.name for p in root.iterdir()) == ["last", "step_0000004"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_run_started_from_another_checkpoint_and_stopped_before_its_first_save_names_that_checkpoint(
        tiny_config, tmp_path, monkeypatch):
    """Fine-tuning or resuming from a checkpoint of another run directory (--ckpt) and stopped before this
    run's first save: `--resume` here would start afresh, so the printed command continues from the checkpoint."""
    base = tiny_config("train.steps=4", out_dir=tmp_path / "base")
    train(base)
    source = Path(base.train.out_dir) / "checkpoints" / "step_0000004"
    losses_signalling(monkeypatch, 2, signal.SIGINT, signal.SIGINT)  # a second SIGINT: no save
    cfg = tiny_config("train.steps=8", out_dir=tmp_path / "new")
    with pytest.raises(Interrupted) as info:
        train(cfg, resume=str(source))
    assert not any((Path(cfg.train.out_dir) / "checkpoints").glob("step_*"))
    assert str(info.value).endswith(f"resume with: racedit train --config {tmp_path / 'new' / 'config.yaml'} "
                                    f"--ckpt {source}")


def test_stop_signals_record_once_ignore_repeats_and_restore():
    got = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: got.append("outside"))
    try:
        with StopSignals("x", announce=False) as stop:
            assert not stop.requested
            for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR1):
                os.kill(os.getpid(), s)
            assert stop.name == "SIGUSR1" and got == []
            with pytest.raises(Interrupted) as info:
                os.kill(os.getpid(), signal.SIGINT)
            assert info.value.exit_code == 130
        os.kill(os.getpid(), signal.SIGUSR1)
        assert got == ["outside"]  # the handler from before is back

        def in_a_thread():  # handlers can only be set in the main thread: there it does nothing
            with StopSignals("x") as s:
                got.append(s.requested)

        t = threading.Thread(target=in_a_thread)
        t.start()
        t.join()
        assert got == ["outside", False] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGUSR1, previous)


# --- two processes ------------------------------------------------------------------------------------------


def gloo_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # forked from a test process that may have one
    GradientState._reset_state()
    real, calls = loop_mod.training_losses, []

    def wrapped(*args, **kwargs):  # only rank 1 is signalled, inside its step 3
        calls.append(1)
        if rank == 1 and len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    loop_mod.training_losses = wrapped
    try:
        train(make_tiny_config(Path(out_dir) / "run", *RUN))
        result = {"code": torch.tensor(0)}
    except Interrupted as e:
        result = {"code": torch.tensor(e.exit_code), "show": torch.tensor(e.show),
                  "text": torch.tensor(list(str(e).encode()))}
    result["steps"] = torch.tensor(len(calls))
    torch.save(result, f"{out_dir}/rank{rank}.pt")


def test_two_processes_stop_at_the_same_step_with_one_checkpoint(tmp_path):
    """Only rank 1 gets SIGTERM (inside step 3): the flag travels in step 3's all-reduce, both ranks stop after
    it, one checkpoint of step 3 is written, and only the main process has a line to print."""
    ranks = run_gloo_workers(gloo_worker, tmp_path, timeout=60)
    assert [int(r["steps"]) for r in ranks] == [3, 3]
    assert [int(r["code"]) for r in ranks] == [143, 143]
    assert [bool(r["show"]) for r in ranks] == [True, False]
    text = bytes(ranks[0]["text"].tolist()).decode()
    root = tmp_path / "run" / "checkpoints"
    assert text.startswith(f"interrupted by a signal to another process at step 3: saved {root / 'step_0000003'}; "
                           f"resume with: accelerate launch [your options] -m racedit train --config")
    assert sorted(p.name for p in root.iterdir()) == ["last", "step_0000003"]
    assert load_train_state(root / "step_0000003")["step"] == 3


# --- sampling and extraction ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("signals_ckpt") / "run"
    return train(make_tiny_config(out, "train.steps=2", "train.ckpt_every=0")).checkpoint


def test_an_interrupted_npz_job_keeps_its_batches_and_the_rerun_completes_it(checkpoint, tmp_path, monkeypatch,
                                                                            capsys):
    import racedit.sampling.npz_job as npz_job

    def sample(out: Path) -> int:
        return main(["sample", "--ckpt", str(checkpoint), "--out", str(out), "--num-samples", "12",
                     "--batch-size", "4", "--device", "cpu", "--quiet"])

    assert sample(tmp_path / "reference.npz") == 0
    real, calls = npz_job.sample_indexed, []

    def signalling(*args, **kwargs):  # SIGTERM inside the second batch: it is finished and kept
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(npz_job, "sample_indexed", signalling)
    out = tmp_path / "samples.npz"
    capsys.readouterr()
    assert sample(out) == 143
    parts = Path(f"{out}.parts")
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"interrupted by SIGTERM: 2 of 3 batches are complete in {parts}; run the "
                                    f"same command again to continue")
    assert "Traceback" not in err and not out.exists() and len(list(parts.glob("batch_*"))) == 2
    monkeypatch.setattr(npz_job, "sample_indexed", real)
    assert sample(out) == 0
    with np.load(out) as got, np.load(tmp_path / "reference.npz") as want:
        assert np.array_equal(got["arr_0"], want["arr_0"]) and np.array_equal(got["labels"], want["labels"])


def test_an_interrupted_extraction_keeps_complete_shards_and_the_rerun_completes_it(tmp_path):
    images = write_standin_image_folder(tmp_path / "images", num_classes=2, per_class=6, size=36, corrupt=False)
    vae = save_standin_vae(tmp_path / "vae")
    kw = {"image_size": 32, "batch_size": 2, "shard_size": 4, "num_workers": 0, "progress": False}

    def stop_after_first(i):  # SIGINT once shard 0 is written: shard 1 stops at its first batch and is dropped
        if i == 0:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as info:
        extract_latents(images, vae, tmp_path / "out", on_shard_done=stop_after_first, **kw)
    assert info.value.exit_code == 130
    assert str(info.value) == (f"interrupted by SIGINT: 1 of 3 shards are complete in {tmp_path / 'out'} (the one in "
                               f"progress was dropped); run the same command again to continue")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["shard-00000"]
    result = extract_latents(images, vae, tmp_path / "out", **kw)
    assert (result.shards_reused, result.shards_written) == (1, 2)
    reference = extract_latents(images, vae, tmp_path / "reference", **kw)
    assert read_manifest(tmp_path / "out")["shards"] == read_manifest(reference.out_dir)["shards"]


# --- the rest of the CLI ----------------------------------------------------------------------------------------


def test_ctrl_c_elsewhere_in_the_cli_is_one_line_and_130(monkeypatch, capsys):
    import racedit.cli.commands as commands

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(commands.COMMANDS, "train", interrupted)
    assert main(["train", "--config", "any.yaml"]) == 130
    assert capsys.readouterr().err == "error: interrupted (Ctrl-C)\n"


def test_an_interrupted_ablation_names_the_ablate_command(monkeypatch, capsys):
    import racedit.experiments.ablation as ablation

    def stopped(*args, **kwargs):
        raise Interrupted(signal.SIGTERM, "interrupted by SIGTERM at step 5: saved x", "racedit train --config y")

    monkeypatch.setattr(ablation, "load_grid", lambda path: SimpleNamespace())
    monkeypatch.setattr(ablation, "run_grid", stopped)
    assert main(["ablate", "--grid", "g.yaml", "--out", "runs/g"]) == 143
    assert capsys.readouterr().err == ("interrupted by SIGTERM at step 5: saved x; resume with: racedit ablate "
                                       "--grid g.yaml --out runs/g\n")
