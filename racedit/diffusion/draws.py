"""The random draws of one training micro-batch (timesteps, noise, label dropout), seeded per step.

Letters (docs/method/README.md): B micro-batch, C channels, H x W input side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from racedit.diffusion.objectives import Objective
from racedit.seeding import Purpose, seed_for


@dataclass
class MicroBatchDraws:
    """What a micro-batch's loss draws at random: timesteps (B,), noise (B, C, H, W), label-dropout mask (B,)."""

    t: torch.Tensor
    noise: torch.Tensor
    drop_labels: torch.Tensor
    null_class: int

    def labels(self, y: torch.Tensor) -> torch.Tensor:
        """y (B,) with the dropped labels replaced by the null class."""
        return torch.where(self.drop_labels, torch.full_like(y, self.null_class), y)


class StepRandomness:
    """Draws t, noise and label dropout for the whole global batch of step s from a generator seeded by
    (seed, s), and hands each process its rows, in the layout of `ResumableBatchOrder`."""

    def __init__(self, objective: Objective, seed: int, global_batch: int, world_size: int, rank: int,
                 grad_accum: int, label_dropout: float, null_class: int):
        self.objective, self.seed, self.global_batch = objective, seed, global_batch
        self.world_size, self.rank, self.grad_accum = world_size, rank, grad_accum
        self.micro = global_batch // (world_size * grad_accum)
        self.label_dropout, self.null_class = label_dropout, null_class
        self._cached: tuple[int, tuple] | None = None

    def _global(self, step: int, shape: torch.Size) -> tuple:
        if self._cached is None or self._cached[0] != step:
            g = torch.Generator().manual_seed(seed_for(self.seed, Purpose.STEP_DRAWS, step))
            t = self.objective.sample_t(self.global_batch, torch.device("cpu"), g)
            noise = torch.randn((self.global_batch, *shape), generator=g)
            drop = torch.rand(self.global_batch, generator=g) < self.label_dropout
            self._cached = (step, (t, noise, drop))
        return self._cached[1]

    def for_micro_batch(self, step: int, accum_index: int, shape: torch.Size, device) -> MicroBatchDraws:
        t, noise, drop = self._global(step, shape)
        start = (accum_index * self.world_size + self.rank) * self.micro
        rows = slice(start, start + self.micro)
        return MicroBatchDraws(t[rows].to(device), noise[rows].to(device), drop[rows].to(device), self.null_class)
