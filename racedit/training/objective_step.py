"""One micro-batch's losses: the objective's loss plus the enabled auxiliary router losses.

Letters (docs/method/README.md): B micro-batch, C channels, H x W input side.
"""

from __future__ import annotations

import torch

from racedit.config import LossConfig
from racedit.diffusion.draws import MicroBatchDraws
from racedit.diffusion.objectives import Objective
from racedit.models.losses import AUX_LOSS_NAMES, auxiliary_losses
from racedit.models.records import ForwardRecord


def training_losses(model, objective: Objective, x0: torch.Tensor, y: torch.Tensor, draws: MicroBatchDraws,
                    loss_cfg: LossConfig, record: ForwardRecord) -> dict[str, torch.Tensor]:
    """Diffusion loss plus the enabled auxiliary losses; "loss" is what to backpropagate.

    x0 (B, C, H, W) clean inputs, y (B,) labels. The model fills `record` (the side channel).
    Besides the objective's own terms, "loss/diffusion" is the objective's loss and each auxiliary loss
    whose coefficient is > 0 is returned unweighted under its name (`racedit.models.losses.AUX_LOSS_NAMES`)
    and added to "loss" times its coefficient; losses switched off are not computed.
    """
    s = objective.sample(x0, t=draws.t, noise=draws.noise.to(x0.dtype))
    out = model(s.x_t, objective.model_time(s.t), draws.labels(y), record=record)
    terms = objective.loss(out, s)
    aux = auxiliary_losses(record, loss_cfg, s.target)
    if aux:
        terms["loss/diffusion"] = terms["loss"]
        total = terms["loss"]
        for field, name in AUX_LOSS_NAMES.items():
            if name in aux:
                terms[name] = aux[name]
                total = total + getattr(loss_cfg, field) * aux[name]
        terms["loss"] = total
    return terms

