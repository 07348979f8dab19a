"""The embedded default dataset: scikit-learn's handwritten digits (pixel space, CPU-sized).

`sklearn.datasets.load_digits` ships 1797 grey 8x8 images of the digits 0..9 (about 180 per class) with
integer intensities 0..16 inside the scikit-learn package, so this works offline.

Letters (docs/method/README.md): n_img images in a split, R image side after the optional resize.

The split. `digits_split_indices` splits every class separately: the images of class c (in the order
`load_digits` returns them) are shuffled with `numpy.random.RandomState(seed)` (the legacy generator, whose
stream numpy keeps fixed across versions; one generator drawn class by class, c = 0..9), and the first
h_c of each shuffled class are held out. The total held out is H = round(N_all * holdout_fraction) and the
per-class counts h_c are its largest-remainder apportionment over the classes in proportion to their sizes,
so every h_c is within 1 of its proportional share and the counts sum to H. The same (seed, fraction)
therefore gives the same split on every machine and every run.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from racedit.limits import DIGITS_EXAMPLES, holdout_count

NUM_CLASSES = 10
NATIVE_SIZE = 8
MAX_INTENSITY = 16.0  # load_digits intensities are integers 0..16


@lru_cache(maxsize=1)
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as read-only arrays: images (1797, 8, 8) float32 in 0..16, labels (1797,) int64."""
    from sklearn.datasets import load_digits  # late import: sklearn is slow to import

    bunch = load_digits()
    images = np.ascontiguousarray(bunch.images, dtype=np.float32)
    labels = np.ascontiguousarray(bunch.target, dtype=np.int64)
    assert len(labels) == DIGITS_EXAMPLES, len(labels)  # racedit.config checks the split sizes with this count
    images.setflags(write=False)  # cached and shared: nobody may change it in place
    labels.setflags(write=False)
    return images, labels


def _apportion(sizes: np.ndarray, total: int) -> np.ndarray:
    """Largest-remainder apportionment of `total` over groups proportional to `sizes` (ties: lower index)."""
    quota = sizes * total / sizes.sum()
    counts = np.floor(quota).astype(np.int64)
    remainder = quota - counts
    # stable sort on the negated remainders: larger remainders first, ties broken by class index
    order = np.argsort(-remainder, kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def digits_split_indices(
    labels: np.ndarray, holdout_fraction: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded train / held-out split (algorithm in the module docstring).

    labels: (N_all,) integer class labels. Returns (train, holdout): sorted int64 index arrays into
    `labels`, disjoint, together covering every index.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    labels = np.asarray(labels)
    classes = np.unique(labels)
    sizes = np.array([(labels == c).sum() for c in classes], dtype=np.int64)
    per_class = _apportion(sizes, holdout_count(len(labels), holdout_fraction))
    rng = np.random.RandomState(seed)
    holdout = []
    for c, h in zip(classes, per_class):
        members = np.flatnonzero(labels == c)
        holdout.append(members[rng.permutation(len(members))[:h]])
    holdout_idx = np.sort(np.concatenate(holdout)).astype(np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels), dtype=np.int64), holdout_idx)
    return train_idx, holdout_idx


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (n_img, C_img, H_img, W_img) to (n_img, C_img, size, size); antialiased only when shrinking.

    Bilinear weights are non-negative and sum to 1, so values stay in the input range; the clamp only
    removes float rounding at the edges of [-1, 1].
    """
    if images.shape[-2:] == (size, size):
        return images
    shrink = size < min(images.shape[-2:])
    out = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return out.clamp_(-1.0, 1.0)


class DigitsDataset(Dataset):
    """One split of the digits as (image, label) pairs.

    image: float32 (1, R, R) in [-1, 1] (intensity / 16 * 2 - 1, so the background is -1); label: int 0..9.
    The whole split is also held in memory as `.images` (n_img, 1, R, R) and `.labels` (n_img,) int64,
    because the training loop may keep the tiny dataset on the device instead of using a DataLoader.
    `.indices` (n_img,) are the positions of the split's images in `load_digits()` order.
    """

    num_classes = NUM_CLASSES

    def __init__(self, split: str = "train", image_size: int = NATIVE_SIZE, holdout_fraction: float = 0.1,
                 seed: int = 0):
        if split not in ("train", "holdout"):
            raise ValueError(f"split must be 'train' or 'holdout', got {split!r}")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        raw_images, raw_labels = load_digits_arrays()
        train_idx, holdout_idx = digits_split_indices(raw_labels, holdout_fraction, seed)
        idx = train_idx if split == "train" else holdout_idx
        images = torch.from_numpy(raw_images[idx]).unsqueeze(1) / MAX_INTENSITY * 2.0 - 1.0  # (n_img, 1, 8, 8)
        self.split = split
        self.image_size = image_size
        self.holdout_fraction = holdout_fraction
        self.seed = seed
        self.indices = torch.from_numpy(idx)
        self.images = resize_images(images, image_size).contiguous()
        self.labels = torch.from_numpy(raw_labels[idx].copy())

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def __repr__(self) -> str:
        return (f"DigitsDataset(split={self.split!r}, n={len(self)}, image_size={self.image_size}, "
                f"holdout_fraction={self.holdout_fraction}, seed={self.seed})")
