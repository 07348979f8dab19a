"""The training state in checkpoints, under DDP and FSDP, and resuming across the two and across process counts.

DDP (`train.distributed=ddp`): the main process writes the whole model, EMA and optimizer (`state.pt`).
FSDP, and expert parallelism (`model.expert_parallel` > 1, whose processes hold different experts; with DDP
or FSDP for the rest): every process writes its shards of the model, the EMA and AdamW's moments with
`torch.distributed.checkpoint` (DCP) into the checkpoint's staging directory (`shards/`, in parallel); the
main process then writes the consolidated `model.safetensors` and `ema.safetensors` (gathered to it, so
sampling, evaluation, conversion and the routing report read the checkpoint as any other), `state.pt`
without the optimizer, the config and the manifest, which lists the shards too, and publishes the directory
in one rename (`racedit.checkpoint.save_checkpoint(..., staged=...)`). A damaged or missing shard is named
like any other file of the checkpoint.

Resuming (`restore_optimizer`): DCP reshards on load, so an FSDP checkpoint continues on any number of
processes, sharded or not. FSDP from FSDP loads model, EMA and optimizer shards; DDP from FSDP loads the
consolidated weights and the whole optimizer state from the shards; FSDP from DDP loads the weights before
sharding and distributes the saved optimizer state (keyed by parameter name) over the shards. Expert shards
are DTensors over the (data, expert) mesh in the DCP files (`racedit.training.expert_sharding`), so they
reshard the same way: a run resumes with another `model.expert_parallel`, 1 included.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from racedit.checkpoint import SHARDS, CheckpointError, save_checkpoint, start_staging, verify_checkpoint
from racedit.config import Config
from racedit.fileio import file_entry
from racedit.training.expert_sharding import (
    ExpertLayout,
    consolidated_state,
    from_checkpoint,
    local_expert_rows,
    to_checkpoint,
)
from racedit.training.sharding import is_sharded

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered whole, on the main process's CPU


def is_sharded_checkpoint(ckpt: Path) -> bool:
    return (Path(ckpt) / SHARDS).is_dir()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper around the torch optimizer


def _writes_shards(model: torch.nn.Module, layout: ExpertLayout | None) -> bool:
    """Whether a checkpoint of this run is sharded: under FSDP, or when processes hold different experts."""
    return is_sharded(model) or layout is not None


def _sharded_state(model: torch.nn.Module, ema_module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   layout: ExpertLayout | None) -> dict:
    """This run's state as DCP saves and loads it: {"model", "ema", "optimizer"} (experts as DTensors)."""
    model_state, optimizer_state = to_checkpoint(*get_state_dict(model, optimizer), model, layout)
    ema_state, _ = to_checkpoint(get_model_state_dict(ema_module), None, ema_module, layout)
    return {"model": model_state, "ema": ema_state, "optimizer": optimizer_state}


def whole_state(module: torch.nn.Module, layout: ExpertLayout | None, to_main: bool) -> dict:
    """`module`'s state dict whole (FSDP shards and expert shards gathered) on the main process's CPU (`to_main`),
    {} elsewhere; collective when the module is sharded either way."""
    if is_sharded(module):
        state = get_model_state_dict(module, options=FULL)
    else:
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()} if to_main else {}
    state = consolidated_state(module, state, layout, to_main)
    return state if to_main else {}


def save_training_checkpoint(ckpt_root: Path, step: int, *, is_main: bool, model: torch.nn.Module,
                             ema_module: torch.nn.Module, optimizer: torch.optim.Optimizer, train_state: dict,
                             config: Config, keep_last: int, layout: ExpertLayout | None = None) -> Path | None:
    """Checkpoint `step` under `ckpt_root`; every process calls it (it is collective under FSDP and expert
    parallelism, `layout`). `model` is the unwrapped model (sharded or not), `train_state` everything of
    `state.pt` but the optimizer. Returns the checkpoint's path on the main process, None elsewhere."""
    optimizer = _optimizer(optimizer)
    if not _writes_shards(model, layout):
        if not is_main:
            return None
        return save_checkpoint(ckpt_root, step, model_state=model.state_dict(), ema_state=ema_module.state_dict(),
                               train_state={"optimizer": optimizer.state_dict(), **train_state}, config=config,
                               keep_last=keep_last)
    # the main process makes the staging directory; every process learns its name (the main process's pid)
    box = [start_staging(ckpt_root, step) if is_main else None]
    dist.broadcast_object_list(box, src=0)
    staged = Path(box[0])
    dcp.save(_sharded_state(model, ema_module, optimizer, layout), checkpoint_id=staged / SHARDS)
    # each process hashes (and fsyncs) the shard files it wrote, in parallel; the main process lists them
    own = {f"{SHARDS}/{p.name}": file_entry(p) for p in sorted((staged / SHARDS).glob(f"__{dist.get_rank()}_*"))}
    entries = [None] * dist.get_world_size()
    dist.all_gather_object(entries, own)
    full_model = whole_state(model, layout, is_main)  # collectives: every process takes part
    full_ema = whole_state(ema_module, layout, is_main)
    if not is_main:
        return None
    return save_checkpoint(ckpt_root, step, model_state=full_model, ema_state=full_ema,
                           train_state={**train_state, "optimizer": "shards"}, config=config, keep_last=keep_last,
                           staged=staged, shard_entries={k: v for e in entries for k, v in e.items()})


def _load_shards(ckpt: Path, state: dict) -> None:
    """Fill `state` ({"model"|"ema"|"optimizer": state dict}) from the checkpoint's shards, after verifying them.
    Partial: AdamW holds no moments for a parameter that never had a gradient (a router's unused target head),
    while a freshly initialised optimizer state lists every parameter."""
    verify_checkpoint(ckpt, [SHARDS])
    try:
        with warnings.catch_warnings():  # a DDP run on one process has no process group: intended
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, checkpoint_id=ckpt / SHARDS, planner=DefaultLoadPlanner(allow_partial_load=True),
                     no_dist=not _distributed())
    except Exception as e:  # DCP's own error for a shard that verification could not see (verification off)
        raise CheckpointError(f"{ckpt / SHARDS} cannot be read ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''})") from None


def _by_name(saved: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A `torch.optim.Optimizer.state_dict()` (parameters numbered in group order) keyed by parameter names
    instead, the form `set_optimizer_state_dict` distributes over shards."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]
    return {"state": {order[i]: s for i, s in saved["state"].items()}, "param_groups": groups}


def weights_load_before_sharding(ckpt: Path, sharded_run: bool) -> bool:
    """Whether the run loads `ckpt`'s model and EMA from its safetensors into the unsharded model (every case
    but a sharded run, FSDP or expert-parallel, from a sharded checkpoint, which loads its shards after
    sharding)."""
    return not (sharded_run and is_sharded_checkpoint(ckpt))


def restore_optimizer(ckpt: Path, state: dict, model: torch.nn.Module, ema_module: torch.nn.Module,
                      optimizer: torch.optim.Optimizer, layout: ExpertLayout | None = None) -> None:
    """Load the optimizer state of `ckpt` (and, for a sharded run from a sharded checkpoint, the model and EMA
    shards) into this run's `model`, `ema_module` and `optimizer`, sharded or not, with experts spread over
    `layout`'s expert groups or not. `state`: its state.pt."""
    optimizer = _optimizer(optimizer)
    if not is_sharded_checkpoint(ckpt):
        if _writes_shards(model, layout):  # not strict: AdamW keeps no moments for a parameter never updated
            by_name = _by_name(state["optimizer"], model, optimizer)
            by_name["state"] = local_expert_rows(by_name["state"], model, layout)
            set_optimizer_state_dict(model, optimizer, by_name,
                                     options=StateDictOptions(full_state_dict=is_sharded(model), strict=False))
        else:
            optimizer.load_state_dict(state["optimizer"])
        return
    if _writes_shards(model, layout):
        shards = _sharded_state(model, ema_module, optimizer, layout)
        _load_shards(ckpt, shards)
        shards = from_checkpoint(shards)
        set_model_state_dict(model, shards["model"])
        set_model_state_dict(ema_module, shards["ema"])
        set_optimizer_state_dict(model, optimizer, shards["optimizer"])
    else:  # the whole optimizer state on every process, read from the shards
        shards = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        _load_shards(ckpt, shards)
        set_optimizer_state_dict(model, optimizer, shards["optimizer"])
