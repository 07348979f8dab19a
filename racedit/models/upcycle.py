"""Upcycling: a dense DiT -> a Race-DiT whose every MLP becomes a k-in-E MoE initialised from it, so the
upcycled model starts at (or, with expert noise, near) the dense model's function. The construction (expert
chunks, the router's "bins", the remaining gap) is explained in docs/method/upcycling.md.

Letters (docs/method/README.md): B images, L tokens per image, D width, E experts, k experts per token,
h expert hidden width; n_copy = E / k copies of each dense chunk.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields, replace
from statistics import NormalDist

import torch
from torch import nn

from racedit.config import ConfigError, ModelConfig
from racedit.models import DiT, resolve_model_config
from racedit.models.moe import local_selection
from racedit.presets import resolve_preset


class UpcycleError(ValueError):
    """A dense model or target that cannot be upcycled as asked; the message names the setting."""


# Router bins per gating: (a, the ramp slope per unit of the projection f; eps, the logit drop per unit of
# distance to the bin). softmax normalises each token's scores, which couples tokens in a global race, so
# its outside logits must fall steeply for the selection to stay one copy per chunk.
BIN_RAMP_MARGIN = {"identity": (1e3, 1.0), "sigmoid": (1e3, 1.0), "softmax": (1e5, 1e4)}


def _nominal_logit(gating: str) -> float:
    return 1.0 if gating == "identity" else 0.0


def _nominal_gate(gating: str, k: int) -> float:
    """s0: the gate value of a selected pair when a token's k selected pairs have logit l0 and the rest -inf."""
    l0 = _nominal_logit(gating)
    return {"identity": l0, "sigmoid": 1.0 / (1.0 + math.exp(-l0)), "softmax": 1.0 / k}[gating]


@torch.no_grad()
def init_moe_from_dense(moe: nn.Module, dense: nn.Module, noise_std: float = 0.01,
                        generator: torch.Generator | None = None) -> None:
    """Initialise a `MoEFeedForward` from a dense `FeedForward` (fc1, fc2) in place; see docs/method/upcycling.md.

    Needs E divisible by k, the expert width equal to the dense hidden width / k, and D >= 2 (E/k - 1)
    router units for the bins.
    """
    E, k, D, h = moe.num_experts, moe.k, moe.dim, moe.hidden
    W1, b1, W2, b2 = dense.fc1.weight, dense.fc1.bias, dense.fc2.weight, dense.fc2.bias
    if E % k:
        raise UpcycleError(f"upcycling needs E divisible by k (each chunk seeds E/k experts); got {k}in{E}")
    if W1.shape != (k * h, D):
        raise UpcycleError(f"layer {moe.layer_index}: dense fc1.weight {tuple(W1.shape)} cannot be split into "
                              f"k={k} experts of width {h} over D={D} (needs ({k * h}, {D}))")
    n_copy = E // k
    if D < 2 * (n_copy - 1):
        raise UpcycleError(f"the router needs 2 (E/k - 1) = {2 * (n_copy - 1)} trunk units for its bins; D={D}")
    dev, dt = moe.experts.w1.device, moe.experts.w1.dtype
    gating = moe.router.gating
    s0 = _nominal_gate(gating, k)
    experts = moe.experts
    for c in range(k):
        rows = slice(c * h, (c + 1) * h)
        w1 = W1[rows].t().to(dev, dt)  # (D, h)
        w2 = W2[:, rows].t().to(dev, dt)  # (h, D)
        for j in range(n_copy):
            e = c * n_copy + j
            n1 = n2 = 0.0
            if n_copy > 1 and noise_std > 0:
                n1 = noise_std * w1.std() * torch.randn(w1.shape, generator=generator).to(dev, dt)
                n2 = noise_std * w2.std() * torch.randn(w2.shape, generator=generator).to(dev, dt)
            experts.w1[e].copy_(w1 + n1)
            experts.b1[e].copy_(b1[rows].to(dev, dt))
            experts.w2[e].copy_((w2 + n2) / s0)
            experts.b2[e].copy_(b2.to(dev, dt) / (k * s0))

    router = moe.router
    trunk, head = router.trunk[0], router.gate_head
    head.weight.zero_()
    head.bias.fill_(_nominal_logit(gating))
    if n_copy > 1:
        a, eps = BIN_RAMP_MARGIN[gating]
        w = torch.randn(D, generator=generator, dtype=torch.float64)
        w = (w / w.norm()).to(trunk.weight.dtype)
        thetas = [NormalDist().inv_cdf(i / n_copy) for i in range(1, n_copy)]
        for i, theta in enumerate(thetas):  # unit 2i: GELU(a (f - theta)); unit 2i + 1: GELU(a (theta - f))
            trunk.weight[2 * i].copy_(a * w)
            trunk.bias[2 * i] = -a * theta
            trunk.weight[2 * i + 1].copy_(-a * w)
            trunk.bias[2 * i + 1] = a * theta
            if router.target_head is not None:
                router.target_head.weight[:, 2 * i:2 * i + 2].zero_()
        for c in range(k):
            for j in range(n_copy):
                e = c * n_copy + j
                if j >= 1:  # below bin j: f < theta_j, measured by unit 2 (j - 1) + 1
                    head.weight[e, 2 * (j - 1) + 1] = -eps / a
                if j <= n_copy - 2:  # above bin j: f > theta_{j+1}, measured by unit 2 j
                    head.weight[e, 2 * j] = -eps / a
    # eval threshold: every selected pair scores ~s0; for softmax the others score < s0 / 2
    moe.tau.fill_(s0 / 2 if gating == "softmax" and n_copy > 1 else s0)
    moe.threshold_initialized.fill_(True)


def _target_config(dense_cfg: ModelConfig, target: str | ModelConfig, overrides: dict) -> ModelConfig:
    if dense_cfg.moe_experts:
        raise UpcycleError(f"upcycling starts from a dense model; this one is {dense_cfg.name}")
    if isinstance(target, ModelConfig):
        cfg = target
    else:
        try:
            preset = resolve_preset(target)
            own = resolve_preset(dense_cfg.name)
        except KeyError as e:
            raise UpcycleError(e.args[0]) from None
        if not preset["moe_experts"]:
            raise UpcycleError(f"upcycle target {target!r} is dense; name a RaceDiT-<size>/<p>-<k>in<E> preset")
        dims = ("depth", "hidden_size", "num_heads", "patch_size")
        if any(preset[f] != own[f] for f in dims):
            raise UpcycleError(
                f"{target} is {'x'.join(str(preset[f]) for f in dims)} (depth x width x heads x patch) but the dense "
                f"model is a {dense_cfg.name} ({'x'.join(str(own[f]) for f in dims)}); upcycling keeps the "
                f"architecture, so name RaceDiT-{dense_cfg.name.split('-', 1)[1]}-<k>in<E>")
        cfg = replace(dense_cfg, name=target, moe_experts=preset["moe_experts"], moe_k=preset["moe_k"])
    allowed = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise UpcycleError(f"unknown model option(s) {unknown}; allowed: {sorted(allowed)}")
    try:
        cfg = resolve_model_config(replace(cfg, **overrides))
    except ConfigError as e:
        raise UpcycleError(str(e)) from None
    for f in ("depth", "hidden_size", "num_heads", "patch_size", "input_size", "in_channels", "mlp_ratio"):
        if getattr(cfg, f) != getattr(dense_cfg, f):
            raise UpcycleError(f"upcycling keeps the architecture, but model.{f} would change from "
                                  f"{getattr(dense_cfg, f)} to {getattr(cfg, f)}")
    return cfg


@torch.no_grad()
def upcycle(dense: DiT, target: str | ModelConfig, noise_std: float = 0.01, seed: int = 0, **overrides) -> DiT:
    """A Race-DiT initialised from a dense DiT: every MLP becomes a MoE (`init_moe_from_dense`), every other
    weight is copied. `target`: a RaceDiT preset of the dense model's size (e.g. RaceDiT-XL/2-4in32 for a
    DiT-XL/2) or a full ModelConfig; `overrides`: ModelConfig fields (routing, gating, ...). Returns the MoE
    model in eval mode (its inference thresholds set), on the dense model's device and dtype.
    """
    cfg = _target_config(dense.config, target, overrides)
    p = next(dense.parameters())
    moe_model = DiT(cfg).to(p.device, p.dtype)
    dense_sd = dense.state_dict()
    own = moe_model.state_dict()
    generator = torch.Generator().manual_seed(seed)
    used = set()
    ffn = re.compile(r"^blocks\.\d+\.mlp\.")  # the feed-forward slots: rebuilt below, not copied
    for key, value in own.items():
        if ffn.match(key):
            continue
        if key not in dense_sd:
            raise UpcycleError(f"upcycle: {key} of {cfg.name} has no counterpart in the dense model")
        if dense_sd[key].shape != value.shape:
            raise UpcycleError(f"upcycle: {key}: dense {tuple(dense_sd[key].shape)} vs {cfg.name} {tuple(value.shape)}")
        value.copy_(dense_sd[key])
        used.add(key)
    left = sorted(k for k in dense_sd if k not in used and not ffn.match(k))
    if left:
        raise UpcycleError(f"upcycle: dense weights with no place in {cfg.name}: {left[:8]}")
    for dense_block, block in zip(dense.blocks, moe_model.blocks):
        init_moe_from_dense(block.mlp, dense_block.mlp, noise_std=noise_std, generator=generator)
    return moe_model.eval()


@torch.no_grad()
def moe_dense_gap(dense: DiT, moe_model: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                  train_mode: bool = False) -> dict[str, float]:
    """How far the upcycled model is from the dense one on (x, t, y): {"relative": ||a - b|| / ||b||,
    "max_abs": max |a - b|} of the whole outputs, and "max_layer_relative": the worst per-layer gap of the
    MoE layers on the dense model's own MLP inputs. train_mode=True routes with the training rule (the
    batch race, local to this process; no forward moves the thresholds), else with the eval rule (the threshold)."""
    inputs: dict[int, torch.Tensor] = {}
    hooks = [b.mlp.register_forward_hook(lambda mod, args, out, i=i: inputs.__setitem__(i, args[0]))
             for i, b in enumerate(dense.blocks)]
    try:
        ref = dense.eval()(x, t, y)
    finally:
        for hook in hooks:
            hook.remove()
    layer = 0.0
    with local_selection(moe_model):
        moe_model.train(train_mode)
        out = moe_model(x, t, y)
        for i, (dense_block, block) in enumerate(zip(dense.blocks, moe_model.blocks)):
            a, b = block.mlp(inputs[i]), dense_block.mlp(inputs[i])
            layer = max(layer, float((a - b).norm() / b.norm().clamp_min(1e-30)))
    moe_model.eval()
    diff = out - ref
    return {"relative": float(diff.norm() / ref.norm().clamp_min(1e-30)), "max_abs": float(diff.abs().max()),
            "max_layer_relative": layer}


