"""Bytes and time of race_scope=global per MoE layer: the all-gather path against radix select; expert
parallelism's all-to-all bytes per layer and expert weights per process (bench/ep_traffic.py).

    python bench/comm_scaling.py                    # RaceDiT-XL/2-4in32 layer, per-process batch 32, 2 and 4 gloo processes
    python bench/comm_scaling.py --batch 8 --iters 5
    python bench/comm_scaling.py --only-expert-parallel   # the expert-parallel tables alone

Each process wraps `torch.distributed.all_reduce` and `all_gather` with a counter and runs, for each path, one
layer's global selection (`routing.select_global`, Expert Race) and the router similarity and balance losses
of its mask. Counted per process: "sent" = bytes of the tensors it hands to the collectives, "received" =
bytes of results it gets from the other ranks (an all_reduce's result, the other ranks' parts of an
all_gather). The formulas below are checked against the counts at the measured process counts, then
extrapolated to 8, 64 and 512 processes. The selection alone is then timed per path (median over --iters,
the slowest rank of each call). Paths: gather (the scores all-gathered), radix 4x256 (4 rounds of 256 bins,
the default) and radix 2x65536. The radix masks are checked equal to the gather mask. Then the expert-parallel
tables (`ep_traffic.report`, skipped by --no-expert-parallel): all-to-all bytes of a small sharded RaceDiT's
training forward and backward, counted at the same process counts, the expert weights per process, and the
model of both at RaceDiT-XL/2-4in32 size for expert groups up to 512.

Letters (docs/method/README.md): B images per process, L tokens per image, E experts, k experts per token
on average, N = B*L tokens, w processes, G groups (1 for Expert Race).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ep_traffic  # noqa: E402  (bench/, beside this file)

from racedit.models.losses import balance_loss, router_similarity_loss  # noqa: E402
from racedit.models.routing import select_global  # noqa: E402

L, E, K_ACTIVE = 256, 32, 4  # RaceDiT-XL/2-4in32 at 256x256: 16x16 latent tokens of patch 2
PATHS = {"gather": ("gather", 8), "radix 4x256": ("radix", 8), "radix 2x65536": ("radix", 16)}
PARTS = ("selection", "similarity loss", "balance loss")


class Counter:
    """Wraps dist.all_reduce / all_gather; adds each call's bytes to the part being measured."""

    def __init__(self):
        self.part, self.bytes = None, {}
        self._reduce, self._gather = dist.all_reduce, dist.all_gather

    def add(self, sent: int, received: int) -> None:
        if self.part is not None:
            s, r = self.bytes.get(self.part, (0, 0))
            self.bytes[self.part] = (s + sent, r + received)

    def all_reduce(self, tensor, *args, **kwargs):
        n = tensor.numel() * tensor.element_size()
        self.add(n, n)
        return self._reduce(tensor, *args, **kwargs)

    def all_gather(self, outputs, tensor, *args, **kwargs):
        n = tensor.numel() * tensor.element_size()
        self.add(n, n * (len(outputs) - 1))
        return self._gather(outputs, tensor, *args, **kwargs)

    def install(self) -> None:
        dist.all_reduce, dist.all_gather = self.all_reduce, self.all_gather


def worker(rank: int, world: int, port: int, out_dir: str, batch: int, iters: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        counter = Counter()
        counter.install()
        g = torch.Generator().manual_seed(rank)
        logits = torch.randn(batch, L, E, generator=g)
        result = {"bytes": {}, "ms": {}, "identical": True}
        masks = {}
        for name, (method, bits) in PATHS.items():
            counter.bytes = {}
            counter.part = "selection"
            mask, _ = select_global(logits, "expert_race", K_ACTIVE, method=method, radix_bits=bits)
            masks[name] = mask
            flat_logits, flat_mask = logits.view(-1, E).requires_grad_(True), mask.view(-1, E)
            counter.part = "similarity loss"
            router_similarity_loss(flat_logits, flat_mask, group=dist.group.WORLD, method=method).backward()
            counter.part = "balance loss"
            balance_loss(flat_logits, flat_mask, group=dist.group.WORLD, method=method).backward()
            counter.part = None
            result["bytes"][name] = counter.bytes
            times = []
            for _ in range(iters):
                dist.barrier()
                start = time.perf_counter()
                select_global(logits, "expert_race", K_ACTIVE, method=method, radix_bits=bits)
                elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                times.append(elapsed.item() * 1e3)
            result["ms"][name] = statistics.median(times)
            result["identical"] &= torch.equal(masks[name], masks["gather"])
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run(world: int, batch: int, iters: int, out_dir: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(world, port, str(out_dir), batch, iters), nprocs=world, start_method="fork")
    return json.loads(Path(out_dir, "rank0.json").read_text())


def formulas(w: int, B: int) -> dict[str, dict[str, tuple[int, int]]]:
    """(sent, received) bytes per process per layer of each path and part, as functions of w and B."""
    N, G = B * L, 1
    scores, logits, mask = 4 * B * L * E, 4 * N * E, N * E  # float32 scores and logits, uint8 mask
    gathered = {  # gather_rows: an all_gather of the shape (int64 per dim), then of the rows
        "selection": (24 + scores, (w - 1) * (24 + scores)),
        "similarity loss": (16 + logits + 16 + mask, (w - 1) * (16 + logits + 16 + mask)),
    }
    gathered["balance loss"] = gathered["similarity loss"]
    out = {"gather": gathered}
    similarity, balance = 4 * (E * (E + 1) + 1), 4 * (2 * E + 1)  # upper triangles of M'M, P'P and N; E-vectors
    for name, bits in (("radix 4x256", 8), ("radix 2x65536", 16)):
        histograms = (32 // bits) * G * (1 << bits) * 4  # int32 counts (below 2^31 candidates per group)
        shape = 40  # B, L, E, L^2, E^2 as int64
        out[name] = {"selection": (shape + histograms + 4 * G, shape + histograms + (w - 1) * 4 * G),
                     "similarity loss": (similarity, similarity), "balance loss": (balance, balance)}
    return out


def kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 1024 ** 2 else f"{n / 1024 ** 2:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="images per process (default 32)")
    parser.add_argument("--iters", type=int, default=7, help="timed selections per path (default 7)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="gloo process counts to measure")
    parser.add_argument("--tmp", default="/tmp/racedit-comm-scaling", help="scratch directory")
    parts = parser.add_mutually_exclusive_group()
    parts.add_argument("--only-expert-parallel", action="store_true", help="only the expert-parallel tables")
    parts.add_argument("--no-expert-parallel", action="store_true", help="skip the expert-parallel tables")
    args = parser.parse_args()
    if args.only_expert_parallel:
        print(f"torch {torch.__version__}, gloo on CPU, 1 thread per process\n")
        ep_traffic.report(args.worlds, Path(args.tmp))
        return
    global_race(args)
    if not args.no_expert_parallel:
        print()
        ep_traffic.report(args.worlds, Path(args.tmp))


def global_race(args) -> None:
    B = args.batch
    print(f"RaceDiT-XL/2-{K_ACTIVE}in{E} MoE layer, B={B} images per process, L={L}, E={E}, Expert Race, "
          f"float32 scores; torch {torch.__version__}, gloo on CPU, 1 thread per process\n")
    measured = {}
    for w in args.worlds:
        out = Path(args.tmp, f"w{w}")
        out.mkdir(parents=True, exist_ok=True)
        measured[w] = run(w, B, args.iters, out)
        assert measured[w]["identical"], "radix mask differs from the gather mask"

    print("## Measured bytes per process per layer (sent / received), rank 0\n")
    print("| processes | path | " + " | ".join(PARTS) + " | total | formula matches |")
    print("|---|---|" + "---|" * (len(PARTS) + 2))
    for w, result in measured.items():
        expected = formulas(w, B)
        for name in PATHS:
            got = result["bytes"][name]
            cells = [f"{kib(got[p][0])} / {kib(got[p][1])}" for p in PARTS]
            total = [sum(got[p][i] for p in PARTS) for i in (0, 1)]
            same = all(tuple(got[p]) == expected[name][p] for p in PARTS)
            print(f"| {w} | {name} | " + " | ".join(cells) + f" | {kib(total[0])} / {kib(total[1])} | {same} |")

    print("\n## Formulas (bytes per process per layer; N = B*L, w processes, G = 1 group)\n")
    print("- gather, selection: sent 24 + 4BLE, received (w-1)(24 + 4BLE)  (shape, then the float32 scores)")
    print("- gather, each loss: sent 32 + 5NE, received (w-1)(32 + 5NE)  (logits float32 and mask uint8)")
    print("- radix r bits, selection: sent 40 + (32/r) G 2^r 4 + 4G, received 40 + (32/r) G 2^r 4 + (w-1) 4G")
    print("  (shape all_reduce, 32/r histogram all_reduces of int32 counts, the tie counts' all_gather)")
    print("- radix, similarity loss: 4(E(E+1) + 1) each way; balance loss: 4(2E + 1) each way")

    print("\n## Extrapolated: bytes received per process per layer (selection + similarity loss; + balance)\n")
    worlds = (8, 64, 512)
    print("| path | " + " | ".join(f"{w} processes" for w in worlds) + " |")
    print("|---|" + "---|" * len(worlds))
    for name in PATHS:
        cells = []
        for w in worlds:
            f = formulas(w, B)[name]
            base = f["selection"][1] + f["similarity loss"][1]
            cells.append(f"{kib(base)} (+{kib(f['balance loss'][1])})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nPer step over 28 layers, selection + similarity loss received, at 64 processes: "
          + ", ".join(f"{name} {kib(28 * sum(formulas(64, B)[name][p][1] for p in PARTS[:2]))}"
                      for name in PATHS))

    print("\n## Selection time per layer (ms, median of the slowest rank)\n")
    print("| processes | " + " | ".join(PATHS) + " |")
    print("|---|" + "---|" * len(PATHS))
    for w, result in measured.items():
        print(f"| {w} | " + " | ".join(f"{result['ms'][name]:.1f}" for name in PATHS) + " |")


if __name__ == "__main__":
    main()
