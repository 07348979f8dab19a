"""bench/ep_traffic.py counts what expert parallelism's all-to-alls move: at 2 gloo processes the counted bytes of
a sharded RaceDiT's forward and backward equal the bytes implied by both processes' per-expert row counts
(computed here from the two ranks' masks), the even-load model is within 10% of them, and `shard_experts`
leaves each process exactly 1/2 of the expert weights, whose whole size is counted here from the shapes.

Letters (docs/method/README.md): D width, E experts, k experts per token, h expert hidden, n processes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import run_gloo_workers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import ep_traffic  # noqa: E402


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        m = ep_traffic.measure("test", "RaceDiT-S/2-2in8", 4, None, dist.group.WORLD)
        fwd, bwd = m["counted"]["forward"], m["counted"]["backward"]
        torch.save({"forward_rows": torch.tensor(fwd["rows"]), "forward_counts": torch.tensor(fwd["counts"]),
                    "backward_rows": torch.tensor(bwd["rows"]), "backward_kinds": torch.tensor(len(bwd)),
                    "counts": torch.tensor(m["counts_per_layer"]), "n_sel": torch.tensor(m["n_sel"]),
                    "model_rows": torch.tensor(m["model_per_layer"]["rows"]),
                    "whole": torch.tensor(m["expert_bytes_whole"]), "here": torch.tensor(m["expert_bytes_here"])},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_gloo_workers(worker, tmp_path_factory.mktemp("ep-traffic"), world=2)


def test_counted_bytes_equal_the_rows_the_masks_send(ranks):
    D, E, value_bytes = ep_traffic.SMALL["hidden_size"], 8, 4
    layers = ranks[0]["counts"].shape[0]
    for rank, result in enumerate(ranks):
        other = ranks[1 - rank]["counts"]  # (layers, E)
        mine = slice(rank * E // 2, (rank + 1) * E // 2)
        theirs = [e for e in range(E) if not mine.start <= e < mine.stop]
        rows_out = int(result["counts"][:, theirs].sum())  # my rows bound for the other process's experts
        rows_in = int(other[:, mine].sum())  # its rows for my experts, whose results I send back
        expected = (rows_out + rows_in) * D * value_bytes
        assert result["forward_rows"].tolist() == [expected, expected]
        assert result["backward_rows"].tolist() == [expected, expected]  # the mirror
        assert result["forward_counts"].tolist() == [layers * 8 * E // 2] * 2  # int64 counts for the other half
        assert int(result["backward_kinds"]) == 1  # the backward exchanges rows only
        assert int(result["n_sel"]) == 4 * 64 * 2  # Expert Race local: N*k = B*L*k rows per layer
        assert 0.9 < expected / layers / float(result["model_rows"]) < 1.1
    assert float(ranks[0]["model_rows"]) == 2 * 512 * 0.5 * D * value_bytes


def test_each_process_holds_exactly_half_the_expert_weights(ranks):
    D, E, k, layers = ep_traffic.SMALL["hidden_size"], 8, 2, ep_traffic.SMALL["depth"]
    h = 4 * D // k
    whole = layers * E * (D * h + h + h * D + D) * 4  # w1, b1, w2, b2 in float32
    for result in ranks:
        assert int(result["whole"]) == whole
        assert 2 * int(result["here"]) == whole
