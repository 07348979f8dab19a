"""Sampling a checkpoint of an expert-parallel run: on one process from the consolidated weights (the whole
model), and expert-parallel on 2 gloo processes (E/2 experts each, the MoE forwards in lockstep), which must
write the same npz as one process holding all experts."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_config, run_gloo_workers

from racedit.checkpoint import save_checkpoint
from racedit.cli import main as racedit_main
from racedit.config import ConfigError, check_expert_parallel
from racedit.models import create_model
from racedit.models.moe import moe_layers, threshold_layers, update_thresholds
from racedit.models.records import ForwardRecord
from racedit.sampling import load_for_sampling, write_samples_npz

SEED = 4
MOE = ["model.moe_experts=4", "model.moe_k=1", "model.routing=expert_race", "sample.sampler=ddpm",
       "sample.steps=3", "sample.cfg_scale=2.0"]
# name -> (config overrides, CLI sample flags); "threshold" has 9 images in 5 batches of 2 (the last of 1):
# process 1 idles in the last round; "topk" (batch-coupled eval routing) has 3 images in one batch of 4:
# process 1 samples nothing and runs the forwards of every round alongside process 0
CHECKPOINTS = {
    "threshold": (["model.expert_parallel=2"], ["--num-samples", "9", "--batch-size", "2"]),
    "topk": (["model.inference_routing=topk"], ["--num-samples", "3", "--batch-size", "4", "--expert-parallel", "2"]),
}


def make_checkpoint(root: Path, name: str) -> Path:
    """A tiny 4-expert Race-DiT checkpoint with perturbed weights and, for threshold routing, a tau set by one
    training forward (so that eval routing selects a share of the pairs, batch-independently)."""
    cfg = make_tiny_config(root / name, *MOE, *CHECKPOINTS[name][0])
    torch.manual_seed(0)
    model = create_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        record = ForwardRecord()
        model(torch.randn(16, 1, 8, 8), torch.randint(0, 1000, (16,)).float(), torch.randint(0, 10, (16,)),
              record=record)
        update_thresholds(model, [record.kth_scores()])
    state = model.state_dict()
    return save_checkpoint(root / name / "checkpoints", 5, model_state=state, ema_state=state,
                           train_state={"step": 5}, config=cfg)


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), ACCELERATE_USE_CPU="true",
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)  # forked: the parent's state is not this job's
    out = Path(out_dir)
    ckpt = (out / "ckpt.txt").read_text()
    if out.name == "topk":  # the command line, with --expert-parallel 2 over the checkpoint's 1
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = racedit_main(["sample", "--ckpt", ckpt, *CHECKPOINTS["topk"][1], "--seed", str(SEED),
                                 "--out", str(out / "ep.npz"), "--device", "cpu"])
        (out / f"rank{rank}.json").write_text(json.dumps({"code": code, "stdout": printed.getvalue()}))
        torch.save({}, out / f"rank{rank}.pt")
        return
    state = PartialState(cpu=True)
    refused = []
    for size in (4, 3):  # 4 does not divide the 2 processes, 3 not the 4 experts
        try:
            load_for_sampling(ckpt, expert_parallel=size)
        except ConfigError as e:
            refused.append(str(e))
    loaded = load_for_sampling(ckpt, expert_parallel=None)  # the checkpoint's model.expert_parallel=2
    scfg, target = loaded.config.sample, out / "ep.npz"
    first = write_samples_npz(loaded, 9, target, scfg, seed=SEED, batch_size=2, max_batches=1, progress=False)
    if rank == 0:  # batch 1 (process 1's) changes but keeps its size: found by the final hash, sampled again
        batch = target.with_name(target.name + ".parts") / "batch_0000001.npz"
        data = bytearray(batch.read_bytes())
        data[len(data) // 2] ^= 0xFF
        batch.write_bytes(bytes(data))
    state.wait_for_everyone()  # the damage is done before process 1 looks at the batches again
    second = write_samples_npz(loaded, 9, target, scfg, seed=SEED, batch_size=2, progress=False)
    (out / f"rank{rank}.json").write_text(json.dumps({"refused": refused, "first": str(first),
                                                      "second": str(second)}))
    torch.save({"local_experts": torch.tensor([layer.experts.w1.shape[0] for layer in moe_layers(loaded.model)]),
                "first_expert": torch.tensor([layer.experts.first_expert for layer in moe_layers(loaded.model)])},
               out / f"rank{rank}.pt")
    state.destroy_process_group()


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """name -> (checkpoint, the job's directory, what each of its 2 processes saved)."""
    root = tmp_path_factory.mktemp("ep_sampling")
    done = {}
    for name in CHECKPOINTS:
        ckpt = make_checkpoint(root / "ckpts", name)
        out = root / name
        out.mkdir()
        (out / "ckpt.txt").write_text(str(ckpt))
        saved = run_gloo_workers(worker, out, world=2, timeout=240)
        done[name] = ckpt, out, [{**s, **json.loads((out / f"rank{r}.json").read_text())} for r, s in enumerate(saved)]
    return done


def one_process_npz(ckpt: Path, path: Path, flags: list[str]) -> Path:
    """`racedit sample` on one process, unchanged: the whole model from the consolidated EMA weights."""
    assert racedit_main(["sample", "--ckpt", str(ckpt), *flags, "--seed", str(SEED), "--out", str(path),
                         "--device", "cpu", "--quiet"]) == 0
    return path


def test_an_expert_parallel_config_loads_on_one_process_and_is_checked_at_launch(tmp_path):
    cfg = make_tiny_config(tmp_path, *MOE, "model.expert_parallel=2")  # validate: one process, no refusal
    check_expert_parallel(cfg, 2)
    with pytest.raises(ConfigError, match="'model.expert_parallel': 2 does not divide the 1 process"):
        check_expert_parallel(cfg, 1)  # what the training loop runs with its process count


def test_one_process_samples_the_whole_model_of_an_expert_parallel_checkpoint(jobs, tmp_path):
    ckpt = jobs["threshold"][0]
    loaded = load_for_sampling(ckpt)
    assert loaded.config.model.expert_parallel == 2
    assert [layer.experts.w1.shape[0] for layer in moe_layers(loaded.model)] == [4, 4]
    assert all(layer.expert_group is None for layer in moe_layers(loaded.model))
    assert all(bool(layer.threshold_initialized) for layer in threshold_layers(loaded.model))
    out = one_process_npz(ckpt, tmp_path / "one.npz", CHECKPOINTS["threshold"][1])
    with np.load(out) as z:
        assert z["arr_0"].shape == (9, 8, 8, 3) and len(np.unique(z["arr_0"].reshape(9, -1), axis=0)) == 9


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_two_expert_parallel_processes_write_the_npz_of_one_process(jobs, name, tmp_path):
    ckpt, out, ranks = jobs[name]
    if name == "threshold":
        assert [r["local_experts"].tolist() for r in ranks] == [[2, 2], [2, 2]]  # E/2 each: really sharded
        assert [r["first_expert"].tolist() for r in ranks] == [[0, 0], [2, 2]]
        for r in ranks:
            assert "does not divide the 2 sampling processes" in r["refused"][0]
            assert "does not divide the 4 experts" in r["refused"][1]
            assert r["first"] == "None" and r["second"] == str(out / "ep.npz")  # stopped after 1 batch, resumed
    else:
        assert [r["code"] for r in ranks] == [0, 0]
        assert "experts split over groups of 2" in ranks[0]["stdout"]
    reference = one_process_npz(ckpt, tmp_path / "one.npz", CHECKPOINTS[name][1])
    with np.load(out / "ep.npz") as ep, np.load(reference) as one:
        assert ep["arr_0"].shape == one["arr_0"].shape and np.array_equal(ep["labels"], one["labels"])
        assert np.array_equal(ep["arr_0"], one["arr_0"])
    assert (out / "ep.npz").read_bytes() == reference.read_bytes()  # the metadata too: no record of the split
