"""Routing diagnostics on hand-built masks with known answers, and their logging by the training loop.

Letters (docs/method/README.md): B images, L tokens per image, N = B*L tokens, E experts.
"""

from __future__ import annotations

import csv
import itertools
import math

import pytest
import torch

from racedit.diffusion.objectives import DDPMObjective, FlowObjective
from racedit.models.records import ForwardRecord, MoELayerRecord
from racedit.models.routing_stats import (
    co_activation,
    combination_curve,
    combination_usage,
    combination_usage_from_counts,
    diagnostics_due,
    experts_per_token_by_timestep,
    max_violation,
    routing_diagnostics,
    timestep_fraction,
    token_timestep_bins,
    zero_expert_fraction,
)


def mask_from_counts(E: int, per_expert: list[int]) -> torch.Tensor:
    """Single-expert tokens: per_expert[e] tokens routed to expert e only."""
    rows = [e for e, n in enumerate(per_expert) for _ in range(n)]
    mask = torch.zeros(len(rows), E, dtype=torch.bool)
    mask[torch.arange(len(rows)), torch.tensor(rows)] = True
    return mask


def mask_from_pairs(E: int, pair_counts: dict[tuple[int, int], int]) -> torch.Tensor:
    """Two-expert tokens: pair_counts[(i, j)] tokens routed to exactly experts i and j."""
    rows = [pair for pair, n in pair_counts.items() for _ in range(n)]
    mask = torch.zeros(len(rows), E, dtype=torch.bool)
    for t, (i, j) in enumerate(rows):
        mask[t, [i, j]] = True
    return mask


def test_max_violation_known_answers():
    assert max_violation(mask_from_counts(4, [4, 2, 2, 0])).item() == pytest.approx(1.0)  # (4 - 2) / 2
    assert max_violation(mask_from_counts(4, [3, 3, 3, 3])).item() == 0.0
    assert max_violation(mask_from_counts(8, [5, 0, 0, 0, 0, 0, 0, 0])).item() == pytest.approx(7.0)  # E - 1
    assert math.isnan(max_violation(torch.zeros(3, 4, dtype=torch.bool)).item())


def test_combination_usage_known_answers():
    E = 4  # 6 pairs
    all_pairs = {p: 2 for p in itertools.combinations(range(E), 2)}
    assert combination_usage(mask_from_pairs(E, all_pairs)).item() == pytest.approx(100.0)
    assert combination_usage(mask_from_pairs(E, {(0, 1): 9})).item() == pytest.approx(100 / 6)
    # counts 10, 5, 3, 1, 1, 0 (total 20): 95% = 19 is reached after 4 pairs (10 + 5 + 3 + 1)
    skewed = {(0, 1): 10, (2, 3): 5, (0, 2): 3, (1, 3): 1, (0, 3): 1}
    assert combination_usage(mask_from_pairs(E, skewed)).item() == pytest.approx(400 / 6)
    # 20 equal pairs (E = 8 has 28): 95% of the mass is exactly 19 pairs
    twenty = dict.fromkeys(list(itertools.combinations(range(8), 2))[:20], 3)
    assert combination_usage(mask_from_pairs(8, twenty)).item() == pytest.approx(100 * 19 / 28)
    # order of tokens and of experts does not matter; a token with three experts adds three pairs
    three = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    assert combination_usage(three).item() == pytest.approx(100 * 3 / 6)
    assert math.isnan(combination_usage(mask_from_counts(E, [2, 2, 2, 2])).item())  # no pair co-activated


def test_combination_curve_ends_and_matches_usage():
    co = co_activation(mask_from_pairs(4, {(0, 1): 10, (2, 3): 5, (0, 2): 3, (1, 3): 1, (0, 3): 1}))
    x, y = combination_curve(co)
    assert x[0] == 0 and y[0] == 0 and x[-1] == pytest.approx(100) and y[-1] == pytest.approx(1)
    assert y.tolist() == pytest.approx([0, 0.5, 0.75, 0.9, 0.95, 1.0, 1.0])
    first_at_95 = x[(y >= 0.95 - 1e-12).nonzero()[0, 0]]
    assert first_at_95.item() == pytest.approx(combination_usage_from_counts(co).item())


def test_zero_expert_fraction():
    mask = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    assert zero_expert_fraction(mask).item() == 0.5


def test_experts_per_token_by_timestep_known_answer():
    # 4 images of L = 2 tokens; token n belongs to image n // 2
    counts = [1, 3, 0, 0, 4, 4, 2, 1]
    mask = torch.zeros(8, 4, dtype=torch.bool)
    for n, c in enumerate(counts):
        mask[n, :c] = True
    t_frac = torch.tensor([0.05, 0.15, 1.0, 0.55])  # bins 0, 1, 9 (1.0 clamps to the last bin), 5
    assert token_timestep_bins(t_frac, 8).tolist() == [0, 0, 1, 1, 9, 9, 5, 5]
    got = experts_per_token_by_timestep(mask, t_frac, bins=10)
    want = [2.0, 0.0, None, None, None, 1.5, None, None, None, 4.0]
    for g, w in zip(got.tolist(), want):
        assert math.isnan(g) if w is None else g == w
    # a stack of layers is averaged over layers: the second layer selects nothing
    stacked = torch.stack([mask, torch.zeros_like(mask)])
    assert experts_per_token_by_timestep(stacked, t_frac, bins=10)[0].item() == 1.0
    with pytest.raises(ValueError):
        token_timestep_bins(torch.tensor([0.1, 0.2, 0.3]), 8)


def test_timestep_fraction_for_both_objectives():
    ddpm = DDPMObjective(1000)
    assert timestep_fraction(ddpm, torch.tensor([0, 500, 999])).tolist() == pytest.approx([0.0, 0.5, 0.999])
    assert timestep_fraction(FlowObjective(), torch.tensor([0.0, 0.25, 1.0])).tolist() == [0.0, 0.25, 1.0]


def test_routing_diagnostics_of_a_hand_built_record():
    E = 4  # 2 images of 4 tokens
    record = ForwardRecord()
    balanced = mask_from_pairs(E, {(0, 1): 2, (2, 3): 2, (0, 2): 2, (1, 3): 2})  # 8 tokens, loads 4 each
    skewed = mask_from_counts(E, [6, 2, 0, 0])  # 8 single-expert tokens
    for i, m in ((0, balanced), (2, skewed)):
        record.moe[i] = MoELayerRecord(logits=torch.zeros(8, E), scores=torch.zeros(8, E), mask=m)
    for i in range(3):
        record.block_output_norms[i] = torch.tensor([1.0 + i, 10.0 * i])
    d = routing_diagnostics(record, torch.tensor([0.0, 0.95]), bins=10)
    assert d["routing/maxvio/block_00"] == 0.0 and d["routing/maxvio/block_02"] == pytest.approx(2.0)
    assert d["routing/maxvio"] == pytest.approx(1.0)
    assert d["routing/comb"] == pytest.approx(400 / 6)  # layer 2 co-activates no pair: left out of the mean
    assert d["routing/zero_expert_frac"] == 0.0
    assert d["routing/experts_per_token"] == pytest.approx(1.5)
    assert d["routing/experts_per_token/t_bin0"] == pytest.approx(1.5)  # image 0: 2 (layer 0), 1 (layer 2)
    assert d["routing/experts_per_token/t_bin9"] == pytest.approx(1.5)
    assert math.isnan(d["routing/experts_per_token/t_bin4"])
    assert d["norms/attn/block_01"] == 2.0 and d["norms/ff/block_02"] == 20.0
    assert "routing/maxvio/block_01" not in d
    dense_only = ForwardRecord(block_output_norms={0: torch.tensor([1.0, 2.0])})
    assert routing_diagnostics(dense_only) == {"norms/attn/block_00": 1.0, "norms/ff/block_00": 2.0}


def test_diagnostics_due():
    assert [s for s in range(1, 13) if diagnostics_due(s, 0, 5, 12)] == [5, 10, 12]
    assert [s for s in range(1, 13) if diagnostics_due(s, 4, 5, 12)] == [4, 8, 12]
    assert not any(diagnostics_due(s, -1, 1, 12) for s in range(1, 13))


def test_expert_race_training_run_logs_losses_and_diagnostics(tiny_config):
    from racedit.training.loop import train

    cfg = tiny_config("model.name=RaceDiT-S/2-2in8", "train.steps=3", "train.ckpt_every=0", "train.log_every=2",
                      "loss.router_similarity=0.01", "loss.per_layer_reg=1.0", "loss.balance=0.01",
                      "loss.z_loss=0.001")
    result = train(cfg)
    with (result.out_dir / "metrics.csv").open() as f:
        reader = csv.DictReader(f)
        header, rows = list(reader.fieldnames), list(reader)
    assert [r["step"] for r in rows] == ["2", "3"]
    want = {"loss", "loss/diffusion", "loss/router_similarity", "loss/per_layer_reg", "loss/balance", "loss/z_loss",
            "routing/maxvio", "routing/comb", "routing/zero_expert_frac", "routing/experts_per_token"}
    want |= {f"routing/maxvio/block_{i:02d}" for i in range(2)}
    want |= {f"routing/experts_per_token/t_bin{b}" for b in range(10)}
    want |= {f"norms/{branch}/block_{i:02d}" for branch in ("attn", "ff") for i in range(2)}
    assert want <= set(header)
    for row in rows:
        assert float(row["routing/experts_per_token"]) == pytest.approx(2.0)  # Expert Race keeps mean k in training
        assert 0.0 <= float(row["routing/maxvio"]) <= 7.0
    # adaLN-Zero: the gates leave 0 at the second update (the first only moves the zero-init final layer)
    assert float(rows[-1]["norms/ff/block_01"]) > 0 and float(rows[-1]["norms/attn/block_00"]) > 0
