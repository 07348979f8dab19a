"""Sampling images from a checkpoint: the library behind `sample.py` and the training loop's grids.

Images are (B, C, H, W) in [-1, 1] in data space (after the codec's decode). The ADM evaluator's format
is uint8 NHWC, converted as clamp(127.5 x + 128, 0, 255) (DiT's DDP sampler convention).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image
from tqdm.auto import tqdm

from racedit.config import Config, SampleConfig
from racedit.data.codec import Codec
from racedit.diffusion.objectives import Objective, create_objective
from racedit.diffusion.samplers import generate
from racedit.fileio import atomic_path, atomic_write_text
from racedit.models import DiT
from racedit.models.moe import threshold_layers
from racedit.training.calibration import ThresholdCalibration, calibrate_thresholds, training_batches
from racedit.training.checkpoint import load_model


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
                      calibration_seed: int = 0, progress: bool = False) -> LoadedCheckpoint:
    """Load a checkpoint (EMA weights by default) into an eval-mode model.

    `calibrate_threshold` > 0 recalibrates the inference threshold tau of the loaded weights on that many
    training batches of `calibration_batch` (default: the config's train.global_batch) from the data the
    config names (`racedit.training.calibration`); the EMA weights otherwise sample with the tau that
    tracked the live weights. Raises `CheckpointError` with a readable message for a missing path or a
    checkpoint that does not fit the model its config describes, and ValueError for a calibration
    request on a model without threshold routing.
    """
    from racedit.data.factory import build_codec

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
    # `vae` (hub id or local dir) overrides the VAE named in the config or the latent manifest.
    return LoadedCheckpoint(model, objective, build_codec(cfg, vae=vae).to(device), cfg, ckpt, which, calibration)


@torch.no_grad()
def sample_images(model: DiT, objective: Objective, codec: Codec, labels: torch.Tensor, sample_cfg: SampleConfig,
                  seed: int = 0, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Images (N, C, H, W) in data space for labels (N,); the noise of sample i depends only on (seed, i)
    and the batch it is in, so the same call gives the same images."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(labels), batch_size):
        y = labels[start:start + batch_size]
        g = torch.Generator().manual_seed(seed * 1_000_003 + start)
        noise = torch.randn((len(y), *_sample_shape(model)), generator=g)
        step_noise = torch.Generator(device).manual_seed(seed * 1_000_003 + start + 1)  # DDPM's per-step noise
        out.append(_generate_decoded(model, objective, codec, y, noise, step_noise, sample_cfg, progress))
    return torch.cat(out)


def _sample_shape(model: DiT) -> tuple[int, int, int]:
    return model.in_channels, model.input_size, model.input_size


def _generate_decoded(model: DiT, objective: Objective, codec: Codec, labels: torch.Tensor, noise: torch.Tensor,
                      generator, sample_cfg: SampleConfig, progress: bool = False) -> torch.Tensor:
    """The sampling core: eval mode, `generate` from `noise` (B, C, H, W), decode; images (B, ...) on the CPU.
    `generator` (one, or one per sample) drives any sampler step noise."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        z = generate(model, objective, labels.to(device), sampler=sample_cfg.sampler, steps=sample_cfg.steps,
                     cfg_scale=sample_cfg.cfg_scale, guidance_channels=sample_cfg.guidance_channels,
                     shape=_sample_shape(model), noise=noise.to(device), generator=generator, progress=progress)
        return codec.decode(z).float().cpu()
    finally:
        model.train(was_training)


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, 3) via clamp(127.5 x + 128, 0, 255); grey is repeated to RGB."""
    x = torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Write images (N, C, H, W) in [-1, 1] as one PNG grid, `nrow` images per row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((images.clamp(-1, 1) + 1) / 2, str(path), nrow=nrow, padding=1, pad_value=1.0)
    return path


# ----------------------------------------------------------------------------- samples for FID (ADM-format npz)

SAMPLES_FORMAT = "racedit-samples/1"
UINT8_CONVERSION = "uint8 = clamp(127.5 x + 128, 0, 255), NHWC, grey repeated to RGB"
NOISE_CONVENTION = "sample i: its own CPU torch.Generator seeded with numpy SeedSequence([seed, i]) (initial and step noise)"


class SamplingError(RuntimeError):
    """A sampling job that cannot continue as asked (e.g. its partial results belong to other settings)."""


def sample_labels(num_samples: int | None, num_classes: int, seed: int = 0, per_class: int | None = None) -> torch.Tensor:
    """Labels (N,) int64 for an FID batch, the same on every process.

    Uniform: drawn uniformly at random with a generator seeded by `seed` (DiT's convention). `per_class=K`:
    exactly K of each class (N = K * num_classes) in a seeded random order; the order matters because the
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
    """The 64-bit seed of sample `index`'s generator: a function of (seed, index) only."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])


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


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _batch_file(parts: Path, b: int) -> Path:
    return parts / f"batch_{b:07d}.npz"


def _weights_fingerprint(loaded: LoadedCheckpoint) -> dict:
    """Size and SHA-256 of the first and last 4 MiB of the sampled weights file (cheap, catches a changed file)."""
    f = loaded.path / f"{loaded.weights}.safetensors"
    if not f.exists():
        return {"file": str(f), "missing": True}
    size = f.stat().st_size
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        h.update(fh.read(1 << 22))
        fh.seek(max(0, size - (1 << 22)))
        h.update(fh.read(1 << 22))
    return {"file": f.name, "size": size, "sha256_head_tail": h.hexdigest()}


def _save_batch(parts: Path, b: int, images: np.ndarray, indices: np.ndarray, labels: np.ndarray) -> None:
    with atomic_path(_batch_file(parts, b)) as tmp, open(tmp, "wb") as f:  # a batch file is absent or complete
        np.savez(f, images=images, indices=indices, labels=labels)


def _npy_entry(zf: zipfile.ZipFile, name: str):
    """A zip entry with a fixed timestamp, so that the same arrays give the same file bytes."""
    return zf.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w", force_zip64=True)


def _assemble(parts: Path, out: Path, num_batches: int, labels: torch.Tensor, batch_size: int, meta: dict) -> None:
    """Stream the batch files, in order, into `out` (ADM npz: arr_0, labels, metadata); atomic rename."""
    from numpy.lib import format as npy

    n = len(labels)
    with np.load(_batch_file(parts, 0)) as z:
        image_shape = z["images"].shape[1:]
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with _npy_entry(zf, "arr_0") as f:
            npy.write_array_header_1_0(f, {"descr": npy.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                                           "shape": (n, *image_shape)})
            for b in range(num_batches):
                path = _batch_file(parts, b)
                lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
                try:
                    with np.load(path) as z:
                        images, indices, lab = z["images"], z["indices"], z["labels"]
                except Exception as e:
                    path.unlink(missing_ok=True)
                    raise SamplingError(f"batch file {path} was unreadable ({type(e).__name__}: {e}) and has "
                                        f"been removed; run the same command again to regenerate it") from e
                if (images.dtype != np.uint8 or images.shape != (hi - lo, *image_shape)
                        or not np.array_equal(indices, np.arange(lo, hi))
                        or not np.array_equal(lab, labels[lo:hi].numpy())):
                    path.unlink(missing_ok=True)
                    raise SamplingError(f"batch file {path} does not hold samples {lo}..{hi - 1} as expected and "
                                        f"has been removed; run the same command again to regenerate it")
                f.write(np.ascontiguousarray(images).data)
        with _npy_entry(zf, "labels") as f:
            npy.write_array(f, labels.numpy().astype(np.int64), allow_pickle=False)
        with _npy_entry(zf, "metadata") as f:
            npy.write_array(f, np.array(json.dumps(meta, sort_keys=True)), allow_pickle=False)


def _complete_file_matches(out: Path, meta: dict, labels: torch.Tensor, loaded: LoadedCheckpoint) -> bool:
    try:
        with np.load(out, allow_pickle=False) as z:
            saved = json.loads(str(z["metadata"]))
            if not np.array_equal(z["labels"], labels.numpy()):
                return False
        _adopt_saved_thresholds(loaded, meta, saved)
        return saved == json.loads(json.dumps(meta))
    except Exception:
        return False


def _adopt_saved_thresholds(loaded: LoadedCheckpoint, meta: dict, saved_meta: dict | None) -> bool:
    """When `saved_meta` records the same job as `meta` (every setting equal, the recalibrated taus aside), take
    the job's taus into the model and `meta` and return True. Every batch of a job then uses the same taus,
    across processes and resumes, even where GPU kernels change a recalibration's last bits; a job with any
    other setting (checkpoint, weights, sampler, calibration, ...) never lends its taus."""
    cal, saved = loaded.threshold_calibration, (saved_meta or {}).get("threshold")
    mine = meta.get("threshold")
    if cal is None or not isinstance(saved, dict) or not isinstance(mine, dict):
        return False

    def without_taus(m: dict) -> dict:
        m = json.loads(json.dumps(m))
        m["threshold"]["tau"] = sorted(m["threshold"].get("tau", {}))  # the layers, not their values
        return m

    if without_taus(saved_meta) != without_taus(meta):
        return False
    taus = {int(i): float(v) for i, v in saved["tau"].items()}
    for layer in threshold_layers(loaded.model):
        layer.tau.fill_(taus[layer.layer_index])
    cal.tau_after = taus
    meta["threshold"] = cal.metadata()
    return True


def write_samples_npz(loaded: LoadedCheckpoint, num_samples: int | None, out: str | Path, sample_cfg: SampleConfig,
                      seed: int = 0, batch_size: int = 64, labels: torch.Tensor | None = None, *,
                      per_class: int | None = None, max_batches: int | None = None,
                      progress: bool = True) -> Path | None:
    """Sample an FID batch and write it as an ADM-format npz: `arr_0` uint8 (N, H, W, 3), `labels` (N,) int64,
    and `metadata` (a JSON string: checkpoint, EMA, sampler, steps, CFG, guidance channels, per-device batch,
    routing at inference, seed, labels, ...).

    Distributed: under `accelerate launch` each process samples the batches b = rank, rank + W, ... of
    `batch_size` samples (b covers samples b*batch_size .. ), so no index is duplicated or missing. Every batch
    is written to `<out>.parts/batch_XXXXXXX.npz` as it finishes; a re-run of the same job (same settings,
    checked against `<out>.parts/job.json`) skips finished batches. When all are there, the main process
    streams them into `out` (atomic rename) and removes the parts. Sample i depends only on (seed, i) and the
    per-device batch (see `sample_indexed`), so the file does not depend on the number of processes or on
    resuming. The parts directory must be on a filesystem all processes share.

    labels: given explicitly, else `sample_labels(num_samples, classes, seed, per_class)`.
    max_batches: stop after this many new batches on each process (time-limited jobs); returns None then,
    leaving the parts for the next run. Returns `out` when the file is complete.
    """
    from accelerate import PartialState

    state = PartialState()
    rank, world, is_main = state.process_index, state.num_processes, state.is_main_process
    model = loaded.model
    if labels is None:
        labels = sample_labels(num_samples, model.num_classes, seed, per_class)
        label_mode = "uniform" if per_class is None else f"{per_class} per class, shuffled"
    else:
        labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
        if num_samples is not None and num_samples != len(labels):
            raise ValueError(f"num_samples {num_samples} but {len(labels)} labels given")
        label_mode = "given"
    if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < model.num_classes):
        raise ValueError(f"labels must be in [0, {model.num_classes - 1}]")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(labels)
    num_batches = -(-n // batch_size)
    out = Path(out)
    parts = _parts_dir(out)
    meta = sampling_metadata(loaded, sample_cfg, format=SAMPLES_FORMAT, num_samples=n, seed=seed,
                             per_device_batch=batch_size, labels=label_mode, noise=NOISE_CONVENTION,
                             conversion=UINT8_CONVERSION)
    say = print if (progress and is_main) else (lambda *a, **k: None)

    if out.exists() and not parts.exists() and _complete_file_matches(out, meta, labels, loaded):
        say(f"{out} already holds these {n} samples; nothing to do")
        return out
    def job_of(meta: dict) -> dict:
        return json.loads(json.dumps({"metadata": meta, "labels_sha256": hashlib.sha256(labels.numpy().tobytes()).hexdigest(),
                                      "weights_fingerprint": _weights_fingerprint(loaded)}, sort_keys=True))

    job = job_of(meta)
    if is_main:
        parts.mkdir(parents=True, exist_ok=True)
        job_file = parts / "job.json"
        if not job_file.exists():
            atomic_write_text(job_file, json.dumps(job, indent=1, sort_keys=True))
        if out.exists():
            say(f"note: {out} exists with other samples; it will be replaced when this job completes")
    state.wait_for_everyone()
    found = json.loads((parts / "job.json").read_text())
    if _adopt_saved_thresholds(loaded, meta, found.get("metadata")):
        job = job_of(meta)
    if found != job:
        keys = sorted({k for k in {**found.get("metadata", {}), **meta}
                       if found.get("metadata", {}).get(k) != job["metadata"].get(k)})
        other = [k for k in ("labels_sha256", "weights_fingerprint") if found.get(k) != job[k]]
        raise SamplingError(f"{parts} holds partial results of a different sampling job (differs in: "
                            f"{', '.join(keys + other)}). Re-run with the same settings to continue it, or delete "
                            f"{parts} (or choose another --out) to start a new one")

    done = {b for b in range(num_batches) if _batch_file(parts, b).exists()}
    todo = [b for b in range(rank, num_batches, world) if b not in done]
    pending = sum(min(batch_size, n - b * batch_size) for b in range(num_batches) if b not in done)
    if done:
        say(f"resuming: {len(done)} of {num_batches} batches already in {parts}")
    bar = tqdm(total=pending, desc=f"sample x{world} proc" if world > 1 else "sample", unit="img",
               disable=not (progress and is_main), smoothing=0.1)
    t0, made = time.perf_counter(), 0
    for j, b in enumerate(todo):
        if max_batches is not None and j >= max_batches:
            break
        idx = torch.arange(b * batch_size, min(n, (b + 1) * batch_size))
        images = sample_indexed(model, loaded.objective, loaded.codec, labels[idx], idx, sample_cfg, seed)
        _save_batch(parts, b, to_uint8_nhwc(images), idx.numpy(), labels[idx].numpy())
        made += len(idx)
        bar.update(min(len(idx) * world, bar.total - bar.n))  # rank 0 stands for all ranks
    bar.close()
    seconds = time.perf_counter() - t0
    state.wait_for_everyone()
    missing = [b for b in range(num_batches) if not _batch_file(parts, b).exists()]
    if made:
        say(f"sampled {made} images on the main process in {seconds:.1f}s "
            f"({made / max(seconds, 1e-9):.2f} img/s per process, {world} process{'es' if world > 1 else ''})")
    if missing:
        say(f"{num_batches - len(missing)} of {num_batches} batches are in {parts}; run the same command again "
            f"to continue")
        return None
    if is_main:
        _assemble(parts, out, num_batches, labels, batch_size, meta)
        shutil.rmtree(parts, ignore_errors=True)
        say(f"wrote {n} samples to {out}")
    state.wait_for_everyone()
    return out


def sampling_metadata(loaded: LoadedCheckpoint, sample_cfg: SampleConfig, **extra) -> dict:
    """How samples were made: checkpoint, weights, sampler, steps, guidance, routing at inference."""
    m = loaded.model.config
    step = re.fullmatch(r"step_(\d+)", loaded.path.name)
    return {"checkpoint": str(loaded.path), "step": int(step.group(1)) if step else None, "weights": loaded.weights,
            "model": m.name, "objective": loaded.config.diffusion.objective, "sampler": sample_cfg.sampler,
            "steps": sample_cfg.steps, "cfg_scale": sample_cfg.cfg_scale,
            "guidance_channels": sample_cfg.guidance_channels or "all",
            "cfg_batching": "cond and uncond halves in one forward" if sample_cfg.cfg_scale != 1.0 else "no uncond pass",
            "inference_routing": m.inference_routing if m.moe_experts else "dense",
            "threshold": (loaded.threshold_calibration.metadata() if loaded.threshold_calibration is not None
                          else "from training" if threshold_layers(loaded.model) else "none"),
            "codec": type(loaded.codec).__name__, "vae": getattr(loaded.codec, "vae_id", None),
            "dtype": str(next(loaded.model.parameters()).dtype), **extra}


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


