"""Train-step time with expert parallelism against data parallelism on the same processes (bench/moe_step.py
--expert-parallel on CPU with gloo; bench/gpu_check.py's expert-parallel row on several GPUs with nccl).

Each of n spawned processes builds the same model twice (seed 0): "data-parallel" keeps every expert (each
process computes all E for its own batch), "expert-parallel" is `shard_experts`-ed over the n processes
(model.expert_parallel = n: E/n experts each, rows travel by all-to-all). Both take the same per-process
batch (its own per rank) and run a train step: forward with a ForwardRecord, MSE loss, backward, AdamW, the
thresholds' update. No gradient is reduced in either (a timing row: data parallelism would all-reduce every
gradient, expert parallelism on one expert group only the non-expert ones). Steps run in interleaved rounds,
all processes together; a step's time is the slowest rank's, the table gives medians. The first step's loss
of the two must agree (the same model computed two ways), which the result reports.

Letters (docs/method/README.md): B images per process, E experts, n processes.
"""

from __future__ import annotations

import json
import socket
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from racedit.models import create_model
from racedit.models.moe import moe_layers, shard_experts, update_thresholds
from racedit.models.records import ForwardRecord

VARIANTS = ("data-parallel", "expert-parallel")


class Step:
    """One variant's model, AdamW and this process's fixed batch: (B, C, H, W) latents, timesteps, labels."""

    def __init__(self, spec: dict, device: torch.device, group, rank: int):
        torch.manual_seed(0)  # the same weights on every process and in both variants
        self.model = create_model(spec["model"], **spec.get("overrides", {}))
        if group is not None:
            shard_experts(self.model, group)
        self.model.to(device).train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.device, self.bf16 = device, spec.get("bf16", False)
        g = torch.Generator().manual_seed(1 + rank)
        B, C, side = spec["batch"], self.model.in_channels, self.model.input_size
        self.x = torch.randn(B, C, side, side, generator=g).to(device)
        self.t = torch.randint(0, 1000, (B,), generator=g).to(device)
        self.y = torch.randint(0, self.model.num_classes, (B,), generator=g).to(device)
        self.target = torch.randn(B, C, side, side, generator=g).to(device)
        self.params = sum(p.numel() for p in self.model.parameters())

    def __call__(self) -> float:
        return train_step(self.model, self.optimizer, self.x, self.t, self.y, self.target, self.bf16).item()


def train_step(model, optimizer, x, t, y, target, bf16: bool) -> torch.Tensor:
    """One benchmarked training step: forward (bf16 autocast or not), MSE on the first C output channels,
    backward, AdamW, the inference thresholds' update as training makes it; returns the loss."""
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    record = ForwardRecord()
    with amp:
        out = model(x, t, y, record=record)
        loss = F.mse_loss(out[:, : x.shape[1]].float(), target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update_thresholds(model, [record.kth_scores()])
    return loss


def worker(rank: int, world: int, port: int, out_dir: str, spec: dict) -> None:
    torch.set_num_threads(spec.get("threads", 1))
    device = torch.device(spec["device"], rank) if spec["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(spec["backend"], init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        steps = {"data-parallel": Step(spec, device, None, rank),
                 "expert-parallel": Step(spec, device, dist.group.WORLD, rank)}
        first_loss = {name: step() for name, step in steps.items()}  # the same weights and batch: equal losses
        for _ in range(spec["warmup"] - 1):
            for step in steps.values():
                step()
        times = {name: [] for name in steps}
        for _ in range(spec["iters"]):
            for name, step in steps.items():
                dist.barrier()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64, device=device)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                times[name].append(elapsed.item() * 1e3)
        result = {"step_ms": {name: statistics.median(t) for name, t in times.items()}, "first_loss": first_loss,
                  "params": {name: step.params for name, step in steps.items()},
                  "experts_here": moe_layers(steps["expert-parallel"].model)[0].experts.num_experts,
                  "experts": moe_layers(steps["data-parallel"].model)[0].experts.num_experts}
        if device.type == "cuda":
            result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run(spec: dict, world: int, out_dir: Path) -> list[dict]:
    """Every rank's result of `worker` on `world` spawned processes (spawn: CUDA and a parent that has run a
    compiled backward both rule out fork). The processes are killed if this is interrupted (a row's time limit)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(worker, args=(world, port, str(out_dir), spec), nprocs=world, join=False,
                                 start_method="spawn")
    try:
        while not context.join():
            pass
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]


def summary(results: list[dict]) -> dict:
    """Rank 0's step medians (already the slowest rank's), their ratio, the first losses and their agreement."""
    r = results[0]
    dp, ep = (r["step_ms"][name] for name in VARIANTS)
    gap = max(abs(res["first_loss"]["expert-parallel"] - res["first_loss"]["data-parallel"]) for res in results)
    return {"dp_ms": dp, "ep_ms": ep, "ep_over_dp": ep / dp, "first_loss_gap": gap, "params": r["params"],
            "experts": r["experts"], "experts_here": r["experts_here"],
            "peak_mem_gib": max(res.get("peak_mem_gib", 0.0) for res in results) or None}


def print_table(spec: dict, world: int, results: list[dict]) -> None:
    s = summary(results)
    where = f"{world} {spec['backend']} processes, {spec['device']}"
    print(f"\n### Train step (fwd + bwd + AdamW), {spec['model']}, batch {spec['batch']} per process, {where}, "
          f"{spec.get('threads', 1)} thread(s) each\n")
    print("| variant | experts per process | params per process (M) | step ms (median, slowest rank) | / data-parallel |")
    print("|---|---|---|---|---|")
    for name, ms, experts in (("data-parallel (all experts on each)", s["dp_ms"], s["experts"]),
                              (f"expert-parallel n={world}", s["ep_ms"], s["experts_here"])):
        key = "data-parallel" if name.startswith("data") else "expert-parallel"
        print(f"| {name} | {experts} | {s['params'][key] / 1e6:.1f} | {ms:.1f} | {ms / s['dp_ms']:.3f} |")
    print(f"\nFirst-step loss, expert-parallel minus data-parallel, largest over ranks: {s['first_loss_gap']:.2e} "
          "(the same model computed two ways). No gradient reduction in either row.")
