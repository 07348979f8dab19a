"""Upcycling a dense racedit checkpoint into a Race-DiT checkpoint (`racedit convert upcycle`); the method
itself is `racedit.models.upcycle`."""


from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from racedit.checkpoint import load_model
from racedit.config import ConfigError, load_config, validate
from racedit.interop.common import ConversionError, fresh_out_dir, save_converted
from racedit.models.upcycle import moe_dense_gap, upcycle


def upcycle_checkpoint(ckpt: str | Path, to: str, out: str | Path, noise_std: float = 0.01, seed: int = 0,
                       use_ema: bool = True, overrides: dict | None = None,
                       probe: bool = True) -> tuple[Path, dict[str, float] | None]:
    """Upcycle a dense racedit checkpoint (its EMA weights by default) into a new checkpoint under `out`:
    the upcycled weights as both live and EMA weights, the same config with the model replaced. Returns
    (checkpoint dir, gap on a random probe batch in eval and train routing, or None without `probe`)."""
    out = fresh_out_dir(out)
    dense, cfg, path = load_model(ckpt, "ema" if use_ema else "model")
    moe_model = upcycle(dense, to, noise_std=noise_std, seed=seed, **(overrides or {}))
    gap = None
    if probe:
        g = torch.Generator().manual_seed(seed)
        m = dense.config
        x = torch.randn(2, m.in_channels, m.input_size, m.input_size, generator=g)
        t = torch.randint(0, cfg.diffusion.num_timesteps, (2,), generator=g).float()
        y = torch.randint(0, m.num_classes, (2,), generator=g)
        ev, tr = moe_dense_gap(dense, moe_model, x, t, y), moe_dense_gap(dense, moe_model, x, t, y, train_mode=True)
        gap = {f"eval_{k}": v for k, v in ev.items()} | {f"train_{k}": v for k, v in tr.items()}
    new_cfg = replace(cfg, model=moe_model.config)
    validate(new_cfg)
    final = save_converted(moe_model, out, new_cfg, str(path),
                           provenance={"upcycled_from": str(path), "noise_std": float(noise_std)})
    return final, gap


def parse_model_overrides(items: list[str]) -> dict:
    """`model.key=value` strings -> {key: typed value} for `upcycle` (parsed and type-checked by `load_config`)."""
    keys = [item.partition("=")[0] for item in items]
    for item, key in zip(items, keys):
        if "=" not in item or not key.startswith("model."):
            raise ConversionError(f"override {item!r} is not of the form model.key=value (e.g. model.gating=sigmoid)")
    try:
        model = load_config(None, items).model
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    return {key.split(".", 1)[1]: getattr(model, key.split(".", 1)[1]) for key in keys}
