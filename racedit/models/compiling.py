"""`torch.compile` for racedit models: one graph per model (or per block), no graph breaks, no recompiles.

Every family traces whole (`fullgraph=True`): the training selection has N*k pairs known from shapes
(`racedit.models.moe_dispatch`), the CPU expert kernel and the global race are custom ops the compiler keeps
opaque, and eval's threshold check runs on the device (`torch.cond`). Two selections have a data-dependent
number of pairs, the eval threshold (S >= tau) and race_scope="global" (this rank's share); `torch.nonzero`
sizes their pair lists, which the compiler captures as an unbacked size only with dynamo's
`capture_dynamic_output_shape_ops`; and a block under activation checkpointing writes the forward record,
a side effect dynamo refuses to trace unless told not to replay it in the recomputation.
`compile_model` sets both (`configure_dynamo`, process-wide dynamo settings), so a new count never
recompiles; calling `torch.compile` on a racedit model directly needs the same settings. Expert parallelism
(`racedit.models.expert_parallel`) needs nothing more: its collectives are custom ops, and the number of rows a
process receives is an unbacked size given by the row exchange's fake, so new loads (none included) do not
recompile either.

Letters (docs/method/README.md): B images.
"""

from __future__ import annotations

import torch
import torch._dynamo

from racedit.limits import CHOICES
from racedit.models.dit import DiT

# torch.compile's modes (torch.compile's documentation); "default" balances compile time and speed.
COMPILE_MODES = CHOICES["train.compile_mode"]
COMPILE_UNITS = ("model", "block")


def configure_dynamo() -> None:
    """The process-wide dynamo settings racedit models need: capture ops whose output size depends on the data
    (`torch.nonzero`) as unbacked sizes; under activation checkpointing, write the forward's record once and
    do not replay that write when the backward recomputes the block (eager replays it with equal values)."""
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


def compile_model(model: DiT, mode: str = "default", unit: str = "model", backend: str | None = None,
                  dynamic: bool | None = None) -> DiT:
    """Compile `model` in place with `fullgraph=True` (`nn.Module.compile`: the module, its class, its state
    dict keys stay as they are) and return it. unit="model": one graph for the whole forward (and, in
    training, its backward); unit="block": one per `DiTBlock`'s forward, the embedders, the final layer and
    module hooks eager (what FSDP needs: its hooks gather and free each block's shards, and are not traced).

    mode: one of COMPILE_MODES (torch's modes, for its default backend, inductor). backend: None for torch's
    default, or another of torch.compile's backends (tests trace with "aot_eager"). dynamic: torch.compile's;
    None marks a dimension dynamic only once it changes (for sampling, another batch size B compiles once
    more, then never again).
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; allowed: {list(COMPILE_MODES)}")
    if unit not in COMPILE_UNITS:
        raise ValueError(f"unknown compile unit {unit!r}; allowed: {list(COMPILE_UNITS)}")
    configure_dynamo()
    options = dict(fullgraph=True, dynamic=dynamic)
    if backend is not None:
        options["backend"] = backend
    if mode != "default":  # torch's own default; a mode only applies to inductor
        options["mode"] = mode
    if unit == "model":
        model.compile(**options)
        return model
    # One code object for all blocks: each block's own constants (its layer index, its routing) are guarded,
    # so every block is one cache entry of the same frame; make room for all of them.
    limit = max(torch._dynamo.config.cache_size_limit, 2 * len(model.blocks))
    torch._dynamo.config.cache_size_limit = limit
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    for block in model.blocks:
        # the forward only: module hooks (FSDP2's gather and reshard of the block's shards) stay eager
        block.forward = torch.compile(block.forward, **options)
    return model
