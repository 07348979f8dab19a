"""Expert parallelism's all-to-all bytes per MoE layer and expert-weight bytes per process (bench/comm_scaling.py).

Measured: each of w forked gloo processes (the expert group, n = w) builds the same small RaceDiT (seed 0),
`shard_experts` it, and runs one training forward (with a ForwardRecord) and its backward, with
`torch.distributed.all_to_all_single` wrapped by a counter (`AllToAllCounter`): every exchange of
`racedit.models.expert_parallel` (the per-expert counts, the rows to the experts, the results back, and the
backward's inverse exchanges) adds what it moves. "sent" = the bytes of the input rows bound for other
processes, "received" = the output rows that came from other processes (a process's rows for its own
experts stay put). Checked against two numbers:
- exact, from the recorded masks: rows to others n_sel - own, rows from others R_o (from the per-expert counts
  of every process, all-reduced after the step, outside the counter): forward sent = received =
  (n_sel - own + R_o) * D * b bytes of rows (out to the experts, results back), the backward the same;
- the model (`all_to_all_formula`): each process's n_sel = N*k routed rows spread evenly over the n processes,
  so (n-1)/n of them leave: 2 * n_sel * (n-1)/n * D * b per direction, forward and backward alike, plus the
  counts' 8E(n-1)/n. Independent of E but for the counts; it tends to the issue's 2 * n_sel * D * b.
  measured / model is how far routing's expert loads are from even.
Expert weights: bytes of every MoE layer's w1, b1, w2, b2 after `shard_experts`, against the unsharded model's
(also counted at RaceDiT-XL/2-4in32 size, on the meta device).

Letters (docs/method/README.md): B images per process, L tokens per image, N = B*L tokens, D width, E experts,
k experts per token on average, h expert hidden, n (n_ep in the package) processes of the expert group, n_sel routed (token, expert)
rows of a process, b bytes per exchanged value (float32 4, bfloat16 2).
"""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from racedit.models import create_model
from racedit.models.expert_parallel import expert_slice
from racedit.models.moe import moe_layers, shard_experts
from racedit.models.records import ForwardRecord

# The measured models: small RaceDiTs (D=128, 2 blocks, 16x16 inputs of patch 2: L=64), k=2 with E=8 and E=32,
# so the rows are the same and only E differs. (label, preset, batch per process, autocast dtype or None)
SMALL = dict(depth=2, hidden_size=128, num_heads=2, input_size=16)
MEASURED = (("S-2in8 small", "RaceDiT-S/2-2in8", 8, None), ("S-2in32 small", "RaceDiT-S/2-2in32", 8, None),
            ("S-2in32 small", "RaceDiT-S/2-2in32", 8, torch.bfloat16))
# The modelled size: RaceDiT-XL/2-4in32 at 256x256, per-process batch 32 (D=1152, L=256, 28 MoE layers).
XL = dict(name="RaceDiT-XL/2-4in32", D=1152, E=32, k=4, L=256, B=32, depth=28)
PHASES, KINDS = ("forward", "backward"), ("counts", "rows")


class AllToAllCounter:
    """Wraps dist.all_to_all_single; adds each call's (sent to others, received from others) bytes to
    bytes[phase][kind] ("counts": integer tensors, "rows": floating rows) while `phase` is set."""

    def __init__(self):
        self.phase, self.bytes = None, {}
        self._all_to_all = dist.all_to_all_single

    def all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                          async_op=False):
        if self.phase is not None:
            n, rank = dist.get_world_size(group), dist.get_rank(group)
            send = list(input_split_sizes) if input_split_sizes else [input.shape[0] // n] * n
            recv = list(output_split_sizes) if output_split_sizes else [output.shape[0] // n] * n
            row_bytes = input.element_size() * math.prod(input.shape[1:])
            kind = "rows" if input.is_floating_point() else "counts"
            sent, received = self.bytes.setdefault(self.phase, {}).setdefault(kind, [0, 0])
            self.bytes[self.phase][kind] = [sent + (sum(send) - send[rank]) * row_bytes,
                                            received + (sum(recv) - recv[rank]) * row_bytes]
        return self._all_to_all(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    def install(self) -> None:
        dist.all_to_all_single = self.all_to_all_single


def all_to_all_formula(n: int, n_sel: int, D: int, value_bytes: int, E: int) -> dict[str, int | float]:
    """Modelled bytes per process per MoE layer, each way (sent = received): "rows" of one pass (forward, or
    backward: its mirror) = 2 * n_sel * (n-1)/n * D * b (rows out to the experts, results back), even loads;
    "counts" = 8E(n-1)/n (the int64 per-expert counts, forward only)."""
    off = (n - 1) / n
    return {"rows": 2 * n_sel * off * D * value_bytes, "counts": 8 * E * off}


def expert_bytes(model: torch.nn.Module) -> int:
    """Bytes of the expert weights (w1, b1, w2, b2 of every MoE layer) this process holds."""
    return sum(p.numel() * p.element_size() for layer in moe_layers(model) for p in layer.experts.parameters())


def measure(label: str, preset: str, batch: int, autocast_dtype, group) -> dict:
    """One sharded training forward + backward of `preset` (SMALL size) on this process's batch: counted bytes,
    the exact count from the masks, the model's, and the expert weights before and after sharding."""
    torch.manual_seed(0)  # the same model on every process, as shard_experts needs
    model = create_model(preset, **SMALL).train()
    whole = expert_bytes(model)
    shard_experts(model, group)
    layers = moe_layers(model)
    E, k, D = layers[0].num_experts, layers[0].k, layers[0].dim
    g = torch.Generator().manual_seed(1 + dist.get_rank(group))  # each process its own batch
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    counter = AllToAllCounter()
    counter.install()
    record = ForwardRecord()
    try:
        counter.phase = "forward"
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            out = model(x, t, y, record=record)
        counter.phase = "backward"
        out.float().square().mean().backward()
    finally:
        counter.phase = None
        dist.all_to_all_single = counter._all_to_all
    value_bytes = torch.empty((), dtype=autocast_dtype or torch.float32).element_size()
    exact_rows, n_sel_total, per_layer = 0, 0, []
    own = expert_slice(E, group)
    for layer in range(len(layers)):
        counts = record.moe[layer].mask.sum(dim=0)  # (E,) this process's rows per expert
        per_layer.append(counts.tolist())
        totals = counts.clone()
        dist.all_reduce(totals, group=group)
        mine = int(counts[own].sum())
        from_others = int(totals[own].sum()) - mine
        exact_rows += (int(counts.sum()) - mine + from_others) * D * value_bytes
        n_sel_total += int(counts.sum())
    n = dist.get_world_size(group)
    model_bytes = all_to_all_formula(n, n_sel_total // len(layers), D, value_bytes, E)
    return {"label": label, "preset": preset, "dtype": str(autocast_dtype or torch.float32).split(".")[-1],
            "B": batch, "L": (model.input_size // model.patch_size) ** 2,
            "D": D, "E": E, "k": k, "layers": len(layers), "n_sel": n_sel_total // len(layers),
            "value_bytes": value_bytes, "counted": counter.bytes, "counts_per_layer": per_layer, "exact_rows_per_pass": exact_rows,
            "model_per_layer": model_bytes, "expert_bytes_whole": whole, "expert_bytes_here": expert_bytes(model)}


def xl_expert_bytes(group) -> dict:
    """RaceDiT-XL/2-4in32's expert-weight bytes, whole and on this process after `shard_experts` (meta device:
    shapes only, no memory)."""
    with torch.device("meta"):
        model = create_model(XL["name"])
    whole = expert_bytes(model)
    shard_experts(model, group)
    rest = sum(p.numel() * p.element_size() for p in model.parameters()) - expert_bytes(model)
    return {"whole": whole, "here": expert_bytes(model), "non_expert": rest, "layers": len(moe_layers(model))}


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        group = dist.group.WORLD
        result = {"measured": [measure(*spec, group) for spec in MEASURED], "xl": xl_expert_bytes(group)}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run(world: int, out_dir: Path) -> list[dict]:
    """Every rank's result at `world` processes (one expert group of n = world)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(world, port, str(out_dir)), nprocs=world, start_method="fork")
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]


def size(n: float) -> str:
    if n < 1024 ** 2:
        return f"{n / 1024:,.1f} KiB"
    return f"{n / 1024 ** 2:,.1f} MiB" if n < 1024 ** 3 else f"{n / 1024 ** 3:,.2f} GiB"


def print_measured(results: dict[int, list[dict]]) -> None:
    print("## Expert parallelism: all-to-all bytes per process per MoE layer, measured (gloo, CPU)\n")
    first = results[next(iter(results))][0]["measured"][0]
    print(f"Small RaceDiTs: D={first['D']}, {first['layers']} MoE layers, B={first['B']} images per process, "
          f"L={first['L']}, k={first['k']}, Expert Race (local), one training forward + backward; n = processes. "
          "Per layer = the run's total / layers. Sent = received in every pass (what goes out comes back).\n")
    print("| n | model | dtype | rank | forward rows sent / received | counts | backward rows sent / received "
          "| = exact from masks | model 2 n_sel (n-1)/n D b | measured / model |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, ranks in results.items():
        for i in range(len(MEASURED)):
            for rank, result in enumerate(ranks):
                m = result["measured"][i]
                layers = m["layers"]
                fwd, bwd = m["counted"]["forward"], m["counted"].get("backward", {})
                fr, br = fwd.get("rows", [0, 0]), bwd.get("rows", [0, 0])
                exact = all(v == m["exact_rows_per_pass"] for v in (*fr, *br))
                modelled = m["model_per_layer"]["rows"]
                print(f"| {n} | {m['label']} E={m['E']} | {m['dtype']} | {rank} | {size(fr[0] / layers)} / "
                      f"{size(fr[1] / layers)} | {fwd.get('counts', [0])[0] / layers:.0f} B | {size(br[0] / layers)} / "
                      f"{size(br[1] / layers)} | {exact} | {size(modelled)} | {fr[0] / layers / modelled:.3f} |")


def print_expert_weights(results: dict[int, list[dict]]) -> None:
    print("\n## Expert weights per process after shard_experts (bytes, float32)\n")
    print("| n | model | whole | per process (every rank) | whole / n | exactly 1/n |")
    print("|---|---|---|---|---|---|")
    for n, ranks in results.items():
        rows = [(f"{m['label']} E={m['E']}", m["expert_bytes_whole"], [r["measured"][i]["expert_bytes_here"]
                 for r in ranks]) for i, m in enumerate(ranks[0]["measured"][:2])]
        rows.append((XL["name"], ranks[0]["xl"]["whole"], [r["xl"]["here"] for r in ranks]))
        for label, whole, here in rows:
            same = all(h * n == whole for h in here)
            print(f"| {n} | {label} | {whole:,} | {', '.join(f'{h:,}' for h in sorted(set(here)))} | "
                  f"{whole / n:,.0f} | {same} |")
    xl = results[next(iter(results))][0]["xl"]
    print(f"\n{XL['name']}: the other parameters stay whole on every process ({size(xl['non_expert'])}).")


def print_modelled(xl_whole: int, xl_layers: int) -> None:
    D, E, k, L, B, depth = (XL[key] for key in ("D", "E", "k", "L", "B", "depth"))
    n_sel = B * L * k
    print(f"\n## Expert parallelism modelled at {XL['name']} size: D={D}, E={E}, k={k}, B={B} images per process, "
          f"L={L}, n_sel = BLk = {n_sel:,} rows per process per layer\n")
    print("Bytes per process per MoE layer, each way (sent = received): rows of one pass = 2 n_sel (n-1)/n D b "
          "(the backward moves as much again), counts 8E(n-1)/n. A run of w processes on a data x expert mesh "
          "(w/n data replicas of n expert shards) exchanges within its expert group only: the bytes depend on n, "
          "not on w (so 512 processes = 16 x 32 at n = 32, or 512 x 1 at n = 512 with E >= 512).\n")
    print("| E | n | rows, forward, bf16 | rows, forward, float32 | counts | per step (28 layers, fwd + bwd, bf16) "
          "| expert weights per process, float32 |")
    print("|---|---|---|---|---|---|---|")
    per_expert = xl_whole // (xl_layers * E)  # bytes of one expert, float32
    for experts, n in ((32, 2), (32, 4), (32, 8), (32, 16), (32, 32), (64, 8), (128, 8), (512, 8), (512, 512)):
        bf16, fp32 = (all_to_all_formula(n, n_sel, D, b, experts) for b in (2, 4))
        print(f"| {experts} | {n} | {size(bf16['rows'])} | {size(fp32['rows'])} | {bf16['counts']:.0f} B | "
              f"{size(depth * 2 * bf16['rows'])} | {size(depth * experts * per_expert / n)} |")
    limit = all_to_all_formula(10 ** 9, n_sel, D, 2, E)["rows"]
    print(f"\nThe issue's bound 2 n_sel D b (bf16): {size(limit)} per layer and pass, whatever E; the rows grow "
          "with B L k D only, the expert weights per process with E/n.")


def report(worlds: list[int], tmp: Path) -> None:
    results = {w: run(w, tmp / f"ep-w{w}") for w in worlds if w > 1}
    if results:
        print_measured(results)
        print_expert_weights(results)
        xl = results[next(iter(results))][0]["xl"]
        xl_whole, xl_layers = xl["whole"], xl["layers"]
    else:
        with torch.device("meta"):
            model = create_model(XL["name"])
        xl_whole, xl_layers = expert_bytes(model), len(moe_layers(model))
    print_modelled(xl_whole, xl_layers)
