"""The speed stages of bench/gpu_check.py: the machine's ceilings, bf16 training, sampling, Inception features,
expert-parallel training on several GPUs.

Timing: on CUDA each timed call sits between two CUDA events and its time is read after the end event
completes; on CPU (`--smoke`) `time.perf_counter` around it. Warm-up calls are not timed, the first call of
a compiled model (its compilation) is reported apart, and every figure is the median of the timed calls.

MFU: 6 FLOPs per multiply-accumulate per trained image (forward 2, backward 4) and 2 per generated forward
row (sampling), MACs from `count_macs` (MoE layers at the mean k), over the bf16 matmul ceiling measured by
`ceilings` on the same machine.

Letters (docs/method/README.md): B images per step.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from racedit.config import LossConfig
from racedit.diffusion.draws import MicroBatchDraws
from racedit.diffusion.objectives import DDPMObjective
from racedit.models import count_macs, create_model
from racedit.models.compiling import compile_model
from racedit.models.moe import update_thresholds
from racedit.models.records import ForwardRecord
from racedit.training.loop import param_groups
from racedit.training.objective_step import training_losses

# What --smoke shrinks every model to (the name keeps its k-in-E), and the latent size of the real rows.
SMOKE_SIZE = dict(depth=2, hidden_size=64, num_heads=2, input_size=8)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds of each of `iters` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def wall(fn, device: torch.device) -> float:
    """Seconds of one call, synchronised (for compile times)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def ceilings(device: torch.device, smoke: bool) -> dict:
    """A square bf16 matmul in TFLOP/s (the MFU denominator) and a device-to-device copy in GB/s (read + write)."""
    n = 512 if smoke else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t_mm = statistics.median(timed(lambda: a @ b, device, 3, 5 if smoke else 20))
    numel = (1 << 20) if smoke else (1 << 29)  # 2 MiB / 1 GiB of float32
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t_copy = statistics.median(timed(lambda: dst.copy_(src), device, 3, 5 if smoke else 20))
    return {"matmul_tflops": 2 * n**3 / t_mm / 1e12, "copy_gbps": 2 * src.numel() * 4 / t_copy / 1e9,
            "matmul_n": n, "copy_bytes": src.numel() * 4}


@dataclass
class TrainRow:
    model: str
    batch: int
    compiled: bool

    @property
    def name(self) -> str:
        return f"train {self.model} b{self.batch} {'compiled' if self.compiled else 'eager'}"

    @property
    def dense_name(self) -> str:
        """The row a RaceDiT row is compared with: the dense DiT of its size at the same batch and mode."""
        dense = "DiT-" + self.model.split("-", 1)[1].split("-")[0]
        return TrainRow(dense, self.batch, self.compiled).name


def build(name: str, device: torch.device, smoke: bool):
    kw = dict(SMOKE_SIZE, num_classes=10) if smoke else {}
    with torch.device(device):  # initialised where it runs: XL/2-4in32's 2.4B parameters take long on a CPU
        return create_model(name, **kw)


def train_row(row: TrainRow, device: torch.device, smoke: bool, peak_tflops: float, iters: int) -> dict:
    """bf16-autocast training steps of `row.model` at batch `row.batch`: the loop's training losses (DDPM, learned
    sigma), backward, AdamW (the loop's parameter groups); images/s and MFU from the median step."""
    reset_memory(device)
    torch.manual_seed(0)
    model = build(row.model, device, smoke).train()
    objective = DDPMObjective(learn_sigma=model.learn_sigma)
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-4)
    fn = compile_model(model) if row.compiled else model  # in place, fullgraph: what train.compile does
    B = row.batch
    x0 = torch.randn(B, model.in_channels, model.input_size, model.input_size, device=device)
    y = torch.randint(0, model.num_classes, (B,), device=device)
    draws = MicroBatchDraws(t=torch.randint(0, 1000, (B,), device=device), noise=torch.randn_like(x0),
                            drop_labels=torch.rand(B, device=device) < 0.1, null_class=model.num_classes)
    loss_cfg = LossConfig()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            terms = training_losses(fn, objective, x0, y, draws, loss_cfg, ForwardRecord())
        terms["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    first = wall(step, device)
    times = timed(step, device, 1 if smoke else 2, iters)
    t = statistics.median(times)
    macs = count_macs(model)
    out = {"img_per_s": B / t, "step_ms": t * 1e3, "mfu": 6 * macs * B / t / (peak_tflops * 1e12),
           "peak_mem_gib": peak_memory_gib(device), "first_step_s": first, "steps_timed": len(times),
           "gmacs_per_img": macs / 1e9}
    if row.compiled:
        out["compile_s"] = first - t  # the first call minus one ordinary step
    if row.compiled:
        torch._dynamo.reset()
    return out  # the model and optimizer go with this frame; the next row's reset_memory frees their memory


def sampling_row(name: str, device: torch.device, smoke: bool, peak_tflops: float, batch: int) -> dict:
    """DDPM with classifier-free guidance (scale 1.5) under bf16 autocast, eval mode; a RaceDiT routes with its
    threshold (set from one training batch of the random-init model). Timed: generate() over `steps` respaced
    DDPM steps, which cost per step what each of the 250 steps costs; images/s is given for 250 steps."""
    from racedit.diffusion.samplers import generate

    reset_memory(device)
    torch.manual_seed(0)
    model = build(name, device, smoke)
    shape = (model.in_channels, model.input_size, model.input_size)
    objective = DDPMObjective(learn_sigma=model.learn_sigma)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    notes = []
    if name.startswith("RaceDiT"):
        record = ForwardRecord()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            model.train()(torch.randn(batch, *shape, device=device), torch.rand(batch, device=device) * 999, y,
                          record=record)
        update_thresholds(model, [record.kth_scores()])
        model.eval()
        record = ForwardRecord()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            model(torch.randn(batch, *shape, device=device), torch.rand(batch, device=device) * 999, y, record=record)
        per_token = [float(r.mask.float().sum(1).mean()) for r in record.moe.values()]
        k = model.blocks[0].mlp.k
        notes.append(f"threshold routing realises {sum(per_token) / len(per_token):.2f} experts/token "
                     f"(k={k}; MFU counts k)")
    model.eval()
    steps = 2 if smoke else 5

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            generate(model, objective, y, sampler="ddpm", steps=steps, cfg_scale=1.5, shape=shape)

    times = timed(run, device, 1, 2 if smoke else 3)
    per_step = statistics.median(times) / steps
    macs = count_macs(model)
    out = {"img_per_s": batch / (250 * per_step), "step_ms": per_step * 1e3,
           "mfu": 2 * macs * 2 * batch / per_step / (peak_tflops * 1e12), "peak_mem_gib": peak_memory_gib(device),
           "notes": notes}
    return out


class _RandomImages:
    """n uint8 (H, W, 3) images in batches, what `extract_features` reads (like racedit.npz.NpzImages)."""

    def __init__(self, n: int, size: int):
        self.n, self.size = n, size
        self.block = torch.randint(0, 256, (64, size, size, 3), dtype=torch.uint8).numpy()

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int, limit: int | None = None):
        n = self.n if limit is None else min(limit, self.n)
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            yield self.block[[i % len(self.block) for i in range(start, start + m)]]


def inception_row(device: torch.device, smoke: bool, workdir) -> dict:
    """racedit's Inception feature extraction (torch-fidelity's Inception-v3, fp32 without TF32, host transfers
    included) on 256x256 uint8 images, with random weights saved like the real file (the machine is offline;
    the speed does not depend on the values). Wall-clock seconds: the path ends in host copies anyway."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fe

    from racedit.evaluation.inception import extract_features, load_inception, resolve_inception_weights

    with mock.patch.object(fe, "load_state_dict_from_url", return_value=None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
        net = fe.FeatureExtractorInceptionV3("random", ["2048"])
    path = workdir / "random-inception.pth"
    torch.save(net.state_dict(), path)
    del net
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not torch-fidelity's weights.*")
        extractor = load_inception(resolve_inception_weights(path), device)
    batch, n, size = (4, 8, 32) if smoke else (250, 2000, 256)
    patch = mock.patch.object(fe.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75) if smoke else None
    if patch:
        patch.start()
    try:
        extract_features(extractor, _RandomImages(batch, size), batch_size=batch, progress=False)  # warm-up
        times = []
        for _ in range(3):
            t = wall(lambda: extract_features(extractor, _RandomImages(n, size), batch_size=batch, progress=False),
                     device)
            times.append(t)
    finally:
        if patch:
            patch.stop()
    notes = ["smoke: Inception input 75x75 instead of 299x299"] if smoke else []
    return {"img_per_s": n / statistics.median(times), "peak_mem_gib": peak_memory_gib(device), "notes": notes}


# The expert-parallel row: model.expert_parallel = n over n GPUs (nccl) against the same model data-parallel.
EXPERT_PARALLEL_MODEL, EXPERT_PARALLEL_BATCH = "RaceDiT-B/2-4in32", 32


def expert_parallel_size(device: torch.device, smoke: bool) -> int:
    """n for the expert-parallel row: 2 gloo processes on CPU (--smoke); on CUDA the largest power of two <= the
    GPU count, at most 8 (it divides E = 32); 1 (no row) with fewer than 2 GPUs."""
    if smoke or device.type != "cuda":
        return 2
    count = torch.cuda.device_count()
    return 1 if count < 2 else min(8, 1 << (count.bit_length() - 1))


def expert_parallel_row(device: torch.device, smoke: bool, n: int) -> dict:
    """bf16-autocast train steps (fwd, bwd, AdamW; no gradient reduction) of RaceDiT-B/2-4in32 at batch 32 per
    process: expert-parallel over n processes against data-parallel on the same n (bench/ep_step.py); images/s
    over all n processes from the expert-parallel median step."""
    import ep_step

    spec = dict(model=EXPERT_PARALLEL_MODEL, batch=2 if smoke else EXPERT_PARALLEL_BATCH, warmup=1 if smoke else 3,
                iters=2 if smoke else 10, device=device.type, backend="nccl" if device.type == "cuda" else "gloo",
                bf16=True, overrides=dict(SMOKE_SIZE, num_classes=10) if smoke else {})
    with tempfile.TemporaryDirectory(prefix="gpu-check-ep-") as tmp:
        s = ep_step.summary(ep_step.run(spec, n, Path(tmp)))
    where = f"{n} {spec['backend']} processes" + (" on CPU (smoke)" if device.type == "cpu" else " on GPUs")
    notes = [f"{where}: expert-parallel step {s['ep_ms']:.1f} ms, data-parallel {s['dp_ms']:.1f} ms, "
             f"ratio {s['ep_over_dp']:.2f}; {s['experts_here']} of {s['experts']} experts per process; "
             f"first-step loss gap {s['first_loss_gap']:.1e}; no gradient reduction in either"]
    return {"img_per_s": n * spec["batch"] * 1e3 / s["ep_ms"], "step_ms": s["ep_ms"], "dp_step_ms": s["dp_ms"],
            "ep_over_dp": s["ep_over_dp"], "peak_mem_gib": s["peak_mem_gib"], "notes": notes}
