"""race_scope=global by radix select (histogram all_reduces) against the all-gather path and one process.

With 2 and 4 gloo processes holding unequal batches: random float32 and float64 scores, heavy ties (a few
values, -0.0 and +0.0 among them), float32 scores that came from bf16, all-negative scores; the radix mask
equals the gather mask and the mask one process computes on the concatenated batch, and the K-th value is
the same float. `radix_topk` is checked at K = 1 and K = all but one against a sort by (-value, index).
The router losses from all_reduced sums equal the gather path and the single process in float64, gradients
included.

Letters (docs/method/README.md): B images per rank, L tokens per image, E experts, k experts per token on
average, K pairs selected per group, G groups, C candidates of a group.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import run_gloo_workers

from racedit.config import ConfigError, LossConfig
from racedit.models import create_model
from racedit.models.global_select import exact_mean, radix_topk
from racedit.models.losses import auxiliary_losses, balance_loss, router_similarity_loss
from racedit.models.moe import MoEFeedForward
from racedit.models.records import ForwardRecord
from racedit.models.routing import SPANS_BATCH, STRATEGIES, grouped_topk, select_global
from racedit.presets import selected_per_group

L, E = 4, 8
BATCHES = {2: (3, 5), 4: (1, 4, 2, 3)}  # images per rank, unequal on purpose
KINDS = ("random", "ties", "bf16", "negative", "float64")
KS = (1, 2, 7)
G_DIRECT = 3  # groups of the direct radix_topk check
RADIX_BITS = (8, 16)


def scores_of(kind: str, B: int, seed: int) -> torch.Tensor:
    """A batch S (B, L, E) of one score distribution."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, E, generator=g)
    if kind == "ties":
        values = torch.tensor([-1.5, -0.0, 0.0, 2.0])
        return values[torch.randint(0, 4, (B, L, E), generator=g)]
    if kind == "bf16":
        return x.bfloat16().float()
    if kind == "negative":
        return -x.abs() - 1.0
    if kind == "float64":
        return x.double()
    return x


def direct_rows(world: int, kind: str) -> list[torch.Tensor]:
    """Per rank (G_DIRECT, C_r) candidates, C_r unequal, for the direct radix_topk check."""
    full = scores_of(kind, 3 * world, 99).reshape(G_DIRECT, -1)  # world * L * E candidates per group
    sizes = [4 + 8 * r for r in range(world)]  # 4, rest; or 4, 12, 20, rest
    sizes[-1] = full.shape[1] - sum(sizes[:-1])
    return list(full.split(sizes, dim=1))


def valid(strategy: str, B_total: int, k: int) -> bool:
    try:
        selected_per_group(strategy, B_total, L, E, k)
    except ValueError:
        return False
    return True


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        batches = BATCHES[world]
        out = {}
        for kind in KINDS:
            local = scores_of(kind, sum(batches), 7)[sum(batches[:rank]):sum(batches[:rank + 1])]
            for strategy in STRATEGIES:
                for k in KS:
                    if not valid(strategy, sum(batches), k):
                        continue
                    for method in ("radix", "gather"):
                        mask, kth = select_global(local, strategy, k, method=method)
                        out[f"{kind}/{strategy}/{k}/{method}/mask"], out[f"{kind}/{strategy}/{k}/{method}/kth"] = mask, kth
            rows = direct_rows(world, kind)
            C = sum(r.shape[1] for r in rows)
            for K in (1, C // 2, C - 1):
                for bits in RADIX_BITS:
                    chosen, kth = radix_topk(rows[rank], K, dist.group.WORLD, bits_per_round=bits, candidates=C)
                    out[f"{kind}/direct/{K}/{bits}/chosen"], out[f"{kind}/direct/{K}/{bits}/kth"] = chosen, kth
        logits, mask = loss_inputs(world)
        start, rows_here = sum(LOSS_ROWS[world][:rank]), LOSS_ROWS[world][rank]
        for name, fn in (("rsl", router_similarity_loss), ("bal", balance_loss)):
            for method in ("radix", "gather"):
                part = logits[start:start + rows_here].clone().requires_grad_(True)
                loss = fn(part, mask[start:start + rows_here], group=dist.group.WORLD, method=method)
                (grad,) = torch.autograd.grad(loss, part)
                out[f"{name}/{method}"], out[f"{name}/{method}/grad"] = loss.detach(), grad
        out.update(model_step(rank, world))
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


LOSS_ROWS = {2: (6, 10), 4: (3, 9, 1, 7)}


def model_step(rank: int, world: int) -> dict[str, torch.Tensor]:
    """A tiny Race-DiT (race_scope=global) forward with both losses and backward, once per global_select: the
    masks of every layer and the gradients of every parameter, by method."""
    batches = BATCHES[world]
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(sum(batches), 1, 8, 8, generator=g, dtype=torch.float64), torch.rand(sum(batches)) * 999
    y = torch.randint(0, 10, (sum(batches),), generator=g)
    rows = slice(sum(batches[:rank]), sum(batches[:rank + 1]))
    out = {}
    for method in ("radix", "gather"):
        torch.manual_seed(0)
        model = create_model("RaceDiT-S/2-2in8", input_size=8, in_channels=1, num_classes=10, depth=2,
                             hidden_size=32, num_heads=2, learn_sigma=False, race_scope="global",
                             global_select=method).double().train()
        record = ForwardRecord()
        prediction = model(x[rows], t[rows], y[rows], record=record)
        aux = auxiliary_losses(record, LossConfig(router_similarity=1.0, balance=1.0))
        (prediction.square().mean() + sum(aux.values())).backward()
        out[f"model/{method}/methods"] = torch.tensor([r.global_select == method for r in record.moe_layers()])
        out[f"model/{method}/masks"] = torch.stack([r.mask for r in record.moe_layers()])
        out[f"model/{method}/grads"] = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return out


def loss_inputs(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    n = sum(LOSS_ROWS[world])
    return torch.randn(n, E, generator=g, dtype=torch.float64), torch.rand(n, E, generator=g) < 0.3


def sort_reference(values: torch.Tensor, K: int) -> tuple[torch.Tensor, float]:
    """The K largest of a group by a plain sort on (-value, index); -0.0 and +0.0 tie. -> (chosen, K-th value)."""
    order = sorted(range(values.numel()), key=lambda i: (-float(values[i]), i))[:K]
    chosen = torch.zeros(values.numel(), dtype=torch.bool)
    chosen[order] = True
    return chosen, float(values[order[-1]])


@pytest.fixture(scope="module", params=[2, 4], ids=["2proc", "4proc"])
def gloo_results(request, tmp_path_factory) -> tuple[int, list[dict]]:
    """(world, what each rank saved): one run of `worker` per process count, shared by the tests below."""
    world = request.param
    return world, run_gloo_workers(worker, tmp_path_factory.mktemp(f"world{world}"), world=world)


def test_radix_select_equals_gather_and_one_process(gloo_results):
    world, ranks = gloo_results
    batches = BATCHES[world]
    checked = 0
    for kind in KINDS:
        whole = scores_of(kind, sum(batches), 7)
        for strategy in STRATEGIES:
            for k in KS:
                if not valid(strategy, sum(batches), k):
                    continue
                single_mask, single_kth = grouped_topk(whole, strategy, k)
                for method in ("radix", "gather"):
                    key = f"{kind}/{strategy}/{k}/{method}"
                    mask = torch.cat([r[f"{key}/mask"] for r in ranks])
                    assert torch.equal(mask, single_mask), key
                    kths = {r[f"{key}/kth"].item() for r in ranks}
                    assert len(kths) == 1, key
                    if strategy in SPANS_BATCH:  # the same floats as one process, same mean
                        assert kths == {single_kth.float().mean().item()}, key
                    else:  # order-free mean: equals one process's exact mean, within a float32 ulp of its mean
                        assert kths == {exact_mean(single_kth).item()}, key
                        torch.testing.assert_close(exact_mean(single_kth), single_kth.float().mean())
                checked += 1
        rows = direct_rows(world, kind)
        group = torch.cat(rows, dim=1)
        C = group.shape[1]
        for K in (1, C // 2, C - 1):
            for bits in RADIX_BITS:
                chosen = torch.cat([r[f"{kind}/direct/{K}/{bits}/chosen"] for r in ranks], dim=1)
                for g in range(G_DIRECT):
                    ref, ref_kth = sort_reference(group[g], K)
                    assert torch.equal(chosen[g], ref), (kind, K, bits, g)
                    assert all(r[f"{kind}/direct/{K}/{bits}/kth"][g].item() == ref_kth for r in ranks)
    assert checked > 50


def test_global_losses_from_sums_equal_gather_and_one_process(gloo_results):
    world, ranks = gloo_results
    logits, mask = loss_inputs(world)
    for name, fn in (("rsl", router_similarity_loss), ("bal", balance_loss)):
        whole = logits.clone().requires_grad_(True)
        loss = fn(whole, mask)
        (grad,) = torch.autograd.grad(loss, whole)
        for method in ("radix", "gather"):
            for r in ranks:
                assert r[f"{name}/{method}"].item() == pytest.approx(loss.item(), rel=1e-12)
            # data-parallel training averages the ranks' gradients: that average is the global loss's gradient
            averaged = torch.cat([r[f"{name}/{method}/grad"] for r in ranks]) / world
            torch.testing.assert_close(averaged, grad, rtol=1e-10, atol=1e-13)


def test_model_trains_the_same_with_either_method(gloo_results):
    world, ranks = gloo_results
    for r in ranks:
        assert r["model/radix/methods"].all() and r["model/gather/methods"].all()  # the config reaches the records
        assert torch.equal(r["model/radix/masks"], r["model/gather/masks"])
        torch.testing.assert_close(r["model/radix/grads"], r["model/gather/grads"], rtol=1e-9, atol=1e-12)


def test_global_select_key_is_validated(tiny_config):
    assert tiny_config().model.global_select == "radix"
    assert tiny_config("model.global_select=gather").model.global_select == "gather"
    with pytest.raises(ConfigError, match="model.global_select"):
        tiny_config("model.global_select=allgather")
    with pytest.raises(ValueError, match="global_select"):
        MoEFeedForward(16, E, 2, global_select="allgather")
    with pytest.raises(ValueError, match="method"):
        select_global(torch.randn(2, L, E), "expert_race", 2, method="allgather")


def test_resume_may_switch_the_method_but_not_the_scope(tiny_config, tmp_path):
    from racedit.training.resume import resume_changes

    saved = tiny_config("model.race_scope=global")
    changes = resume_changes(saved, tiny_config("model.race_scope=global", "model.global_select=gather"),
                             tmp_path, 0)
    assert changes == {"model.global_select": ("radix", "gather")}
    with pytest.raises(ConfigError, match="model.race_scope"):
        resume_changes(saved, tiny_config(), tmp_path, 0)
