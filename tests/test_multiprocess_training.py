"""Two-process CPU training (DDP over gloo, set up by accelerate from the launcher's environment variables)
on stored latents equals one process with the same global batch; a 2-process run resumes on 1 process.

The two processes are laid out as two one-process "nodes" (RANK 0 and 1, LOCAL_RANK 0 on both), the case
where using the global rank as a device index breaks: each must still get device index 0.
"""

from __future__ import annotations

import csv
import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port

from racedit.checkpoint import load_weights
from racedit.config import load_config
from racedit.data.latent_extract import extract_latents
from racedit.testing import save_standin_vae, write_standin_image_folder
from racedit.training.loop import train

TINY_LATENT_RUN = [
    "model.name=DiT-S/2", "model.input_size=4", "model.in_channels=4", "model.num_classes=3",
    "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "model.patch_size=2",
    "data.kind=latents", "data.num_workers=0",
    "train.steps=7", "train.global_batch=8", "train.lr=1e-3", "train.ema_decay=0.9", "train.log_every=1",
    "train.ckpt_every=3", "train.sample_every=0", "train.seed=5",
]


def worker(rank: int, world: int, port: int, overrides: list[str], result_dir: str) -> None:
    # what a launcher (accelerate launch / torchrun) puts in the environment of each process
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from accelerate import PartialState

    train(load_config(None, overrides), stop_after=3)
    state = PartialState()
    torch.save({"device_index": state.device.index, "process_index": state.process_index,
                "num_processes": state.num_processes}, f"{result_dir}/rank{rank}.pt")


def losses(run_dir) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def assert_same_weights(ckpt_a, ckpt_b) -> None:
    for which in ("model", "ema"):
        a, b = load_weights(ckpt_a, which), load_weights(ckpt_b, which)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{which}.{k}")


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    images = write_standin_image_folder(root / "images", num_classes=3, per_class=8, size=36, corrupt=False)
    vae = save_standin_vae(root / "vae")
    extract_latents(images, vae, root / "latents", image_size=32, batch_size=8, shard_size=10, num_workers=0,
                    progress=False)
    return root / "latents"


def test_two_processes_equal_one_and_resume_on_one(latents, tmp_path):
    base = [*TINY_LATENT_RUN, f"data.latents={latents}"]
    ref_dir, mp_dir = tmp_path / "one", tmp_path / "two"

    mp.spawn(worker, args=(2, free_port(), [*base, f"train.out_dir={mp_dir}"], str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["process_index"] for r in ranks] == [0, 1] and all(r["num_processes"] == 2 for r in ranks)
    assert all(r["device_index"] == 0 for r in ranks)  # LOCAL_RANK, not the global rank

    train(load_config(None, [*base, f"train.out_dir={ref_dir}"]), stop_after=6)
    ref = losses(ref_dir)
    assert len(ref) == 6
    two = losses(mp_dir)
    assert len(two) == 3  # only the main process logs
    assert two == pytest.approx(ref[:3], rel=1e-5)
    assert_same_weights(mp_dir / "checkpoints" / "step_0000003", ref_dir / "checkpoints" / "step_0000003")
    assert not (mp_dir / "checkpoints" / "step_0000006").exists()

    # the 2-process run continues on 1 process exactly like the 1-process run did
    train(load_config(None, [*base, f"train.out_dir={mp_dir}"]), resume=True, stop_after=3)
    assert losses(mp_dir) == pytest.approx(ref, rel=1e-5)
    assert_same_weights(mp_dir / "checkpoints" / "step_0000006", ref_dir / "checkpoints" / "step_0000006")
