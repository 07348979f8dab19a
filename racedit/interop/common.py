"""What every conversion shares: the error type, strict key/shape checks, and saving converted weights as an
ordinary racedit checkpoint (`save_converted`), so `racedit sample` samples them."""


from __future__ import annotations

from pathlib import Path

import torch

from racedit.checkpoint import save_checkpoint
from racedit.config import (
    Config,
    ConfigError,
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    SampleConfig,
    validate,
)
from racedit.models import DiT, resolve_model_config
from racedit.presets import PATCHES, SIZES

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # the VAE the official DiT checkpoints were trained with
VAE_DOWNSAMPLE = 8  # SD-VAE: 256 x 256 images <-> 32 x 32 latents
DIT_NORM_EPS = 1e-6  # every LayerNorm of DiT (racedit's too)


class ConversionError(ValueError):
    """Weights that cannot be converted as asked; the message names the key, the shapes or the setting."""

# ----------------------------------------------------------------------------------------------- helpers


def shape_str(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def check_tensors(state: dict, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not state:
        raise ConversionError(f"{source}: expected a non-empty state dict (parameter name -> tensor), "
                              f"got {type(state).__name__}")
    bad = [f"{k!r}: {type(v).__name__}" for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{source}: not a state dict; these entries are not tensors: {bad[:5]}")
    return state


def need_tensor(state: dict, key: str, ndim: int, source: str) -> torch.Tensor:
    if key not in state:
        near = sorted(state)[:8]
        raise ConversionError(f"{source}: key {key!r} is missing (the file's first keys: {near}); "
                              f"is this a checkpoint of the expected layout?")
    t = state[key]
    if t.ndim != ndim:
        raise ConversionError(f"{source}: {key!r} has shape {shape_str(t.shape)}; expected {ndim} dimensions")
    return t


def fit_report(expected: dict[str, tuple], given: dict[str, torch.Tensor], what: str) -> None:
    """Raise ConversionError listing missing and unexpected keys and shape mismatches."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = [f"{k}: file {shape_str(given[k].shape)} vs expected {shape_str(expected[k])}"
             for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k])]
    if missing or unexpected or wrong:
        lines = [f"{what}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
        if wrong:
            lines.append(f"  shape mismatches ({len(wrong)}): {wrong[:6]}{' ...' if len(wrong) > 6 else ''}")
        raise ConversionError("\n".join(lines))


def _size_name(depth: int, hidden: int) -> str | None:
    for size, (d, h, _) in SIZES.items():
        if (d, h) == (depth, hidden):
            return size
    return None


def dense_model_config(depth: int, hidden: int, patch: int, num_heads: int | None, source: str, **fixed) -> ModelConfig:
    """A dense ModelConfig named after the DiT preset of (depth, hidden) when there is one."""
    size = _size_name(depth, hidden)
    if size is None:
        if num_heads is None:
            known = {f"DiT-{s}": (d, h) for s, (d, h, _) in SIZES.items()}
            raise ConversionError(f"{source}: depth {depth} x width {hidden} is no DiT preset {known}; the number "
                                  f"of attention heads cannot be read from the weights, so pass num_heads "
                                  f"(--num-heads)")
        size = "S"
    heads = num_heads if num_heads is not None else SIZES[size][2]
    if hidden % heads:
        raise ConversionError(f"{source}: width {hidden} is not divisible by num_heads={heads}")
    name = f"DiT-{size}/{patch if patch in PATCHES else 2}"
    return ModelConfig(name=name, depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch,
                       moe_experts=0, moe_k=0, **fixed)


def build_dense_model(cfg: ModelConfig) -> DiT:
    try:
        return DiT(resolve_model_config(cfg))
    except ConfigError as e:
        raise ConversionError(str(e)) from None


# ---------------------------------------------------------------------------------- racedit checkpoints


def converted_config(model_cfg: ModelConfig, vae: str = DEFAULT_VAE, diffusion: DiffusionConfig | None = None,
                     sample: SampleConfig | None = None) -> Config:
    """The run config saved with a converted checkpoint.

    data.kind=latents with no latent directory and data.vae naming the decoder (a hub id or a local
    directory); diffusion: DDPM, 1000 linear betas 1e-4..0.02 (DiT's); sampling: DDPM, 250 steps, CFG 4.0
    on all channels (`racedit sample --guidance-channels 3` gives DiT's legacy 3-channel guidance).
    """
    cfg = Config(model=model_cfg, diffusion=diffusion or DiffusionConfig(),
                 data=DataConfig(kind="latents", latents="", vae=str(vae)),
                 sample=sample or SampleConfig(sampler="ddpm", steps=250, cfg_scale=4.0, guidance_channels=0))
    validate(cfg)
    return cfg


def fresh_out_dir(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"output {out} exists and is not an empty directory; choose a new --out")
    return out


def save_converted(model: DiT, out: str | Path, config: Config, source: str, provenance: dict | None = None) -> Path:
    """Save `model` as racedit checkpoint `step_0000000` under `out` (with `last` pointing at it): its weights
    as both the live and the EMA weights (converted weights are EMA weights). The train state records
    `provenance`, by default {"converted_from": source}. Returns the checkpoint dir."""
    out = fresh_out_dir(out)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return save_checkpoint(out, 0, model_state=state, ema_state=state, config=config,
                           train_state={"step": 0, **(provenance or {"converted_from": str(source)})})


