"""Routing for the MoE feed-forward: gating functions, the grouped top-K strategies, the inference threshold.

Every strategy is one top-K over groups of the score tensor S (B, L, E); a strategy is only its grouping
(Race-DiT, arXiv 2503.16057, §4: the table in its Fig. 3, Fig. 10 and Table 6; docs/method/routing.md):

| strategy        | groups | candidates per group | selected per group |
|-----------------|--------|----------------------|--------------------|
| `token_choice`  | B*L    | E                    | k                  |
| `expert_choice` | B*E    | L                    | k*L/E              |
| `bl_choice`     | E      | B*L                  | B*L*k/E            |
| `be_choice`     | L      | B*E                  | B*k                |
| `le_choice`     | B      | L*E                  | L*k                |
| `expert_race`   | 1      | B*L*E                | B*L*k              |

Selection is exact: each group gets exactly its number of pairs, also when scores tie. Ties are broken
deterministically in favour of the lower candidate index inside the group, where candidates are laid out
in the order of the table's candidate axes (for Expert Race: the flat (b, l, e) index, so the concatenated
batch of several ranks breaks ties in rank order).

Global scope (`select_global`): the selection over the batch concatenated from every rank, in rank order.
For token, expert and LE choice each group lies inside one image, so that is the local selection; the
groups of BL choice, BE choice and Expert Race span the ranks, and each rank holds one consecutive run of
every group's candidates (the flat (b, l), (b, e) or (b, l, e) index with b running over the ranks in
order). method="radix" finds their top-K from all_reduced digit histograms (`global_select.radix_topk`),
method="gather" all-gathers the scores (the readable reference); both give the same mask and K-th value.

The inference threshold (docs/method/threshold.md; the update rule is this project's, the paper gives
none): for the batch-coupled strategies (all but token choice) each MoE layer keeps tau, an EMA of the
training batch's K-th largest score; in eval mode a pair is selected when S >= tau, so a sample's routing
does not depend on the rest of its batch. For strategies with several groups, "the K-th largest score" is
the mean over groups of each group's K-th largest score.

Letters (docs/method/README.md): B images, L tokens per image, E experts, k experts per token on average,
K pairs selected per group, N = B*L tokens; S (B, L, E) the gate values (routing scores).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from racedit.models.global_select import (
    RADIX_BITS,
    default_group,
    exact_mean,
    global_batch,
    radix_topk,
    world_size,
)
from racedit.presets import selected_per_group

STRATEGIES = ("token_choice", "expert_choice", "bl_choice", "be_choice", "le_choice", "expert_race")
GATINGS = ("identity", "sigmoid", "softmax")
# Strategies whose selection for one token depends on other tokens' scores; these keep a threshold.
BATCH_COUPLED = tuple(s for s in STRATEGIES if s != "token_choice")
# Strategies whose groups hold the candidates of several images, so under race_scope=global several ranks.
SPANS_BATCH = ("bl_choice", "be_choice", "expert_race")
GLOBAL_SELECT_METHODS = ("radix", "gather")


def gate(logits: torch.Tensor, gating: str) -> torch.Tensor:
    """Gate values S = G(logits) over the last (expert) axis; S is both the selection score and the weight."""
    if gating == "identity":
        return logits
    if gating == "sigmoid":
        return torch.sigmoid(logits)
    if gating == "softmax":
        return torch.softmax(logits, dim=-1)
    raise ValueError(f"unknown gating {gating!r}; allowed: {list(GATINGS)}")


def group_layout(strategy: str, B: int, L: int, E: int, k: int) -> tuple[tuple[int, int, int], int, int, int]:
    """(permutation of the (B, L, E) axes, groups, candidates per group, selected per group K) of a strategy.

    Raises ValueError when the strategy is unknown or K would not be a whole number in [1, candidates].
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown routing strategy {strategy!r}; allowed: {list(STRATEGIES)}")
    K = selected_per_group(strategy, B, L, E, k)
    layout = {
        "token_choice": ((0, 1, 2), B * L, E),
        "expert_choice": ((0, 2, 1), B * E, L),
        "bl_choice": ((2, 0, 1), E, B * L),
        "be_choice": ((1, 0, 2), L, B * E),
        "le_choice": ((0, 1, 2), B, L * E),
        "expert_race": ((0, 1, 2), 1, B * L * E),
    }[strategy]
    return (*layout, K)


def _to_groups(scores: torch.Tensor, perm: tuple[int, int, int], groups: int) -> torch.Tensor:
    """S (B, L, E) -> (groups, candidates), detached, candidates in the strategy's order."""
    return scores.detach().permute(perm).reshape(groups, -1)


def _from_groups(chosen: torch.Tensor, shape: torch.Size, perm: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of `_to_groups` for a mask: (groups, candidates) -> (B, L, E)."""
    inverse = [perm.index(i) for i in range(3)]
    return chosen.reshape([shape[p] for p in perm]).permute(inverse).contiguous()


def grouped_topk(scores: torch.Tensor, strategy: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact grouped top-K of S (B, L, E) -> (bool mask (B, L, E), K-th largest score of each group (groups,)).

    The mask carries no gradient. Among scores equal to a group's K-th largest value, the lower candidate
    indices are taken first, so the count per group is exact and the choice deterministic.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be (B, L, E), got shape {tuple(scores.shape)}")
    B, L, E = scores.shape
    perm, groups, candidates, K = group_layout(strategy, B, L, E, k)
    grouped = _to_groups(scores, perm, groups)
    # The smallest of an unsorted top-K is the K-th largest (measured faster than kthvalue on CPU).
    kth = grouped.topk(K, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
    above = grouped > kth
    tied = grouped == kth
    still_needed = K - above.sum(dim=1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(dim=1) <= still_needed))
    return _from_groups(chosen, scores.shape, perm), kth.squeeze(1)


def select(scores: torch.Tensor, strategy: str, k: int) -> torch.Tensor:
    """Training selection: bool mask (B, L, E) with exactly K pairs in each group of `strategy` (table above)."""
    return grouped_topk(scores, strategy, k)[0]


def gather_rows(x: torch.Tensor, group) -> tuple[torch.Tensor, list[int]]:
    """Concatenate x (n, ...) of every rank of `group` in rank order -> ((sum n, ...), n of each rank).

    Ranks may hold different n; the other dimensions must agree (ValueError naming the shapes). The
    other ranks' rows arrive detached; this rank's rows are the live tensor, so gradient flows to the
    local part only. Without a group (or with one rank) x is returned. All ranks of the group must call
    this together.
    """
    if world_size(group) == 1:
        return x, [x.shape[0]]
    world = dist.get_world_size(group)
    shape = torch.tensor(list(x.shape), device=x.device, dtype=torch.long)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    shapes = torch.stack(shapes).tolist()
    if any(s[1:] != list(x.shape[1:]) for s in shapes):
        raise ValueError(f"ranks must agree on all but the first dimension; got shapes per rank {shapes}")
    sizes = [s[0] for s in shapes]
    largest = max(sizes)
    local = x.detach()
    if local.dtype == torch.bool:  # gloo and nccl gather numbers, not booleans
        local = local.to(torch.uint8)
    local = local.contiguous()
    if x.shape[0] < largest:
        local = torch.cat([local, local.new_zeros(largest - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    rank = dist.get_rank(group)
    parts = [x if r == rank else p[:s].to(x.dtype) for r, (p, s) in enumerate(zip(parts, sizes))]
    return torch.cat(parts), sizes


def grouped_topk_global(scores: torch.Tensor, strategy: str, k: int, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`grouped_topk` over the batch concatenated from every rank of `group`, sliced back to this rank.

    The result equals what one process holding the concatenation (in rank order) would select, ties
    included. Ranks may hold different B (L and E must agree); without an initialised process group, or
    with one rank, this is `grouped_topk`. All ranks must call it together.
    """
    group = default_group(group)
    if world_size(group) == 1:
        return grouped_topk(scores, strategy, k)
    try:
        everything, sizes = gather_rows(scores.detach(), group)
    except ValueError as e:
        raise ValueError(f"race_scope=global needs the same L and E on every rank: {e}") from None
    mask, kth = grouped_topk(everything, strategy, k)
    start = sum(sizes[: dist.get_rank(group)])
    return mask[start:start + scores.shape[0]], kth


def select_global(scores: torch.Tensor, strategy: str, k: int, group=None, method: str = "radix", *,
                  radix_bits: int = RADIX_BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """Training selection over the batch of every rank of `group` (default: the default process group):
    S (B, L, E) of this rank -> (bool mask (B, L, E) of this rank, the batch's K-th largest score () float32).

    The mask is this rank's slice of what one process holding the concatenated batch (rank order) selects,
    ties included; ranks may hold different B, L and E must agree. The K-th score is what the inference
    threshold moves by: for BL, BE choice and Expert Race the mean over groups of each group's K-th largest
    score (the same floats on every rank); for token, expert and LE choice, whose groups are images, the
    `exact_mean` of the groups' K-th scores over all ranks. method: "radix" (histogram all_reduces: a few KiB
    whatever the world size) or "gather" (all-gather the scores: the readable reference). Without a process
    group, or with one rank, this is `grouped_topk` on the local batch. All ranks must call it together.
    radix_bits: digit bits per histogram round (8: 4 rounds of 256 bins for float32; 16: 2 of 65,536).
    """
    if method not in GLOBAL_SELECT_METHODS:
        raise ValueError(f"unknown global selection method {method!r}; allowed: {list(GLOBAL_SELECT_METHODS)}")
    group = default_group(group)
    if world_size(group) == 1:
        mask, kth = grouped_topk(scores, strategy, k)
        return mask, kth.float().mean()
    if method == "gather":
        mask, kth = grouped_topk_global(scores, strategy, k, group)
        return mask, (kth.float().mean() if strategy in SPANS_BATCH else exact_mean(kth))
    if strategy not in SPANS_BATCH:  # every group inside one image: the local selection is the global one
        mask, kth = grouped_topk(scores, strategy, k)
        return mask, exact_mean(kth, group)
    if scores.dim() != 3:
        raise ValueError(f"scores must be (B, L, E), got shape {tuple(scores.shape)}")
    B, L, E = scores.shape
    perm, groups, candidates, K = group_layout(strategy, global_batch(B, L, E, group, scores.device), L, E, k)
    chosen, kth = radix_topk(_to_groups(scores, perm, groups), K, group, radix_bits, candidates)
    return _from_groups(chosen, scores.shape, perm), kth.float().mean()


@torch.library.custom_op("racedit::select_global", mutates_args=())
def select_global_op(scores: torch.Tensor, strategy: str, k: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`select_global` over the default process group -> (mask (B, L, E) bool, the K-th score () float32).

    A custom op so that torch.compile keeps the collectives and their host reads (the ranks' batch sizes)
    out of the graph: its outputs have static shapes, and only the dispatch after it sees a data-dependent
    count.
    """
    return select_global(scores, strategy, k, method=method)


@select_global_op.register_fake
def _(scores, strategy, k, method):
    return torch.empty_like(scores, dtype=torch.bool), scores.new_empty((), dtype=torch.float32)


@torch.no_grad()
def update_threshold_(tau: torch.Tensor, initialized: torch.Tensor, kth_score: torch.Tensor, decay: float) -> None:
    """In place: tau <- kth_score on the first update, else decay * tau + (1 - decay) * kth_score.

    tau is a float32 scalar buffer and `initialized` a bool scalar buffer; no host synchronisation.
    """
    kth = kth_score.detach().to(tau.dtype)
    tau.copy_(torch.where(initialized, decay * tau + (1.0 - decay) * kth, kth))
    initialized.fill_(True)


def threshold_mask(scores: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Eval-mode selection of the batch-coupled strategies: bool mask S >= tau, same shape as S."""
    return scores.detach() >= tau.to(scores.dtype)


def gate_logits_fp32(r: torch.Tensor, head: torch.nn.Linear) -> torch.Tensor:
    """Gating-head logits in at least float32 whatever the autocast state: (..., D) -> (..., E)."""
    dtype = torch.promote_types(head.weight.dtype, torch.float32)
    with torch.autocast(device_type=r.device.type, enabled=False):
        bias = head.bias.to(dtype) if head.bias is not None else None
        return F.linear(r.to(dtype), head.weight.to(dtype), bias)
