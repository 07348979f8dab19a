"""Streaming npz/npy reading and writing for image batches too large for memory (the ADM format: uint8 NHWC
`arr_0`, plus `labels` and a JSON `metadata` string).

Letters (docs/method/README.md): n_img images, H_img x W_img image size, B images of one batch.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from numpy.lib import format as npy

from racedit.fileio import atomic_path


class NpzError(ValueError):
    """An npz/npy file that is not what it must be (missing array, wrong dtype or layout, truncated)."""


class NpzImages:
    """uint8 images (n_img, H_img, W_img, 3) stored as `key` (default arr_0) of an .npz, read in batches
    without loading all.

    The member is streamed out of the zip (stored or deflated), so a 50K x 256 x 256 x 3 batch (9.8 GB) never
    has to fit in memory.
    """

    def __init__(self, path: str | Path, key: str = "arr_0"):
        self.path = Path(path)
        self.key = key
        with open_zip(self.path) as zf:
            if f"{key}.npy" not in zf.namelist():
                raise NpzError(f"{self.path} has no '{key}' array (keys: {npz_keys(zf)})")
            with zf.open(f"{key}.npy") as f:
                shape, fortran, dtype = read_npy_header(f, self.path)
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or fortran:
            raise NpzError(
                f"{self.path}: '{key}' must be uint8 images (N, H, W, 3) in C order (the ADM format), got "
                f"{dtype} {shape}{' (Fortran order)' if fortran else ''}. Convert images x in [-1, 1] with "
                f"clamp(127.5 x + 128, 0, 255).astype(uint8) in NHWC layout"
            )
        self.shape = shape

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        n = len(self) if limit is None else min(limit, len(self))
        row = int(np.prod(self.shape[1:]))
        with open_zip(self.path) as zf, zf.open(f"{self.key}.npy") as f:
            read_npy_header(f, self.path)
            for start in range(0, n, batch_size):
                count = min(batch_size, n - start)
                buf = bytearray(read_exact(f, count * row, self.path))  # writable, for torch.from_numpy
                yield np.frombuffer(buf, dtype=np.uint8).reshape(count, *self.shape[1:])


def open_zip(path: Path) -> zipfile.ZipFile:
    """`path` opened as a zip archive (an .npz is one); NpzError if it is none (another format, or truncated)."""
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise NpzError(f"{path} is not an .npz (zip) file ({e}): truncated, or another format") from None


def npz_keys(zf: zipfile.ZipFile) -> list[str]:
    return [n[:-4] if n.endswith(".npy") else n for n in zf.namelist()]


def read_npy_header(f, path: Path):
    version = npy.read_magic(f)
    if version == (1, 0):
        return npy.read_array_header_1_0(f)
    if version == (2, 0):
        return npy.read_array_header_2_0(f)
    raise NpzError(f"{path}: unsupported .npy format version {version}")


def read_exact(f, nbytes: int, path: Path) -> bytes:
    parts, got = [], 0
    while got < nbytes:
        chunk = f.read(nbytes - got)
        if not chunk:
            raise NpzError(f"{path}: array data ends early (truncated file?)")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def read_npz_metadata(path: str | Path) -> dict | None:
    """The JSON `metadata` that `racedit sample` stores in its npz, or None (absent, or not a JSON string)."""
    with np.load(path, allow_pickle=False) as z:
        if "metadata" not in z.files:
            return None
        try:
            meta = json.loads(str(z["metadata"]))
        except ValueError:  # a pickled object array, or text that is not JSON
            return None
    return meta if isinstance(meta, dict) else None


def _npy_entry(zf: zipfile.ZipFile, name: str):
    """A zip entry with a fixed timestamp, so that the same arrays give the same file bytes."""
    return zf.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w", force_zip64=True)


def write_image_npz(path: str | Path, batches: Iterable[np.ndarray], image_shape: tuple[int, ...],
                    labels: np.ndarray, metadata: dict) -> Path:
    """Stream uint8 image batches (B, H_img, W_img, 3), in order, into an ADM-format npz at `path`,
    atomically: `arr_0` (n_img, H_img, W_img, 3) with n_img = len(labels), `labels` (n_img,) int64 and
    `metadata` (a JSON string). Only one batch is in memory at a time, and the same arrays always give the same file bytes."""
    n = len(labels)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with _npy_entry(zf, "arr_0") as f:
            npy.write_array_header_1_0(f, {"descr": npy.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                                           "shape": (n, *image_shape)})
            written = 0
            for images in batches:
                if images.dtype != np.uint8 or tuple(images.shape[1:]) != tuple(image_shape):
                    raise NpzError(f"{path}: a batch of {images.dtype} {images.shape} does not fit uint8 "
                                   f"(b, {', '.join(map(str, image_shape))})")
                f.write(np.ascontiguousarray(images).data)
                written += len(images)
            if written != n:
                raise NpzError(f"{path}: {written} images written for {n} labels")
        with _npy_entry(zf, "labels") as f:
            npy.write_array(f, np.asarray(labels).astype(np.int64), allow_pickle=False)
        with _npy_entry(zf, "metadata") as f:
            npy.write_array(f, np.array(json.dumps(metadata, sort_keys=True)), allow_pickle=False)
    return Path(path)
