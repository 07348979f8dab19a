"""race_scope=global over 2 CPU processes (gloo) equals one process holding the concatenated batch.

Letters (docs/method/README.md): B images per rank, L tokens per image, D width, E experts, k experts per
token on average.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from conftest import run_gloo_workers

from racedit.models.moe import MoEFeedForward, update_thresholds
from racedit.models.records import ForwardRecord
from racedit.models.routing import grouped_topk, grouped_topk_global

L, D, E, K_ACTIVE = 8, 16, 8, 2
RANK_BATCH = (3, 5)  # unequal on purpose: the gather must handle it


def make_layer() -> MoEFeedForward:
    torch.manual_seed(0)
    return MoEFeedForward(D, E, K_ACTIVE, routing="expert_race", race_scope="global").double().train()


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    u = torch.randn(sum(RANK_BATCH), L, D, generator=g, dtype=torch.float64)
    ties = torch.randint(0, 3, (sum(RANK_BATCH), L, E), generator=g).double()  # heavy ties across ranks
    return u, ties


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        start = sum(RANK_BATCH[:rank])
        rows = slice(start, start + RANK_BATCH[rank])
        u, ties = make_batch()
        layer = make_layer()
        results = {}
        for step in range(2):
            record = ForwardRecord()
            results[f"y{step}"] = layer(u[rows], record)
            update_thresholds(layer, [record.kth_scores()])
            results[f"mask{step}"] = record.moe[0].mask
            results[f"kth{step}"] = record.moe[0].kth_score
            results["group_is_world"] = record.moe[0].group is dist.group.WORLD
        results["tau"] = layer.tau.clone()
        results["tie_mask"], results["tie_kth"] = grouped_topk_global(ties[rows], "expert_race", K_ACTIVE)
        torch.save({key: v.detach() if torch.is_tensor(v) else v for key, v in results.items()},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_global_race_equals_single_process_on_concatenated_batch(tmp_path):
    ranks = run_gloo_workers(worker, tmp_path)

    u, ties = make_batch()
    single = make_layer()
    single.router.race_scope = "local"
    for step in range(2):
        record = ForwardRecord()
        y = single(u, record)
        update_thresholds(single, [record.kth_scores()])
        mask = record.moe[0].mask.view(sum(RANK_BATCH), L, E)
        got_mask = torch.cat([r[f"mask{step}"].view(-1, L, E) for r in ranks])
        assert torch.equal(got_mask, mask)
        assert int(got_mask.sum()) == sum(RANK_BATCH) * L * K_ACTIVE
        torch.testing.assert_close(torch.cat([r[f"y{step}"] for r in ranks]), y.detach(), rtol=1e-12, atol=1e-12)
        for r in ranks:
            assert r[f"kth{step}"].item() == record.moe[0].kth_score.item()
    for r in ranks:
        assert r["tau"].item() == single.tau.item()
        assert r["group_is_world"]

    tie_mask, tie_kth = grouped_topk(ties, "expert_race", K_ACTIVE)
    assert torch.equal(torch.cat([r["tie_mask"] for r in ranks]), tie_mask)
    assert all(r["tie_kth"].item() == tie_kth.item() for r in ranks)
