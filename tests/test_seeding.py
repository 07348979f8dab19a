"""`seed_for`: every (seed, purpose, keys) a distinct stream, equal to numpy's own SeedSequence spawn tree."""

from __future__ import annotations

import numpy as np
import pytest

from racedit.config import ConfigError, load_config
from racedit.sampling import sample_seed
from racedit.seeding import Purpose, seed_for


def state(sequence: np.random.SeedSequence) -> int:
    return int(sequence.generate_state(1, dtype=np.uint64)[0])


def child(parent: np.random.SeedSequence, n: int) -> np.random.SeedSequence:
    """The n-th child of a fresh parent (`spawn` counts the children it has already made)."""
    return parent.spawn(n + 1)[n]


def test_equals_numpys_spawn_tree_and_the_recorded_sample_convention():
    for seed in (0, 1, 12345, 2**32 - 1):
        for purpose in Purpose:
            if purpose == Purpose.SAMPLE:
                continue
            assert seed_for(seed, purpose) == state(child(np.random.SeedSequence(seed), int(purpose)))
            for key in (0, 1, 7):
                grandchild = child(child(np.random.SeedSequence(seed), int(purpose)), key)
                assert seed_for(seed, purpose, key) == state(grandchild)
        for i in (0, 1, 999):  # npz metadata's NOISE_CONVENTION: SeedSequence([seed, i])
            assert seed_for(seed, Purpose.SAMPLE, i) == sample_seed(seed, i) == state(np.random.SeedSequence([seed, i]))


def test_distinct_over_a_grid_of_seeds_purposes_and_keys():
    seeds = range(3)
    keyed = [p for p in Purpose if p not in (Purpose.LATENT_DRAWS, Purpose.CALIBRATION)]
    derived = [(s, p, k) for s in seeds for p in keyed for k in range(300)]
    derived += [(s, p) for s in seeds for p in (Purpose.LATENT_DRAWS, Purpose.CALIBRATION)]
    values = {seed_for(*d) for d in derived}
    assert len(values) == len(derived)
    # the keyless purposes differ from their keyed children with key 0 (a trailing zero is not dropped)
    assert seed_for(0, Purpose.DATA_ORDER) != seed_for(0, Purpose.DATA_ORDER, 0)


def test_batch_size_one_no_longer_reuses_a_seed():
    """Regression: sample_images seeded a batch starting at `start` with seed*1_000_003+start (initial noise)
    and seed*1_000_003+start+1 (step noise); at batch size 1 sample i's step noise was sample i+1's initial
    noise. The data order (seed*1_000_003+epoch) and step draws (seed*7_919+step+1) also met at seed 0."""
    def old_noise(seed, start):
        return seed * 1_000_003 + start

    def old_step_noise(seed, start):
        return seed * 1_000_003 + start + 1

    starts = range(50)  # batch size 1: one batch per sample
    assert all(old_step_noise(2, i) == old_noise(2, i + 1) for i in starts[:-1])
    assert 0 * 1_000_003 + 5 == 0 * 7_919 + 4 + 1  # epoch 5's permutation == step 4's draws

    new = [seed_for(2, Purpose.BATCH_NOISE, i) for i in starts] + [seed_for(2, Purpose.BATCH_STEP_NOISE, i) for i in starts]
    assert len(set(new)) == len(new)
    assert seed_for(0, Purpose.DATA_ORDER, 5) != seed_for(0, Purpose.STEP_DRAWS, 4)


@pytest.mark.parametrize("args", [(-1, Purpose.DATA_ORDER, 0), (2**32, Purpose.DATA_ORDER, 0),
                                  (0, Purpose.STEP_DRAWS, -1), (0, Purpose.STEP_DRAWS, 2**32),
                                  (0, Purpose.SAMPLE), (0, Purpose.SAMPLE, 1, 2)])
def test_out_of_range_or_wrong_arity_raises(args):
    with pytest.raises(ValueError):
        seed_for(*args)


def test_config_rejects_a_seed_the_helper_cannot_take():
    assert load_config(None, [f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1
    for bad in (-1, 2**32):
        with pytest.raises(ConfigError, match="train.seed"):
            load_config(None, [f"train.seed={bad}"])
