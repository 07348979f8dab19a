"""The correctness stages of bench/gpu_check.py: each returns a dict of what it measured, or raises CheckFailed.

Every check runs on `device`; on CPU (`--smoke`) the same code runs there and each CUDA-only assertion says in
its notes what it ran instead. References are independent of the code under test: the plain per-expert loop
(`dispatch_reference`) in float64 on the CPU, the CPU's selection for the same float32 scores, the same sample
alone against in a batch.

Letters (docs/method/README.md): B images, L tokens per image, N = B*L, D width, E experts, k.
"""

from __future__ import annotations

import math
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from racedit.models import create_model
from racedit.models.moe import Experts, dispatch, dispatch_reference, update_thresholds
from racedit.models.moe_dispatch import grouped_mm_supported, resolve_implementation
from racedit.models.records import ForwardRecord
from racedit.models.routing import STRATEGIES, grouped_topk, threshold_mask
from racedit.testing import RecordOps


class CheckFailed(AssertionError):
    """A correctness check that did not hold; its message says what and by how much."""


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64 (0 when both are zero)."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    den = ref.norm().item()
    return (a - ref).norm().item() / den if den > 0 else (a - ref).norm().item()


@contextmanager
def full_fp32():
    """float32 matmuls in full precision (no TF32), restored afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def _routed_case(N: int, D: int, k: int, E: int, seed: int):
    """x (N, D), scores (N, E), an Expert Race mask (N, E) with skewed loads and empty experts, experts (CPU fp32).

    Skew: expert e's logits are shifted by -e/4 (expert 0 is busiest); the last quarter of the experts is
    pushed to -30 so it gets no pair (empty experts); some tokens get none too (the race allows it)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    scores = torch.randn(N, E, generator=g) - torch.arange(E) / 4
    scores[:, E - E // 4:] -= 30.0
    mask = grouped_topk(scores.view(1, N, E), "expert_race", k)[0].view(N, E)
    torch.manual_seed(seed)
    experts = Experts(D, 4 * D // k, E, k)
    with torch.no_grad():  # non-zero biases so their gradients are checked too
        experts.b1.normal_(0, 0.1, generator=g)
        experts.b2.normal_(0, 0.1, generator=g)
    return x, scores, mask, experts


def check_dispatch(device: torch.device, smoke: bool) -> dict:
    """`dispatch` on the device, every kernel it can run there, against `dispatch_reference` in float64 on the
    CPU: forward output and the gradients of x, scores and the expert weights; float32 within 1e-5, bf16 autocast
    within 1e-2 (relative Frobenius error)."""
    N, D = (64, 32) if smoke else (2048, 256)
    results, worst = [], {"float32": 0.0, "bf16": 0.0}
    for k, E in ((2, 8), (4, 32)):
        x, scores, mask, experts = _routed_case(N, D, k, E, seed=k * 100 + E)
        loads = mask.sum(0)
        cot = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
        ref = _forward_backward(x.double(), scores.double(), mask, _copy(experts, torch.float64), cot.double(),
                                lambda xx, ss, mm, ee: dispatch_reference(xx, mm, ss, ee), None, "cpu")
        for precision, tol in (("float32", 1e-5), ("bf16", 1e-2)):
            kernels = _kernels(device, torch.float32 if precision == "float32" else torch.bfloat16, D, 4 * D // k)
            for kernel in kernels:
                def run(xx, ss, mm, ee, _kernel=kernel, _pairs=N * k):
                    return dispatch(xx, mm, ss, ee, implementation=_kernel, num_selected=_pairs)
                with full_fp32():
                    got = _forward_backward(x.to(device), scores.to(device), mask.to(device),
                                            _copy(experts, torch.float32, device), cot.to(device), run,
                                            torch.bfloat16 if precision == "bf16" else None, device.type)
                errs = {name: rel_err(got[name], ref[name]) for name in ref}
                worst[precision] = max(worst[precision], *errs.values())
                results.append({"k_in_E": f"{k}in{E}", "precision": precision, "kernel": kernel,
                                "max_rel_err": max(errs.values()), "errors": errs})
                if max(errs.values()) >= tol:
                    bad = {n: f"{e:.2e}" for n, e in errs.items() if e >= tol}
                    raise CheckFailed(f"dispatch {kernel} {k}in{E} {precision} on {device.type}: relative error "
                                      f"{bad} >= {tol:g} against the float64 reference loop")
        results[-1]["loads"] = loads.tolist()
    auto = {p: resolve_implementation("auto", device, dt, D, 4 * D // 2) for p, dt in
            (("float32", torch.float32), ("bf16", torch.bfloat16))}
    notes = [f"kernels checked: {sorted({r['kernel'] for r in results})}; 'auto' resolves to {auto} in eager mode",
             f"empty experts: {E // 4} of {E} per case; worst relative error float32 {worst['float32']:.1e}, "
             f"bf16 {worst['bf16']:.1e}"]
    if device.type == "cpu":
        notes.append("ran on CPU (smoke): the CUDA kernels were not exercised")
    return {"cases": results, "worst": worst, "auto": auto, "notes": notes}


def _kernels(device: torch.device, dtype: torch.dtype, dim: int, hidden: int) -> list[str]:
    kernels = ["padded_bmm", "expert_loop"]
    if grouped_mm_supported(device.type, dtype, dim, hidden):
        kernels.insert(0, "grouped_mm")
    return kernels


def _copy(experts: Experts, dtype: torch.dtype, device="cpu") -> Experts:
    clone = Experts(experts.dim, experts.hidden, experts.num_experts, 1)
    clone.load_state_dict(experts.state_dict())
    return clone.to(device=device, dtype=dtype)


def _forward_backward(x, scores, mask, experts, cot, fn, autocast_dtype, device_type) -> dict:
    x, scores = x.clone().requires_grad_(), scores.clone().requires_grad_()
    amp = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with amp:
        out = fn(x, scores, mask, experts)
    (out.float() * cot.float()).sum().backward()
    grads = {f"grad_{n}": p.grad for n, p in experts.named_parameters()}
    return {"out": out, "grad_x": x.grad, "grad_scores": scores.grad, **grads}


def check_selection(device: torch.device, smoke: bool) -> dict:
    """The six strategies select on the device exactly what they select on the CPU for the same float32 scores,
    with many ties (scores on a grid of 5 values) and without; the threshold mask S >= tau likewise."""
    shapes = [(2, 16, 8, 2), (4, 16, 32, 4)] if smoke else [(8, 256, 8, 2), (32, 256, 32, 4), (4, 64, 8, 1)]
    compared = 0
    for B, L, E, k in shapes:
        g = torch.Generator().manual_seed(B * L * E + k)
        for tied in (True, False):
            scores = (torch.randint(0, 5, (B, L, E), generator=g) / 4.0) if tied else torch.randn(B, L, E, generator=g)
            for strategy in STRATEGIES:
                mask_cpu, kth_cpu = grouped_topk(scores, strategy, k)
                mask_dev, kth_dev = grouped_topk(scores.to(device), strategy, k)
                if not torch.equal(mask_cpu, mask_dev.cpu()) or not torch.equal(kth_cpu, kth_dev.cpu()):
                    diff = int((mask_cpu != mask_dev.cpu()).sum())
                    raise CheckFailed(f"{strategy} on {device.type} selects {diff} pairs differently from the CPU "
                                      f"(B={B}, L={L}, E={E}, k={k}, ties={tied})")
                compared += 1
            tau = scores.flatten().median()
            if not torch.equal(threshold_mask(scores, tau), threshold_mask(scores.to(device), tau.to(device)).cpu()):
                raise CheckFailed(f"the threshold mask on {device.type} differs from the CPU's (B={B}, L={L}, E={E})")
    notes = [f"{compared} selections compared (6 strategies x {len(shapes)} shapes x tied/untied), all identical"]
    if device.type == "cpu":
        notes.append("ran on CPU (smoke): CPU against CPU, so this only exercises the check itself")
    return {"compared": compared, "notes": notes}


def _small_moe(device, smoke: bool, **options):
    size = dict(depth=2, hidden_size=64, num_heads=2, input_size=8) if smoke else \
        dict(depth=4, hidden_size=256, num_heads=4, input_size=16)
    return create_model("RaceDiT-S/2-2in8", num_classes=10, **size, **options).to(device)


def _inputs(model, B: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g).float()
    y = torch.randint(0, model.num_classes, (B,), generator=g)
    return x.to(device), t.to(device), y.to(device)


@torch.no_grad()
def check_threshold_batch_independence(device: torch.device, smoke: bool) -> dict:
    """Eval-mode threshold routing (S >= tau): samples 0, 7 and 15 give the same output alone as in a batch of
    16 (float32, no TF32). A selection may differ only for a score within 1e-4 of tau (the batched and single
    matmuls round differently); the outputs then must still agree within 1e-4."""
    torch.manual_seed(0)
    model = _small_moe(device, smoke)
    for p in model.parameters():  # off the adaLN-Zero init, whose zero gates and final layer give zero outputs
        p.add_(torch.randn_like(p), alpha=0.05)
    model.train()
    record = ForwardRecord()
    model(*_inputs(model, 16, device, seed=1), record=record)
    update_thresholds(model, [record.kth_scores()])
    model.eval()
    worst, borderline = 0.0, 0
    with full_fp32():
        x, t, y = _inputs(model, 16, device, seed=2)
        batch_record = ForwardRecord()
        batched = model(x, t, y, record=batch_record)
        for i in (0, 7, 15):
            alone_record = ForwardRecord()
            alone = model(x[i:i + 1], t[i:i + 1], y[i:i + 1], record=alone_record)
            for index, layer in alone_record.moe.items():
                L = layer.mask.shape[0]
                in_batch = batch_record.moe[index].mask[i * L:(i + 1) * L]
                differ = in_batch != layer.mask
                if differ.any():
                    tau = model.blocks[index].mlp.tau
                    near = (layer.scores - tau).abs() < 1e-4 * max(1.0, float(tau.abs()))
                    if (differ & ~near).any():
                        raise CheckFailed(f"sample {i}, MoE layer {index}: {int((differ & ~near).sum())} pairs "
                                          f"selected differently alone and in a batch of 16, away from tau")
                    borderline += int(differ.sum())
            err = rel_err(alone[0], batched[i])
            if batched[i].abs().max() == 0:
                raise CheckFailed("the model's output is zero: the comparison would prove nothing")
            worst = max(worst, err)
            if err >= 1e-4:
                raise CheckFailed(f"sample {i}: output alone differs from the batch of 16 by {err:.2e} (>= 1e-4)")
    notes = [f"worst relative difference alone vs batch {worst:.1e}; {borderline} borderline pairs (|S - tau| < 1e-4)"]
    if device.type == "cpu":
        notes.append("ran on CPU (smoke)")
    return {"worst_rel_diff": worst, "borderline_pairs": borderline, "notes": notes}


def check_no_host_sync(device: torch.device, smoke: bool) -> dict:
    """The MoE training forward and backward (bf16 autocast, the loop's training losses with every auxiliary router
    loss on, Expert Race) make
    no device-to-host synchronisation: on CUDA inside torch.cuda.set_sync_debug_mode("error") after one warm-up
    step; on CPU the analogue: no host-reading op dispatched and no `.tolist()`, with the static kernel the
    accelerator would use (CPU's default, the expert_loop custom op, reads counts on the host by design)."""
    from racedit.config import LossConfig
    from racedit.diffusion.draws import MicroBatchDraws
    from racedit.diffusion.objectives import DDPMObjective
    from racedit.training.objective_step import training_losses

    torch.manual_seed(0)
    model = _small_moe(device, smoke, router_target_head=True).train()
    objective = DDPMObjective(learn_sigma=model.learn_sigma)
    # every auxiliary router loss on, so their paths are checked too
    losses = LossConfig(router_similarity=0.01, per_layer_reg=0.01, balance=0.01, z_loss=0.001)
    B = 8
    x0, _, y = _inputs(model, B, device)
    draws = MicroBatchDraws(t=torch.randint(0, 1000, (B,), device=device), noise=torch.randn_like(x0),
                            drop_labels=torch.rand(B, device=device) < 0.1, null_class=model.num_classes)
    notes = []
    if device.type == "cpu":
        kernel = "grouped_mm" if grouped_mm_supported("cpu", torch.bfloat16, 64, 128) else "padded_bmm"
        for m in model.modules():
            if hasattr(m, "dispatch_implementation"):
                m.dispatch_implementation = kernel
        notes.append(f"ran on CPU (smoke): host-reading ops recorded instead of set_sync_debug_mode, kernel {kernel}")

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            terms = training_losses(model, objective, x0, y, draws, losses, ForwardRecord())
        terms["loss"].backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: lazy initialisation and the grouped-matmul probe may synchronise once
    if device.type == "cuda":
        torch.cuda.synchronize()
        try:
            torch.cuda.set_sync_debug_mode("error")
            step()
        except RuntimeError as e:
            raise CheckFailed(f"a device-to-host synchronisation in the MoE training forward/backward: {e}") from e
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        notes.append("set_sync_debug_mode('error') raised nothing")
    else:
        original = torch.Tensor.tolist

        def refuse(*args, **kwargs):
            raise CheckFailed("host read (.tolist()) in the MoE training forward/backward")

        torch.Tensor.tolist = refuse
        try:
            with RecordOps() as record:
                step()
        finally:
            torch.Tensor.tolist = original
        if record.host_reads:
            raise CheckFailed(f"host-reading ops in the MoE training forward/backward: {sorted(set(record.host_reads))}")
    return {"notes": notes}


def check_digits_runs(device: torch.device, smoke: bool, out: Path, root: Path, scratch: Path) -> dict:
    """The demo model on the digits in bf16 through the training loop, eager and with train.compile=true: no
    non-finite step, and the logged loss falls (the last logged loss at most 0.7x the first). The runs live in
    `scratch`; their metrics.csv and last sample grid are copied to `out`."""
    from racedit.config import load_config
    from racedit.training.loop import train
    from racedit.training.metrics import read_metrics

    steps = 40 if smoke else 300
    runs, notes = {}, []
    threads = torch.get_num_threads()  # the demo config sets train.num_threads=1 for the whole process
    for mode in ("eager", "compiled"):
        run_dir = scratch / f"digits-{mode}"  # checkpoints stay out of the results folder, which travels back
        overrides = [f"train.steps={steps}", "train.mixed_precision=bf16", f"train.compile={mode == 'compiled'}",
                     f"train.out_dir={run_dir}", "train.eval_samples_per_class=0", "train.log_with=none",
                     f"train.log_every={steps // 10}", "train.ckpt_every=0"]
        if smoke:  # fewer steps, a short warm-up and a cheap end-of-run grid
            overrides += ["train.warmup_steps=2", "sample.steps=2", "model.depth=1",
                          "model.hidden_size=32", "model.num_heads=2", "train.global_batch=16"]
        cfg = load_config(root / "configs" / "demo.yaml", overrides)
        result = train(cfg)
        _, rows = read_metrics(run_dir)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(run_dir / "metrics.csv", out / f"digits-{mode}-metrics.csv")
        grids = sorted((run_dir / "samples").glob("*.png"))
        if grids:
            shutil.copy(grids[-1], out / f"digits-{mode}-grid.png")
        losses = [r["loss"] for r in rows if "loss" in r]
        runs[mode] = {"seconds": result.seconds, "skipped_steps": result.skipped_steps, "losses": losses,
                      "final_loss": result.last_loss}
        if result.skipped_steps or not all(map(math.isfinite, losses)):
            raise CheckFailed(f"digits {mode}: {result.skipped_steps} non-finite steps skipped; losses {losses}")
        if not losses or losses[-1] > 0.7 * losses[0]:
            raise CheckFailed(f"digits {mode}: the loss did not fall enough ({losses[0]:.4f} -> {losses[-1]:.4f}, "
                              f"need <= 0.7x)")
        notes.append(f"{mode}: {steps} steps in {result.seconds:.1f}s, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
                     f"0 skipped")
    torch.set_num_threads(threads)
    if device.type == "cpu":
        notes.append("ran on CPU (smoke): bf16 autocast on CPU, torch.compile with the aot_eager backend")
    return {"runs": runs, "notes": notes}
