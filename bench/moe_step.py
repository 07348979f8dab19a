"""Train-step time of a dense DiT against Race-DiT MoE models, the MoE layer alone, and peak memory.

    python bench/moe_step.py                      # CPU: DiT-S/2 vs RaceDiT-S/2-2in8 and -4in32, batch 8
    python bench/moe_step.py --iters 20 --no-memory
    python bench/moe_step.py --only-compiled --compile-units model block   # eager vs compiled, both units
    python bench/moe_step.py --only-expert-parallel --threads 1   # RaceDiT-S/2-2in8, 2 gloo processes

One run prints markdown tables. Train step = forward (with a ForwardRecord, as in training) + backward +
AdamW step + the inference thresholds' update. Models are timed in interleaved rounds (dense, MoE, MoE,
dense, ...) so a change in machine load hits every model alike; the tables give medians. A second train-step
table and the layer table time each MoE model with each dispatch kernel, "[expert_loop]" (the CPU default,
the racedit::expert_mlp custom op: per-expert matmuls on host-read counts) against "[grouped_mm]" (the static path: no host reads, torch's grouped
matmul), side by side. Peak memory is
the peak resident set of a fresh subprocess running two train steps of one model (CPU), or
torch.cuda.max_memory_allocated (GPU). When CUDA is available, a second table gives bf16-autocast
images/s of DiT-B/2 against RaceDiT-B/2-4in32. --expert-parallel adds (--only-expert-parallel: only) the
train step of RaceDiT-S/2-2in8 with model.expert_parallel=2 over 2 spawned gloo processes against the same
model data-parallel on the 2 processes (bench/ep_step.py).

Letters (docs/method/README.md): B images per step, L tokens per image, D width, E experts, k experts per
token on average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ep_step  # noqa: E402  (bench/, beside this file)

from racedit.models import count_params, create_model  # noqa: E402
from racedit.models.compiling import compile_model  # noqa: E402
from racedit.models.moe import MoEFeedForward  # noqa: E402
from racedit.models.records import ForwardRecord  # noqa: E402

CPU_MODELS = ("DiT-S/2", "RaceDiT-S/2-2in8", "RaceDiT-S/2-4in32")
GPU_MODELS = ("DiT-B/2", "RaceDiT-B/2-4in32")
# Residual-stream options (issue: hyper/frac-connections), appended to a preset name as "NAME + OPTION".
CONNECTIONS = {
    "SHCx2": dict(connections="hyper", connections_n=2),
    "DHCx2": dict(connections="hyper", connections_n=2, connections_dynamic=True),
    "DFCx4": dict(connections="frac", connections_m=4, connections_dynamic=True),
}
CONNECTION_TABLES = tuple(tuple([base] + [f"{base} + {opt}" for opt in CONNECTIONS])
                          for base in ("DiT-S/2", "RaceDiT-S/2-2in8"))


# Dispatch kernels compared side by side (racedit/models/moe_dispatch.py): the per-expert loop (host-read
# counts) against the static path (no host reads) with torch's grouped matmul.
DISPATCH_KERNELS = ("expert_loop", "grouped_mm")
DISPATCH_MODELS = tuple(f"{name} [{kernel}]" for name in CPU_MODELS[1:] for kernel in DISPATCH_KERNELS)


def build(name: str) -> torch.nn.Module:
    """A preset, optionally with a residual-stream option and a dispatch kernel: "RaceDiT-S/2-2in8 + SHCx2",
    "RaceDiT-S/2-2in8 [grouped_mm]"."""
    name, _, kernel = name.partition("[")
    preset, _, option = (part.strip() for part in name.partition("+"))
    model = create_model(preset, **CONNECTIONS[option]) if option else create_model(preset)
    if kernel:
        for layer in model.modules():
            if isinstance(layer, MoEFeedForward):
                layer.dispatch_implementation = kernel.rstrip("]").strip()
    return model


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW, fused where this build supports it on the model's device (the fastest variant for every model)."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-4)


class TrainStep:
    """One model with its optimizer and a fixed random batch: (B, 4, 32, 32) latents, timesteps, labels."""

    def __init__(self, name: str, batch: int, device: torch.device, bf16: bool):
        torch.manual_seed(0)
        self.name = name
        self.model = build(name).to(device).train()
        self.optimizer = make_optimizer(self.model)
        self.device, self.bf16 = device, bf16
        channels, side = self.model.in_channels, self.model.input_size
        self.x = torch.randn(batch, channels, side, side, device=device)
        self.t = torch.randint(0, 1000, (batch,), device=device)
        self.y = torch.randint(0, self.model.num_classes, (batch,), device=device)
        self.target = torch.randn_like(self.x)

    def __call__(self) -> None:
        ep_step.train_step(self.model, self.optimizer, self.x, self.t, self.y, self.target, self.bf16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rounds(steps: dict[str, callable], warmup: int, iters: int, device: torch.device) -> dict[str, dict]:
    """Interleaved timing: every round runs each step once. -> name -> {wall_ms, cpu_ms} medians."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    walls: dict[str, list[float]] = {name: [] for name in steps}
    cpus: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            sync(device)
            walls[name].append(time.perf_counter() - wall)
            cpus[name].append(time.process_time() - cpu)
    return {name: {"wall_ms": 1e3 * statistics.median(walls[name]), "cpu_ms": 1e3 * statistics.median(cpus[name])}
            for name in steps}


class LayerStep:
    """Forward + backward of one feed-forward layer on u (B, L, D) with a fixed upstream gradient."""

    def __init__(self, layer: torch.nn.Module, batch: int, tokens: int, dim: int, device: torch.device):
        self.layer = layer.to(device).train()
        self.u = torch.randn(batch, tokens, dim, device=device, requires_grad=True)
        self.grad = torch.randn(batch, tokens, dim, device=device)

    def __call__(self) -> None:
        self.layer(self.u, ForwardRecord()).backward(self.grad)
        self.layer.zero_grad(set_to_none=True)
        self.u.grad = None


def peak_memory_mib(name: str, batch: int, device: torch.device, bf16: bool) -> float:
    """Peak memory of two train steps of one model: a fresh subprocess's max RSS (CPU) or CUDA allocator peak."""
    if device.type == "cuda":
        return cuda_peak_mib(lambda: TrainStep(name, batch, device, bf16), device)
    return child_peak_rss_mib([sys.executable, __file__, "--memory-child", name, "--batch", str(batch),
                               "--threads", str(torch.get_num_threads())])


def cuda_peak_mib(make_step, device: torch.device) -> float:
    """The CUDA allocator's peak (MiB) over two calls of the step `make_step()` builds."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    step = make_step()
    step()
    step()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    del step
    return peak


def child_peak_rss_mib(cmd: list[str]) -> float:
    """Run a `--memory-child` command line; its last stdout line is {"peak_rss_mib": ...}."""
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mib"]


def memory_child(name: str, batch: int) -> None:
    step = TrainStep(name, batch, torch.device("cpu"), bf16=False)
    step()
    step()
    print_peak_rss()


def print_peak_rss() -> None:
    """The `--memory-child` answer: {"peak_rss_mib": ...} of this process, read by `child_peak_rss_mib`."""
    # VmHWM is this process's own peak; ru_maxrss would carry the parent's peak over the fork.
    with open("/proc/self/status") as f:
        hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mib": hwm_kib / 1024}))


def machine_line(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    load = os.getloadavg()[0]
    line = (f"torch {torch.__version__}, {cpu}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}{gpu}, "
            f"load average {load:.2f}")
    if device.type == "cpu" and load > 0.5 * (os.cpu_count() or 1):
        # Other processes hold the cores: every intra-op parallel region may wait a scheduler slice for
        # its second thread, which penalises many small kernels (the MoE loop) far more than a few big ones.
        line += ("\nnote: the machine is busy with other work; wall times include waiting for a core. "
                 "Compare with --threads 1 and the CPU ms column.")
    return line


def model_table(names: tuple[str, ...], args, device: torch.device, bf16: bool) -> None:
    steps = {name: TrainStep(name, args.batch, device, bf16) for name in names}
    params = {name: count_params(step.model) for name, step in steps.items()}
    times = timed_rounds(steps, args.warmup, args.iters, device)
    del steps
    dense = names[0]
    memory = {} if args.no_memory else {name: peak_memory_mib(name, args.batch, device, bf16) for name in names}
    print(f"\n### Train step (fwd + bwd + AdamW), batch {args.batch}, {device.type}{', bf16 autocast' if bf16 else ''}\n")
    print("| model | params total / activated (M) | step ms (median wall) | / dense | step CPU ms | images/s |"
          f"{' peak memory MiB |' if memory else ''}")
    print(f"|---|---|---|---|---|---|{'---|' if memory else ''}")
    for name in names:
        t = times[name]
        p = params[name]
        mem = f" {memory[name]:.0f} |" if memory else ""
        print(f"| {name} | {p['total'] / 1e6:.1f} / {p['activated'] / 1e6:.1f} | {t['wall_ms']:.1f} | "
              f"{t['wall_ms'] / times[dense]['wall_ms']:.3f} | {t['cpu_ms']:.1f} | "
              f"{1e3 * args.batch / t['wall_ms']:.1f} |{mem}")


def compiled_table(args, device: torch.device) -> None:
    """Eager against compiled train steps (`racedit.models.compiling.compile_model`, inductor, fullgraph) of the
    CPU models, timed side by side; compile time (the first compiled step, less a median eager step) apart."""
    import torch._dynamo

    # every model and unit keeps its own cache entries of the same forward code
    torch._dynamo.config.cache_size_limit = 1024
    steps, compile_s = {}, {}
    for name in CPU_MODELS:
        steps[name] = TrainStep(name, args.batch, device, False)
        for unit in args.compile_units:
            step = TrainStep(name, args.batch, device, False)
            compile_model(step.model, mode=args.compile_mode, unit=unit)
            start = time.perf_counter()
            step()
            compile_s[f"{name} compiled/{unit}"] = time.perf_counter() - start
            steps[f"{name} compiled/{unit}"] = step
    times = timed_rounds(steps, args.warmup, args.iters, device)
    dense = CPU_MODELS[0]
    print(f"\n### Train step (fwd + bwd + AdamW), eager and compiled (mode {args.compile_mode}), batch {args.batch}, "
          f"{device.type}\n")
    print("| model | step ms (median wall) | / eager | / dense, same mode | compile s (first step) |")
    print("|---|---|---|---|---|")
    for name in CPU_MODELS:
        for label in (name, *(f"{name} compiled/{unit}" for unit in args.compile_units)):
            t = times[label]["wall_ms"]
            same_mode = label.replace(name, dense, 1)
            first = compile_s.get(label)
            first = f"{first - times[name]['wall_ms'] / 1e3:.1f}" if first is not None else "-"
            print(f"| {label} | {t:.1f} | {t / times[name]['wall_ms']:.3f} | {t / times[same_mode]['wall_ms']:.3f} | "
                  f"{first} |")


def layer_table(args, device: torch.device) -> None:
    from racedit.models.dit import FeedForward

    dim, tokens = 384, 256  # DiT-S/2 width; 256 tokens = 32x32 latents with patch 2
    torch.manual_seed(0)
    layers = {"dense MLP (D=384, h=1536)": FeedForward(dim, 4 * dim)}
    for k, experts in ((2, 8), (4, 32)):
        for kernel in DISPATCH_KERNELS:
            layer = MoEFeedForward(dim, experts, k, target_dim=16)
            layer.dispatch_implementation = kernel
            layers[f"MoE {k}in{experts} (expert_race) [{kernel}]"] = layer
    steps = {name: LayerStep(layer, args.batch, tokens, dim, device) for name, layer in layers.items()}
    times = timed_rounds(steps, args.warmup, args.iters * 2, device)
    print_layer_table(f"Feed-forward layer alone (fwd + bwd), u = ({args.batch}, {tokens}, {dim}), {device.type}",
                      times, "dense")


def expert_parallel_table(args, device: torch.device) -> None:
    """RaceDiT-S/2-2in8 expert-parallel (E/2 experts each) against data-parallel, 2 gloo processes of
    --threads threads (1 if unset) each: `ep_step`."""
    spec = dict(model=CPU_MODELS[1], batch=args.batch, warmup=args.warmup, iters=args.iters, device=device.type,
                backend="gloo", threads=args.threads or 1)
    ep_step.print_table(spec, 2, ep_step.run(spec, 2, Path("/tmp/racedit-moe-step-ep")))


def print_layer_table(title: str, times: dict[str, dict], baseline: str, digits: int = 2) -> None:
    """A markdown table of `timed_rounds` results: wall ms, ratio to the first row (`baseline`), CPU ms."""
    first = next(iter(times))
    print(f"\n### {title}\n")
    print(f"| layer | ms (median wall) | / {baseline} | CPU ms |")
    print("|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t['wall_ms']:.{digits}f} | {t['wall_ms'] / times[first]['wall_ms']:.{digits + 1}f} | "
              f"{t['cpu_ms']:.{digits}f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="images per train step (CPU tables)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--iters", type=int, default=10, help="timed rounds (the layer table uses twice as many)")
    parser.add_argument("--gpu-batch", type=int, default=64, help="images per train step (GPU table)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave as is)")
    parser.add_argument("--connections", action="store_true",
                        help="also time dense and Race-DiT S/2 with SHCx2, DHCx2 and DFCx4 connections")
    parser.add_argument("--only-connections", action="store_true", help="only the connections tables")
    parser.add_argument("--compiled", action="store_true", help="also time compiled train steps (inductor)")
    parser.add_argument("--only-compiled", action="store_true", help="only the eager-vs-compiled table")
    parser.add_argument("--compile-units", nargs="+", default=["model"], choices=["model", "block"],
                        help="compile the whole model and/or each block (default: model)")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled rows")
    parser.add_argument("--expert-parallel", action="store_true",
                        help="also time RaceDiT-S/2-2in8 expert-parallel against data-parallel, 2 gloo processes")
    parser.add_argument("--only-expert-parallel", action="store_true", help="only the expert-parallel table")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.batch)
        return

    cpu = torch.device("cpu")
    print(f"# bench/moe_step.py\n\n{machine_line(cpu)}")
    print(f"command: python bench/moe_step.py {' '.join(sys.argv[1:])}".rstrip())
    if args.only_compiled or args.only_expert_parallel:
        (compiled_table if args.only_compiled else expert_parallel_table)(args, cpu)
        print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
        return
    if args.expert_parallel:
        expert_parallel_table(args, cpu)
    if not args.only_connections:
        layer_table(args, cpu)
        model_table(CPU_MODELS, args, cpu, bf16=False)
        model_table(CPU_MODELS[:1] + DISPATCH_MODELS, args, cpu, bf16=False)
    if args.compiled:
        compiled_table(args, cpu)
    if args.connections or args.only_connections:
        for names in CONNECTION_TABLES:  # the "/ dense" column is then the overhead over the residual model
            model_table(names, args, cpu, bf16=False)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        print(f"\n{machine_line(gpu)}")
        gpu_args = argparse.Namespace(**{**vars(args), "batch": args.gpu_batch})
        layer_table(gpu_args, gpu)
        model_table(GPU_MODELS, gpu_args, gpu, bf16=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
