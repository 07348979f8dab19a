"""Expert-parallel sampling: the n_proc processes of a sampling job split every MoE layer's experts in expert
groups of n_ep (`racedit sample --expert-parallel N`, or `load_for_sampling(expert_parallel=...)`), as training does.

Layout: a (data, expert) grid of shape (n_proc/n_ep, n_ep): processes g*n_ep .. (g+1)*n_ep - 1 form expert group g
and hold E_loc = E/n_ep experts each of every MoE layer (`racedit.models.moe.shard_experts` of the whole loaded
model); the n_proc/n_ep groups sample different batches, as data-parallel processes do. One process, or n_ep = 1,
samples the whole model.

Lockstep: each MoE forward is a collective of the expert group, so its processes run the same forwards. Each
round every process samples its next batch or, with none left, the forwards of a batch whose images are dropped
(`idle_forwards`); the group agrees each round (`group_agrees`) whether any of its processes has a batch left
and whether one must stop (a signal). Sample i depends only on (seed, i) and the per-process batch, up to the
last bits of the expert matmuls, which run on rows gathered from the group (CPU: bit for bit, as tested).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from racedit.limits import ConfigError
from racedit.models.expert_parallel import expert_layout
from racedit.models.moe import moe_layers


def sampling_expert_group(model: torch.nn.Module, size: int, flag: str = "model.expert_parallel"):
    """The expert group of this process for `size` processes per group, or None (no process group, one process,
    or size 1: the whole model samples). Collective over all processes (it makes the groups); ConfigError,
    naming `flag`, for a dense model or a size that does not divide the experts or the process count."""
    if size == 1 or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    layers = moe_layers(model)
    experts = layers[0].experts.num_experts if layers else 0
    world = dist.get_world_size()
    if not experts:
        raise ConfigError(f"bad value for {flag}: {size} splits the experts of MoE layers, but this model is "
                          "dense; use 1")
    if experts % size:
        raise ConfigError(f"bad value for {flag}: {size} does not divide the {experts} experts; use a divisor")
    if world % size:
        raise ConfigError(f"bad value for {flag}: {size} does not divide the {world} sampling processes; use a "
                          f"divisor of {world}, or 1 (every process holds all experts)")
    return expert_layout(next(model.parameters()).device, size).expert_group  # the groups training makes


def expert_group_of(model: torch.nn.Module):
    """The expert group `shard_experts` gave the MoE layers of `model`, or None (the whole model)."""
    return next((layer.expert_group for layer in moe_layers(model) if layer.expert_group is not None), None)


def group_agrees(group, more: bool, stop: bool, device: torch.device) -> tuple[bool, bool]:
    """(whether any process of `group` has a batch left, whether any must stop): one all_reduce (max) of two
    flags; every process of the group calls it once per round."""
    flags = torch.tensor([int(more), int(stop)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return bool(flags[0]), bool(flags[1])
