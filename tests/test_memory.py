"""Memory layers (pkm, ultramem, ultramemv2): equivalence at init, retrieval against brute force, the
embedding-bag gather, the fixed address shuffle through checkpoints, LR groups, costs, and a training run."""

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_config

from racedit.checkpoint import latest_checkpoint, load_into, load_weights, save_checkpoint
from racedit.config import ConfigError, load_config
from racedit.models import count_macs, count_params, create_model
from racedit.models.memory import (
    ProductKeyMemory,
    TuckerRetrieval,
    product_key_topk,
    tucker_topk,
    variance_matching_std,
    weighted_bag,
)
from racedit.models.records import ForwardRecord
from racedit.training.loop import ema_avg_fn, group_lr_lambda, param_groups, train

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("pkm", "ultramem", "ultramemv2")
TINY = dict(input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=32, num_heads=2, learn_sigma=True)
SMALL_MEMORY = dict(memory_keys=8, memory_topk=4)


def _inputs(batch: int = 4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(batch, generator=g, dtype=torch.float64) * 1000
    y = torch.randint(0, 10, (batch,), generator=g)
    return x, t, y


def _randomise_gates(model, std: float = 0.2) -> None:
    """Non-zero block gates and output layer, so the blocks (but not the memory layers) really act."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for block in model.blocks:
            block.adaLN_modulation[-1].weight.normal_(0, std, generator=g)
            block.adaLN_modulation[-1].bias.normal_(0, std, generator=g)
        model.final_layer.linear.weight.normal_(0, std, generator=g)
        model.final_layer.adaLN_modulation[-1].weight.normal_(0, std, generator=g)


# ------------------------------------------------------------------------------------------------ equivalence

@pytest.mark.parametrize("name", ["DiT-S/2", "RaceDiT-S/2-2in4"])
@pytest.mark.parametrize("kind", KINDS)
def test_fresh_model_with_memory_equals_model_without(kind, name):
    torch.manual_seed(0)
    base = create_model(name, **TINY).double().train()
    _randomise_gates(base)
    model = create_model(name, memory=kind, **SMALL_MEMORY, **TINY).double().train()
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(".memory." in k for k in result.missing_keys)
    x, t, y = _inputs()
    ref = base(x, t, y)
    rec = ForwardRecord(diagnostics=True)
    out = model(x, t, y, record=rec)
    assert ref.abs().max() > 1e-2
    assert torch.equal(out, ref)  # exactly: the memory branch enters through a zero gate
    assert sorted(rec.memory) == [0, 1]
    # ... and the test can fail: an open gate changes the output.
    with torch.no_grad():
        model.blocks[1].memory.adaLN_gate[-1].bias.fill_(0.5)
    assert (model(x, t, y) - ref).abs().max() > 1e-6


def test_memory_blocks_selects_blocks_and_rejects_bad_indices():
    model = create_model("DiT-S/2", memory="ultramemv2", memory_blocks=[1], **SMALL_MEMORY, **TINY)
    assert model.blocks[0].memory is None and model.blocks[1].memory is not None
    assert all(b.memory is not None for b in create_model("DiT-S/2", memory="pkm", **SMALL_MEMORY, **TINY).blocks)
    with pytest.raises(ConfigError, match="memory_blocks"):
        create_model("DiT-S/2", memory="pkm", memory_blocks=[2], **SMALL_MEMORY, **TINY)
    with pytest.raises(ConfigError, match="memory_value_dim"):
        create_model("DiT-S/2", memory="pkm", memory_value_dim=16, **SMALL_MEMORY, **TINY)


def test_config_rejects_bad_memory_values(tmp_path):
    with pytest.raises(ConfigError, match="memory_expansion"):
        make_tiny_config(tmp_path, "model.memory=ultramem", "model.memory_expansion=3")
    with pytest.raises(ConfigError, match="memory_share"):
        make_tiny_config(tmp_path, "model.memory=ultramemv2", "model.memory_share=1.5")


# ------------------------------------------------------------------------------------------------ retrieval

@pytest.mark.parametrize("n_key,m_read", [(6, 1), (6, 4), (12, 6), (5, 5)])
def test_product_key_topk_equals_brute_force_over_all_slots(n_key, m_read):
    g = torch.Generator().manual_seed(n_key * 10 + m_read)
    s_row = torch.randn(7, 2, n_key, generator=g, dtype=torch.float64)
    s_col = torch.randn(7, 2, n_key, generator=g, dtype=torch.float64)
    scores, slots = product_key_topk(s_row, s_col, m_read)
    full = (s_row.unsqueeze(-1) + s_col.unsqueeze(-2)).flatten(-2)  # (..., n_key*n_key), slot a*n_key + b
    best, best_slots = full.topk(m_read, dim=-1)
    torch.testing.assert_close(scores, best)
    assert torch.equal(slots.sort(-1).values, best_slots.sort(-1).values)


def test_pkm_layer_reads_the_brute_force_top_m():
    torch.manual_seed(0)
    layer = ProductKeyMemory(16, keys=5, topk=3, heads=2).double()
    x = torch.randn(9, 16, dtype=torch.float64)
    out, slots = layer.read(x)
    q = layer.query_norm(layer.query(x).view(9, 2, 2, layer.key_dim))
    s = torch.einsum("qhsk,hsnk->qhsn", q, layer.keys)
    full = (s[:, :, 0].unsqueeze(-1) + s[:, :, 1].unsqueeze(-2)).flatten(-2)  # (N, n_head, 25)
    best, idx = full.topk(3, dim=-1)
    assert torch.equal(slots.view(9, 2, 3).sort(-1).values, idx.sort(-1).values)
    expected = torch.einsum("qhm,qhmd->qd", best.softmax(-1), layer.tables.values[idx])
    torch.testing.assert_close(out, expected)


def _rank1_cores(heads: int, cores: int, r: int, positive: bool, g: torch.Generator) -> torch.Tensor:
    """Cores (n_head, n_core, r, r) whose sum is rank 1 (each core alone is not)."""
    u, t = torch.rand(heads, r, generator=g, dtype=torch.float64), torch.rand(heads, r, generator=g, dtype=torch.float64)
    if not positive:
        u, t = u - 0.5, t - 0.5
    total = 1.5 * u.unsqueeze(-1) * t.unsqueeze(-2)
    parts = torch.randn(heads, cores - 1, r, r, generator=g, dtype=torch.float64)
    return torch.cat([parts, (total - parts.sum(1)).unsqueeze(1)], dim=1)


def _svd_u_t(cores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    left, _, right_t = torch.linalg.svd(cores.sum(1))
    return left[..., :, 0], right_t[..., 0, :]


def _tucker_brute_force(s_row, s_col, cores, m_read):
    full = torch.einsum("qhra,hirs,qhsb->qhiab", s_row, cores, s_col)  # (N, n_head, n_core, n_vkey, n_vkey)
    per_core = full.flatten(-2)
    best, idx = per_core.sum(2).topk(m_read, dim=-1)
    return best, idx, per_core


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("r,n_core,n_vkey,m_read", [(2, 2, 10, 4), (3, 1, 8, 3), (2, 3, 6, 6)])
def test_tucker_prefilter_is_exact_for_a_rank1_core(signed, r, n_core, n_vkey, m_read):
    """The paper's pre-filter (top-m_read rows and columns under u^T s_row and t^T s_col) is exact for a
    rank-1 core when those rank-1 scores are positive; the signed pre-filter is exact whatever the signs."""
    g = torch.Generator().manual_seed(r * 100 + n_core * 10 + n_vkey)
    N, n_head = 6, 2
    cores = _rank1_cores(n_head, n_core, r, positive=not signed, g=g)
    s_row = torch.randn(N, n_head, r, n_vkey, generator=g, dtype=torch.float64)
    s_col = torch.randn(N, n_head, r, n_vkey, generator=g, dtype=torch.float64)
    u, t = _svd_u_t(cores)
    if not signed:  # positive u, t (up to the SVD's joint sign) and positive key scores
        sign = torch.sign(u.sum(-1, keepdim=True))
        u, t = u * sign, t * sign
        s_row, s_col = s_row.abs(), s_col.abs()
    core_scores, slots = tucker_topk(s_row, s_col, cores, u, t, m_read, signed=signed)
    best, idx, per_core = _tucker_brute_force(s_row, s_col, cores, m_read)
    assert torch.equal(slots.sort(-1).values, idx.sort(-1).values)
    torch.testing.assert_close(core_scores.sum(2), best)
    expected = per_core.gather(-1, slots.unsqueeze(2).expand(N, n_head, n_core, m_read))
    torch.testing.assert_close(core_scores, expected)


def test_ultramem_retrieval_with_rank1_core_matches_brute_force_after_refresh():
    torch.manual_seed(0)
    ret = TuckerRetrieval(16, keys=7, topk=4, heads=1, key_dim=8, rank=2, cores=2, query_per_rank=True,
                          norm_gain=1.0, prefilter_signed=True).double()
    ret.initialize_weights()
    with torch.no_grad():
        ret.cores.copy_(_rank1_cores(1, 2, 2, positive=False, g=torch.Generator().manual_seed(3)))
    ret.refresh()  # the pre-filter follows the new cores
    x = torch.randn(5, 16, dtype=torch.float64)
    core_scores, slots = ret(x)
    q = ret.query_norm(ret.query(x).view(5, 1, 2, 2, 8))
    s = torch.einsum("qhsrk,hsrnk->qhsrn", q, ret.key_norm(ret.keys))
    best, idx, _ = _tucker_brute_force(s[:, :, 0], s[:, :, 1], ret.cores, 4)
    assert torch.equal(slots.sort(-1).values, idx.sort(-1).values)
    torch.testing.assert_close(core_scores.sum(2), best)


def test_refresh_is_the_top_singular_pair_and_keeps_its_sign():
    torch.manual_seed(0)
    ret = TuckerRetrieval(8, keys=4, topk=2, heads=3, key_dim=4, rank=3, cores=2, query_per_rank=False,
                          norm_gain=1.0, prefilter_signed=False)
    ret.initialize_weights()
    u0 = ret.prefilter_u.clone()
    core = ret.cores.detach().sum(1).double()
    sigma = torch.linalg.svdvals(core)[:, 0]
    recon = torch.einsum("hr,hs->hrs", ret.prefilter_u.double(), ret.prefilter_t.double()) * sigma[:, None, None]
    assert torch.allclose(torch.einsum("hr,hrs,hs->h", ret.prefilter_u.double(), core, ret.prefilter_t.double()),
                          sigma, atol=1e-5)
    assert (recon - core).norm() < core.norm()  # the rank-1 part, not something else
    with torch.no_grad():
        ret.cores.add_(0.01 * torch.randn_like(ret.cores))
    ret.refresh()
    assert ((ret.prefilter_u * u0).sum(-1) > 0.9).all()  # aligned with the previous step


# ------------------------------------------------------------------------------------------------ gather

@pytest.mark.parametrize("n_core,blocks", [(1, 1), (2, 1), (2, 4), (1, 3), (3, 4)])
def test_weighted_bag_equals_naive_gather_and_sum(n_core, blocks):
    g = torch.Generator().manual_seed(n_core * 10 + blocks)
    n_slot, Dv, N, J = 11, 6 * n_core, 5, 9
    table = torch.randn(n_slot, Dv, generator=g, dtype=torch.float64, requires_grad=True)
    slots = torch.randint(0, n_slot, (N, J), generator=g)  # with repeats
    slots[0, :3] = 4
    weights = torch.randn(N, J, n_core, generator=g, dtype=torch.float64, requires_grad=True)
    block = torch.randint(0, blocks, (N, J), generator=g) if blocks > 1 else None
    out = weighted_bag(table, slots, weights, block, blocks)
    # naive (N, J, n_core, Dv/n_core)
    gathered = table[slots].view(N, J, n_core, Dv // n_core) * weights.unsqueeze(-1)
    onehot = F.one_hot(block, blocks).double() if block is not None else torch.ones(N, J, 1, dtype=torch.float64)
    naive = torch.einsum("qjhc,qjp->qphc", gathered, onehot).reshape(N, blocks, Dv)
    torch.testing.assert_close(out, naive)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * upstream).sum(), (table, weights))
    naive_grads = torch.autograd.grad((naive * upstream).sum(), (table, weights))
    for a, b in zip(grads, naive_grads):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------ shuffle

def test_ive_shuffle_is_a_fixed_permutation_saved_in_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_model("DiT-S/2", memory="ultramem", memory_expansion=4, **SMALL_MEMORY, **TINY)
    layer = model.blocks[0].memory
    shuffle = layer.address_shuffle.clone()
    assert torch.equal(shuffle.sort().values.long(), torch.arange(4 * 64))
    assert not torch.equal(shuffle.long(), torch.arange(4 * 64))
    assert "blocks.0.memory.address_shuffle" in model.state_dict()
    assert all(p is not layer.address_shuffle for p in model.parameters())
    model.initialize_weights()  # re-initialising the weights keeps the shuffle
    assert torch.equal(layer.address_shuffle, shuffle)
    # the EMA copy keeps it bit for bit (an averaged integer buffer would be rounded)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_avg_fn(0.9999), use_buffers=True)
    for _ in range(3):
        ema.update_parameters(model)
    assert torch.equal(ema.module.blocks[0].memory.address_shuffle, shuffle)

    _randomise_gates(model)
    with torch.no_grad():
        for block in model.blocks:
            block.memory.adaLN_gate[-1].bias.fill_(0.3)
    model.eval()
    x, t, y = (v.float() if v.is_floating_point() else v for v in _inputs())
    out = model(x, t, y)
    ckpt = save_checkpoint(tmp_path / "ckpts", 1, model_state=model.state_dict(), ema_state=ema.module.state_dict(),
                           train_state={"step": 1}, config=load_config(None, []))
    torch.manual_seed(123)  # another seed draws another shuffle
    fresh = create_model("DiT-S/2", memory="ultramem", memory_expansion=4, **SMALL_MEMORY, **TINY).eval()
    assert not torch.equal(fresh.blocks[0].memory.address_shuffle, shuffle)
    load_into(fresh, load_weights(ckpt, "model"), "test checkpoint")
    assert torch.equal(fresh.blocks[0].memory.address_shuffle, shuffle)
    assert torch.equal(fresh(x, t, y), out)


# ------------------------------------------------------------------------------------------------ optimizer

def test_value_tables_get_their_own_group_and_schedule():
    model = create_model("DiT-S/2", memory="ultramemv2", memory_value_lr_scale=4.0, memory_value_lr_decay=0.5,
                         **SMALL_MEMORY, **TINY)
    groups = param_groups(model, 0.1)
    memory_groups = [g for g in groups if g["name"] == "memory_values"]
    assert len(memory_groups) == 2 and all(g["weight_decay"] == 0.0 for g in memory_groups)
    tables = {id(p) for b in model.blocks for p in b.memory.tables.parameters()}
    assert {id(p) for g in memory_groups for p in g["params"]} == tables
    assert all(id(p) not in tables for g in groups if g["name"] != "memory_values" for p in g["params"])

    decayed = group_lr_lambda(memory_groups[0], warmup=0, total_steps=100)
    assert [decayed(s) for s in (0, 25, 50, 99)] == [4.0, 2.5, 1.0, 1.0]
    constant = group_lr_lambda({"lr_scale": 2.0}, warmup=4, total_steps=100)
    assert [constant(s) for s in (0, 3, 50)] == [0.5, 2.0, 2.0]
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [group_lr_lambda(g, 0, 100) for g in optimizer.param_groups])
    for _ in range(25):
        optimizer.step()
        scheduler.step()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["decay"] == pytest.approx(1e-3) and lrs["memory_values"] == pytest.approx(2.5e-3)


# ------------------------------------------------------------------------------------------------ costs

def test_params_and_macs_of_the_memory_layers():
    dense = create_model("DiT-S/2", **TINY)
    L, d = 16, 32
    for kind in KINDS:
        model = create_model("DiT-S/2", memory=kind, **SMALL_MEMORY, **TINY)
        layers = [b.memory for b in model.blocks]
        extra = sum(p.numel() for m in layers for p in m.parameters())
        assert count_params(model)["total"] - count_params(dense)["total"] == extra
        tables = sum(p.numel() for m in layers for p in m.tables.parameters())
        unused = tables * (1 - min(1.0, 4 / 64))  # one token reads J = 4 of the 64 slots
        assert count_params(model)["activated"] == pytest.approx(count_params(model)["total"] - unused, abs=2)
        assert count_macs(model) - count_macs(dense) == sum(L * m.read_macs_per_token() + d * d for m in layers)
    # ultramemv2 sizes Dk so that memory is memory_share of block + memory compute
    model = create_model("DiT-S/2", memory="ultramemv2", memory_keys=32, memory_topk=8, **{**TINY, "hidden_size": 128})
    block = model.blocks[0]
    share = block.memory.read_macs_per_token() * 16 / block.macs(16)
    assert share == pytest.approx(0.17, abs=0.02)


def test_dit_xl_ultramemv2_table_size_and_init():
    """The DiT-XL preset (configs/imagenet256/memory-xl2-ultramemv2.yaml): n_key = 512 (262,144 slots),
    Dv = 216, Dp = 72 -> 75.5M table parameters per layer; the fourth-root init gives 0.066 for UltraMemV2's
    227M config (0.0044 with the printed square; docs/method/memory.md)."""
    with torch.device("meta"):
        model = create_model("DiT-XL/2", memory="ultramemv2", memory_keys=512, memory_topk=94)
    layer = model.blocks[0].memory
    assert (layer.value_dim, layer.prevalue_dim) == (216, 72)
    assert sum(p.numel() for p in layer.tables.parameters()) == 262_144 * 288
    assert variance_matching_std(768, 20, 3.25, 32, 1, 192, 192) == pytest.approx(0.066, abs=5e-4)


def test_memory_configs_load_and_build():
    paths = [ROOT / "configs" / "digits-ultramemv2.yaml", *sorted((ROOT / "configs" / "imagenet256").glob("memory-*.yaml"))]
    assert len(paths) >= 4
    for path in paths:
        cfg = load_config(path, [])
        assert cfg.model.memory != "none"
        with torch.device("meta"):
            model = create_model(cfg.model)
        assert any(b.memory is not None for b in model.blocks), path


# ------------------------------------------------------------------------------------------------ training

def test_digits_ultramemv2_with_expert_race_trains(tmp_path):
    run = tmp_path / "run"
    cfg = make_tiny_config(run, "model.name=RaceDiT-S/2-2in4", "model.memory=ultramemv2", "model.memory_keys=8",
                           "model.memory_topk=4", "model.memory_expansion=4", "model.memory_value_lr_scale=4.0",
                           "model.memory_value_lr_decay=0.5", "train.steps=30", "train.lr=3e-3", "train.ckpt_every=10", "train.keep_last=5")
    train(cfg)
    with open(run / "metrics.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # the loss falls
    ckpt = latest_checkpoint(run / "checkpoints")
    early, after, ema = (load_weights(run / "checkpoints" / "step_0000010", "model"), load_weights(ckpt, "model"),
                         load_weights(ckpt, "ema"))
    for key in ("blocks.0.memory.tables.values", "blocks.0.memory.tables.prevalues",
                "blocks.1.memory.adaLN_gate.1.bias", "blocks.0.memory.retrieval.cores"):
        assert not torch.equal(after[key], early[key]), key  # the memory layers learn, the gate opens
    shuffle = "blocks.0.memory.address_shuffle"
    assert torch.equal(after[shuffle].sort().values.long(), torch.arange(4 * 64))
    assert torch.equal(after[shuffle], early[shuffle]) and torch.equal(ema[shuffle], after[shuffle])
    # the pre-filter was refreshed from the trained cores (model and EMA alike)
    for state in (after, ema):
        u, _ = _svd_u_t(state["blocks.0.memory.retrieval.cores"].double())
        got = state["blocks.0.memory.retrieval.prefilter_u"].double()
        torch.testing.assert_close(got.abs(), u.abs(), atol=1e-5, rtol=0)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    scales = [g.get("lr_scale") for g in state["optimizer"]["param_groups"]]
    assert scales.count(4.0) == 2
