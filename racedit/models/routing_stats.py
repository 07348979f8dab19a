"""Routing diagnostics of MoE layers, from routing masks and the forward side channel.

Pure tensor functions (tested on hand-built masks) plus `routing_diagnostics`, which turns one filled
`ForwardRecord` into the flat scalars the training loop logs every `train.diagnostics_every` steps:

| name | meaning |
|---|---|
| `routing/maxvio`, `routing/maxvio/block_XX` | (max_e load_e - mean load) / mean load; mean over MoE layers, per layer |
| `routing/comb` | combination usage (%), mean over the MoE layers where some token has two experts |
| `routing/zero_expert_frac` | fraction of tokens that got no expert, mean over MoE layers |
| `routing/experts_per_token` | mean experts per token over tokens and MoE layers |
| `routing/experts_per_token/t_bin<b>` | the same for the tokens of images whose timestep falls in bin b of 10 |
| `norms/attn/block_XX`, `norms/ff/block_XX` | mean per-token norm of what the block's attention / feed-forward branch adds to the residual (gate included) |

Timestep bins split the normalised timestep t/T (ddpm; flow: t) in [0, 1] into equal parts; bin 0 is the
cleanest, the last bin the noisiest. Tokens are (b, l) row-major, so token i belongs to image i // L.

Letters (docs/method/README.md): B images, L tokens per image, N = B*L tokens, E experts.
"""

from __future__ import annotations

import math

import torch

from racedit.models.records import ForwardRecord

__all__ = [
    "expert_load",
    "max_violation",
    "co_activation",
    "combination_usage",
    "combination_usage_from_counts",
    "combination_curve",
    "experts_per_token",
    "zero_expert_fraction",
    "timestep_fraction",
    "token_timestep_bins",
    "experts_per_token_by_timestep",
    "routing_diagnostics",
    "diagnostics_due",
    "block_name",
]

COMB_MASS = 0.95  # combination usage: share of the co-activation mass the counted pairs must reach


def block_name(index: int) -> str:
    """Suffix of per-layer metric names: block 3 -> "block_03"."""
    return f"block_{index:02d}"


def expert_load(mask: torch.Tensor) -> torch.Tensor:
    """Tokens per expert (E,) float64 from a routing mask (N, E) bool."""
    return mask.detach().to(torch.float64).sum(dim=0)


def max_violation(mask: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max_e load_e - mean_e load_e) / mean_e load_e, a 0-d float64 tensor (NaN if nothing selected).

    0 for perfectly balanced load; E - 1 when one expert takes every selected pair. mask (N, E) bool.
    """
    return max_violation_from_load(expert_load(mask))


def max_violation_from_load(load: torch.Tensor) -> torch.Tensor:
    """MaxVio from per-expert loads (..., E) -> (...) float64: (max - mean) / mean, NaN where the mean is 0."""
    load = load.to(torch.float64)
    mean = load.mean(dim=-1)
    return torch.where(mean > 0, (load.amax(dim=-1) - mean) / mean.clamp_min(1e-12), torch.full_like(mean, math.nan))


def co_activation(mask: torch.Tensor) -> torch.Tensor:
    """M^T M (E, E) float64: entry (i, j) counts tokens routed to both i and j (the diagonal: to i)."""
    m = mask.detach().to(torch.float64)
    return m.t() @ m


def _pair_counts(co: torch.Tensor) -> torch.Tensor:
    """Upper-triangle (i < j) entries of a co-activation matrix (E, E), flattened (E(E-1)/2,)."""
    E = co.shape[0]
    i, j = torch.triu_indices(E, E, offset=1, device=co.device)
    return co[i, j].to(torch.float64)


def combination_usage_from_counts(co: torch.Tensor, mass: float = COMB_MASS) -> torch.Tensor:
    """Combination usage (%) from co-activation counts (E, E), a 0-d float64 tensor.

    The pair counts C_ij (i < j) sorted descending, the smallest number of pairs whose counts reach `mass` of
    the total, as a percentage of all E(E-1)/2 pairs (Race-DiT §11, Fig. 13; docs/method/losses.md).
    Higher means more diverse expert combinations. NaN when no token has two experts.
    """
    pairs = _pair_counts(co)
    total = pairs.sum()
    if pairs.numel() == 0:
        return torch.full((), math.nan, dtype=torch.float64, device=co.device)
    cumulative = pairs.sort(descending=True).values.cumsum(0)
    needed = (cumulative < mass * total - 1e-9 * total).sum() + 1
    value = 100.0 * needed.to(torch.float64) / pairs.numel()
    return torch.where(total > 0, value, torch.full_like(value, math.nan))


def combination_usage(mask: torch.Tensor, mass: float = COMB_MASS) -> torch.Tensor:
    """Combination usage (%) of a routing mask (N, E) bool; see `combination_usage_from_counts`."""
    return combination_usage_from_counts(co_activation(mask), mass)


def combination_curve(co: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The curve behind combination usage: (share of pairs in %, cumulative share of co-activations).

    Both (E(E-1)/2 + 1,) float64 starting at (0, 0), pairs sorted by count descending. co (E, E).
    """
    pairs = _pair_counts(co).sort(descending=True).values
    total = pairs.sum().clamp_min(1e-12)
    zero = pairs.new_zeros(1)
    x = torch.cat([zero, torch.arange(1, pairs.numel() + 1, dtype=torch.float64, device=co.device)])
    return 100.0 * x / max(pairs.numel(), 1), torch.cat([zero, pairs.cumsum(0) / total])


def experts_per_token(mask: torch.Tensor) -> torch.Tensor:
    """Number of selected experts of each token (N,) float64 from a mask (N, E) bool."""
    return mask.detach().to(torch.float64).sum(dim=1)


def zero_expert_fraction(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of tokens with no selected expert, a 0-d float64 tensor; mask (N, E) bool."""
    return (experts_per_token(mask) == 0).to(torch.float64).mean()


def timestep_fraction(objective, t: torch.Tensor) -> torch.Tensor:
    """Objective time t (B,) -> (B,) float in [0, 1], 0 = clean data, 1 = pure noise.

    ddpm: t / num_timesteps (integer steps in [0, T)); flow: t itself (t in [0, 1], t = 1 is noise).
    """
    steps = getattr(objective, "num_timesteps", None)
    return t.double() / steps if steps else t.double()


def token_timestep_bins(t_frac: torch.Tensor, num_tokens: int, bins: int = 10) -> torch.Tensor:
    """Bin index (N,) long of every token: floor(t_frac * bins) clamped to [0, bins-1], repeated over the
    L tokens of each image; t_frac (B,) in [0, 1], num_tokens N = B*L."""
    B = t_frac.shape[0]
    if B == 0 or num_tokens % B:
        raise ValueError(f"{num_tokens} tokens do not split into {B} images")
    image_bins = (t_frac.double() * bins).floor().long().clamp(0, bins - 1)
    return image_bins.repeat_interleave(num_tokens // B)


def experts_per_token_by_timestep(mask: torch.Tensor, t_frac: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """Mean experts per token in each timestep bin (bins,) float64, NaN for bins without tokens.

    mask (N, E) bool with N = B*L, or a stack of layers' masks (layers, N, E) whose counts are averaged over
    layers; t_frac (B,) normalised timesteps (`timestep_fraction`).
    """
    counts = experts_per_token(mask) if mask.dim() == 2 else mask.detach().to(torch.float64).sum(-1).mean(0)
    index = token_timestep_bins(t_frac.to(counts.device), counts.shape[0], bins)
    total = counts.new_zeros(bins).index_add_(0, index, counts)
    tokens = counts.new_zeros(bins).index_add_(0, index, torch.ones_like(counts))
    return torch.where(tokens > 0, total / tokens.clamp_min(1), torch.full_like(total, math.nan))


def diagnostics_due(step: int, every: int, log_every: int, end_step: int) -> bool:
    """Whether optimizer step `step` (1-based, the step just finished) gets routing diagnostics.

    every > 0: each `every` steps; every = 0: with each metrics row (each `log_every` steps and the
    last step `end_step`); every < 0: never.
    """
    if every < 0:
        return False
    if every == 0:
        return step % max(log_every, 1) == 0 or step == end_step
    return step % every == 0


@torch.no_grad()
def routing_diagnostics(record: ForwardRecord, t_frac: torch.Tensor | None = None, bins: int = 10) -> dict[str, float]:
    """The training diagnostics (table in the module docstring) of one forward pass, by metric name.

    record: the filled side channel; t_frac (B,): normalised timesteps of the batch's images (None skips
    the per-timestep bins). Dense models report only the block output norms. One host synchronisation.
    """
    names: list[str] = []
    values: list[torch.Tensor] = []

    def put(name: str, value: torch.Tensor) -> None:
        names.append(name)
        values.append(value.detach().to(torch.float64).reshape(()))

    layers = sorted(record.moe)
    if layers:
        masks = [record.moe[i].mask for i in layers]
        maxvio = torch.stack([max_violation(m) for m in masks])
        put("routing/maxvio", maxvio.mean())
        for i, v in zip(layers, maxvio):
            put(f"routing/maxvio/{block_name(i)}", v)
        put("routing/comb", torch.stack([combination_usage(m) for m in masks]).nanmean())
        put("routing/zero_expert_frac", torch.stack([zero_expert_fraction(m) for m in masks]).mean())
        stacked = torch.stack([m.detach() for m in masks])  # (layers, N, E)
        put("routing/experts_per_token", stacked.to(torch.float64).sum(-1).mean())
        if t_frac is not None:
            for b, v in enumerate(experts_per_token_by_timestep(stacked, t_frac, bins)):
                put(f"routing/experts_per_token/t_bin{b}", v)
    for i in sorted(record.block_output_norms):
        norms = record.block_output_norms[i]
        put(f"norms/attn/{block_name(i)}", norms[0])
        put(f"norms/ff/{block_name(i)}", norms[1])
    if not values:
        return {}
    return dict(zip(names, torch.stack(values).tolist()))
