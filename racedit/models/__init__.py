"""Model construction and accounting: `create_model`, `count_params`, `count_macs`."""

from __future__ import annotations

import re
from dataclasses import fields, replace

import torch
import torch.nn as nn

from racedit.config import ConfigError, ModelConfig, check_model_shape, resolved_sizes
from racedit.models.dit import DiT, DiTBlock, build_feedforward
from racedit.models.memory import read_macs_per_token

__all__ = ["DiT", "create_model", "resolve_model_config", "count_params", "count_macs"]


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """Fill the fields left at None from the preset named by `cfg.name`, and check the sizes fit together
    (`racedit.config.check_model_shape`)."""
    cfg = replace(cfg, **resolved_sizes(cfg))
    check_model_shape(cfg)
    if cfg.memory == "ultramemv2" and not cfg.memory_key_dim:
        cfg = replace(cfg, memory_key_dim=_memory_share_key_dim(cfg))
    return cfg


def block_macs_per_token(cfg: ModelConfig) -> float:
    """MACs per token of one DiT block without memory (attention at this model's token count, the dense MLP
    or the MoE at mean k, the block's adaLN spread over the tokens), counted by `DiTBlock.macs` on the meta
    device: the denominator of UltraMemV2's memory share."""
    tokens = (cfg.input_size // cfg.patch_size) ** 2
    with torch.device("meta"):
        block = DiTBlock(cfg.hidden_size, cfg.num_heads, build_feedforward(cfg, 0))
    return block.macs(tokens) / tokens


def _memory_share_key_dim(cfg: ModelConfig) -> int:
    """UltraMemV2's key width Dk (a multiple of 8, at least 8) whose memory MACs per token are
    `model.memory_share` of block + memory MACs. Dk enters linearly (query projection and key scores), so it
    is solved from two probe layers."""
    target = cfg.memory_share / (1 - cfg.memory_share) * block_macs_per_token(cfg)
    lo, hi = (read_macs_per_token(cfg, k) for k in (8, 16))
    per_dim = (hi - lo) / 8
    return max(8, int(round((8 + (target - lo) / per_dim) / 8)) * 8)


def create_model(name: str | ModelConfig = "DiT-XL/2", **overrides) -> DiT:
    """Build a DiT from a preset name (or a ModelConfig) plus keyword overrides of `ModelConfig` fields.

    >>> create_model("RaceDiT-B/2-2in8", routing="expert_race", gating="identity")
    """
    base = name if isinstance(name, ModelConfig) else ModelConfig(name=name)
    allowed = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ConfigError(f"unknown model option(s) {unknown}; allowed: {sorted(allowed)}")
    return DiT(resolve_model_config(replace(base, **overrides)))


def _expert_fractions(model: nn.Module) -> dict[str, float]:
    """Parameter name -> fraction of it one token uses on average (k/E for expert weights)."""
    out = {}
    for mod_name, module in model.named_modules():
        fraction = getattr(module, "activated_fraction", None)
        if fraction is not None:
            for p_name, _ in module.named_parameters():
                out[f"{mod_name}.{p_name}" if mod_name else p_name] = float(fraction)
    return out


_BIAS = re.compile(r"^(.*bias.*|b\d+)$")  # nn.Linear biases and the batched expert biases b1, b2


def count_params(model: nn.Module, convention: str = "all") -> dict[str, int]:
    """{"total", "activated"} parameter counts.

    convention="all": every parameter, as DiT's table counts (the frozen position embedding included).
    convention="paper": Race-DiT's tables: weight matrices inside the blocks only (no biases, embedders,
    final layer, position embedding or per-layer-regularization target head).
    "activated" is what one token uses on average: k/E of the expert weights, and never the target head,
    which only serves a training loss.
    """
    if convention not in ("all", "paper"):
        raise ValueError(f"convention must be 'all' or 'paper', got {convention!r}")
    fractions = _expert_fractions(model)
    total = activated = 0.0
    for name, p in model.named_parameters():
        if convention == "paper":
            if not name.startswith("blocks.") or p.ndim < 2 or _BIAS.match(name.rsplit(".", 1)[-1]) \
                    or "target_head" in name:
                continue
        total += p.numel()
        if "target_head" not in name:
            activated += p.numel() * fractions.get(name, 1.0)
    return {"total": int(total), "activated": int(round(activated))}


def count_macs(model: DiT) -> int:
    """Forward multiply-accumulates for one image (DiT's "Gflops" are MACs); MoE layers at mean k."""
    return model.macs()
