"""Recalibrating the inference threshold tau of a set of weights (docs/method/threshold.md).

tau is an EMA of the training batch's K-th largest score, taken from the *live* model's scores. The EMA
weights score tokens a little differently, so sampling with the EMA weights and the live tau realises a
mean number of experts per token that drifts from k. `calibrate_thresholds` runs the given weights with
the training rule on training batches at random timesteps (as training does: random t, noise and label
dropout; no gradient) and sets each threshold layer's tau to the mean batch K-th largest score.

Letters (docs/method/README.md): B calibration batch, C channels, H x W input side.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from racedit.diffusion.draws import MicroBatchDraws
from racedit.diffusion.objectives import Objective
from racedit.models.moe import local_selection, threshold_layers
from racedit.models.records import ForwardRecord
from racedit.seeding import Purpose, seed_for


@dataclass
class ThresholdCalibration:
    """What `calibrate_thresholds` did: per threshold layer (by layer index), tau before and after."""

    batches: int
    batch_size: int
    seed: int
    tau_before: dict[int, float] = field(default_factory=dict)
    tau_after: dict[int, float] = field(default_factory=dict)

    def summary(self) -> str:
        pairs = ", ".join(f"{i}: {self.tau_before[i]:.4f} -> {self.tau_after[i]:.4f}" for i in sorted(self.tau_after))
        return f"tau recalibrated on {self.batches} batches of {self.batch_size} (seed {self.seed}): {pairs}"

    def metadata(self) -> dict:
        return {"batches": self.batches, "batch_size": self.batch_size, "seed": self.seed,
                "tau": {str(i): v for i, v in sorted(self.tau_after.items())}}


@torch.no_grad()
def calibrate_thresholds(model: torch.nn.Module, objective: Objective, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                         num_batches: int, label_dropout: float, seed: int = 0,
                         progress: bool = False) -> ThresholdCalibration:
    """Set tau of every threshold layer of `model` to its mean batch K-th largest score over `num_batches`
    batches (x0 (B, C, H, W), y (B,)) taken from `batches`.

    Each batch is noised at timesteps drawn as in training (`objective.sample_t`), with labels dropped to
    the null class with probability `label_dropout`, all from a CPU generator seeded by
    `seed_for(seed, Purpose.CALIBRATION)`, so the result depends only on the weights, the batches and the
    seed. The selection is the training rule
    (grouped top-K over the batch) and always local to this process: no collective runs even if the
    model was trained with race_scope="global" (the batch given here then plays the global batch).
    Nothing else in the model changes (no gradient, no optimizer); it is left in the mode it was in.
    Raises ValueError when the model has no threshold layer or `batches` runs out.
    """
    layers = threshold_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layer that routes with an inference threshold "
                         "(batch-coupled routing with inference_routing=threshold)")
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    gen = torch.Generator().manual_seed(seed_for(seed, Purpose.CALIBRATION))
    sums: dict[int, torch.Tensor | float] = {m.layer_index: 0.0 for m in layers}  # on the device: no sync per batch
    before = {m.layer_index: float(m.tau) for m in layers}
    batch_size = 0
    was_training = model.training
    try:
        # The training selection, whose K-th largest score is what tau estimates; a forward records that
        # score and leaves tau alone.
        model.train()
        with local_selection(model):
            it: Iterator = iter(batches)
            for _ in tqdm(range(num_batches), desc="calibrate tau", disable=not progress, leave=False):
                try:
                    x0, y = next(it)
                except StopIteration:
                    raise ValueError(f"calibration data ran out before {num_batches} batches") from None
                batch_size = len(x0)
                t = objective.sample_t(len(x0), torch.device("cpu"), gen)
                noise = torch.randn(x0.shape, generator=gen)
                drop = torch.rand(len(x0), generator=gen) < label_dropout
                draws = MicroBatchDraws(t.to(x0.device), noise.to(x0.device, x0.dtype), drop.to(y.device),
                                        model.num_classes)
                s = objective.sample(x0, t=draws.t, noise=draws.noise)
                record = ForwardRecord()
                model(s.x_t, objective.model_time(s.t), draws.labels(y), record=record)
                for i in sums:
                    sums[i] = sums[i] + record.moe[i].kth_score.double()
    finally:
        model.train(was_training)
    for m in layers:
        m.tau.fill_(float(sums[m.layer_index]) / num_batches)
        m.threshold_initialized.fill_(True)
    return ThresholdCalibration(num_batches, batch_size, seed, before, {m.layer_index: float(m.tau) for m in layers})
