"""One derivation for every seed racedit draws from: `seed_for(seed, purpose, *keys)`.

Each random stream (the data order of an epoch, the draws of a training step, the noise of a sample, ...)
gets its own 64-bit seed from numpy's SeedSequence, which hashes its input so that nearby inputs give
unrelated seeds. Ad-hoc arithmetic such as `seed * 1_000_003 + start (+ 1)` does not: at batch size 1 it
gave sample i's step noise the seed of sample i+1's initial noise.

The stream of (purpose, *keys) is SeedSequence(seed, spawn_key=(purpose, *keys)), numpy's own child-stream
construction (what `SeedSequence(seed).spawn` builds): the purpose is the first level of the tree, the keys
the next ones. Every value must fit in 32 bits, so each is one word of the hashed input and two different
(seed, purpose, keys) never hash the same input. `Purpose.SAMPLE` is the one exception: it is the
per-sample convention recorded in npz metadata, SeedSequence([seed, i]). Its input is at most 4 words,
every other purpose's at least 5 (numpy pads the seed to 4 words before a spawn key), so it cannot
coincide with them either.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

_WORD = 2**32


class Purpose(IntEnum):
    """What a derived seed drives (the keys it takes). Each has its own value, so two never share a stream."""

    SAMPLE = 0  # sample i of a sampling job, its initial and step noise (i)
    DATA_ORDER = 1  # the permutation of the training examples for an epoch (epoch)
    STEP_DRAWS = 2  # timesteps, noise and label dropout of a global training batch (step)
    BATCH_NOISE = 3  # initial noise of a `sample_images` batch (first sample's index)
    BATCH_STEP_NOISE = 4  # sampler step noise of a `sample_images` batch (first sample's index)
    LATENT_DRAWS = 5  # the base key of the latent store's per-read hash (none)
    CALIBRATION = 6  # timesteps, noise and label dropout of threshold calibration (none)


def seed_for(seed: int, purpose: Purpose, *keys: int) -> int:
    """The 64-bit seed of the stream (purpose, *keys) under `seed`; seed and keys are integers in [0, 2**32)."""
    values = (seed, *keys)
    if any(not 0 <= int(v) < _WORD for v in values):
        raise ValueError(f"seed and keys must be integers in [0, 2**32), got seed={seed}, keys={keys}")
    if purpose == Purpose.SAMPLE:
        if len(keys) != 1:
            raise ValueError(f"Purpose.SAMPLE takes one key (the sample index), got {keys}")
        sequence = np.random.SeedSequence([int(seed), int(keys[0])])
    else:
        sequence = np.random.SeedSequence(int(seed), spawn_key=(int(Purpose(purpose)), *map(int, keys)))
    return int(sequence.generate_state(1, dtype=np.uint64)[0])
