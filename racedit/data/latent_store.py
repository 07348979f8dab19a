"""The latent store: the on-disk format of extracted VAE latents, its manifest, and the training readers
(`LatentDataset`, `LatentBatches`). `racedit.data.latent_extract` writes it.

Letters (docs/method/README.md): n_img latents (readable images), n_rows rows of one shard, B rows of a read
batch, C latent channels, H x W latent side.

On disk (`out/`):

    manifest.json          written last, once every shard is complete: settings, classes, counts, skips
    class_to_idx.json      {class folder name: label}
    shard-00000/           one directory per block of `shard_size` consecutive files of the image folder
        moments.npy        (n_rows, 2, 2, C, H, W) float16|float32: [row, flip, (mean, std)]
        labels.npy         (n_rows,) int64
        file_index.npy     (n_rows,) int64 position of the row's file in the folder's sorted file list
        shard.json         file range, settings, rows, skipped files, array shapes, sizes and sha256

Flip 0 is the center-cropped image, flip 1 the same image mirrored left-right before encoding, so both
random-flip augmentations of DiT are stored exactly. mean = (posterior mean - shift) * scaling_factor and
std = posterior std * scaling_factor: a latent in model space is mean + std * N(0, 1).

Opening a store (`LatentDataset`) checks every shard against its shard.json: files present, sizes, shapes
and dtypes always (a stat and a header read each), SHA-256 with `verify_checksums=True` or RACEDIT_VERIFY=2.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from racedit.fileio import sha256_of, verify_level
from racedit.seeding import Purpose, seed_for

FORMAT = "racedit-latents/1"
MANIFEST = "manifest.json"
STORE_DTYPES = ("float16", "float32")


class LatentStoreError(RuntimeError):
    """A latent directory that is missing, incomplete, or was made with other settings."""


def read_manifest(root: str | Path) -> dict:
    """The manifest of a latent directory; `LatentStoreError` with what to do when it is missing."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        if Path(root).is_dir() and any(Path(root).glob("shard-*")):
            raise LatentStoreError(f"{root} has no {MANIFEST}: its extraction did not finish. Re-run the same "
                                   f"racedit extract-latents command to complete it (finished shards are kept)")
        raise LatentStoreError(f"{root} is not a latent directory (no {MANIFEST}); make one with "
                               f"racedit extract-latents --data IMAGE_ROOT --vae VAE --out {root}")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:  # truncated or edited: the store cannot be trusted to say what it holds
        raise LatentStoreError(f"{path} is damaged ({type(e).__name__}: {e}); re-run the racedit extract-latents "
                               f"command that made {root} (finished shards that verify are kept)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise LatentStoreError(f"{path}: format {found!r}, this racedit reads {FORMAT!r}")
    return manifest


def verify_shard(shard_dir: Path, expected: dict | None = None, checksums: bool = False) -> str | None:
    """None when `shard_dir` is a complete shard (matching `expected`'s keys of shard.json), else the problem."""
    meta_path = shard_dir / "shard.json"
    if not meta_path.is_file():
        return "no shard.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        return f"unreadable shard.json ({e})"
    for key, value in (expected or {}).items():
        if meta.get(key) != value:
            return f"shard.json {key} is {meta.get(key)!r}, expected {value!r}"
    for name, info in meta.get("arrays", {}).items():
        path = shard_dir / f"{name}.npy"
        if not path.is_file():
            return f"missing {path.name}"
        if path.stat().st_size != info["bytes"]:
            return f"{path.name} has {path.stat().st_size} bytes, shard.json says {info['bytes']}"
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            return f"unreadable {path.name} ({e})"
        if list(arr.shape) != info["shape"] or str(arr.dtype) != info["dtype"]:
            return f"{path.name} is {arr.dtype}{list(arr.shape)}, expected {info['dtype']}{info['shape']}"
        if checksums and sha256_of(path) != info["sha256"]:
            return f"{path.name} does not match its sha256 in shard.json"
    if set(meta.get("arrays", {})) != {"moments", "labels", "file_index"}:
        return "shard.json does not list moments, labels and file_index"
    return None


def check_shards(root: str | Path, manifest: dict, checksums: bool = False) -> None:
    """Raise LatentStoreError naming the first shard of `manifest` whose files are missing or not of the size,
    shape and dtype its shard.json records (with `checksums`, also its SHA-256), and the command that
    re-extracts it (a re-run of extract-latents keeps the shards that verify and redoes the others)."""
    root = Path(root)
    for s in manifest["shards"]:
        shard_dir = root / s["name"]
        problem = verify_shard(shard_dir, checksums=checksums)
        if problem is None:
            continue
        first = manifest["shards"][0]["files"]
        cmd = ["racedit", "extract-latents", "--data", str(manifest.get("source", "IMAGE_ROOT")),
               "--vae", str(manifest.get("vae", "VAE")), "--out", str(root),
               "--image-size", str(manifest.get("image_size")), "--shard-size", str(first[1] - first[0]),
               "--store-dtype", str(manifest.get("store_dtype"))] + (["--verify-checksums"] if checksums else [])
        raise LatentStoreError(f"latent shard {shard_dir} is damaged ({problem}); re-extract it with "
                               f"`{shlex.join(cmd)}` (shards that verify are kept)")


# --- Reading -------------------------------------------------------------------------------------------

_M1, _M2, _M3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix(z: np.ndarray) -> np.ndarray:
    z = z + _M1
    z = (z ^ (z >> np.uint64(30))) * _M2
    z = (z ^ (z >> np.uint64(27))) * _M3
    return z ^ (z >> np.uint64(31))


def draw_keys(seed: int, key: int, indices: np.ndarray) -> np.ndarray:
    """64-bit hashes (B,) uint64 of (seed, key, index): the per-sample randomness of `LatentDataset`.

    The base comes from `seed_for`; the per-index part is vectorised splitmix64, because a batch read
    hashes every index (a SeedSequence per index costs ~15 us here, a batch of 256 ~4 ms)."""
    with np.errstate(over="ignore"):
        a = np.uint64(seed_for(seed, Purpose.LATENT_DRAWS))
        b = _splitmix(a ^ np.uint64(key % 2**64))
        return _splitmix(b ^ indices.astype(np.uint64))


class KeyedIndices(list):
    """A list of dataset indices that carries the randomness key (`epoch`) of the batch.

    A batch sampler that yields these makes `LatentDataset` draw with that key instead of its own
    `.epoch`, which is how the training loader stays exact across resumes and process counts.
    """

    def __init__(self, indices: Iterable[int], epoch: int):
        super().__init__(indices)
        self.epoch = epoch


class LatentDataset(Dataset):
    """Latents of a directory written by `extract_latents`, memory-mapped.

    `dataset[i]` -> (x (C, H, W) float32, label int). x is the stored posterior of row i for one of its two
    flips, sampled (mean + std * eps) when `sample_posterior`, else the mean. The flip (when `flip`) and
    eps are drawn from a 64-bit hash of (seed, epoch, i), so they repeat exactly for the same epoch,
    independently of workers, batch composition and number of processes; change the epoch with
    `set_epoch` (like DistributedSampler), or let the batch sampler pass it (`KeyedIndices`).

    `__getitems__` reads a whole batch with one fancy index per shard, which a DataLoader uses
    automatically (batch_sampler or batch_size); `read(indices)` returns the batch already stacked, and
    `LatentBatches` serves such stacked batches to a DataLoader without the per-sample collate (faster).
    The shards open lazily in each process, so the dataset pickles small and works with num_workers > 0.
    `.labels` (n_img,) int64, `.classes`, `.num_classes`, `.latent_shape` (C, H, W), `.manifest`.
    """

    def __init__(self, root: str | Path, sample_posterior: bool = True, flip: bool = True, seed: int = 0,
                 verify_checksums: bool | None = None):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        # sizes, shapes and dtypes always (a stat and a header each); SHA-256 when asked or RACEDIT_VERIFY=2
        check_shards(self.root, self.manifest, verify_level() >= 2 if verify_checksums is None else verify_checksums)
        self.sample_posterior, self.flip, self.seed = sample_posterior, flip, seed
        self.epoch = 0
        self.classes: list[str] = self.manifest["classes"]
        self.num_classes = len(self.classes)
        self.latent_shape = tuple(self.manifest["latent_shape"])
        self._shards = [self.root / s["name"] for s in self.manifest["shards"]]
        rows = [s["rows"] for s in self.manifest["shards"]]
        self._offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        labels = [np.load(d / "labels.npy") for d in self._shards]
        self.labels = torch.from_numpy(np.concatenate(labels) if labels else np.empty(0, np.int64))
        if len(self.labels) != self._offsets[-1]:
            raise LatentStoreError(f"{self.root}: the shards hold {len(self.labels)} rows, the manifest says "
                                   f"{self._offsets[-1]}")
        self._moments: list[np.ndarray] | None = None
        self._gen: torch.Generator | None = None
        self._scratch: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        """The randomness key for reads that do not bring their own (`KeyedIndices`)."""
        self.epoch = epoch

    def _open(self) -> list[np.ndarray]:
        if self._moments is None:
            self._moments = [np.load(d / "moments.npy", mmap_mode="r") for d in self._shards]
        return self._moments

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _moments=None, _gen=None, _scratch=None)

    def read(self, indices: Sequence[int] | np.ndarray, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch: x (B, C, H, W) float32, y (B,) int64 for dataset indices (B,) under randomness key `epoch`."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n_all = len(self)
        if len(idx) and (idx.min() < 0 or idx.max() >= n_all):
            raise IndexError(f"LatentDataset index out of range [0, {n_all}): {idx[(idx < 0) | (idx >= n_all)][:5]}")
        key = self.epoch if epoch is None else epoch
        draws = draw_keys(self.seed, key, idx)
        flips = (draws >> np.uint64(63)).astype(np.int64) if self.flip else np.zeros(len(idx), np.int64)
        shard = np.searchsorted(self._offsets, idx, side="right") - 1
        row = idx - self._offsets[shard]
        moments = self._open()
        first = np.unique(shard)
        if len(first) == 1:
            picked = moments[first[0]][row, flips]  # (B, 2, C, H, W): mean and std of the drawn flip
        else:
            picked = np.empty((len(idx), 2, *self.latent_shape), dtype=moments[0].dtype)
            for s in first:
                sel = shard == s
                picked[sel] = moments[s][row[sel], flips[sel]]
        t = torch.from_numpy(np.ascontiguousarray(picked))
        x = torch.empty((len(idx), *self.latent_shape), dtype=torch.float32)
        if not (self.sample_posterior and len(idx)):
            return x.copy_(t[:, 0]), self.labels[torch.from_numpy(idx)]
        if self._gen is None:
            self._gen = torch.Generator()
        with np.errstate(over="ignore"):
            seeds = _splitmix(draws).tolist()  # a second hash: the noise seed is independent of the flip bit
        gen, shape = self._gen, self.latent_shape
        for seed, eps in zip(seeds, x.unbind(0)):  # eps written in place, then x = mean + std * eps
            gen.manual_seed(seed)
            torch.randn(shape, generator=gen, out=eps)
        if self._scratch is None or self._scratch.shape != t.shape:  # reused: no fresh pages per batch
            self._scratch = torch.empty(t.shape, dtype=torch.float32)
        moments = self._scratch.copy_(t)
        torch.addcmul(moments[:, 0], moments[:, 1], x, out=x)  # elementwise, so in place is safe
        return x, self.labels[torch.from_numpy(idx)]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.read([i])
        return x[0], int(y[0])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        x, y = self.read(indices, getattr(indices, "epoch", None))
        return list(zip(x.unbind(0), y.tolist()))

    def __repr__(self) -> str:
        return (f"LatentDataset(root={str(self.root)!r}, n={len(self)}, latent_shape={self.latent_shape}, "
                f"classes={self.num_classes}, sample_posterior={self.sample_posterior}, flip={self.flip})")


class LatentBatches(Dataset):
    """A `LatentDataset` whose items are whole batches: `batches[indices]` -> `dataset.read(indices, epoch)`,
    x (B, C, H, W) float32 and y (B,) int64, with `epoch` taken from `KeyedIndices` when it carries one.

    Use it with `DataLoader(LatentBatches(ds), batch_size=None, sampler=<yields index lists>)`. The batch
    is built once by `read` and handed over as is: no split into B samples and no re-stack by the collate
    function (mean-only reads about 1.4x faster, bench/latents.py). `len` counts samples, not batches.
    """

    def __init__(self, dataset: LatentDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset.read(indices, getattr(indices, "epoch", None))

