"""Stand-ins for smoke tests, docs and benchmarks, made locally (no network): a tiny random-init VAE, a
small generated image folder with a few unreadable files, and a recorder of the ops a computation dispatches
(to check that a path reads nothing on the host)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that read a tensor on the host (`.item()`, `int(tensor)`, a traced `.tolist()`) or size a result by its data:
# on CUDA, what `torch.cuda.set_sync_debug_mode("error")` catches.
HOST_READS = frozenset({torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                        torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default})


class RecordOps(TorchDispatchMode):
    """Inside, every aten op dispatched is appended to `ops`; `host_reads` are those in HOST_READS."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))

    @property
    def host_reads(self) -> list[str]:
        return [str(op) for op in self.ops if op in HOST_READS]


def save_standin_vae(path: str | Path, block_out_channels: Sequence[int] = (8, 8, 8, 8), latent_channels: int = 4,
                     layers_per_block: int = 1, norm_num_groups: int = 4, seed: int = 0) -> Path:
    """A random-init diffusers AutoencoderKL saved with `save_pretrained` (downsample 2^(blocks - 1)).

    The default is tiny (8 channels, downsample 8, scaling factor 0.18215 like SD-VAE); SD-VAE's own
    architecture is block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    blocks = len(block_out_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                        up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=tuple(block_out_channels),
                        layers_per_block=layers_per_block, latent_channels=latent_channels,
                        norm_num_groups=norm_num_groups, sample_size=256, scaling_factor=0.18215)
    vae.save_pretrained(path)
    return Path(path)


def write_standin_image_folder(root: str | Path, num_classes: int = 3, per_class: int = 10, size: int = 40,
                               seed: int = 0, corrupt: bool = True) -> Path:
    """A small generated ImageFolder (no network) for smoke tests, docs and benchmarks.

    Class c holds `per_class` PNGs of random colour blobs with varied aspect ratios around `size`, named
    `img_000.png`...; with `corrupt`, class 0 also gets a truncated PNG (`broken.png`) and class 1 a text
    file (`notes.txt`), which a reader must skip. Returns the root.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            w = int(size * rng.uniform(1.0, 1.6))
            h = int(size * rng.uniform(1.0, 1.3))
            w, h = (w, h) if j % 2 else (h, w)
            base = rng.integers(0, 256, size=3)
            arr = np.clip(base + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
            arr[: h // 2, : w // 3] = 255 - arr[: h // 2, : w // 3]  # an asymmetric patch: flips differ
            Image.fromarray(arr).save(d / f"img_{j:03d}.png")
    if corrupt and num_classes >= 2:
        good = (root / "class_00" / "img_000.png").read_bytes()
        (root / "class_00" / "broken.png").write_bytes(good[: len(good) // 2])
        (root / "class_01" / "notes.txt").write_text("not an image\n")
    return root
