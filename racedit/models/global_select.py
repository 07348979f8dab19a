"""Collectives of the global race whose traffic does not grow with the batch or the number of processes.

race_scope=global selects over the batch of every rank (docs/method/routing.md, "Race scope"). Gathering the
scores costs each rank B*L*E values times the world size; this module finds the same selection from counts:

- `radix_topk`: exact top-K of each group whose candidates are spread over the ranks. Scores map to integer
  keys that order like the floats; a few rounds of histogram counting over the key's digits, one
  `all_reduce` of (groups, 2^r) counts per round, find the K-th largest key of the whole job. Ties at the
  K-th value go to the lower global candidate index: ranks hold consecutive runs of each group's candidates
  (rank order), so one `all_gather` of each rank's tie count (an exclusive prefix sum) shares them out.
  The mask is the one the gathered top-K gives, bit for bit.
- `exact_mean`: a mean of one float per group over all ranks that does not depend on how the groups are
  split among them (fixed point, integer sums), for the K-th score of strategies whose groups are images.
- `sum_over_ranks`: sum of small tensors over the ranks whose gradient reaches this rank's summand only,
  for the router losses' E x E and E-sized sums.
- `global_batch`: B of all ranks, checking that L and E agree.

Costs per call, r bits per round: ceil(bits/r) all_reduces of groups * 2^r counts, one all_gather of
`groups` counts per rank; docs/method/routing.md and docs/benchmarks.md give the bytes.

Letters (docs/method/README.md): B images per rank, L tokens per image, E experts, K pairs selected per group,
G groups, C candidates of a group on this rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

RADIX_BITS = 8  # bits per round: 4 rounds of 256 bins for float32 scores (measured: docs/benchmarks.md)
FIXED_POINT_BITS = 40  # `exact_mean` keeps 2^-40 of the largest |value|; int64 then holds 2^23 summands
_INT64_SIGN = torch.iinfo(torch.int64).min


def world_size(group) -> int:
    """Ranks in `group`; 1 for group=None (no group) or without an initialised process group."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def default_group(group):
    """`group`, else the default process group when one is initialised, else None."""
    if group is None and dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return group


def global_batch(B: int, L: int, E: int, group, device: torch.device | None = None) -> int:
    """B summed over the ranks of `group` (one all_reduce of 5 int64 on `device`, the one the backend
    reduces on: the scores'); ValueError unless L and E agree."""
    shape = torch.tensor([B, L, E, L * L, E * E], dtype=torch.int64, device=device)
    dist.all_reduce(shape, group=group)
    world = world_size(group)
    total_b, sum_l, sum_e, sum_l2, sum_e2 = shape.tolist()
    # equal on every rank iff world * sum(x^2) == sum(x)^2 (zero variance)
    if world * sum_l2 != sum_l * sum_l or world * sum_e2 != sum_e * sum_e:
        raise ValueError(f"race_scope=global needs the same L and E on every rank; this rank has L={L}, E={E}, "
                         f"the ranks' mean is L={sum_l / world:g}, E={sum_e / world:g}")
    return total_b


def _order_keys(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """float32/float64 (...) -> (compare key, digit key, key bits): integers of the float's width in its order.

    A float's bits read as a signed integer order the non-negative floats; flipping all but the sign bit of
    the negative ones orders those too (the compare key). The digit key is that key with its sign bit
    flipped, the bit pattern of the unsigned key, so its r-bit digits, most significant first, order like
    the value. -0.0 must be turned into +0.0 before (they compare equal, so they must tie).
    """
    if values.dtype == torch.float32:
        bits = values.view(torch.int32)
        signed = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        return signed, signed ^ torch.iinfo(torch.int32).min, 32
    bits = values.view(torch.int64)
    signed = bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)
    return signed, signed ^ _INT64_SIGN, 64


def _value_of_key(unsigned: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `_order_keys`: unsigned key (G,) int64 -> (compare key (G,), the float (G,) of `dtype`)."""
    if dtype == torch.float32:
        signed = (unsigned - (1 << 31)).to(torch.int32)
        return signed, (signed ^ ((signed >> 31) & 0x7FFFFFFF)).view(torch.float32)
    signed = unsigned ^ _INT64_SIGN
    return signed, (signed ^ ((signed >> 63) & 0x7FFFFFFFFFFFFFFF)).view(torch.float64)


def radix_topk(grouped: torch.Tensor, K: int, group, bits_per_round: int = RADIX_BITS,
               candidates: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-K of each group over all ranks: grouped (G, C) -> (bool chosen (G, C), K-th largest (G,)).

    Row g of `grouped` holds this rank's run of group g's candidates; the group is the concatenation of the
    runs in rank order (C may differ between ranks, G may not). Every rank gets the same K-th value, and
    the union of the ranks' `chosen` is what `routing.grouped_topk` picks on the concatenation, ties
    included. float32 and float64 keep their dtype; other floats are compared as float32 (exact) and the
    K-th value is returned in float32. NaN scores give an unspecified choice. `candidates`: the group's
    size over all ranks when known (picks int32 counts below 2^31); all ranks must call this together.
    Each round looks only at the candidates whose digits so far equal the K-th key's (a compaction: one
    host read per round on an accelerator).
    """
    values = grouped.detach()
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    values = (values + 0.0).contiguous()  # -0.0 -> +0.0
    compare, digit_key, key_bits = _order_keys(values)
    G, C = values.shape
    device = values.device
    bins = 1 << bits_per_round
    count_dtype = torch.int32 if candidates is not None and candidates < 2**31 else torch.int64
    need = torch.full((G,), K, dtype=torch.int64, device=device)  # places left among the matching keys
    kth_unsigned = torch.zeros(G, dtype=torch.int64, device=device)
    ones = torch.ones(G * C, dtype=count_dtype, device=device)
    # The keys whose digits so far equal the K-th key's, where they are (flat) and their rows: all of them,
    # as (G, C), in the first round, then compacted (later rounds look at about 1/2^r as many or fewer).
    keys, positions, rows = digit_key, None, torch.arange(G, device=device).unsqueeze(1)
    for shift in range(key_bits - bits_per_round, -1, -bits_per_round):
        digit = ((keys >> shift) & (bins - 1)).to(torch.int64)
        hist = torch.zeros(G * bins, dtype=count_dtype, device=device)
        hist.scatter_add_(0, (rows * bins + digit).reshape(-1), ones[:digit.numel()])
        dist.all_reduce(hist, group=group)
        hist = hist.view(G, bins).to(torch.int64)
        at_least = hist.flip(1).cumsum(1).flip(1)  # matching keys of the job with this digit or a larger one
        chosen_digit = (at_least >= need.unsqueeze(1)).sum(1) - 1  # the largest digit still holding the K-th
        above = at_least.gather(1, chosen_digit.unsqueeze(1)) - hist.gather(1, chosen_digit.unsqueeze(1))
        need = need - above.squeeze(1)
        kth_unsigned |= chosen_digit << shift
        if positions is None:
            positions = (digit == chosen_digit.unsqueeze(1)).reshape(-1).nonzero().squeeze(1)
            keys, rows = keys.reshape(-1)[positions], positions // max(C, 1)
        else:
            kept = (digit == chosen_digit[rows]).nonzero().squeeze(1)
            keys, positions, rows = keys[kept], positions[kept], rows[kept]
    kth_compare, kth = _value_of_key(kth_unsigned, values.dtype)
    chosen = compare > kth_compare.unsqueeze(1)
    # `positions` (ascending) are this rank's keys equal to the K-th; `need` how many of those the job takes
    ties_here = torch.zeros(G, dtype=count_dtype, device=device).scatter_add_(0, rows, ones[:rows.numel()])
    ties_per_rank = [torch.empty_like(ties_here) for _ in range(world_size(group))]
    dist.all_gather(ties_per_rank, ties_here, group=group)
    rank = dist.get_rank(group)
    ties_before = torch.stack(ties_per_rank[:rank]).sum(0).to(torch.int64) if rank else torch.zeros_like(need)
    first_of_row = ties_here.to(torch.int64).cumsum(0) - ties_here  # this rank's ties in the rows before
    place = torch.arange(1, rows.numel() + 1, device=device) - first_of_row[rows] + ties_before[rows]
    chosen.view(-1)[positions[place <= need[rows]]] = True  # 1-based place among the job's ties
    return chosen, kth


def exact_mean(values: torch.Tensor, group=None) -> torch.Tensor:
    """Mean of values (n,) over every rank of `group` (all of them for group=None) -> () float32.

    Each value is rounded to a multiple of 2^-40 of the job's largest |value| and the integers are summed,
    so the result does not depend on how the values are split among the ranks or ordered (a float sum
    would). Two all_reduces of 8 and 16 bytes. Non-finite values give a non-finite mean.
    """
    v = values.detach().to(torch.float64).reshape(-1)
    spans = world_size(group) > 1
    peak = v.abs().max() if v.numel() else v.new_zeros(())
    if spans:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    if not torch.isfinite(peak):
        return v.new_full((), float("nan") if torch.isnan(peak) else float("inf")).float()
    exponent = torch.frexp(peak).exponent.to(torch.float64)  # peak < 2^exponent
    fixed = torch.round(v * torch.exp2(FIXED_POINT_BITS - exponent)).to(torch.int64)
    sums = torch.stack([fixed.sum(), torch.tensor(v.numel(), dtype=torch.int64, device=v.device)])
    if spans:
        dist.all_reduce(sums, group=group)
    return (sums[0].to(torch.float64) * torch.exp2(exponent - FIXED_POINT_BITS) / sums[1]).float()


def sum_over_ranks(parts: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Each tensor of `parts` summed over the ranks of `group`, in one all_reduce of their concatenation.

    The result has the job's value and the gradient of this rank's summand only (the other ranks' parts
    arrive detached), which is what each rank backpropagates through for a loss of global sums.
    """
    if world_size(group) == 1:
        return parts
    flat = torch.cat([p.detach().reshape(-1).to(parts[0].dtype) for p in parts])
    dist.all_reduce(flat, group=group)
    out, start = [], 0
    for p in parts:
        total = flat[start:start + p.numel()].view(p.shape).to(p.dtype)
        out.append(total + (p - p.detach()))  # the job's value exactly; gradient to p
        start += p.numel()
    return out
