"""`model.expert_parallel` in the training loop, on 2 and 4 CPU processes (gloo): it trains as one process holding
the whole batch, with DDP and with FSDP for the non-expert weights, as one expert group or as data x expert = 2 x 2;
its checkpoints hold every expert (consolidated safetensors, DCP shards) and resume with another expert-parallel size,
1 included (on one process), continuing the same run.

A module fixture runs every training job once (forked workers); the tests read what they left. The model is a tiny
Race-DiT whose global Expert Race selects what one process would (`race_scope=global`), with activation
checkpointing in the FSDP runs. Float32 training: the tolerances are the FSDP tests' (tests/test_fsdp.py says why
not bitwise); tests/test_expert_parallel.py checks the same in float64 to 1e-10.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close_weights, launched_as, make_tiny_config, run_gloo_workers
from conftest import logged_losses as losses
from PIL import Image

import racedit.training.loop as loop_mod
from racedit.checkpoint import load_weights, verify_checkpoint
from racedit.config import ConfigError
from racedit.models.compiling import compile_model
from racedit.training.loop import train

RACE = ["model.moe_experts=4", "model.moe_k=1", "model.routing=expert_race", "model.race_scope=global",
        "loss.balance=0.01", "train.steps=6", "train.ckpt_every=3", "train.keep_last=5", "train.grad_clip=0.05"]
STEP = 3  # where the runs that resume start
FSDP = ["train.distributed=fsdp", "train.grad_checkpointing=true"]


def config(out_dir, *overrides):
    return make_tiny_config(out_dir, *RACE, *overrides)


def ckpt(root, step):
    return root / "checkpoints" / f"step_{step:07d}"


# run name -> (processes, overrides, the run and step it resumes from)
JOBS = {
    "one": (1, [], None),
    "ep2": (2, ["model.expert_parallel=2", "train.grad_checkpointing=true"], None),
    "ep2_fsdp": (2, ["model.expert_parallel=2", *FSDP], None),
    "ep4": (4, ["model.expert_parallel=4"], None),
    "dp2_ep2_fsdp": (4, ["model.expert_parallel=2", *FSDP], None),
    "ep2_on_1": (1, [], ("ep2", STEP)),  # an expert-parallel checkpoint resumed on one process
    "ep4_as_2x2": (4, ["model.expert_parallel=2"], ("ep4", STEP)),  # another expert-parallel size
    "ep2_fsdp_on_1": (1, [], ("ep2_fsdp", STEP)),
    "one_as_ep2": (2, ["model.expert_parallel=2"], ("one", STEP)),  # a one-process checkpoint, expert-parallel
    # FSDP without expert parallelism (its experts in 1-D FSDP shards) and a one-process checkpoint, resumed as
    # expert-parallel FSDP: the shards become expert shards; the whole optimizer state is cut to each process's
    "fsdp2": (2, FSDP, None),
    "fsdp2_as_ep2_fsdp": (2, ["model.expert_parallel=2", *FSDP], ("fsdp2", STEP)),
    "one_as_ep2_fsdp": (2, ["model.expert_parallel=2", *FSDP], ("one", STEP)),
    # accumulated micro-batches: the expert gradients are reduced once, at the last (token choice: a selection
    # per token, so the same pairs however the batch is split)
    "ddp2_accum": (2, ["train.grad_accum=2", "model.routing=token_choice"], None),
    "ep2_accum": (2, ["train.grad_accum=2", "model.routing=token_choice", "model.expert_parallel=2"], None),
    # torch.compile (traced with aot_eager to keep the suite fast): the whole model under DDP, per block under FSDP
    "ep2_compile": (2, ["model.expert_parallel=2", "train.compile=true"], None),
    "ep2_fsdp_compile": (2, ["model.expert_parallel=2", "train.compile=true", *FSDP], None),
}


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    launched_as(rank, world, port)
    loop_mod.compile_model = functools.partial(compile_model, backend="aot_eager")  # this child's copy only
    run = Path(out_dir)
    _, overrides, source = JOBS[run.name]
    train(config(run, *overrides), resume=source and str(ckpt(run.parent / source[0], source[1])))
    torch.save({}, run / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep")
    for name, (world, _, _) in JOBS.items():  # in order: a resumed run after the run it resumes
        run_gloo_workers(worker, root / name, world=world, timeout=300)
    return root


@pytest.mark.parametrize("run", ["ep2", "ep2_fsdp", "ep4", "dp2_ep2_fsdp", "ep2_compile", "ep2_fsdp_compile"])
def test_expert_parallel_trains_as_one_process(runs, run):
    one = losses(runs / "one")
    assert len(one) == 6
    assert losses(runs / run) == pytest.approx(one, rel=1e-5)
    # the consolidated checkpoint holds all E experts, equal to the one-process run's
    assert load_weights(ckpt(runs / run, 6), "ema")["blocks.0.mlp.experts.w1"].shape[0] == 4
    assert_close_weights(ckpt(runs / run, 6), ckpt(runs / "one", 6))


def test_expert_parallel_accumulates_as_data_parallel(runs):
    assert losses(runs / "ep2_accum") == pytest.approx(losses(runs / "ddp2_accum"), rel=1e-6)
    assert_close_weights(ckpt(runs / "ep2_accum", 6), ckpt(runs / "ddp2_accum", 6))


def test_expert_shards_are_dcp_files_of_every_process(runs, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    sharded = ckpt(runs / "ep4", 6)
    shards = sorted(p.name for p in (sharded / "shards").iterdir())
    assert shards == [".metadata", *(f"__{r}_0.distcp" for r in range(4))]
    manifest = json.loads((sharded / "manifest.json").read_text())
    assert {f"shards/{name}" for name in shards} <= set(manifest["files"])
    verify_checkpoint(sharded)
    # the experts as the shards hold them, read by torch's own converter, are the consolidated ones
    dcp_to_torch_save(sharded / "shards", tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    for which in ("model", "ema"):
        consolidated = load_weights(sharded, which)
        assert consolidated.keys() == whole[which].keys()
        assert all(torch.equal(consolidated[k], whole[which][k]) for k in consolidated), which


@pytest.mark.parametrize("run", ["ep2", "ep2_fsdp", "ep4", "dp2_ep2_fsdp", "ep4_as_2x2", "one_as_ep2"])
def test_sample_grids_gathered_from_the_expert_shards(runs, run):
    """The end-of-run grid samples the EMA gathered from the expert shards: the one-process run's pixels."""
    with Image.open(runs / "one" / "samples" / "step_0000006.png") as a, \
            Image.open(runs / run / "samples" / "step_0000006.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("resumed", ["ep2_on_1", "ep4_as_2x2", "ep2_fsdp_on_1", "one_as_ep2", "fsdp2_as_ep2_fsdp",
                                     "one_as_ep2_fsdp"])
def test_resume_with_another_expert_parallel_size(runs, resumed):
    source = JOBS[resumed][2][0]
    uninterrupted, continued = losses(runs / source), losses(runs / resumed)
    assert len(continued) == 6 - STEP
    assert continued == pytest.approx(uninterrupted[STEP:], rel=1e-5)
    assert_close_weights(ckpt(runs / resumed, 6), ckpt(runs / source, 6))


def test_expert_parallel_key_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="'model.expert_parallel': 3 does not divide the 4 experts"):
        config(tmp_path, "model.expert_parallel=3")
    with pytest.raises(ConfigError, match="model.expert_parallel=2 splits the experts of MoE layers, but model"):
        make_tiny_config(tmp_path, "model.expert_parallel=2")
    with pytest.raises(ConfigError, match="'model.expert_parallel': 0. Must be >= 1"):
        config(tmp_path, "model.expert_parallel=0")
    with pytest.raises(ConfigError, match="fp16 with model.expert_parallel=2"):
        config(tmp_path, "model.expert_parallel=2", "train.mixed_precision=fp16")
    with pytest.raises(ConfigError, match="'model.expert_parallel': 2 does not divide the 1 process"):
        train(config(tmp_path / "one", "model.expert_parallel=2"))
