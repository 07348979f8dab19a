"""Expert parallelism in training (`model.expert_parallel=n_ep`): the expert gradients, the norm, the state.

The processes are laid out by `racedit.models.expert_parallel.expert_layout`: expert groups of n_ep consecutive
processes, each holding all E experts of every MoE layer (E_loc each, `racedit.models.moe.shard_experts`), and
n_proc/n_ep such groups, data-parallel replicas of one another. Everything but the experts is replicated (DDP)
or sharded over all n_proc processes (FSDP) as without expert parallelism; the expert weights are left out of
both (`expert_parameters`), because their processes hold different experts.

Gradients. Each process's loss is the mean over its own batch, and DDP and FSDP average the gradients over the
n_proc processes, so the step follows the whole batch's mean loss. An expert's gradient on its process already sums
the rows of every process of the expert group (the backward's exchange brings them), so it only needs the sum
over the data-parallel replicas of its shard and the same 1/n_proc: `reduce_expert_gradients`, one all_reduce over
the data dimension. The gradient norm for clipping counts every expert once (`clip_grad_norm_`).

State. Checkpoints hold every expert: the consolidated safetensors gather each expert group's shards
(`consolidated_state`), and the DCP shards describe each process's experts as a DTensor (Shard(0) over the
expert dimension, replicated over the data dimension; `to_checkpoint` / `from_checkpoint`), so DCP reshards
them for a resume with another n_ep, with or without FSDP, on any number of processes.

Letters (docs/method/README.md): n_proc processes, n_ep processes per expert group, E experts, E_loc = E/n_ep.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from racedit.models.expert_parallel import ExpertLayout, expert_slice
from racedit.models.moe import moe_layers, shard_experts
from racedit.training.sharding import full, local


def shard_model_experts(model: torch.nn.Module, layout: ExpertLayout | None) -> torch.nn.Module:
    """Keep this process's experts of `model` (built identically on every process) and dispatch through its
    expert group; nothing without a layout."""
    return model if layout is None else shard_experts(model, layout.expert_group)


def expert_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Name -> parameter of every expert weight of `model` (names as in `model.named_parameters()`), in order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: p for layer in moe_layers(model) for p in layer.experts.parameters() if id(p) in names}


def ignore_experts_in_ddp(model: torch.nn.Module) -> None:
    """Tell DDP (before it wraps `model`) to leave the expert weights alone: their processes hold different
    experts, so DDP's averaging and its start-up broadcast from process 0 would be wrong for them."""
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, list(expert_parameters(model)))


@torch.no_grad()
def reduce_expert_gradients(model: torch.nn.Module, layout: ExpertLayout) -> None:
    """Each expert gradient <- (sum over the data-parallel replicas of its shard) / n_proc, in one all_reduce over the
    data dimension (see the module doc); a missing gradient counts as zero, so every process calls the same."""
    params = [p for p in expert_parameters(model).values() if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    if layout.world // layout.size > 1:
        dist.all_reduce(flat, group=layout.data_group)
    flat.div_(layout.world)
    for p, part in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = part.view_as(p).clone() if p.grad is None else p.grad.copy_(part.view_as(p))


@torch.no_grad()
def clip_grad_norm_(model: torch.nn.Module, max_norm: float, layout: ExpertLayout) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over all of `model`'s gradients, each expert counted once: the norm of the
    replicated or FSDP-sharded gradients, and the sum of squares of the expert gradients over the expert group.
    Returns the total norm before clipping (float32, float64 for float64 gradients; the same on every process)."""
    experts = list(expert_parameters(model).values())
    ids = {id(p) for p in experts}
    grads = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in ids]
    expert_grads = [p.grad for p in experts if p.grad is not None]
    device = next(model.parameters()).device
    # at least float32 (bf16 squares would lose the norm), float64 gradients keep theirs: torch's clip does too
    dtype = functools.reduce(torch.promote_types, [g.dtype for g in grads + expert_grads], torch.float32)
    others = full(torch.nn.utils.get_total_norm(grads)).to(dtype) if grads else torch.zeros((), device=device)
    square = torch.zeros((), device=device, dtype=dtype)
    for g in expert_grads:
        square += g.detach().to(dtype).pow(2).sum()
    dist.all_reduce(square, group=layout.expert_group)
    total = (others.to(device).pow(2) + square).sqrt()
    if math.isfinite(max_norm):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        everything = [local(g) for g in grads] + expert_grads
        if everything:
            torch._foreach_mul_(everything, coef.to(everything[0].dtype))
    return total


@torch.no_grad()
def consolidated_state(module: torch.nn.Module, state: dict, layout: ExpertLayout | None, to_main: bool) -> dict:
    """`state` (the whole state dict of `module` but for the experts, which hold this process's shards) with every
    expert weight gathered whole over the expert group, on the CPU of the main process (`to_main`); collective.
    Without a layout, `state` as it is."""
    if layout is None:
        return state
    state = dict(state)
    group, n = layout.expert_group, layout.size
    if 0 not in dist.get_process_group_ranks(group):  # every expert group holds all experts: the main one gathers
        return state
    for name, p in expert_parameters(module).items():
        shard = local(p).detach().contiguous()
        parts = [torch.empty_like(shard) for _ in range(n)]
        dist.all_gather(parts, shard, group=group)
        if to_main:
            state[name] = torch.cat(parts).cpu()
    return state


def _as_dtensor(t: torch.Tensor, layout: ExpertLayout) -> DTensor:
    return DTensor.from_local(t, layout.mesh, [Replicate(), Shard(0)], run_check=False)


def to_checkpoint(model_state: dict, optimizer_state: dict | None, module: torch.nn.Module,
                  layout: ExpertLayout | None) -> tuple[dict, dict | None]:
    """DCP's view of a model (and optimizer) state dict: each expert weight, and its AdamW moments, as a DTensor
    of all E experts of which this process holds its rows (see the module doc). Without a layout, as they are."""
    if layout is None:
        return model_state, optimizer_state
    names = set(expert_parameters(module))
    model_state = {k: (_as_dtensor(v, layout) if k in names else v) for k, v in model_state.items()}
    if optimizer_state is not None:
        per_param = {k: ({m: (_as_dtensor(t, layout) if k in names and torch.is_tensor(t) and t.dim() else t)
                          for m, t in s.items()}) for k, s in optimizer_state["state"].items()}
        optimizer_state = {**optimizer_state, "state": per_param}
    return model_state, optimizer_state


def from_checkpoint(state: dict) -> dict:
    """The inverse of `to_checkpoint` after DCP filled it: expert DTensors back to this process's rows (nested)."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out[k] = from_checkpoint(v)
        elif isinstance(v, DTensor) and v.device_mesh.ndim == 2:
            out[k] = v.to_local()
        else:
            out[k] = v
    return out


def local_expert_rows(state: dict, module: torch.nn.Module, layout: ExpertLayout | None) -> dict:
    """A whole state dict (all E experts: a consolidated checkpoint's, or a name-keyed optimizer state's
    "state") cut to this process's experts, for a run with expert parallelism; without a layout, as it is."""
    if layout is None:
        return state
    names = set(expert_parameters(module))

    def cut(t):
        return t[expert_slice(t.shape[0], layout.expert_group)].clone() if torch.is_tensor(t) and t.dim() else t

    return {k: ({m: cut(t) for m, t in v.items()} if isinstance(v, dict) else cut(v)) if k in names else v
            for k, v in state.items()}
