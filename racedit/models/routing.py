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

from racedit.presets import selected_per_group

STRATEGIES = ("token_choice", "expert_choice", "bl_choice", "be_choice", "le_choice", "expert_race")
GATINGS = ("identity", "sigmoid", "softmax")
# Strategies whose selection for one token depends on other tokens' scores; these keep a threshold.
BATCH_COUPLED = tuple(s for s in STRATEGIES if s != "token_choice")


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


def grouped_topk(scores: torch.Tensor, strategy: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact grouped top-K of S (B, L, E) -> (bool mask (B, L, E), K-th largest score of each group (groups,)).

    The mask carries no gradient. Among scores equal to a group's K-th largest value, the lower candidate
    indices are taken first, so the count per group is exact and the choice deterministic.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be (B, L, E), got shape {tuple(scores.shape)}")
    B, L, E = scores.shape
    perm, groups, candidates, K = group_layout(strategy, B, L, E, k)
    permuted_shape = [scores.shape[p] for p in perm]
    grouped = scores.detach().permute(perm).reshape(groups, candidates)
    # The smallest of an unsorted top-K is the K-th largest (measured faster than kthvalue on CPU).
    kth = grouped.topk(K, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
    above = grouped > kth
    tied = grouped == kth
    still_needed = K - above.sum(dim=1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(dim=1) <= still_needed))
    inverse = [perm.index(i) for i in range(3)]
    mask = chosen.reshape(permuted_shape).permute(inverse).contiguous()
    return mask, kth.squeeze(1)


def select(scores: torch.Tensor, strategy: str, k: int) -> torch.Tensor:
    """Training selection: bool mask (B, L, E) with exactly K pairs in each group of `strategy` (table above)."""
    return grouped_topk(scores, strategy, k)[0]


def world_size(group) -> int:
    """Ranks in `group`; 1 for group=None (no group) or without an initialised process group."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


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
    if group is None:
        group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    if world_size(group) == 1:
        return grouped_topk(scores, strategy, k)
    try:
        everything, sizes = gather_rows(scores.detach(), group)
    except ValueError as e:
        raise ValueError(f"race_scope=global needs the same L and E on every rank: {e}") from None
    mask, kth = grouped_topk(everything, strategy, k)
    start = sum(sizes[: dist.get_rank(group)])
    return mask[start:start + scores.shape[0]], kth


@torch.library.custom_op("racedit::global_topk_mean_kth", mutates_args=())
def global_topk_mean_kth(scores: torch.Tensor, strategy: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`grouped_topk_global` over the default process group -> (mask (B, L, E) bool, mean over the global groups
    of their K-th largest score () float32).

    A custom op so that torch.compile keeps the collectives and their host reads (the ranks' batch sizes)
    out of the graph: its outputs have static shapes, and only the dispatch after it sees a data-dependent
    count.
    """
    mask, kth = grouped_topk_global(scores, strategy, k)
    return mask, kth.float().mean()


@global_topk_mean_kth.register_fake
def _(scores, strategy, k):
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
