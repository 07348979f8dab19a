#!/usr/bin/env python
"""Memory per process under DDP and FSDP (`train.distributed`): parameters, gradients, AdamW state, EMA.

    python bench/memory_scale.py                 # the tables (model), the 2-process check, activations
    python bench/memory_scale.py --skip-measure  # the model tables only

1. Model. P parameters in float32: DDP holds 4P (weights) + 4P (gradients) + 8P (AdamW's two moments) + 4P
   (EMA) = 20P bytes on every process; FSDP holds 20P/N, plus the all-gathered float32 weights of the
   unit(s) in use (FSDP2 gathers one DiTBlock at a time and prefetches the next: 2 x the largest block; the
   root unit, embedders and final layer, stays gathered through the step). Counted for DiT-XL/2,
   RaceDiT-XL/2-4in32 and RaceDiT-XL/2-4in64 (twice the experts, 5.2B) at 1, 2, 4, 8 and 64 processes from the presets' parameter
   counts (models built on the meta device).
2. Check: a small Race model trained one step by `racedit.training.sharding` on 2 gloo processes on CPU; the
   bytes each process really holds (the local shards of weights, gradients, AdamW moments and EMA, summed
   from the tensors) against the model of point 1.
3. Activations: the bytes autograd saves for the backward in one DiTBlock of each preset (ImageNet 256: 256
   tokens), measured on CPU under bfloat16 autocast at batch 2 and scaled linearly to batch 32 and the
   model's depth; with activation checkpointing, a block's input per block plus one block's activations.
   Then which presets fit an 80 GB (H100) and a 141 GB (H200) GPU at per-GPU batch 32, state + activations,
   with 10% left for the allocator and the CUDA context. Prints tables; no assertion.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from racedit.config import ModelConfig  # noqa: E402
from racedit.models import create_model  # noqa: E402
from racedit.models.dit import DiTBlock  # noqa: E402

PRESETS = ("DiT-XL/2", "RaceDiT-XL/2-4in32", "RaceDiT-XL/2-4in64")
PROCESSES = (1, 2, 4, 8, 64)
GB = 1e9
CAPACITY = {"80 GB": 80e9, "141 GB": 141e9}
USABLE = 0.9  # the rest for the CUDA context, the allocator's fragmentation, NCCL buffers


def model_config(name: str, **fields):
    """ImageNet 256 in SD-VAE latents: 32 x 32 x 4, 1000 classes."""
    return ModelConfig(name=name, input_size=32, in_channels=4, num_classes=1000, **fields)


def meta_model(name: str):
    with torch.device("meta"):
        return create_model(model_config(name))


def sizes(model) -> dict[str, int]:
    """Parameter counts: all, the largest DiTBlock, the root unit (everything outside the blocks)."""
    total = sum(p.numel() for p in model.parameters())
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.modules() if isinstance(b, DiTBlock)]
    return {"total": total, "largest_block": max(blocks), "root": total - sum(blocks), "depth": len(blocks)}


def state_bytes(n: dict[str, int], scheme: str, processes: int) -> dict[str, float]:
    """Bytes per process of weights, gradients, AdamW and EMA (float32), and FSDP's gathered units."""
    share = 1 if scheme == "ddp" else processes
    per = n["total"] / share
    out = {"params": 4 * per, "grads": 4 * per, "adamw": 8 * per, "ema": 4 * per}
    out["gathered"] = 0.0 if scheme == "ddp" or processes == 1 else 4 * (2 * n["largest_block"] + n["root"])
    return out


def print_state_table() -> dict[str, dict]:
    counts = {name: sizes(meta_model(name)) for name in PRESETS}
    print("## Training state per process (GB, float32 master weights; FSDP adds its gathered units)\n")
    print("| model | params | scheme | " + " | ".join(f"{p} proc" for p in PROCESSES) + " |")
    print("|---|---|---|" + "---|" * len(PROCESSES))
    for name, n in counts.items():
        for scheme in ("ddp", "fsdp"):
            cells = []
            for p in PROCESSES:
                b = state_bytes(n, scheme, p)
                cells.append(f"{sum(b.values()) / GB:.1f}")
            print(f"| {name} | {n['total'] / 1e9:.2f}B | {scheme} | " + " | ".join(cells) + " |")
    print("\nper process at 8 processes, GB: params / grads / AdamW / EMA / gathered units")
    for name, n in counts.items():
        for scheme in ("ddp", "fsdp"):
            b = state_bytes(n, scheme, 8)
            print(f"  {name:20s} {scheme:4s} " + " / ".join(f"{v / GB:.2f}" for v in b.values()))
    return counts


# --- 2. the 2-process check -----------------------------------------------------------------------------

SMALL = dict(name="RaceDiT-S/2-2in8", input_size=8, in_channels=4, num_classes=10, depth=4)


def _local_bytes(tensors) -> int:
    from racedit.training.sharding import local

    return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.optim.swa_utils import AveragedModel

    from racedit.models.records import ForwardRecord
    from racedit.training.loop import param_groups
    from racedit.training.sharding import ema_update_, shard_model

    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL)
    model = create_model(cfg)
    ema = AveragedModel(model, use_buffers=True)
    ema.requires_grad_(False)
    shard_model(model, torch.device("cpu"))
    shard_model(ema.module, torch.device("cpu"))
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-4)
    x, t, y = torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    model(x, t, y, ForwardRecord()).square().mean().backward()
    optimizer.step()
    ema_update_(ema.module, model, 0.999, ema.n_averaged)
    params = list(model.parameters())
    measured = {"params": _local_bytes(params), "grads": _local_bytes(p.grad for p in params),
                "adamw": _local_bytes(v for s in optimizer.state.values() for k, v in s.items() if k != "step"),
                "ema": _local_bytes(ema.module.parameters())}
    # the cost of a sharded checkpoint: every process writes its shards; consolidating gathers to the main one
    import time

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    from racedit.training.checkpointing import FULL

    dist.barrier()
    t0 = time.perf_counter()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "ema": get_model_state_dict(ema.module), "optimizer": optimizer_state},
             checkpoint_id=f"{out_dir}/shards")
    dist.barrier()
    t1 = time.perf_counter()
    full_model, full_ema = get_model_state_dict(model, options=FULL), get_model_state_dict(ema.module, options=FULL)
    if rank == 0:
        save_file(full_model, f"{out_dir}/model.safetensors")
        save_file(full_ema, f"{out_dir}/ema.safetensors")
    dist.barrier()
    measured.update(shards_s=t1 - t0, consolidate_s=time.perf_counter() - t1)
    torch.save({k: torch.tensor(v) for k, v in measured.items()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def measure_two_processes() -> None:
    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import free_port

    cfg = ModelConfig(**SMALL)
    with torch.device("meta"):
        n = sizes(create_model(cfg))
    trainable = sum(p.numel() for p in create_model(cfg).parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(2, free_port(), d), nprocs=2, start_method="fork")
        ranks = [torch.load(f"{d}/rank{r}.pt", weights_only=True) for r in range(2)]
    model = state_bytes(n, "fsdp", 2)
    print(f"\n## Check: {SMALL['name']} (depth 4, {n['total'] / 1e6:.2f}M params) sharded on 2 gloo processes, "
          f"bytes per process after one step\n")
    print("| | params | grads | AdamW | EMA |")
    print("|---|---|---|---|---|")
    for r, m in enumerate(ranks):
        print(f"| measured, rank {r} | " + " | ".join(f"{int(m[k]):,}" for k in ("params", "grads", "adamw", "ema"))
              + " |")
    # AdamW holds moments for trainable parameters only (the frozen position embedding has none)
    adamw = 8 * trainable / 2
    print(f"| model 20P/N | {model['params']:,.0f} | {model['grads']:,.0f} | {adamw:,.0f} | {model['ema']:,.0f} |")
    print(f"| DDP (whole) | {4 * n['total']:,} | {4 * n['total']:,} | {8 * trainable:,} | {4 * n['total']:,} |")
    shards_s, consolidate_s = float(ranks[0]["shards_s"]), float(ranks[0]["consolidate_s"])
    print(f"\nsave: shards (16 bytes/param, both processes in parallel) {shards_s:.2f} s = "
          f"{16 * n['total'] / shards_s / 1e6:.0f} MB/s; consolidated model + EMA (8 bytes/param, gathered, written "
          f"by the main process) {consolidate_s:.2f} s = {8 * n['total'] / consolidate_s / 1e6:.0f} MB/s")


# --- 3. activations ------------------------------------------------------------------------------------

def block_activation_bytes(name: str, batch: int = 2) -> tuple[int, int]:
    """(bytes autograd saves in one DiTBlock's forward at `batch`, bytes of its input) under bf16 autocast."""
    cfg = model_config(name, depth=1)
    torch.manual_seed(0)
    model = create_model(cfg).train()
    block = model.blocks[0]
    L, D = model.x_embedder.num_patches, model.config.hidden_size
    h = torch.randn(batch, L, D, requires_grad=True)
    c = torch.randn(batch, D)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    from racedit.models.records import ForwardRecord

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(h, c, ForwardRecord())
    seen, total = set(), 0
    for t in saved:  # a tensor saved by several ops is held once
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen and t.device.type != "meta":
            seen.add(key)
            total += t.untyped_storage().nbytes()
    del out
    return total, batch * L * D * 2  # the block input, kept in bf16 under checkpointing


def print_fit_table(counts: dict[str, dict], processes: int = 8, batch: int = 32) -> None:
    print(f"\n## Fit at per-GPU batch {batch}, {processes} GPUs (state + activations, GB; fits if under "
          f"{USABLE:.0%} of the GPU)\n")
    print("| model | activations / block at batch 32 | scheme | checkpointing | total | 80 GB | 141 GB |")
    print("|---|---|---|---|---|---|---|")
    for name, n in counts.items():
        per_block, block_input = block_activation_bytes(name)
        scale = batch / 2
        full_act = per_block * scale * n["depth"]
        ckpt_act = block_input * scale * n["depth"] + per_block * scale
        for scheme in ("ddp", "fsdp"):
            state = sum(state_bytes(n, scheme, processes).values())
            for ac, act in (("off", full_act), ("on", ckpt_act)):
                total = state + act
                fits = ["yes" if total < USABLE * cap else "no" for cap in CAPACITY.values()]
                print(f"| {name} | {per_block * scale / GB:.2f} | {scheme} | {ac} | {total / GB:.1f} | "
                      + " | ".join(fits) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-measure", action="store_true", help="only the model tables")
    args = parser.parse_args()
    torch.set_num_threads(1)
    counts = print_state_table()
    if not args.skip_measure:
        measure_two_processes()
        print_fit_table(counts)


if __name__ == "__main__":
    main()
