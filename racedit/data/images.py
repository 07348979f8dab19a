"""ImageNet-style image folders: class subfolders, the ADM center crop, and skipping of unreadable files.

Layout read by `ImageFolder`: `root/<class name>/<any file>`. Classes are the subfolder names in sorted
order, so class index i is the i-th name of `sorted(os.listdir(root))` (directories only, hidden names
ignored); files inside a class are sorted too, so the file order (and with it every index) is the same on
every machine and every process. Every regular, non-hidden file is a candidate image: a file that PIL
cannot open or decode (corrupt, truncated, not an image) is not an error but a *skip*, reported with its
path and the reason.

Letters (docs/method/README.md): R image side after the crop, B images of a batch.

The crop is the one the ADM reference batch and DiT training use (`center_crop`): halve the image with a
box filter while its short side is at least 2 R, resize with a bicubic filter so the short side is R, then
cut the central R x R square.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


class ImageFolderError(ValueError):
    """The image root is missing or malformed (no class folders, an empty class folder)."""


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The ADM / DiT center crop of a PIL image to `size` x `size`.

    1. While the short side is >= 2 * size, shrink both sides to half (floor) with `Image.BOX`
       (a cheap, alias-free pre-shrink of large photos).
    2. Scale both sides by size / short side, rounding to the nearest integer, with `Image.BICUBIC`;
       the short side is then exactly `size`.
    3. Keep the central size x size window; when the excess is odd the extra pixel is cut on the right
       (bottom), i.e. the window starts at floor(excess / 2).
    """
    if size < 1:
        raise ValueError(f"crop size must be >= 1, got {size}")
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Decode `path` as RGB, center-crop it to size x size: uint8 (size, size, 3). Raises on a bad file."""
    with Image.open(path) as im:
        im.load()  # decode now: a truncated file fails here, not later
        rgb = im.convert("RGB")
    return np.array(center_crop(rgb, size), dtype=np.uint8)  # a writable copy


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, R, R) -> float32 in [-1, 1] (x / 127.5 - 1)."""
    return images.float().div_(127.5).sub_(1.0)


@dataclass(frozen=True)
class Skipped:
    """A file that could not be read as an image."""

    path: str  # relative to the image root
    reason: str  # the exception, one line

    def as_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason}


def scan_image_folder(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and files of an ImageFolder tree.

    Returns (classes, files): `classes` the sorted class folder names (index = position), `files` the
    (path relative to root, class index) of every regular non-hidden file, sorted by class then name.
    Raises `ImageFolderError` for a missing root, a root without class folders, or an empty class folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise ImageFolderError(f"image root {str(root)!r} does not exist or is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ImageFolderError(f"image root {str(root)!r} has no class subfolders (expected root/<class>/<image>)")
    files: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        names = sorted(e.name for e in os.scandir(root / name) if e.is_file() and not e.name.startswith("."))
        if not names:
            raise ImageFolderError(f"class folder {str(root / name)!r} is empty: every class needs at least one image")
        files.extend((f"{name}/{n}", index) for n in names)
    return classes, files


class ImageFolder(Dataset):
    """Center-cropped RGB images of an ImageFolder tree, addressed by file index.

    `dataset[i]` is a dict: "image" uint8 tensor (3, R, R) or None when file i is unreadable, "label" int,
    "index" i, "error" the reason (str) or None. Unreadable files are not raised but returned, so a
    DataLoader keeps going; `collate_images` drops them and reports them as `Skipped`.
    `.classes` (sorted names), `.class_to_idx`, `.files` ((relative path, label) pairs).
    """

    def __init__(self, root: str | Path, image_size: int):
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.root = Path(root)
        self.image_size = image_size
        self.classes, self.files = scan_image_folder(self.root)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        rel, label = self.files[i]
        try:
            arr = load_image(self.root / rel, self.image_size)
        except Exception as e:  # any decoder failure means "not a usable image"
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
            return {"image": None, "label": label, "index": i, "error": reason}
        return {"image": torch.from_numpy(arr).permute(2, 0, 1).contiguous(), "label": label, "index": i,
                "error": None}

    def __repr__(self) -> str:
        return f"ImageFolder(root={str(self.root)!r}, classes={len(self.classes)}, files={len(self)}, " \
               f"image_size={self.image_size})"


@dataclass
class ImageBatch:
    """The readable images of a batch and the files that were skipped."""

    images: torch.Tensor  # (B, 3, R, R) uint8
    labels: torch.Tensor  # (B,) int64
    indices: torch.Tensor  # (B,) int64 file indices
    skipped: list[tuple[int, str]]  # (file index, reason)


def collate_images(items: list[dict]) -> ImageBatch:
    """DataLoader collate for `ImageFolder`: stack the readable images, list the unreadable ones."""
    good = [it for it in items if it["image"] is not None]
    skipped = [(it["index"], it["error"]) for it in items if it["image"] is None]
    # an all-unreadable batch gives an empty (0, 3, 0, 0) tensor: callers skip it
    images = torch.stack([it["image"] for it in good]) if good else torch.empty((0, 3, 0, 0), dtype=torch.uint8)
    labels = torch.tensor([it["label"] for it in good], dtype=torch.int64)
    indices = torch.tensor([it["index"] for it in good], dtype=torch.int64)
    return ImageBatch(images, labels, indices, skipped)
