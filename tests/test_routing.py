"""Grouped top-K strategies, gating functions and the inference threshold (racedit.models.routing).

Letters (docs/method/README.md): B images, L tokens per image, E experts, k experts per token on average, N =
B*L tokens.
"""

from __future__ import annotations

import pytest
import torch

from racedit.models.moe import MoEFeedForward, update_thresholds
from racedit.models.records import ForwardRecord
from racedit.models.routing import (
    BATCH_COUPLED,
    STRATEGIES,
    gate,
    grouped_topk,
    select,
    threshold_mask,
    update_threshold_,
)

# strategy -> (axes that index a group, axes that index the candidates inside a group), over (B, L, E);
# written out independently of routing.group_layout.
GROUPING = {
    "token_choice": ((0, 1), (2,)),
    "expert_choice": ((0, 2), (1,)),
    "bl_choice": ((2,), (0, 1)),
    "be_choice": ((1,), (0, 2)),
    "le_choice": ((0,), (1, 2)),
    "expert_race": ((), (0, 1, 2)),
}
SHAPES = [(1, 4, 2, 1), (2, 8, 4, 2), (3, 16, 8, 2), (4, 16, 8, 4), (2, 32, 32, 4), (5, 12, 6, 3), (8, 4, 4, 4)]


def expected_per_group(strategy: str, B: int, L: int, E: int, k: int) -> int:
    return {"token_choice": k, "expert_choice": k * L // E, "bl_choice": B * L * k // E, "be_choice": B * k,
            "le_choice": L * k, "expert_race": B * L * k}[strategy]


def as_groups(t: torch.Tensor, strategy: str) -> torch.Tensor:
    """(B, L, E) -> (groups, candidates) with candidates in the layout order the module documents."""
    group_axes, candidate_axes = GROUPING[strategy]
    permuted = t.permute(*group_axes, *candidate_axes)
    candidates = 1
    for axis in candidate_axes:
        candidates *= t.shape[axis]
    return permuted.reshape(-1, candidates)


def score_variants(B: int, L: int, E: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    random = torch.randn(B, L, E, generator=g)
    return {
        "random": random,
        "few_values": torch.randint(0, 3, (B, L, E), generator=g).float(),  # many ties
        "all_equal": torch.full((B, L, E), 0.25),
        "rounded_bf16": random.to(torch.bfloat16).float().mul(4).round().div(4),
    }


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_each_strategy_selects_exactly_its_number_per_group(strategy, shape):
    B, L, E, k = shape
    if strategy == "expert_choice" and (k * L) % E or strategy == "bl_choice" and (B * L * k) % E:
        pytest.skip("shape breaks this strategy's integer constraint")
    want = expected_per_group(strategy, B, L, E, k)
    for name, scores in score_variants(B, L, E, seed=sum(shape)).items():
        mask = select(scores, strategy, k)
        assert mask.dtype == torch.bool and mask.shape == (B, L, E)
        assert int(mask.sum()) == B * L * k, (name, "every strategy selects B*L*k pairs in total")
        grouped_mask, grouped_scores = as_groups(mask, strategy), as_groups(scores, strategy)
        assert (grouped_mask.sum(1) == want).all(), (name, grouped_mask.sum(1))
        # It is the top: within a group, no unselected score beats a selected one.
        lowest_selected = grouped_scores.masked_fill(~grouped_mask, float("inf")).min(1).values
        highest_unselected = grouped_scores.masked_fill(grouped_mask, float("-inf")).max(1).values
        assert (lowest_selected >= highest_unselected).all(), name


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ties_go_to_the_lower_candidate_index(strategy):
    B, L, E, k = 2, 8, 4, 2
    scores = torch.zeros(B, L, E)
    grouped = as_groups(select(scores, strategy, k), strategy)
    want = expected_per_group(strategy, B, L, E, k)
    assert grouped[:, :want].all() and not grouped[:, want:].any()
    # The same input always gives the same mask.
    noisy = torch.randint(0, 2, (B, L, E), generator=torch.Generator().manual_seed(3)).float()
    assert torch.equal(select(noisy, strategy, k), select(noisy.clone(), strategy, k))


def test_expert_race_is_one_global_topk():
    torch.manual_seed(0)
    B, L, E, k = 4, 16, 8, 2
    scores = torch.randn(B, L, E)
    mask, kth = grouped_topk(scores, "expert_race", k)
    K = B * L * k
    top = scores.flatten().topk(K).indices
    expected = torch.zeros(B * L * E, dtype=torch.bool)
    expected[top] = True
    assert torch.equal(mask.flatten(), expected)
    assert kth.shape == (1,) and kth.item() == scores.flatten().sort(descending=True).values[K - 1].item()
    # A token may get anything from 0 to E experts; only the total is fixed.
    per_token = mask.sum(-1)
    assert per_token.float().mean().item() == k and int(per_token.sum()) == K


def test_integer_constraints_fail_with_a_clear_message():
    scores = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="expert_choice.*whole number"):
        select(scores, "expert_choice", 2)
    with pytest.raises(ValueError, match="bl_choice.*whole number"):
        select(torch.randn(1, 3, 8), "bl_choice", 1)
    with pytest.raises(ValueError, match="1 <= k <= E"):
        select(scores, "expert_race", 9)
    with pytest.raises(ValueError, match="unknown routing strategy"):
        select(scores, "random", 2)


def test_gating_functions():
    logits = torch.randn(5, 7)
    assert torch.equal(gate(logits, "identity"), logits)
    assert torch.allclose(gate(logits, "sigmoid"), 1 / (1 + torch.exp(-logits)))
    assert torch.allclose(gate(logits, "softmax").sum(-1), torch.ones(5))
    with pytest.raises(ValueError, match="unknown gating"):
        gate(logits, "tanh")


def test_threshold_ema_update_matches_hand_computation():
    tau = torch.zeros((), dtype=torch.float32)
    initialized = torch.zeros((), dtype=torch.bool)
    update_threshold_(tau, initialized, torch.tensor(2.0), decay=0.9)
    assert bool(initialized) and tau.item() == 2.0  # first batch sets tau
    update_threshold_(tau, initialized, torch.tensor(1.0), decay=0.9)
    assert tau.item() == pytest.approx(0.9 * 2.0 + 0.1 * 1.0)
    update_threshold_(tau, initialized, torch.tensor(-3.0, dtype=torch.float64), decay=0.9)
    assert tau.dtype == torch.float32 and tau.item() == pytest.approx(0.9 * 1.9 + 0.1 * -3.0)


@pytest.mark.parametrize("strategy", ["expert_race", "bl_choice", "le_choice", "token_choice"])
def test_moe_layer_threshold_tracks_the_kth_score(strategy):
    torch.manual_seed(0)
    B, L, D, E, k, decay = 4, 8, 16, 4, 2, 0.8
    layer = MoEFeedForward(D, E, k, routing=strategy, threshold_decay=decay).train()
    hand_tau = None
    for step in range(3):
        record = ForwardRecord()
        layer(torch.randn(B, L, D), record)
        update_thresholds(layer, [record.kth_scores()])  # what the training step does after the backward
        rec = record.moe[0]
        if strategy == "token_choice":
            assert rec.kth_score is None and not bool(layer.threshold_initialized)
            continue
        scores = rec.scores.detach().view(B, L, E)
        per_group = as_groups(scores, strategy).sort(dim=1, descending=True).values
        kth = per_group[:, expected_per_group(strategy, B, L, E, k) - 1].mean()  # mean of each group's K-th
        assert rec.kth_score.item() == pytest.approx(kth.item(), abs=1e-6)
        hand_tau = kth.item() if step == 0 else decay * hand_tau + (1 - decay) * kth.item()
        assert layer.tau.item() == pytest.approx(hand_tau, abs=1e-6)
        assert layer.tau.dtype == torch.float32


def test_eval_threshold_routing_is_batch_independent():
    torch.manual_seed(0)
    L, D, E, k = 16, 32, 8, 2
    layer = MoEFeedForward(D, E, k, routing="expert_race").double().train()
    for _ in range(5):
        record = ForwardRecord()
        layer(torch.randn(16, L, D, dtype=torch.float64), record)
        update_thresholds(layer, [record.kth_scores()])
    assert bool(layer.threshold_initialized) and layer.tau.dtype == torch.float32
    layer.eval()
    batch = torch.randn(16, L, D, dtype=torch.float64)
    with torch.no_grad():
        record = ForwardRecord()
        together = layer(batch, record)
        for i in (0, 5, 15):
            alone = layer(batch[i:i + 1])
            torch.testing.assert_close(alone[0], together[i], rtol=1e-12, atol=1e-12)
    rec = record.moe[0]
    assert torch.equal(rec.mask, threshold_mask(rec.scores, layer.tau))
    # The count varies with the batch: no top-K in eval mode.
    assert rec.kth_score is None


def test_eval_topk_rule_and_uninitialized_threshold():
    torch.manual_seed(0)
    B, L, D, E, k = 2, 8, 16, 4, 2
    topk_layer = MoEFeedForward(D, E, k, inference_routing="topk").eval()
    record = ForwardRecord()
    topk_layer(torch.randn(B, L, D), record)
    assert int(record.moe[0].mask.sum()) == B * L * k
    fresh = MoEFeedForward(D, E, k).eval()
    with pytest.warns(UserWarning, match="never set"):
        fresh(torch.randn(B, L, D), record)
    assert int(record.moe[0].mask.sum()) == B * L * k


def test_threshold_buffer_stays_float32_under_dtype_casts():
    torch.manual_seed(0)
    layer = MoEFeedForward(16, 4, 2).train()
    record = ForwardRecord()
    layer(torch.randn(2, 4, 16), record)
    update_thresholds(layer, [record.kth_scores()])
    tau = layer.tau.item()
    assert torch.tensor(tau).bfloat16().item() != tau  # a cast to bf16 would round it
    layer.to(torch.bfloat16)
    assert layer.tau.dtype == torch.float32 and layer.tau.item() == tau
    assert layer.experts.w1.dtype == torch.bfloat16
    state = layer.state_dict()
    assert "tau" in state and "threshold_initialized" in state


def test_batch_coupled_list_is_the_strategies_whose_selection_depends_on_other_tokens():
    """Brute force: a strategy is batch-coupled iff the experts chosen for one token change when only the
    *other* tokens' scores change. Token (0, 0) keeps fixed, distinct scores; every other (token, expert)
    score is set far above, then far below them. In every grouping other than one group per token, the
    token's group holds enough other candidates (another image's, another position's) to take all its slots
    when they all score higher, and none when they all score lower."""
    B, L, E, k = 2, 4, 4, 2
    own = torch.tensor([0.1, 0.4, 0.3, 0.2])
    depends = {}
    for strategy in STRATEGIES:
        chosen = []
        for others in (10.0, -10.0):
            scores = torch.full((B, L, E), others)
            scores[0, 0] = own
            chosen.append(select(scores, strategy, k)[0, 0])
        depends[strategy] = not torch.equal(chosen[0], chosen[1])
        if strategy == "token_choice":  # its own top-k, whatever the rest of the batch: experts 1 and 2
            assert chosen[0].tolist() == chosen[1].tolist() == [False, True, True, False]
        else:  # all slots to the others, then all the token's experts
            assert chosen[0].tolist() == [False] * E and chosen[1].tolist() == [True] * E, strategy
    assert set(BATCH_COUPLED) == {s for s, d in depends.items() if d}
    assert set(BATCH_COUPLED) < set(STRATEGIES)
