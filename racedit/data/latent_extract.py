"""Resumable, sharded extraction of an image folder into the latent store (`racedit.data.latent_store`).

Letters (docs/method/README.md): n_img latents (readable images), n_rows rows of one shard, B images of a
VAE batch, C latent channels, H x W latent side, R image side.

A shard is written into `shard-XXXXX.tmp-*` and renamed into place only when all its files (shard.json
last) are on disk, so a killed run never leaves a half-written shard under the final name; a re-run
verifies the shards already there (settings, file list digest, array shapes and sizes, optionally
checksums) and extracts only the missing ones. Processes started by `accelerate launch` share the
missing shards round-robin; the main process writes the manifest at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from racedit.data.codec import AutoencoderKLCodec
from racedit.data.images import ImageFolder, collate_images, to_model_range
from racedit.data.latent_store import (
    FORMAT,
    MANIFEST,
    STORE_DTYPES,
    LatentStoreError,
    read_manifest,
    verify_shard,
)
from racedit.fileio import atomic_write_text, sha256_of
from racedit.outputs import check_output_dir
from racedit.runlock import lock_on_main
from racedit.signals import Interrupted, StopSignals, ignore_stop_signals

VAE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --- Extraction ----------------------------------------------------------------------------------------


@dataclass
class ExtractResult:
    """What `extract_latents` did (the same on every process)."""

    out_dir: Path
    num_files: int  # files in the image folder
    num_latents: int  # readable images = rows over all shards
    num_skipped: int  # unreadable files
    shards_total: int
    shards_written: int  # by this process in this call
    shards_reused: int  # complete and verified before this call
    seconds: float


def plan_shards(num_files: int, shard_size: int) -> list[tuple[int, int]]:
    """File ranges [start, end) of the shards: consecutive blocks of `shard_size` files."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [(s, min(s + shard_size, num_files)) for s in range(0, num_files, shard_size)]


def _files_digest(files: Sequence[tuple[str, int]]) -> str:
    h = hashlib.sha256()
    for rel, label in files:
        h.update(f"{rel}\t{label}\n".encode())
    return h.hexdigest()


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def _write_shard(out: Path, i: int, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays + shard.json into a temporary directory, fsync, and rename it to shard-XXXXX."""
    final = out / _shard_name(i)
    tmp = out / f"{_shard_name(i)}.tmp-{os.getpid()}"
    for stale in out.glob(f"{_shard_name(i)}.tmp-*"):  # left by a killed run (this shard has one writer)
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = dict(meta, arrays={})
    for name, arr in arrays.items():
        path = tmp / f"{name}.npy"
        with open(path, "wb") as f:
            np.save(f, np.ascontiguousarray(arr))
            f.flush()
            os.fsync(f.fileno())
        meta["arrays"][name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "bytes": path.stat().st_size,
                                "sha256": sha256_of(path)}
    with open(tmp / "shard.json", "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)


def _log(msg: str, state) -> None:
    prefix = f"[rank {state.process_index}] " if state.num_processes > 1 else ""
    tqdm.write(prefix + msg)


def extract_latents(data: str | Path, vae: str | Path, out: str | Path, image_size: int = 256,
                    batch_size: int = 32, shard_size: int = 20_000, num_workers: int | None = None,
                    store_dtype: str = "float16", vae_dtype: str = "fp32", verify_checksums: bool = False,
                    state=None, progress: bool = True,
                    on_shard_done: Callable[[int], None] | None = None, overwrite: bool = False) -> ExtractResult:
    """Encode every readable image of the ImageFolder `data` with the VAE `vae` into shards under `out`.

    vae: hub id (e.g. "stabilityai/sd-vae-ft-ema") or local directory. image_size: R of the ADM center
    crop (a multiple of the VAE downsample). batch_size: images per VAE call (each is encoded twice, as
    is and mirrored). shard_size: files per shard. num_workers: image-decoding DataLoader workers per
    process (default: CPU cores / processes, at most 8). store_dtype: float16 (default; ImageNet-256 at
    SD-VAE is about 42 GB) or float32. vae_dtype: fp32 | fp16 | bf16 for the encoder. state: an accelerate
    `PartialState` (created when None); work is shared among its processes. on_shard_done(i) is called
    after shard i is written (tests use it to simulate a crash). An existing `out` must hold a latent store
    only (re-running the same command resumes it), else OutputExists; `overwrite`: write into it anyway
    (never over shards of other settings, which are refused). `out` has one writer at a time
    (`racedit.runlock`, main process). SIGINT, SIGTERM and SIGUSR1
    (`racedit.signals`) stop it before the next batch, dropping the shard in progress: `Interrupted`.
    Skipped files are named in a log line each and in the manifest; the main process prints a summary.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # like Accelerator, honour ACCELERATE_USE_CPU (CPU-only multi-process runs: gloo instead of no DDP at all)
    state = state or PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    with lock_on_main(state, out, "--out"):  # two extractions into one store would remove each other's shards
        return _extract_latents(data, vae, out, image_size=image_size, batch_size=batch_size, shard_size=shard_size,
                                num_workers=num_workers, store_dtype=store_dtype, vae_dtype=vae_dtype,
                                verify_checksums=verify_checksums, state=state, progress=progress,
                                on_shard_done=on_shard_done, overwrite=overwrite)


def _extract_latents(data: str | Path, vae: str | Path, out: str | Path, image_size: int = 256,
                    batch_size: int = 32, shard_size: int = 20_000, num_workers: int | None = None,
                    store_dtype: str = "float16", vae_dtype: str = "fp32", verify_checksums: bool = False,
                    state=None, progress: bool = True,
                    on_shard_done: Callable[[int], None] | None = None, overwrite: bool = False) -> ExtractResult:
    """`extract_latents` under the lock of `out`."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # like Accelerator, honour ACCELERATE_USE_CPU (CPU-only multi-process runs: gloo instead of no DDP at all)
    state = state or PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {STORE_DTYPES}, got {store_dtype!r}")
    if vae_dtype not in VAE_DTYPES:
        raise ValueError(f"vae_dtype must be one of {list(VAE_DTYPES)}, got {vae_dtype!r}")
    t0 = time.perf_counter()
    out = Path(out)
    # a latent store only: its shards (and their temporaries), manifest and class map
    check_output_dir(out, [MANIFEST, "class_to_idx.json"], [r"shard-\d+", r"shard-\d+\.tmp-\d+"], overwrite=overwrite,
                     what="a latent store")
    images = ImageFolder(data, image_size)
    codec = AutoencoderKLCodec(vae).to(state.device, VAE_DTYPES[vae_dtype])
    side = codec.model_size(image_size)  # ValueError unless image_size is a multiple of the VAE downsample
    latent_shape = [codec.channels, side, side]
    vae_path = str(Path(vae).resolve()) if Path(vae).is_dir() else None
    settings = {"format": FORMAT, "vae": str(vae), "image_size": image_size, "scaling_factor": codec.scaling_factor,
                "shift_factor": codec.shift_factor, "store_dtype": store_dtype, "latent_shape": latent_shape}
    if num_workers is None:
        num_workers = min(8, max(1, (os.cpu_count() or 1) // state.num_processes))

    manifest_path = out / MANIFEST
    try:  # a damaged manifest says nothing: the shards are checked one by one, and it is written anew at the end
        old = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    except ValueError:
        old = None
    if isinstance(old, dict):
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise LatentStoreError(f"{out} already holds latents made with other settings {diff} "
                                   f"(existing, requested); choose another --out")
    plan = plan_shards(len(images), shard_size)
    # each process checks every num_processes-th existing shard; the verdicts are then shared
    verdicts = []
    for i in range(state.process_index, len(plan), state.num_processes):
        verdicts.append((i, *_check_existing(out / _shard_name(i), settings, plan[i], images, data, verify_checksums)))
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        verdicts = gather_object(verdicts)
    verdicts.sort()
    errors = [msg for _, status, msg in verdicts if status == "error"]
    if errors:
        raise LatentStoreError(errors[0])
    for i, status, msg in verdicts:
        if status == "redo" and state.is_main_process:
            _log(f"{_shard_name(i)} is incomplete or damaged ({msg}): extracting it again", state)
    todo = [i for i, status, _ in verdicts if status != "ok"]
    reused = len(plan) - len(todo)
    state.wait_for_everyone()  # everyone has planned before anyone writes
    mine = todo[state.process_index::state.num_processes]

    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        print(f"extract_latents: {len(images)} files in {len(images.classes)} classes -> {len(plan)} shards "
              f"({reused} already complete, {len(todo)} to extract on {state.num_processes} process(es)) | "
              f"VAE {vae} | {image_size}px -> latents {latent_shape} {store_dtype}")
    state.wait_for_everyone()
    total = sum(plan[i][1] - plan[i][0] for i in mine)
    t_encode = time.perf_counter()
    bar = tqdm(total=total, desc="extract", unit="img", disable=not (progress and state.is_main_process),
               dynamic_ncols=True)
    written = 0
    with StopSignals("the current batch, dropping the shard in progress", announce=state.is_main_process) as stop:
        for i in mine:
            start, end = plan[i]
            meta = {"settings": settings, "shard": i, "files": [start, end],
                    "files_digest": _files_digest(images.files[start:end])}
            encoded = _encode_range(images, start, end, codec, batch_size, num_workers, store_dtype, bar, state, stop)
            if encoded is None:  # a stop signal
                break
            arrays, skipped = encoded
            meta.update(rows=len(arrays["labels"]), skipped=skipped)
            _write_shard(out, i, meta, arrays)
            written += 1
            if on_shard_done is not None:
                on_shard_done(i)
    bar.close()
    state.wait_for_everyone()
    if stop.requested:
        kept = (f"{reused + written} of {len(plan)} shards are complete in {out} (the one in progress was dropped)"
                if state.num_processes == 1 else f"the complete shards in {out} are kept (those in progress were dropped)")
        raise Interrupted(stop.signum, f"interrupted by {stop.name}: {kept}; run the same command again to continue",
                          show=state.is_main_process)
    manifest = None
    if state.is_main_process:
        manifest = _write_manifest(out, images, plan, settings, vae_path, data)
    state.wait_for_everyone()
    manifest = manifest or read_manifest(out)
    now = time.perf_counter()
    seconds, encode_seconds = now - t0, now - t_encode
    result = ExtractResult(out, len(images), manifest["num_latents"], manifest["num_skipped"], len(plan),
                           len(mine), reused, seconds)
    if state.is_main_process:
        extracted = sum(plan[i][1] - plan[i][0] for i in todo)
        print(f"extract_latents: done: {result.num_latents} latents from {result.num_files} files, "
              f"{result.num_skipped} skipped (named in {manifest_path}), {len(plan)} shards ({reused} reused) "
              f"in {seconds:.1f}s ({extracted / max(encode_seconds, 1e-9):.1f} img/s encoding over all processes) "
              f"-> {out}")
    return result


def _check_existing(shard_dir: Path, settings: dict, files: tuple[int, int], images: ImageFolder, data,
                    checksums: bool) -> tuple[str, str]:
    """("ok" | "todo" | "redo" | "error", message) for the shard that should cover `files`."""
    if not shard_dir.exists():
        return "todo", ""
    start, end = files
    expected = {"settings": settings, "files": [start, end], "files_digest": _files_digest(images.files[start:end])}
    problem = verify_shard(shard_dir, expected, checksums=checksums)
    if problem is None:
        return "ok", ""
    meta = _read_json(shard_dir / "shard.json")
    if meta is not None and (meta.get("settings") != settings or meta.get("files") != [start, end]):
        return "error", (f"{shard_dir} was made with other settings or another shard size ({problem}); "
                         f"choose another --out")
    if meta is not None and meta.get("files_digest") != expected["files_digest"]:
        return "error", (f"the image folder {data} changed since {shard_dir} was written (other files in its "
                         f"range); choose another --out")
    return "redo", problem


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _encode_range(images: ImageFolder, start: int, end: int, codec: AutoencoderKLCodec, batch_size: int,
                  num_workers: int, store_dtype: str, bar, state,
                  stop: StopSignals) -> tuple[dict[str, np.ndarray], list[dict]] | None:
    """Encode files [start, end) (as is and mirrored): the shard's arrays and its skipped files; None when a
    stop signal arrives first (checked before each batch)."""
    side = codec.model_size(images.image_size)
    C, H, W = codec.channels, side, side
    moments = np.empty((end - start, 2, 2, C, H, W), dtype=store_dtype)
    labels, file_index = np.empty(end - start, dtype=np.int64), np.empty(end - start, dtype=np.int64)
    n_rows, skipped = 0, []
    loader = DataLoader(Subset(images, range(start, end)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=collate_images, worker_init_fn=ignore_stop_signals,
                        pin_memory=state.device.type == "cuda")
    for batch in loader:
        if stop.requested:
            return None
        for index, reason in batch.skipped:
            rel = images.files[index][0]
            _log(f"skipped {rel}: {reason}", state)
            skipped.append({"path": rel, "reason": reason})
        B = len(batch.labels)
        if B:
            x = to_model_range(batch.images.to(state.device, non_blocking=True))
            mean, std = codec.encode_moments(torch.cat([x, x.flip(-1)]))  # (2B, C, H, W) each
            both = torch.stack([mean.view(2, B, C, H, W), std.view(2, B, C, H, W)], dim=2)  # (2, B, 2, C, H, W)
            moments[n_rows:n_rows + B] = both.transpose(0, 1).cpu().numpy().astype(store_dtype)
            labels[n_rows:n_rows + B] = batch.labels.numpy()
            file_index[n_rows:n_rows + B] = batch.indices.numpy()
            n_rows += B
        bar.update(B + len(batch.skipped))
    return {"moments": moments[:n_rows], "labels": labels[:n_rows], "file_index": file_index[:n_rows]}, skipped


def _write_manifest(out: Path, images: ImageFolder, plan: list[tuple[int, int]], settings: dict,
                    vae_path: str | None, data) -> dict:
    shards, skipped, counts = [], [], np.zeros(len(images.classes), dtype=np.int64)
    for i, (start, end) in enumerate(plan):
        shard_dir = out / _shard_name(i)
        problem = verify_shard(shard_dir, {"settings": settings, "files": [start, end]})
        if problem is not None:
            raise LatentStoreError(f"{shard_dir} is not complete after extraction ({problem})")
        meta = json.loads((shard_dir / "shard.json").read_text())
        counts += np.bincount(np.load(shard_dir / "labels.npy"), minlength=len(images.classes))
        skipped.extend(meta["skipped"])
        shards.append({"name": shard_dir.name, "rows": meta["rows"], "files": [start, end]})
    C, H, W = settings["latent_shape"]
    manifest = dict(settings)
    manifest.update({
        "vae_path": vae_path,  # absolute path when the VAE was a local directory, else null
        "resolution": settings["image_size"],
        "latent_channels": C,
        "latent_size": H,
        "downsample": settings["image_size"] // H,
        "layout": "moments.npy (n, flip, [mean, std], c, h, w); flip 0 = image, 1 = mirrored left-right; "
                  "latent = mean + std * N(0, 1), already scaled by scaling_factor",
        "source": str(Path(data).resolve()),
        "classes": images.classes,
        "class_to_idx": images.class_to_idx,
        "num_files": len(images),
        "num_latents": int(sum(s["rows"] for s in shards)),
        "num_skipped": len(skipped),
        "counts_per_class": counts.tolist(),
        "skipped": skipped,
        "shards": shards,
    })
    atomic_write_text(out / "class_to_idx.json", json.dumps(images.class_to_idx, indent=1))
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


