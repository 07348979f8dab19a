#!/usr/bin/env python
"""Latent pipeline throughput: extraction (images/s) and `LatentDataset` reads (samples/s).

    python bench/latents.py                      # CPU: tiny VAE extraction + reads of ImageNet-256-shaped latents
    python bench/latents.py --num-latents 50000 --batch 256 --workers 0 2 4

Extraction runs the real `extract_latents` on a generated ImageFolder with a tiny random-init VAE (and, on
a GPU, with a random-init VAE of SD-VAE's architecture). Reads use a synthetic store of ImageNet-256
latent shape (4 x 32 x 32, both flips, mean + std, float16) written in the documented shard format, read
through the training loader's DataLoader (`LatentBatches` items drawn by `KeyedMicroBatches`), and through
the generic per-sample one for comparison, so the numbers include the flip, the posterior sample,
collation and worker transfer. Target: > 20,000 samples/s on
2 CPU cores (DiT-XL/2 at > 500 img/s needs far less). Prints one table; no assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from racedit.data.factory import KeyedMicroBatches
from racedit.data.latent_extract import extract_latents
from racedit.data.latent_store import FORMAT, LatentBatches, LatentDataset
from racedit.data.order import ResumableBatchOrder
from racedit.testing import save_standin_vae, write_standin_image_folder

SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32}


class OneProcess:
    """The part of accelerate's PartialState that `extract_latents` uses, for one process on `device`
    (PartialState is a singleton, so it cannot switch between CPU and GPU within one run)."""

    process_index, num_processes, is_main_process = 0, 1, True

    def __init__(self, device: str):
        self.device = torch.device(device)

    def wait_for_everyone(self) -> None:
        pass


def bench_extraction(root: Path, vae_kwargs: dict, images: int, image_size: int, batch: int, device: str,
                     vae_dtype: str, workers: int) -> float:
    folder = write_standin_image_folder(root / "images", num_classes=4, per_class=images // 4,
                                        size=int(image_size * 1.2), corrupt=False)
    vae = save_standin_vae(root / f"vae-{len(vae_kwargs)}", **vae_kwargs)
    out = root / f"out-{device}-{vae_dtype}-{len(vae_kwargs)}"
    state = OneProcess(device)
    # warm-up (model load, first kernels) on a throwaway copy, then the timed run
    extract_latents(folder, vae, root / "warm", image_size=image_size, batch_size=batch, shard_size=batch,
                    num_workers=workers, vae_dtype=vae_dtype, state=state, progress=False)
    t0 = time.perf_counter()
    r = extract_latents(folder, vae, out, image_size=image_size, batch_size=batch, shard_size=10_000,
                        num_workers=workers, vae_dtype=vae_dtype, state=state, progress=False)
    return r.num_latents / (time.perf_counter() - t0)


def write_synthetic_store(out: Path, n: int, shard_rows: int, latent_shape=(4, 32, 32), classes: int = 1000) -> Path:
    """A latent directory in the documented format with random moments (no VAE needed)."""
    rng = np.random.default_rng(0)
    shards = []
    for i, start in enumerate(range(0, n, shard_rows)):
        rows = min(shard_rows, n - start)
        d = out / f"shard-{i:05d}"
        d.mkdir(parents=True)
        m = np.lib.format.open_memmap(d / "moments.npy", mode="w+", dtype=np.float16, shape=(rows, 2, 2, *latent_shape))
        for s in range(0, rows, 4096):
            block = rng.standard_normal((min(4096, rows - s), 2, 2, *latent_shape), dtype=np.float32)
            block[:, :, 1] = np.abs(block[:, :, 1]) * 0.01
            m[s:s + len(block)] = block
        m.flush()
        del m
        np.save(d / "labels.npy", rng.integers(0, classes, rows).astype(np.int64))
        np.save(d / "file_index.npy", np.arange(start, start + rows, dtype=np.int64))
        shards.append({"name": d.name, "rows": rows, "files": [start, start + rows]})
    manifest = {"format": FORMAT, "vae": "synthetic", "vae_path": None, "image_size": 256, "resolution": 256,
                "scaling_factor": 0.18215, "shift_factor": 0.0, "store_dtype": "float16",
                "latent_shape": list(latent_shape), "latent_channels": latent_shape[0], "latent_size": latent_shape[1],
                "downsample": 8, "classes": [f"c{i}" for i in range(classes)], "num_latents": n, "num_skipped": 0,
                "skipped": [], "shards": shards}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _cpu_seconds(proc) -> float:
    """CPU time (user + system) of this process and its live children (the DataLoader workers)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:  # a child that just exited
            pass
    return total


def bench_reads(store: Path, batch: int, workers: int, sample_posterior: bool, batches: int,
                per_sample_collate: bool = False) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second over the main process and its workers).

    The training loader's DataLoader (`LatentBatches`: whole batches per item),
    or with `per_sample_collate` the generic one (`batch_sampler` over `LatentDataset`: split into
    samples and re-stacked by the default collate)."""
    import psutil

    ds = LatentDataset(store, sample_posterior=sample_posterior)
    order = ResumableBatchOrder(len(ds), batch, seed=0)
    prefetch = 4 if workers else None
    if per_sample_collate:
        loader = DataLoader(ds, batch_sampler=KeyedMicroBatches(order, 0), num_workers=workers,
                            prefetch_factor=prefetch)
    else:
        loader = DataLoader(LatentBatches(ds), batch_size=None, sampler=KeyedMicroBatches(order, 0),
                            num_workers=workers, prefetch_factor=prefetch)
    it = iter(loader)
    for _ in range(max(2, 2 * workers)):  # warm-up: workers started, first pages mapped
        next(it)
    proc = psutil.Process()
    cpu0, t0 = _cpu_seconds(proc), time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds(proc) - cpu0
    del it
    return batches * batch / seconds, batches * batch / max(cpu, 1e-9)


def normal_draw_ns(batch: int, latent_shape=(4, 32, 32), rounds: int = 20) -> float:
    """Nanoseconds per normal of the posterior noise as `LatentDataset.read` draws it: a generator
    seeded per sample, then `torch.randn` of one latent."""
    gen, x = torch.Generator(), torch.empty((batch, *latent_shape))
    t0 = time.perf_counter()
    for r in range(rounds):
        for i, eps in enumerate(x.unbind(0)):
            gen.manual_seed(r * batch + i)
            torch.randn(latent_shape, generator=gen, out=eps)
    return 1e9 * (time.perf_counter() - t0) / (rounds * x.numel())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-latents", type=int, default=20_000, help="rows of the synthetic store (~32 KiB each)")
    p.add_argument("--shard-rows", type=int, default=8192)
    p.add_argument("--batch", type=int, default=256, help="micro-batch of the read benchmark")
    p.add_argument("--batches", type=int, default=60, help="timed batches per read configuration")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--extract-images", type=int, default=64, help="images for the CPU extraction benchmark")
    p.add_argument("--gpu-extract-images", type=int, default=512)
    p.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        ips = bench_extraction(root / "cpu", {}, args.extract_images, 256, 16, "cpu", "fp32", 2)
        rows.append(("extract, tiny VAE (8 ch), 256 px, CPU fp32, 2 decode workers", f"{ips:,.1f} img/s"))
        if torch.cuda.is_available():
            for dtype in ("fp32", "bf16"):
                ips = bench_extraction(root / "gpu", SD_VAE, args.gpu_extract_images, 256, 64, "cuda", dtype,
                                       min(8, os.cpu_count() or 1))
                rows.append((f"extract, SD-VAE-sized random VAE, 256 px, {torch.cuda.get_device_name()} {dtype}",
                             f"{ips:,.1f} img/s"))
        store = write_synthetic_store(root / "store", args.num_latents, args.shard_rows)
        for collate in (False, True):
            for posterior in (True, False):
                for w in args.workers:
                    sps, per_cpu = bench_reads(store, args.batch, w, posterior, args.batches, collate)
                    what = "posterior sample" if posterior else "mean only"
                    how = "per-sample collate" if collate else "LatentBatches (training)"
                    rows.append((f"read {how}, batch {args.batch}, {what}, workers={w}",
                                 f"{sps:,.0f} samples/s ({per_cpu:,.0f} per CPU-second)"))
        rows.append(("posterior noise alone (per-sample seeded torch.randn, 1 thread)",
                     f"{normal_draw_ns(args.batch):.1f} ns per normal"))
    width = max(len(r[0]) for r in rows)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"reads: synthetic ImageNet-256 store, {args.num_latents:,} rows of 4x32x32 float16 moments (both flips)")
    print(f"{'benchmark'.ljust(width)} | throughput")
    print(f"{'-' * width}-|-----------")
    for name, value in rows:
        print(f"{name.ljust(width)} | {value}")


if __name__ == "__main__":
    main()
