"""Classifier-free guidance (CFG).

The model is trained with label dropout, so it also predicts unconditionally when given the null class
(`num_classes`). Guidance with scale s replaces the prediction by

    guided = uncond + s * (cond - uncond)

Exactly which output channels are guided (C data channels; a learn_sigma model outputs 2C):

- `guidance_channels=0` (default): all C prediction channels (eps or velocity) are guided.
- `guidance_channels=g` (1 <= g <= C): only the first g channels are guided; channels g..C-1 take the
  conditional prediction. `g=3` with C=4 latents reproduces DiT's legacy behaviour (its sampler guided
  `model_out[:, :3]`).
- The learned-variance channels (C..2C-1) are never guided; they always come from the conditional half.
- `cfg_scale == 1` skips the unconditional forward: the result is the plain conditional prediction.

Conditional and unconditional halves run as one forward over a doubled batch (conditional first). Both
halves see the same x_t at every step. (DiT's reference sampler instead carried two separate trajectories
in its doubled batch, which drift apart through the unguided channels and independent sampler noise; that
detail is not reproduced here, only its choice of channels.)

Letters (docs/method/README.md): B images, C data channels, H x W spatial size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

ModelFn = Callable[[Tensor, Tensor], Tensor]


def combine_guidance(cond: Tensor, uncond: Tensor, cfg_scale: float, channels: int, guidance_channels: int = 0) -> Tensor:
    """Guided output (B, C or 2C, H, W) from the conditional and unconditional outputs of the same shape.

    `channels` is C, the number of data channels; see the module docstring for which channels are guided.
    """
    if not 0 <= guidance_channels <= channels:
        raise ValueError(f"guidance_channels must be in [0, {channels}] (0 = all), got {guidance_channels}")
    guided = channels if guidance_channels == 0 else guidance_channels
    mixed = uncond[:, :guided] + cfg_scale * (cond[:, :guided] - uncond[:, :guided])
    return torch.cat([mixed, cond[:, guided:]], dim=1)


def guided_model_fn(
    model: nn.Module, y: Tensor, cfg_scale: float, null_class: int | None = None, guidance_channels: int = 0
) -> ModelFn:
    """A function (x (B, C, H, W), t (B,) model time) -> guided output (B, C or 2C, H, W) for labels y (B,).

    `null_class` defaults to `model.num_classes`. The model is called as `model(x, t, y)`.
    """
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, y)
    null = model.num_classes if null_class is None else null_class
    y_both = torch.cat([y, torch.full_like(y, null)])

    def fn(x: Tensor, t: Tensor) -> Tensor:
        out = model(torch.cat([x, x]), torch.cat([t, t]), y_both)
        cond, uncond = out.chunk(2)
        return combine_guidance(cond, uncond, cfg_scale, x.shape[1], guidance_channels)

    return fn
