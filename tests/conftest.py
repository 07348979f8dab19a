"""Shared fixtures: a tiny digits config (a run that trains in well under a second per step on CPU)."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

import pytest
import torch

from racedit.config import Config, load_config

# The suite's tensors are tiny: with 2 intra-op threads on a shared 2-core machine every small op pays for
# thread wake-ups (a 12-step tiny training run took 3.3 s on 2 threads vs 1.5 s on 1). RACEDIT_TEST_THREADS
# overrides, e.g. to measure.
torch.set_num_threads(int(os.environ.get("RACEDIT_TEST_THREADS", "1")))
# The digits classifier cache goes to a per-session temporary directory, never to the user's ~/.cache.
os.environ.setdefault("RACEDIT_CACHE", tempfile.mkdtemp(prefix="racedit-test-cache-"))

# A 2-block, 32-wide DiT on the 8x8 digits: 16 tokens, about 50K parameters.
TINY = [
    "model.name=DiT-S/2", "model.input_size=8", "model.in_channels=1", "model.num_classes=10",
    "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "model.patch_size=2", "model.learn_sigma=false",
    "data.kind=digits", "data.image_size=8",
    "train.steps=12", "train.global_batch=16", "train.grad_accum=1", "train.lr=1e-3", "train.ema_decay=0.9",
    "train.log_every=1", "train.ckpt_every=4", "train.sample_every=0", "train.eval_samples_per_class=0",
    "sample.sampler=ddim", "sample.steps=2", "sample.cfg_scale=2.0",
]


def make_tiny_config(out_dir: str | Path, *overrides: str) -> Config:
    """The tiny digits config writing to `out_dir`, with `a.b=c` overrides applied on top (validated)."""
    return load_config(None, [*TINY, f"train.out_dir={out_dir}", *overrides])


@pytest.fixture
def tiny_config(tmp_path):
    """Factory: `tiny_config(*overrides, out_dir=tmp_path / "run")` -> a validated tiny digits Config."""

    def make(*overrides: str, out_dir: str | Path | None = None) -> Config:
        return make_tiny_config(out_dir if out_dir is not None else tmp_path / "run", *overrides)

    return make


def pytest_collection_modifyitems(config, items):
    """The compile tests run last, their fork-based gloo test first among them: once a process has run a
    compiled backward, torch's autograd refuses to run a backward in a child forked from it, and the
    multi-process fixtures (`run_gloo_workers`) fork."""
    def order(item) -> int:
        if item.module.__name__ != "test_compile":
            return 0
        return 1 if "two_processes" in item.name else 2

    items.sort(key=order)  # stable: the order inside each group is kept


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gloo_workers(worker, out_dir: str | Path, world: int = 2, timeout: float = 120.0) -> list[dict]:
    """Run `worker(rank, world, port, out_dir)` in `world` forked processes and return what each rank saved
    to `out_dir/rank{r}.pt` (tensors only). Fork, not spawn: the children need no fresh interpreter and
    imports (seconds each); workers set their own thread count first. Fails the test after `timeout` s."""
    import torch.multiprocessing as mp

    context = mp.start_processes(worker, args=(world, free_port(), str(out_dir)), nprocs=world, join=False,
                                 start_method="fork")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} gloo workers did not finish within {timeout:.0f} s")
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world)]


def launched_as(rank: int, world: int, port: int) -> None:
    """In a forked worker: the environment a launcher gives process `rank` of `world` (none for one process:
    a plain `racedit train`), one thread, and accelerate's state reset (the parent's is not this process's)."""
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), ACCELERATE_USE_CPU="true",
                          OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def logged_losses(run_dir) -> list[float]:
    """The loss column of a run's metrics.csv (one row per logged step)."""
    import csv

    with open(Path(run_dir) / "metrics.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def assert_close_weights(ckpt_a, ckpt_b, rtol=1e-4, atol=1e-5) -> None:
    """The model and EMA weights of two checkpoints agree (the tolerance the multi-process tests use)."""
    from racedit.checkpoint import load_weights

    for which in ("model", "ema"):
        a, b = load_weights(ckpt_a, which), load_weights(ckpt_b, which)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=f"{which}.{k}")
