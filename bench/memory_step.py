"""What a memory layer costs in a DiT train step: RaceDiT-S/2 without and with pkm, ultramem, ultramemv2.

    python bench/memory_step.py                     # CPU, batch 8, 128 x 128 = 16,384 slots per layer
    python bench/memory_step.py --keys 64 --iters 5 --no-memory
    python bench/memory_step.py --keys 256 --kinds ultramemv2     # a larger table, one kind (RAM: 16 B per table number)
    python bench/memory_step.py --slots-read runs/digits-ultramemv2  # rows one training batch reads: fresh vs trained

Every memory model has a memory layer in every block and the same table: n_slot = keys^2 slots of D = 384
numbers each (pkm: values D wide; ultramem: Dv = D, n_blk = 4; ultramemv2: Dp + Dv = D/4 + 3D/4, Dk from
the 17% memory share), and reads `--topk` slots per token. Columns: parameters (total / activated per
token), the tables alone, forward MACs per image and the memory share of them, train-step time
(forward with a ForwardRecord + backward + AdamW, medians of interleaved rounds, as bench/moe_step.py),
peak memory (a fresh subprocess's peak RSS on CPU, the CUDA allocator peak on GPU) and the fraction of
each layer's slots a step reads (a DiT batch reads most of a table's slots; docs/memory.md).

Letters (docs/method/README.md): B images per step, L = 256 tokens per image (32x32x4 latents, patch 2),
D = 384, n_slot slots per layer, n_blk implicit-value-expansion blocks.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_step import (  # noqa: E402
    child_peak_rss_mib,
    cuda_peak_mib,
    machine_line,
    make_optimizer,
    print_layer_table,
    print_peak_rss,
    timed_rounds,
)

from racedit.models import count_macs, count_params, create_model  # noqa: E402
from racedit.models.moe import update_thresholds  # noqa: E402
from racedit.models.records import ForwardRecord  # noqa: E402

BASE = "RaceDiT-S/2-2in8"


def variants(keys: int, topk: int, kinds: str = "pkm,ultramem,ultramemv2") -> dict[str, dict]:
    """Label -> create_model overrides: the base model and each memory kind in `kinds` at the same table size."""
    d = 384
    table = dict(memory_keys=keys, memory_topk=topk)
    all_kinds = {
        "+ pkm": dict(memory="pkm", **table),
        "+ ultramem (E=4)": dict(memory="ultramem", memory_value_dim=d, memory_expansion=4, **table),
        "+ ultramemv2": dict(memory="ultramemv2", memory_value_dim=3 * d // 4, memory_prevalue_dim=d // 4, **table),
    }
    wanted = kinds.split(",")
    unknown = set(wanted) - {over["memory"] for over in all_kinds.values()}
    if unknown:
        raise SystemExit(f"unknown --kinds {sorted(unknown)}; choose from pkm, ultramem, ultramemv2")
    return {BASE: {}, **{label: over for label, over in all_kinds.items() if over["memory"] in wanted}}


class TrainStep:
    """One model, its AdamW and a fixed random batch of (B, 4, 32, 32) latents; records what memory layers read."""

    def __init__(self, overrides: dict, batch: int, device: torch.device, bf16: bool):
        torch.manual_seed(0)
        self.model = create_model(BASE, **overrides).to(device).train()
        self.optimizer = make_optimizer(self.model)
        self.device, self.bf16 = device, bf16
        self.x = torch.randn(batch, 4, 32, 32, device=device)
        self.t = torch.randint(0, 1000, (batch,), device=device)
        self.y = torch.randint(0, 1000, (batch,), device=device)
        self.target = torch.randn_like(self.x)
        self.touched: list[float] = []

    def __call__(self) -> None:
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        record = ForwardRecord(diagnostics=True)
        with amp:
            out = self.model(self.x, self.t, self.y, record=record)
            loss = F.mse_loss(out[:, :4].float(), self.target)
        loss.backward()
        self.optimizer.step()
        self.model.after_optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        update_thresholds(self.model, [record.kth_scores()])  # the MoE inference thresholds, as training does
        if record.memory:
            self.touched = [float(v["slots_touched"]) for v in record.memory.values()]


def peak_memory_mib(label: str, args, device: torch.device, bf16: bool) -> float:
    if device.type == "cuda":
        over = variants(args.keys, args.topk, args.kinds)[label]
        return cuda_peak_mib(lambda: TrainStep(over, args.batch, device, bf16), device)
    return child_peak_rss_mib([sys.executable, __file__, "--memory-child", label, "--batch", str(args.batch),
                               "--keys", str(args.keys), "--topk", str(args.topk), "--kinds", args.kinds,
                               "--threads", str(torch.get_num_threads())])


def memory_child(args) -> None:
    step = TrainStep(variants(args.keys, args.topk, args.kinds)[args.memory_child], args.batch, torch.device("cpu"), bf16=False)
    step()
    step()
    print_peak_rss()


def table_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for b in model.blocks if b.memory is not None for p in b.memory.tables.parameters())


def memory_macs(model: torch.nn.Module) -> int:
    tokens = model.x_embedder.num_patches
    return sum(b.memory.macs(tokens) for b in model.blocks if b.memory is not None)


def model_table(args, device: torch.device, bf16: bool) -> None:
    specs = variants(args.keys, args.topk, args.kinds)
    steps = {label: TrainStep(over, args.batch, device, bf16) for label, over in specs.items()}
    times = timed_rounds(steps, args.warmup, args.iters, device)
    rows = {}
    for label, step in steps.items():
        m = step.model
        layer = m.blocks[0].memory
        rows[label] = dict(params=count_params(m), tables=table_params(m), macs=count_macs(m), mem_macs=memory_macs(m),
                           touched=sum(step.touched) / len(step.touched) if step.touched else None,
                           layer=layer.extra_repr() if layer is not None else "")
    del steps
    memory = {} if args.no_memory else {label: peak_memory_mib(label, args, device, bf16) for label in specs}
    base = rows[BASE]
    print(f"\n### Train step (fwd + bwd + AdamW), batch {args.batch} x 256 tokens, {device.type}"
          f"{', bf16 autocast' if bf16 else ''}; memory in all 12 blocks, {args.keys}^2 = {args.keys ** 2:,} slots "
          f"per layer, top-{args.topk}\n")
    print("| model | params total / activated (M) | tables (M) | GMACs / image | x base | memory share of MACs "
          f"| step ms (median wall) | x base | step CPU ms |{' peak MiB | x base |' if memory else ''} slots read per step |")
    print(f"|---|---|---|---|---|---|---|---|---|{'---|---|' if memory else ''}---|")
    for label, r in rows.items():
        t = times[label]
        mem = f" {memory[label]:.0f} | {memory[label] / memory[BASE]:.2f} |" if memory else ""
        touched = f"{100 * r['touched']:.1f}%" if r["touched"] is not None else "-"
        print(f"| {label} | {r['params']['total'] / 1e6:.1f} / {r['params']['activated'] / 1e6:.1f} | "
              f"{r['tables'] / 1e6:.1f} | {r['macs'] / 1e9:.2f} | {r['macs'] / base['macs']:.3f} | "
              f"{100 * r['mem_macs'] / r['macs']:.1f}% | {t['wall_ms']:.0f} | {t['wall_ms'] / times[BASE]['wall_ms']:.2f} | "
              f"{t['cpu_ms']:.0f} |{mem} {touched} |")
    print("\nlayers: " + "; ".join(f"{label}: {r['layer']}" for label, r in rows.items() if r["layer"]))


class LayerStep:
    """Forward + backward of one block-sized layer on u (B, 256, D) with a fixed upstream gradient."""

    def __init__(self, layer: torch.nn.Module, batch: int, device: torch.device, memory: bool):
        self.layer = layer.to(device).train()
        self.memory = memory  # a memory layer built alone keeps its gate's default (non-zero) init
        self.u = torch.randn(batch, 256, 384, device=device, requires_grad=True)
        self.c = torch.randn(batch, 384, device=device)
        self.grad = torch.randn(batch, 256, 384, device=device)

    def __call__(self) -> None:
        out = self.layer(self.u, self.c, ForwardRecord()) if self.memory else self.layer(self.u)
        out.backward(self.grad)
        self.layer.zero_grad(set_to_none=True)
        self.u.grad = None


def layer_table(args, device: torch.device) -> None:
    from racedit.models.dit import FeedForward
    from racedit.models.memory import build_memory

    torch.manual_seed(0)
    steps = {"dense MLP (D=384, h=1536)": LayerStep(FeedForward(384, 1536), args.batch, device, memory=False)}
    for label, over in variants(args.keys, args.topk, args.kinds).items():
        if over:
            cfg = create_model(BASE, **over, depth=1).config
            steps[f"memory layer {label[2:]}"] = LayerStep(build_memory(cfg, 0), args.batch, device, memory=True)
    times = timed_rounds(steps, args.warmup, args.iters * 2, device)
    print_layer_table(f"One layer alone (fwd + bwd), u = ({args.batch}, 256, 384), {device.type}", times,
                      "dense MLP", digits=1)


def slots_read(path: str, batch: int) -> None:
    """Per memory layer, the share of its rows one training batch of `batch` images reads, for the fresh
    model of a checkpoint's config (same seed) and for its trained weights."""
    from racedit.checkpoint import load_config_of, load_into, load_weights, resolve_checkpoint
    from racedit.data.factory import build_training_data
    from racedit.diffusion.objectives import create_objective

    ckpt = resolve_checkpoint(path)
    cfg = load_config_of(ckpt)
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model).train()
    data = build_training_data(cfg)
    objective = create_objective(cfg.diffusion, model.learn_sigma)
    g = torch.Generator().manual_seed(0)
    rows = torch.randperm(data.num_examples, generator=g)[:batch]
    x0, y = data.read(rows), data.labels[rows]
    t = objective.sample_t(len(rows), torch.device("cpu"), generator=g)
    noised = objective.sample(x0, t=t, noise=torch.randn(x0.shape, generator=g))

    def read() -> str:
        record = ForwardRecord(diagnostics=True)
        with torch.no_grad():
            model(noised.x_t, objective.model_time(noised.t), y, record=record)
        return " | ".join(f"{100 * float(record.memory[i]['slots_touched']):.1f}%" for i in sorted(record.memory))

    fresh = read()
    load_into(model, load_weights(ckpt, "model"), str(ckpt))
    trained = read()
    layers = [b.layer_index for b in model.blocks if b.memory is not None]
    layer = model.blocks[layers[0]].memory
    print(f"# bench/memory_step.py --slots-read\n\ncheckpoint {ckpt} ({cfg.model.memory}, {layer.slots:,} slots per layer); "
          f"one batch of {len(rows)} training images = {len(rows) * model.x_embedder.num_patches * layer.heads * layer.topk:,} "
          "reads per layer\n")
    print("| weights | " + " | ".join(f"block {i}" for i in layers) + " |")
    print("|---|" + "---|" * len(layers))
    print(f"| fresh (seed {cfg.train.seed}) | {fresh} |")
    print(f"| trained | {trained} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="images per train step")
    parser.add_argument("--keys", type=int, default=128, help="keys per side: keys^2 slots per memory layer")
    parser.add_argument("--topk", type=int, default=32, help="slots read per token")
    parser.add_argument("--kinds", default="pkm,ultramem,ultramemv2", help="memory kinds to compare with the base")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--iters", type=int, default=6, help="timed rounds (the layer table uses twice as many)")
    parser.add_argument("--gpu-batch", type=int, default=64, help="images per train step on GPU")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave as is)")
    parser.add_argument("--slots-read", default=None, metavar="CKPT",
                        help="only print the share of slots one training batch reads, fresh vs this checkpoint")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    if args.slots_read:
        slots_read(args.slots_read, 128 if args.batch == 8 else args.batch)
        return
    cpu = torch.device("cpu")
    print(f"# bench/memory_step.py\n\n{machine_line(cpu)}")
    print(f"command: python bench/memory_step.py {' '.join(sys.argv[1:])}".rstrip())
    layer_table(args, cpu)
    model_table(args, cpu, bf16=False)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        print(f"\n{machine_line(gpu)}")
        gpu_args = argparse.Namespace(**{**vars(args), "batch": args.gpu_batch})
        layer_table(gpu_args, gpu)
        model_table(gpu_args, gpu, bf16=True)


if __name__ == "__main__":
    main()
