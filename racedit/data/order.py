"""A resumable, rank-aware order of training examples.

The indices of optimizer step s are a pure function of (seed, s): epoch e = s // steps_per_epoch draws a
permutation from (seed, e) alone. So the order does not depend on the number of processes, on prefetching
DataLoader workers, or on where a run was interrupted, and resuming at step s needs nothing but s.
Each global batch of `global_batch` indices is cut into `grad_accum x world_size` equal micro-batches;
rank r takes micro-batch (a, r) for accumulation index a.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from racedit.seeding import Purpose, seed_for


class ResumableBatchOrder:
    """This rank's micro-batches of dataset indices for every optimizer step."""

    def __init__(self, num_examples: int, global_batch: int, seed: int, world_size: int = 1, rank: int = 0,
                 grad_accum: int = 1):
        per_step = world_size * grad_accum
        # the config's boundary check (racedit.config.check_batch_layout) reports this to the user
        assert global_batch % per_step == 0, (global_batch, world_size, grad_accum)
        if num_examples < global_batch:
            raise ValueError(f"the dataset has {num_examples} examples, fewer than train.global_batch={global_batch}")
        self.num_examples, self.global_batch, self.seed = num_examples, global_batch, seed
        self.world_size, self.rank, self.grad_accum = world_size, rank, grad_accum
        self.micro_batch = global_batch // per_step
        self.steps_per_epoch = num_examples // global_batch  # an epoch's incomplete tail is dropped
        self._cache: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(seed_for(self.seed, Purpose.DATA_ORDER, epoch))
            self._cache = (epoch, torch.randperm(self.num_examples, generator=g))
        return self._cache[1]

    def step_indices(self, step: int) -> list[torch.Tensor]:
        """The `grad_accum` micro-batches (each (micro_batch,) long) of this rank for optimizer step `step`."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        batch = self._permutation(epoch)[pos * self.global_batch:(pos + 1) * self.global_batch]
        micro = batch.view(self.grad_accum, self.world_size, self.micro_batch)
        return [micro[a, self.rank] for a in range(self.grad_accum)]

    def micro_batches(self, start_step: int) -> Iterator[list[int]]:
        """Endless micro-batches from `start_step` on; usable as a DataLoader `batch_sampler`."""
        step = start_step
        while True:
            for idx in self.step_indices(step):
                yield idx.tolist()
            step += 1

    def position(self, step: int) -> dict:
        """Where step `step` sits in the data (saved in checkpoints for the record)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": pos, "num_examples": self.num_examples}
