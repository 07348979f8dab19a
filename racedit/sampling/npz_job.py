"""A resumable, multi-process sampling job that writes an ADM-format npz for FID (uint8 NHWC `arr_0`, labels and
a JSON `metadata` entry): batches are saved under `<out>.parts/` as they finish, each with a digest file, and
verified and assembled at the end.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from racedit.checkpoint import step_of
from racedit.config import SampleConfig
from racedit.fileio import atomic_path, atomic_write_text, sha256_of, verify_level
from racedit.models.moe import threshold_layers
from racedit.npz import read_npz_metadata, write_image_npz
from racedit.outputs import OVERWRITE_FLAG, refuse_existing
from racedit.runlock import lock_on_main
from racedit.sampling.expert_groups import expert_group_of, group_agrees
from racedit.sampling.generate import (
    LoadedCheckpoint,
    idle_forwards,
    read_grid_metadata,
    sample_indexed,
    sample_labels,
    to_uint8_nhwc,
)
from racedit.signals import Interrupted, StopSignals

SAMPLES_FORMAT = "racedit-samples/1"
UINT8_CONVERSION = "uint8 = clamp(127.5 x + 128, 0, 255), NHWC, grey repeated to RGB"
NOISE_CONVENTION = "sample i: its own CPU torch.Generator seeded with numpy SeedSequence([seed, i]) (initial and step noise)"


class SamplingError(RuntimeError):
    """A sampling job that cannot continue as asked (e.g. its partial results belong to other settings)."""


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


def _digest_file(batch: Path) -> Path:
    return batch.with_name(batch.stem.replace("batch_", "digest_") + ".json")  # {"bytes", "sha256"} of the batch


def _save_batch(parts: Path, b: int, images: np.ndarray, indices: np.ndarray, labels: np.ndarray) -> None:
    """A batch file is absent or complete, and once present its digest file is too (written before the rename)."""
    path = _batch_file(parts, b)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=images, indices=indices, labels=labels)
        atomic_write_text(_digest_file(path), json.dumps({"bytes": tmp.stat().st_size, "sha256": sha256_of(tmp)}))


def _batch_problem(parts: Path, b: int, hash_it: bool) -> str | None:
    """None when batch file `b` is there and matches its digest file (its size; with `hash_it` its SHA-256 too),
    else what is wrong; "missing" when it was not made yet. With RACEDIT_VERIFY=0 only its presence counts."""
    path = _batch_file(parts, b)
    if not path.exists():
        return "missing"
    if verify_level() == 0:
        return None
    try:
        digest = json.loads(_digest_file(path).read_text())
        size, sha = int(digest["bytes"]), str(digest["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"its digest file {_digest_file(path).name} is missing or unreadable"
    if path.stat().st_size != size:
        return f"it has {path.stat().st_size} bytes, {_digest_file(path).name} says {size} (truncated or replaced)"
    if hash_it and sha256_of(path) != sha:
        return f"it does not match its SHA-256 in {_digest_file(path).name} (its bytes changed after it was written)"
    return None


def _drop_damaged(parts: Path, b: int, hash_it: bool) -> bool:
    """Whether batch `b` is ready; a damaged one is removed with a one-line note on stderr (it is sampled again)."""
    problem = _batch_problem(parts, b, hash_it)
    if problem not in (None, "missing"):
        path = _batch_file(parts, b)
        print(f"note: {path} is damaged ({problem}); removed, sampling it again", file=sys.stderr)
        path.unlink(missing_ok=True)
        _digest_file(path).unlink(missing_ok=True)
    return problem is None


def _assemble(parts: Path, out: Path, num_batches: int, labels: torch.Tensor, batch_size: int, meta: dict) -> None:
    """Stream the batch files, in order, into `out` (ADM npz: arr_0, labels, metadata); atomic rename. A batch
    file that is unreadable or holds other samples is removed, so the next run regenerates it."""
    n = len(labels)
    with np.load(_batch_file(parts, 0)) as z:
        image_shape = z["images"].shape[1:]

    def batches():
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
            yield images

    write_image_npz(out, batches(), image_shape, labels.numpy(), meta)


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
                      progress: bool = True, overwrite: bool = False) -> Path | None:
    """Sample an FID batch and write it as an ADM-format npz: `arr_0` uint8 (n_img, H_img, W_img, 3), `labels`
    (n_img,) int64, and `metadata` (a JSON string: checkpoint, EMA, sampler, steps, CFG, guidance channels,
    per-device batch, routing at inference, seed, labels, ...).

    Distributed: under `accelerate launch` each process samples the batches b = rank, rank + world_size, ... of
    `batch_size` samples (b covers samples b*batch_size .. ), so no index is duplicated or missing. Every batch
    is written to `<out>.parts/batch_XXXXXXX.npz` as it finishes, with its size and SHA-256 in
    `digest_XXXXXXX.json`; a re-run of the same job (same settings, checked against `<out>.parts/job.json`)
    skips finished batches whose size matches. Before assembling, every batch is hashed; a damaged one is
    removed and sampled again (one line on stderr). When all are there, the main process
    streams them into `out` (atomic rename) and removes the parts. Sample i depends only on (seed, i) and the
    per-device batch (see `sample_indexed`), so the file does not depend on the number of processes or on
    resuming. The parts directory must be on a filesystem all processes share.
    Expert-parallel (a model `load_for_sampling` split over expert groups): the processes of each group
    sample round by round together; one with no batch left runs a batch's forwards and drops the images.

    labels: given explicitly, else `sample_labels(num_samples, classes, seed, per_class)`.
    max_batches: stop after this many new batches on each process (time-limited jobs); returns None then,
    leaving the parts for the next run. Returns `out` when the file is complete.
    overwrite: replace an existing `out` that holds anything but this job's samples (else: OutputExists, before
    anything is written). The parts directory has one writer at a time (`racedit.runlock`, main process).
    SIGINT, SIGTERM and SIGUSR1 (`racedit.signals`) stop it after the batch in progress: the parts stay, and
    `Interrupted` says how many.
    """
    from accelerate import PartialState

    state = PartialState()
    is_main = state.is_main_process
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
    out = Path(out)
    parts = _parts_dir(out)
    meta = sampling_metadata(loaded, sample_cfg, format=SAMPLES_FORMAT, num_samples=n, seed=seed,
                             per_device_batch=batch_size, labels=label_mode, noise=NOISE_CONVENTION,
                             conversion=UINT8_CONVERSION)
    say = print if (progress and is_main) else (lambda *a, **k: None)

    if out.exists() and not _complete_file_matches(out, meta, labels, loaded):
        if not overwrite:
            refuse_existing(out, _foreign_npz_reason(out, meta))
        if is_main:
            print(f"note: {OVERWRITE_FLAG}: {out} will be replaced when this job completes", file=sys.stderr)
    elif out.exists() and not parts.exists():
        say(f"{out} already holds these {n} samples; nothing to do")
        return out

    def job_of(meta: dict) -> dict:
        return json.loads(json.dumps({"metadata": meta, "labels_sha256": hashlib.sha256(labels.numpy().tobytes()).hexdigest(),
                                      "weights_fingerprint": _weights_fingerprint(loaded)}, sort_keys=True))

    with lock_on_main(state, parts, "the sampling job's parts directory"):
        return _run_job(loaded, out, parts, labels, meta, job_of, sample_cfg, seed, batch_size, max_batches,
                        progress, state, say)


def _foreign_npz_reason(out: Path, meta: dict) -> str:
    """Why the existing `out` is not this job's npz, for the refusal."""
    saved = read_npz_metadata(out) if out.is_file() else None
    if not isinstance(saved, dict) or saved.get("format") != SAMPLES_FORMAT:
        return "was not written by racedit sample"
    keys = sorted(k for k in {**saved, **meta} if saved.get(k) != json.loads(json.dumps(meta)).get(k))
    return f"holds the samples of another job (differs in: {', '.join(keys) or 'labels'})"


def _run_job(loaded: LoadedCheckpoint, out: Path, parts: Path, labels: torch.Tensor, meta: dict, job_of,
             sample_cfg: SampleConfig, seed: int, batch_size: int, max_batches: int | None, progress: bool, state,
             say) -> Path | None:
    """The job of `write_samples_npz` under its parts directory's lock: check or write job.json, sample this
    process's missing batches, assemble when all are there."""
    rank, world, is_main = state.process_index, state.num_processes, state.is_main_process
    n = len(labels)
    num_batches = -(-n // batch_size)
    job = job_of(meta)
    if is_main:
        parts.mkdir(parents=True, exist_ok=True)
        job_file = parts / "job.json"
        if not job_file.exists():
            atomic_write_text(job_file, json.dumps(job, indent=1, sort_keys=True))
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

    # every process checks the sizes of its own batches (a damaged one is made again); all see the same files
    done = {b for b in range(num_batches) if (_drop_damaged(parts, b, hash_it=False) if b % world == rank
                                              else _batch_problem(parts, b, hash_it=False) is None)}
    todo = [b for b in range(rank, num_batches, world) if b not in done]
    pending = sum(min(batch_size, n - b * batch_size) for b in range(num_batches) if b not in done)
    if done:
        say(f"resuming: {len(done)} of {num_batches} batches already in {parts}")
    bar = tqdm(total=pending, desc=f"sample x{world} proc" if world > 1 else "sample", unit="img",
               disable=not (progress and is_main), smoothing=0.1)
    t0 = time.perf_counter()

    group = expert_group_of(loaded.model)  # expert-parallel: the MoE forwards of its processes run in lockstep

    def make(b: int) -> int:
        idx = torch.arange(b * batch_size, min(n, (b + 1) * batch_size))
        images = sample_indexed(loaded.model, loaded.objective, loaded.codec, labels[idx], idx, sample_cfg, seed)
        _save_batch(parts, b, to_uint8_nhwc(images), idx.numpy(), labels[idx].numpy())
        return len(idx)

    def make_all(batches: list[int], limit: int | None = None, stop: StopSignals | None = None, bar=None) -> int:
        """Sample the first `limit` of `batches` (all: None), or until `stop`; the number of images made. In an
        expert group, round by round with the others of the group (`racedit.sampling.expert_groups`)."""
        count = 0
        for j in itertools.count():
            more = j < len(batches) and (limit is None or j < limit)
            stopping = stop is not None and stop.requested
            if group is not None:
                any_more, stopping = group_agrees(group, more, stopping, next(loaded.model.parameters()).device)
            else:
                any_more = more
            if stopping or not any_more:
                return count
            if not more:  # the others of the group sample a batch: run its forwards with them
                idle_forwards(loaded.model, loaded.objective, sample_cfg, min(n, batch_size))
                continue
            k = make(batches[j])
            count += k
            if bar is not None:
                bar.update(min(k * world, bar.total - bar.n))  # rank 0 stands for all ranks
        return count

    with StopSignals("the current batch", announce=is_main) as stop:  # SIGINT/TERM/USR1: keep the batches done
        made = make_all(todo, max_batches, stop, bar)
    bar.close()
    seconds = time.perf_counter() - t0
    state.wait_for_everyone()
    missing = [b for b in range(num_batches) if not _batch_file(parts, b).exists()]
    state.wait_for_everyone()  # every process has looked before the main process drops a damaged batch below
    if made:
        say(f"sampled {made} images on the main process in {seconds:.1f}s "
            f"({made / max(seconds, 1e-9):.2f} img/s per process, {world} process{'es' if world > 1 else ''})")
    if missing and stop.requested:
        raise Interrupted(stop.signum, f"interrupted by {stop.name}: {num_batches - len(missing)} of {num_batches} "
                          f"batches are complete in {parts}; run the same command again to continue", show=is_main)
    if missing:
        say(f"{num_batches - len(missing)} of {num_batches} batches are in {parts}; run the same command again "
            f"to continue")
        return None
    # each batch hashed once, just before it is assembled; a damaged one is removed and sampled again: by the
    # main process, or, expert-parallel, by the process it belongs to with its group in lockstep
    damaged = [b for b in range(num_batches) if not _drop_damaged(parts, b, hash_it=True)] if is_main else []
    if group is not None:
        shared = [damaged]
        dist.broadcast_object_list(shared, src=0)
        make_all([b for b in shared[0] if b % world == rank])
        state.wait_for_everyone()
    else:
        make_all(damaged)
    if is_main:
        _assemble(parts, out, num_batches, labels, batch_size, meta)
        shutil.rmtree(parts, ignore_errors=True)
        say(f"wrote {n} samples to {out}")
    state.wait_for_everyone()
    return out


GRID_FORMAT = "racedit-grid/1"


def grid_metadata(loaded: LoadedCheckpoint, sample_cfg: SampleConfig, classes: list[int], per_class: int,
                  seed: int) -> dict:
    """What `racedit sample` records in a grid PNG's text chunk: the job (checkpoint weights and settings)."""
    return json.loads(json.dumps(sampling_metadata(loaded, sample_cfg, format=GRID_FORMAT, classes=list(classes),
                                                   per_class=per_class, seed=seed,
                                                   weights_fingerprint=_weights_fingerprint(loaded))))


def check_grid_out(out: str | Path, metadata: dict | None = None, overwrite: bool = False) -> None:
    """Refuse (OutputExists) an existing grid `out` unless `overwrite` or its text chunk records this very job
    (`metadata`, from `grid_metadata`). metadata None: refuse only what racedit wrote no grid metadata into
    (a check that needs no loaded checkpoint)."""
    out = Path(out)
    if overwrite or not out.exists():
        return
    saved = read_grid_metadata(out)
    if saved is None or saved.get("format") != GRID_FORMAT:
        refuse_existing(out, "is not a grid that racedit sample wrote")
    if metadata is not None and saved != metadata:
        keys = sorted(k for k in {**saved, **metadata} if saved.get(k) != metadata.get(k))
        refuse_existing(out, f"is a racedit grid of other settings (differs in: {', '.join(keys)})")


def sampling_metadata(loaded: LoadedCheckpoint, sample_cfg: SampleConfig, **extra) -> dict:
    """How samples were made: checkpoint, weights, sampler, steps, guidance, routing at inference."""
    m = loaded.model.config
    return {"checkpoint": str(loaded.path), "step": step_of(loaded.path), "weights": loaded.weights,
            "model": m.name, "objective": loaded.config.diffusion.objective, "sampler": sample_cfg.sampler,
            "steps": sample_cfg.steps, "cfg_scale": sample_cfg.cfg_scale,
            "guidance_channels": sample_cfg.guidance_channels or "all",
            "cfg_batching": "cond and uncond halves in one forward" if sample_cfg.cfg_scale != 1.0 else "no uncond pass",
            "inference_routing": m.inference_routing if m.moe_experts else "dense",
            "threshold": (loaded.threshold_calibration.metadata() if loaded.threshold_calibration is not None
                          else "from training" if threshold_layers(loaded.model) else "none"),
            "codec": type(loaded.codec).__name__, "vae": getattr(loaded.codec, "vae_id", None),
            "dtype": str(next(loaded.model.parameters()).dtype), **extra}

