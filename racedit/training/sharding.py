"""Fully sharded data parallelism (FSDP2) for `train.distributed=fsdp`.

`torch.distributed.fsdp.fully_shard` is applied to each `DiTBlock` and then to the whole model (the root
unit holds the embedders, the final layer and the stream parameters of hyper-/frac-connections). Every
parameter becomes a DTensor sharded on its first dimension over the processes, so each process keeps 1/P
of the parameters, of their gradients (reduce-scattered in the backward) and of AdamW's moments (the
optimizer is built on the sharded parameters). The EMA model is sharded the same way, unit for unit, so
its update is a local lerp of matching shards (`ema_update_`).

Why directly, under accelerate's process group, and not through accelerate's FSDP plugin: accelerate only
switches to FSDP on accelerator devices (its CPU/gloo processes stay `MULTI_CPU` and would get DDP), so the
tested CPU path could not go through it; its FSDP2 preparation adds wrapping heuristics for transformers
models (an embedding unit, a tail unit with the final norm) that a DiT does not have; and it shards the
model only, while racedit's EMA must be sharded identically. accelerate still launches the processes, sets
up the process group and devices (`LOCAL_RANK`), wraps the optimizer, accumulates and logs.

Mixed precision (`train.mixed_precision=bf16`): a `MixedPrecisionPolicy` that all-gathers and computes in
bfloat16 while the sharded master weights, the optimizer and the gradient reduction stay in float32 (the
outputs are cast back to float32 for the loss). fp16 is refused by the config checks (it needs a sharded
gradient scaler). Activation checkpointing works per block (the recomputed forward all-gathers its block
again), and `torch.compile` compiles the sharded model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from racedit.models.dit import DiTBlock


def mixed_precision_policy(mixed_precision: str) -> MixedPrecisionPolicy:
    """bf16: compute in bfloat16, keep master weights and reduce gradients in float32; else no casting."""
    if mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    output_dtype=torch.float32)
    return MixedPrecisionPolicy()


@contextlib.contextmanager
def process_group(device: torch.device, num_processes: int, enabled: bool) -> Iterator[None]:
    """Inside, a process group exists when `enabled`: the launcher's (set up by accelerate for 2+ processes), or
    a group of one made here and destroyed on the way out (FSDP and DCP need one even on a single process)."""
    made = enabled and not (dist.is_available() and dist.is_initialized())
    if made and num_processes > 1:  # never a group of one per process: each would train alone
        raise RuntimeError(f"{num_processes} processes but no process group: accelerate's was destroyed (by "
                           f"Accelerator.end_training) or never made")
    if made:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1, device_id=device if device.type == "cuda" else None)
    try:
        yield
    finally:
        if made:
            dist.destroy_process_group()


def shard_model(model: torch.nn.Module, device: torch.device, mixed_precision: str = "no",
                ignored: set[torch.nn.Parameter] | None = None) -> torch.nn.Module:
    """Shard `model` in place over all processes: one FSDP unit per DiTBlock, then the root. Needs a process
    group (`process_group`). The model is moved to `device` (this process's, LOCAL_RANK's GPU) first.
    `ignored`: parameters FSDP leaves whole and unreduced (expert parallelism's experts)."""
    model.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision_policy(mixed_precision)
    for module in model.modules():
        if isinstance(module, DiTBlock):
            fully_shard(module, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a DTensor (its shard, or the whole of a replicated one); a tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (a collective: every process must call it); a tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """Whether the next backward reduce-scatters gradients (False for all but the last micro-batch of an
    accumulated step: the unsharded gradients accumulate locally, as DDP's no_sync)."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


@torch.no_grad()
def ema_update_(ema: torch.nn.Module, model: torch.nn.Module, decay: float, n_averaged: torch.Tensor) -> None:
    """One EMA step of a sharded EMA `ema` (an AveragedModel's module, sharded like `model`) towards `model`,
    shard by shard: floating tensors e <- e + (1 - decay) (m - e) (the lerp AveragedModel's EMA makes), other
    tensors copied; `n_averaged` counts the step. Parameters and buffers, as AveragedModel(use_buffers=True)."""
    pairs = [*zip(ema.parameters(), model.parameters()), *zip(ema.buffers(), model.buffers())]
    floating = [(local(e), local(m)) for e, m in pairs if torch.is_floating_point(e) or torch.is_complex(e)]
    if floating:
        torch._foreach_lerp_([e for e, _ in floating], [m for _, m in floating], 1.0 - decay)
    for e, m in pairs:
        if not (torch.is_floating_point(e) or torch.is_complex(e)):
            local(e).copy_(local(m))
    n_averaged += 1
