#!/usr/bin/env python
"""What checkpoint verification costs: hashing and verifying checkpoints of growing size, extrapolated to XL/2.

    python bench/verify.py                              # DiT-S/2 depth 2, DiT-S/2, DiT-B/2
    python bench/verify.py --models DiT-S/2 DiT-B/2 DiT-L/2 --dir /scratch/me

Each model is built with random weights; its checkpoint is what training saves (`save_checkpoint`): live and
EMA weights (fp32 safetensors), the AdamW state after one step (two fp32 moments per parameter) and the
config, with its manifest. For each it times the save (which hashes every file once for the manifest),
`verify_checkpoint` with the page cache warm (just written) and cold (the files' pages dropped with
posix_fadvise, so they are read from the disk again), and, for comparison, what a resume reads anyway:
loading both weight files and the optimizer state without verification. The last row extrapolates to
DiT-XL/2 (675M parameters, a checkpoint of about 4 x 2.7 GB) from the bytes per parameter and the MB/s of
the largest model measured. Prints one table; no assertion.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

import racedit.fileio as fileio
from racedit.checkpoint import FILES, load_train_state, load_weights, save_checkpoint, verify_checkpoint
from racedit.config import Config, ModelConfig
from racedit.fileio import MANIFEST
from racedit.models import count_params, create_model

XL2_PARAMS = 675e6


def drop_cache(ckpt: Path) -> bool:
    """Evict the checkpoint's files from the page cache (only those pages: nothing else on the machine)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for name in (*FILES, MANIFEST):
        fd = os.open(ckpt / name, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def verify_fresh(ckpt: Path) -> None:
    fileio._DIGESTS.clear()  # this process hashed nothing yet
    verify_checkpoint(ckpt)


def load_unverified(ckpt: Path) -> None:
    with fileio.verification(False):
        load_weights(ckpt, "model"), load_weights(ckpt, "ema"), load_train_state(ckpt)


def bench_model(spec: str, root: Path) -> dict:
    name, _, depth = spec.partition(":")
    model = create_model(name, **({"depth": int(depth)} if depth else {}))
    params = count_params(model)["total"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates both moments of every parameter
    state = model.state_dict()
    ema = {k: v.clone() for k, v in state.items()}
    cfg = Config(model=ModelConfig(name=name))
    out = root / spec.replace("/", "-").replace(":", "-d")
    t0 = time.perf_counter()
    save_checkpoint(out, 1, model_state=state, ema_state=ema, config=cfg,
                    train_state={"optimizer": optimizer.state_dict(), "step": 1})
    t_save = time.perf_counter() - t0
    del model, optimizer, state, ema  # only the files from here on
    ckpt = out / "step_0000001"
    size = sum((ckpt / f).stat().st_size for f in FILES)
    warm = min(timed(lambda: verify_fresh(ckpt)) for _ in range(2))
    cold = timed(lambda: verify_fresh(ckpt)) if drop_cache(ckpt) else float("nan")
    load = timed(lambda: load_unverified(ckpt))
    shutil.rmtree(out)
    return {"model": spec, "params": params, "bytes": size, "save": t_save, "warm": warm, "cold": cold, "load": load}


def sha256_memory_mb_s(mb: int = 256) -> float:
    buf = os.urandom(1 << 20) * mb
    return mb / min(timed(lambda: hashlib.sha256(buf).digest()) for _ in range(3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["DiT-S/2:2", "DiT-S/2", "DiT-B/2"],
                   help="presets, NAME:DEPTH for a shallower one (default: DiT-S/2:2 DiT-S/2 DiT-B/2)")
    p.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary directory)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (hashing is one thread either way)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="racedit-bench-verify-", dir=args.dir))
    try:
        rows = [bench_model(spec, root) for spec in args.models]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"# bench/verify.py --models {' '.join(args.models)}\n")
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, checkpoints in {args.dir or '/tmp'}; "
          f"SHA-256 of bytes in memory: {sha256_memory_mb_s():.0f} MB/s (one thread)\n")
    print("| model | params (M) | checkpoint MB | save s (hashing included) | verify s, warm cache | MB/s | "
          "verify s, cold cache | MB/s | load s (weights + optimizer, unverified) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mb = r["bytes"] / 1e6
        print(f"| {r['model']} | {r['params'] / 1e6:.1f} | {mb:.0f} | {r['save']:.2f} | {r['warm']:.2f} | "
              f"{mb / r['warm']:.0f} | {r['cold']:.2f} | {mb / r['cold']:.0f} | {r['load']:.2f} |")
    big = max(rows, key=lambda r: r["bytes"])
    xl_mb = big["bytes"] / big["params"] * XL2_PARAMS / 1e6
    warm_s, cold_s = xl_mb / (big["bytes"] / 1e6 / big["warm"]), xl_mb / (big["bytes"] / 1e6 / big["cold"])
    print(f"| DiT-XL/2 (extrapolated from {big['model']}) | {XL2_PARAMS / 1e6:.0f} | {xl_mb:.0f} | | "
          f"{warm_s:.1f} | | {cold_s:.1f} | | |")


if __name__ == "__main__":
    main()
