"""From a config to training data and to the codec between data space and model space.

Both kinds of training data have the same interface: `num_examples`, `channels`, `size`, `num_classes`,
`labels` (n_img,), `read(idx)` -> x0 (B, C, H, W) of some examples, and `loader(order, start_step, device)`,
which yields this process's micro-batches (x0 (B, C, H, W), y (B,)) in the order of a
`ResumableBatchOrder`, from optimizer step `start_step` on. Letters (docs/method/README.md): n_img training
examples, B images of a read or a micro-batch, C channels, H x W model-space side.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from racedit.config import Config, ConfigError
from racedit.data.codec import AutoencoderKLCodec, Codec, IdentityCodec
from racedit.data.digits import DigitsDataset
from racedit.data.latent_store import (
    KeyedIndices,
    LatentBatches,
    LatentDataset,
    LatentStoreError,
    read_manifest,
)
from racedit.data.order import ResumableBatchOrder
from racedit.signals import ignore_stop_signals


@dataclass
class TrainingData:
    """Training examples held in memory as one tensor (the digits), addressed by index."""

    inputs: torch.Tensor  # (n_img, C, H, W) model-space inputs (digits: pixels in [-1, 1])
    labels: torch.Tensor  # (n_img,) int64
    num_classes: int

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.inputs.shape[1]

    @property
    def size(self) -> int:
        return self.inputs.shape[-1]

    def read(self, idx: torch.Tensor) -> torch.Tensor:
        """x0 (B, C, H, W) of examples idx (B,)."""
        return self.inputs[idx]

    def loader(self, order, start_step: int, device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        inputs, labels = self.inputs.to(device), self.labels.to(device)
        for idx in order.micro_batches(start_step):
            idx = torch.as_tensor(idx, device=device)
            yield inputs[idx], labels[idx]


class KeyedMicroBatches:
    """The micro-batches of `order` from `start_step` on (the same lists as `order.micro_batches`), each a
    `KeyedIndices` carrying its epoch, the key of the per-sample draws. A DataLoader takes it as the
    `batch_sampler` of a `LatentDataset`, or as the `sampler` of `LatentBatches` (what training does)."""

    def __init__(self, order, start_step: int):
        self.order, self.start_step = order, start_step

    def __iter__(self):

        step = self.start_step
        while True:
            epoch = step // self.order.steps_per_epoch
            for idx in self.order.step_indices(step):
                yield KeyedIndices(idx.tolist(), epoch)
            step += 1


class LatentTrainingData:
    """Stored VAE latents (`LatentDataset`) read through a DataLoader with `data.num_workers` workers.

    The loader's batch sampler is the run's `ResumableBatchOrder`, and the flip and posterior noise of a
    sample depend only on (seed, epoch, index), so resuming at any step, and any number of processes,
    see exactly the same x0 for the same global batch.
    """

    def __init__(self, dataset, num_workers: int = 0):
        self.dataset, self.num_workers = dataset, num_workers
        self.num_classes = dataset.num_classes

    @property
    def num_examples(self) -> int:
        return len(self.dataset)

    @property
    def channels(self) -> int:
        return self.dataset.latent_shape[0]

    @property
    def size(self) -> int:
        return self.dataset.latent_shape[-1]

    @property
    def labels(self) -> torch.Tensor:
        return self.dataset.labels

    def read(self, idx: torch.Tensor) -> torch.Tensor:
        """x0 (B, C, H, W) of examples idx (B,): a flip and posterior sample under the randomness of epoch 0."""
        return self.dataset.read(torch.as_tensor(idx).numpy(), epoch=0)[0]

    def loader(self, order, start_step: int, device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = torch.device(device)
        workers = self.num_workers
        # whole micro-batches per item (batch_size=None): read once, no per-sample split and re-collate
        dl = DataLoader(LatentBatches(self.dataset), batch_size=None, sampler=KeyedMicroBatches(order, start_step),
                        num_workers=workers, pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                        persistent_workers=False, worker_init_fn=ignore_stop_signals)  # the main process stops
        for x, y in dl:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def build_training_data(cfg: Config) -> TrainingData | LatentTrainingData:
    """The training split named by `cfg.data` (the digits keep their whole split in memory; latents are
    memory-mapped)."""
    d = cfg.data
    if d.kind == "latents":
        try:
            ds = LatentDataset(d.latents, sample_posterior=d.sample_posterior, flip=d.flip, seed=cfg.train.seed)
        except LatentStoreError as e:
            raise ConfigError(f"data.latents={d.latents!r}: {e}") from None
        return LatentTrainingData(ds, num_workers=d.num_workers)
    ds = DigitsDataset("train", image_size=d.image_size, holdout_fraction=d.holdout_fraction, seed=0)
    return TrainingData(ds.images, ds.labels, ds.num_classes)


def build_codec(cfg: Config, vae: str | None = None) -> Codec:
    """The decoder from the run's model space to images (`Codec`).

    digits: identity on the pixels. latents: an `AutoencoderKLCodec` (the VAE loads on first use) with
    the VAE `vae`, else `cfg.data.vae`, else the one named in the latent manifest, and the scaling the
    latents were stored with (the manifest's; the VAE config's when the latent directory is not here).
    """
    d = cfg.data
    if d.kind != "latents":
        return IdentityCodec(channels=1)
    override = vae or d.vae or None
    try:
        manifest = read_manifest(d.latents)
    except LatentStoreError as e:
        if override is None:
            raise ConfigError(f"cannot decode latents: {e}; name the VAE yourself (racedit sample --vae ID_OR_DIR, "
                              f"or data.vae=ID_OR_DIR)") from None
        return AutoencoderKLCodec(override)
    if override is None:
        local = manifest.get("vae_path")
        override = local if local and Path(local).is_dir() else manifest["vae"]
    shift = manifest.get("shift_factor") or 0.0
    return AutoencoderKLCodec(override, scaling_factor=manifest["scaling_factor"], shift_factor=shift,
                              channels=manifest["latent_channels"], downsample=manifest["downsample"])


def training_batches(cfg, batch_size: int, seed: int, device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches (x0, y) of `batch_size` from the training data that `cfg` names, in a seeded shuffled order
    (the digits split in memory, or the latent store, with its flips and posterior noise)."""
    data = build_training_data(cfg)
    return data.loader(ResumableBatchOrder(data.num_examples, batch_size, seed), 0, device)
