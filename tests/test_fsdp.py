"""train.distributed=fsdp on 2 CPU processes (gloo): equal to DDP, sharded checkpoints that resume on 2 and 1
processes and as DDP (and DDP checkpoints as FSDP), sample exactly as DDP-saved weights, and name a bad shard.

A module fixture runs every training job once (forked workers, 2 or 1 processes); the tests read what they left.

The model is a tiny Race-DiT with everything FSDP must carry: MoE layers routed by a global Expert Race, the
z-loss, hyper-connections, an UltraMemV2 memory layer (its pre-filter refresh needs the whole cores) and
activation checkpointing (every run, DDP and FSDP).

Tolerance, and why not bitwise: FSDP reduce-scatters gradients where DDP all-reduces them (FSDP divides
by the world size before the sum, DDP after), the gradient norm is a sum of per-shard squares, and one
process sums the whole batch's gradient in autograd rather than over processes. Those differ in the last bit
of float32. Measured over ten steps: losses within 4e-8 relative (asserted: 1e-5); weights within 3e-5
absolute, because Adam's update m/sqrt(v) of an entry whose gradient is near zero turns a last-bit change into
a change of up to lr = 1e-3 (asserted: rtol 1e-4 plus atol 1e-5, what the DDP tests use).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close_weights, launched_as, make_tiny_config, run_gloo_workers
from conftest import logged_losses as losses
from PIL import Image

from racedit.checkpoint import CheckpointError, load_weights, save_checkpoint, verify_checkpoint
from racedit.cli import main as racedit_main
from racedit.training.loop import train

RACE = ["model.moe_experts=4", "model.moe_k=1", "model.routing=expert_race", "model.race_scope=global",
        "loss.z_loss=0.001", "model.connections=hyper", "model.memory=ultramemv2", "model.memory_keys=8", "model.memory_topk=4",
        "train.grad_checkpointing=true", "train.steps=10", "train.ckpt_every=5", "train.keep_last=5",
        "sample.steps=2"]
FSDP = ["train.distributed=fsdp"]
STEP = 5  # where the runs that resume start


def config(out_dir, *overrides):
    return make_tiny_config(out_dir, *RACE, *overrides)


def ckpt(root, step):
    return root / "checkpoints" / f"step_{step:07d}"


# run name -> (overrides, the checkpoint it resumes from); every one a 2-process job of its own. The FSDP run
# resumed on 2 processes stops after 3 steps (its losses are compared; the weights at the end on 1 process)
# the per-layer regularization (router target heads; 2-process DDP cannot train it: its unused-parameter
# search starts from the output, which the heads do not feed) with frac-connections, 3 steps, against one process
# and the other auxiliary losses and the other Tucker memory (UltraMem; RACE has UltraMemV2)
PER_LAYER = ["model.router_target_head=true", "loss.per_layer_reg=0.1", "model.connections=frac",
             "loss.balance=0.01", "loss.router_similarity=0.1", "model.memory=ultramem",
             "train.steps=3", "train.ckpt_every=0"]
JOBS = {"ddp": ([], None), "fsdp": (FSDP, None), "fsdp_on_2": (FSDP, ("fsdp", STEP)),
        "fsdp_per_layer": ([*FSDP, *PER_LAYER], None)}
RESUMED_STEPS = {"fsdp_on_2": 3}
# and one-process jobs: FSDP on 1, DDP (on 1) from FSDP, FSDP (on 1) from DDP
SINGLE = {"fsdp_on_1": (FSDP, ("fsdp", STEP)), "fsdp_as_ddp": ([], ("fsdp", STEP)),
          "ddp_as_fsdp": (FSDP, ("ddp", STEP)), "one_per_layer": (PER_LAYER, None)}


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    launched_as(rank, world, port)
    run = Path(out_dir)
    overrides, source = {**JOBS, **SINGLE}[run.name]
    train(config(run, *overrides), resume=source and str(ckpt(run.parent / source[0], source[1])),
          stop_after=RESUMED_STEPS.get(run.name))
    torch.save({}, run / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    for name in JOBS:  # one job per run: accelerate's end_training ends a process's group
        run_gloo_workers(worker, root / name, world=2, timeout=300)
    # in a child too: a backward here, in the test's process, would leave autograd's threads, which later
    # forked workers (of any test) cannot use
    for name in SINGLE:
        run_gloo_workers(worker, root / name, world=1, timeout=300)
    return root


def test_fsdp_equals_ddp_over_ten_steps(runs):
    ddp, fsdp = losses(runs / "ddp"), losses(runs / "fsdp")
    assert len(ddp) == len(fsdp) == 10  # only the main process logs
    assert fsdp == pytest.approx(ddp, rel=1e-5)
    assert_close_weights(ckpt(runs / "fsdp", 10), ckpt(runs / "ddp", 10))
    # every process wrote its shard; the consolidated weights sit beside them
    shards = sorted(p.name for p in (ckpt(runs / "fsdp", 10) / "shards").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]


@pytest.mark.parametrize("resumed", ["fsdp_on_2", "fsdp_on_1", "fsdp_as_ddp"])
def test_fsdp_checkpoint_resumes_on_other_shapes(runs, resumed):
    uninterrupted, continued = losses(runs / "fsdp"), losses(runs / resumed)
    assert len(continued) == RESUMED_STEPS.get(resumed, 10 - STEP)
    assert continued == pytest.approx(uninterrupted[STEP:STEP + len(continued)], rel=1e-5)
    if resumed not in RESUMED_STEPS:
        assert_close_weights(ckpt(runs / resumed, 10), ckpt(runs / "fsdp", 10))


def test_ddp_checkpoint_resumes_as_fsdp(runs):
    assert losses(runs / "ddp_as_fsdp") == pytest.approx(losses(runs / "ddp")[STEP:], rel=1e-5)
    assert_close_weights(ckpt(runs / "ddp_as_fsdp", 10), ckpt(runs / "ddp", 10))


def test_fsdp_trains_the_auxiliary_losses_and_ultramem_as_one_process(runs):
    sharded, one = losses(runs / "fsdp_per_layer"), losses(runs / "one_per_layer")
    assert len(sharded) == 3 and sharded == pytest.approx(one, rel=1e-5)
    assert_close_weights(ckpt(runs / "fsdp_per_layer", 3), ckpt(runs / "one_per_layer", 3))


def test_fsdp_checkpoint_samples_as_the_same_weights_saved_by_ddp(runs, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    sharded = ckpt(runs / "fsdp", 10)
    # the weights as the shards hold them, read by torch's own converter (not racedit's consolidation)
    dcp_to_torch_save(sharded / "shards", tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    for which in ("model", "ema"):
        consolidated = load_weights(sharded, which)
        assert all(torch.equal(consolidated[k], whole[which][k]) for k in consolidated)
    # the same weights saved by the DDP path (the main process's whole state dicts)
    ddp_saved = save_checkpoint(tmp_path / "ddp_saved", 10, model_state=whole["model"], ema_state=whole["ema"],
                                train_state={"step": 10}, config=config(runs / "fsdp", *FSDP))
    for which in ("model", "ema"):
        a, b = load_weights(sharded, which), load_weights(ddp_saved, which)
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), which
    grids = []
    for source in (sharded, ddp_saved):
        out = tmp_path / f"{source.parent.parent.name}.png"
        assert racedit_main(["sample", "--ckpt", str(source), "--out", str(out), "--classes", "0", "1", "--per-class", "2"]) == 0
        with Image.open(out) as image:  # the pixels (the PNG's text metadata names its checkpoint)
            grids.append(np.asarray(image).copy())
    assert np.array_equal(grids[0], grids[1])


def test_damaged_or_missing_shard_is_named(runs, tmp_path):
    for damage in ("truncate", "delete"):
        bad = tmp_path / damage / "step_0000005"
        shutil.copytree(ckpt(runs / "fsdp", STEP), bad)
        shard = bad / "shards" / "__1_0.distcp"
        if damage == "truncate":
            shard.write_bytes(shard.read_bytes()[:-10])
        else:
            shard.unlink()
        with pytest.raises(CheckpointError) as e:
            verify_checkpoint(bad)
        line = str(e.value)
        assert "\n" not in line and "shards/__1_0.distcp" in line
        assert ("missing" if damage == "delete" else "bytes") in line
        with pytest.raises(CheckpointError, match="shards/__1_0.distcp"):  # refused before training starts
            train(config(tmp_path / f"resume_{damage}", *FSDP), resume=str(bad))


def test_distributed_key_is_checked_at_load(tmp_path):
    from racedit.config import ConfigError

    with pytest.raises(ConfigError, match=r"'train.distributed'.*\['ddp', 'fsdp'\]"):
        make_tiny_config(tmp_path, "train.distributed=zero3")
    with pytest.raises(ConfigError, match="train.mixed_precision=fp16 with train.distributed=fsdp"):
        make_tiny_config(tmp_path, "train.distributed=fsdp", "train.mixed_precision=fp16")
