"""Sampling images from a checkpoint: loading it for sampling, batches of images, grids, and per-sample
seeded generation (the library behind `racedit sample` and the training loop's grids).

Images are (B, C, H, W) in [-1, 1] in data space (after the codec's decode). The ADM evaluator's format
is uint8 NHWC, converted as clamp(127.5 x + 128, 0, 255) (DiT's DDP sampler convention).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torchvision.utils import make_grid

from racedit.checkpoint import load_model
from racedit.config import Config, SampleConfig
from racedit.data.codec import Codec
from racedit.data.factory import build_codec, training_batches
from racedit.diffusion.objectives import Objective, create_objective
from racedit.diffusion.samplers import generate
from racedit.fileio import atomic_path
from racedit.models import DiT
from racedit.models.compiling import compile_model
from racedit.models.moe import shard_experts
from racedit.sampling.calibration import ThresholdCalibration, calibrate_thresholds
from racedit.sampling.expert_groups import sampling_expert_group
from racedit.seeding import Purpose, seed_for


@dataclass
class LoadedCheckpoint:
    """A model ready to sample (eval mode), with what sampling it needs."""

    model: DiT
    objective: Objective
    codec: Codec
    config: Config
    path: Path
    weights: str  # "ema" or "model"
    threshold_calibration: ThresholdCalibration | None = None  # set when tau was recalibrated after loading


def load_for_sampling(path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu",
                      vae: str | None = None, calibrate_threshold: int = 0, calibration_batch: int | None = None,
                      calibration_seed: int = 0, progress: bool = False, compile: bool = False,
                      expert_parallel: int | None = 1) -> LoadedCheckpoint:
    """Load a checkpoint (EMA weights by default) into an eval-mode model.

    `calibrate_threshold` > 0 recalibrates the inference threshold tau of the loaded weights on that many
    training batches of `calibration_batch` (default: the config's train.global_batch) from the data the
    config names (`racedit.sampling.calibration`); the EMA weights otherwise sample with the tau that
    tracked the live weights. Raises `CheckpointError` with a readable message for a missing path or a
    checkpoint that does not fit the model its config describes, and ValueError for a calibration
    request on a model without threshold routing. `compile`: `racedit.models.compiling.compile_model` (one
    graph; a new batch size compiles once more, a new routing count or tau never does), after calibrating.
    `expert_parallel`: under a process group of several processes, split the experts over groups of this many
    (None: the checkpoint's model.expert_parallel; `racedit.sampling.expert_groups`, collective); its MoE
    forwards must then run in lockstep (`write_samples_npz` does). One process always holds the whole model.
    """
    which = "ema" if use_ema else "model"
    model, cfg, ckpt = load_model(path, which)
    model.to(device)
    objective = create_objective(cfg.diffusion, model.learn_sigma)
    calibration = None
    if calibrate_threshold:
        batch = calibration_batch or cfg.train.global_batch
        data = training_batches(cfg, batch, calibration_seed, device)
        calibration = calibrate_thresholds(model, objective, data, calibrate_threshold,
                                           model.config.class_dropout_prob, seed=calibration_seed, progress=progress)
    size = cfg.model.expert_parallel if expert_parallel is None else expert_parallel
    shard_experts(model, sampling_expert_group(model, size, "model.expert_parallel" if expert_parallel is None
                                               else "--expert-parallel"))
    if compile:
        compile_model(model)
    # `vae` (hub id or local dir) overrides the VAE named in the config or the latent manifest.
    return LoadedCheckpoint(model, objective, build_codec(cfg, vae=vae).to(device), cfg, ckpt, which, calibration)


@torch.no_grad()
def sample_images(model: DiT, objective: Objective, codec: Codec, labels: torch.Tensor, sample_cfg: SampleConfig,
                  seed: int = 0, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Images (n_img, C_img, H_img, W_img) in data space for labels (n_img,); the noise of sample i depends only on (seed, i)
    and the batch it is in, so the same call gives the same images."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(labels), batch_size):
        y = labels[start:start + batch_size]
        g = torch.Generator().manual_seed(seed_for(seed, Purpose.BATCH_NOISE, start))
        noise = torch.randn((len(y), *_sample_shape(model)), generator=g)
        # DDPM's per-step noise
        step_noise = torch.Generator(device).manual_seed(seed_for(seed, Purpose.BATCH_STEP_NOISE, start))
        out.append(_generate_decoded(model, objective, codec, y, noise, step_noise, sample_cfg, progress))
    return torch.cat(out)


def _sample_shape(model: DiT) -> tuple[int, int, int]:
    return model.in_channels, model.input_size, model.input_size


def _generate_decoded(model: DiT, objective: Objective, codec: Codec | None, labels: torch.Tensor, noise: torch.Tensor,
                      generator, sample_cfg: SampleConfig, progress: bool = False) -> torch.Tensor | None:
    """The sampling core: eval mode, `generate` from `noise` (B, C, H, W), decode; images (B, ...) on the CPU.
    `generator` (one, or one per sample) drives any sampler step noise. codec None: no decode, returns None."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        z = generate(model, objective, labels.to(device), sampler=sample_cfg.sampler, steps=sample_cfg.steps,
                     cfg_scale=sample_cfg.cfg_scale, guidance_channels=sample_cfg.guidance_channels,
                     shape=_sample_shape(model), noise=noise.to(device), generator=generator, progress=progress)
        return None if codec is None else codec.decode(z).float().cpu()
    finally:
        model.train(was_training)


@torch.no_grad()
def idle_forwards(model: DiT, objective: Objective, sample_cfg: SampleConfig, batch: int) -> None:
    """The model forwards of sampling `batch` images, whose results are dropped (zero noise, class 0, no decode):
    what a process of an expert group with no batch left runs while the others sample one (each MoE forward is
    collective over the group, and every batch makes the sampler's same forwards). B = 0 does not route."""
    device = next(model.parameters()).device
    labels = torch.zeros(batch, dtype=torch.int64)
    noise = torch.zeros(batch, *_sample_shape(model))
    _generate_decoded(model, objective, None, labels, noise, torch.Generator(device).manual_seed(0), sample_cfg)


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """(n_img, C_img, H_img, W_img) in [-1, 1] -> uint8 (n_img, H_img, W_img, 3) via clamp(127.5 x + 128, 0, 255);
    grey is repeated to RGB."""
    x = torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


GRID_TEXT_KEY = "racedit"  # the PNG text chunk holding a grid's metadata (JSON)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, metadata: dict | None = None) -> Path:
    """Write images (n_img, C_img, H_img, W_img) in [-1, 1] as one PNG grid, `nrow` images per row (pixels as
    torchvision's save_image makes them), atomically; `metadata` goes into the text chunk `racedit` as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid((images.clamp(-1, 1) + 1) / 2, nrow=nrow, padding=1, pad_value=1.0)
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()
    info = PngImagePlugin.PngInfo()
    if metadata is not None:
        info.add_text(GRID_TEXT_KEY, json.dumps(metadata, sort_keys=True))
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG", pnginfo=info)
    return path


def read_grid_metadata(path: str | Path) -> dict | None:
    """The metadata `save_grid` stored in a PNG, or None (no such chunk, or not a readable PNG)."""
    try:
        with Image.open(path) as img:
            text = img.text.get(GRID_TEXT_KEY) if img.format == "PNG" else None
        return json.loads(text) if text else None
    except (OSError, ValueError, SyntaxError):
        return None


def sample_labels(num_samples: int | None, num_classes: int, seed: int = 0, per_class: int | None = None) -> torch.Tensor:
    """Labels (n_img,) int64 for an FID batch, the same on every process.

    Uniform: drawn uniformly at random with a generator seeded by `seed` (DiT's convention). `per_class`:
    exactly `per_class` of each class (n_img = per_class * num_classes) in a seeded random order; the order matters because the
    Inception Score is computed over consecutive splits, which must each see all classes.
    """
    g = torch.Generator().manual_seed(seed)
    if per_class is not None:
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        n = per_class * num_classes
        if num_samples is not None and num_samples != n:
            raise ValueError(f"{per_class} per class x {num_classes} classes = {n} samples, not {num_samples}; "
                             f"give one of --num-samples / --per-class, or matching values")
        return torch.arange(num_classes).repeat_interleave(per_class)[torch.randperm(n, generator=g)]
    if num_samples is None or num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return torch.randint(0, num_classes, (num_samples,), generator=g)


def sample_seed(seed: int, index: int) -> int:
    """The 64-bit seed of sample `index`'s generator: a function of (seed, index) only (`Purpose.SAMPLE`)."""
    return seed_for(seed, Purpose.SAMPLE, index)


@torch.no_grad()
def sample_indexed(model: DiT, objective: Objective, codec: Codec, labels: torch.Tensor, indices: torch.Tensor,
                   sample_cfg: SampleConfig, seed: int = 0) -> torch.Tensor:
    """Images (B, C, H, W) in data space for labels (B,) and global sample indices (B,).

    All randomness of sample i (its initial noise and any sampler step noise) comes from its own CPU
    generator seeded by `sample_seed(seed, i)`, so sample i does not depend on the batch it lands in, the
    number of processes, resuming, or the device the noise is moved to.
    """
    gens = [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]
    noise = torch.stack([torch.randn(_sample_shape(model), generator=g) for g in gens])
    return _generate_decoded(model, objective, codec, labels, noise, gens, sample_cfg)


def grid_for_classes(loaded: LoadedCheckpoint, classes: list[int], per_class: int, sample_cfg: SampleConfig,
                     seed: int = 0) -> torch.Tensor:
    """Images (len(classes) * per_class, C, H, W), one row per class."""
    bad = [c for c in classes if not 0 <= c < loaded.model.num_classes]
    if bad:
        raise ValueError(f"class ids {bad} are outside [0, {loaded.model.num_classes - 1}] for this checkpoint")
    labels = torch.tensor(classes).repeat_interleave(per_class)
    return sample_images(loaded.model, loaded.objective, loaded.codec, labels, sample_cfg, seed=seed,
                         batch_size=max(1, min(len(labels), 256)))


def sample_config_with(base: SampleConfig, **overrides) -> SampleConfig:
    """`base` with the non-None overrides applied (CLI flags over the checkpoint's defaults)."""
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


