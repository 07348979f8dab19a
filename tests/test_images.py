"""Image folders: the ADM center crop against hand-computed cases, the folder scan, and skipped files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from racedit.data.images import (
    ImageFolder,
    ImageFolderError,
    center_crop,
    collate_images,
    scan_image_folder,
    to_model_range,
)
from racedit.testing import write_standin_image_folder


def rgb(arr: np.ndarray) -> Image.Image:
    """(H, W) grey levels -> an RGB image with the same value in all channels."""
    return Image.fromarray(np.repeat(arr.astype(np.uint8)[..., None], 3, axis=2))


def test_center_crop_box_halving_averages_2x2_blocks():
    # 16x16 -> (short side 16 >= 8) box to 8x8 -> (8 >= 8) box to 4x4 -> scale 1 -> crop everything.
    # Each 4x4 block has the value B[i, j] plus a +-1 checkerboard whose 2x2 means are 0, so two rounds of
    # exact 2x2 averaging give B; a nearest or bilinear pick would land on B +- 1.
    b = np.array([[10, 50, 90, 130], [20, 60, 100, 140], [30, 70, 110, 150], [40, 80, 120, 160]])
    checker = np.where((np.arange(16)[:, None] + np.arange(16)[None, :]) % 2 == 0, 1, -1)
    img = np.kron(b, np.ones((4, 4), dtype=int)) + checker
    out = np.asarray(center_crop(rgb(img), 4))
    assert out.shape == (4, 4, 3)
    np.testing.assert_array_equal(out[..., 0], b)


def test_center_crop_window_position_even_and_odd_excess():
    cols = np.tile(np.arange(12) * 20, (4, 1))  # 4 high, 12 wide; column j has value 20 j
    # short side 4 = target: no halving, the bicubic resize keeps the size, so the crop is of the original:
    # excess 12 - 4 = 8 -> left = 4 -> columns 4..7
    np.testing.assert_array_equal(np.asarray(center_crop(rgb(cols), 4))[0, :, 0], [80, 100, 120, 140])
    # odd excess 11 - 4 = 7 -> left = floor(7 / 2) = 3 -> columns 3..6 (the extra pixel is cut on the right)
    np.testing.assert_array_equal(np.asarray(center_crop(rgb(cols[:, :11]), 4))[0, :, 0], [60, 80, 100, 120])
    # tall image: the same along rows
    out = np.asarray(center_crop(rgb(cols.T), 4))[:, 0, 0]
    np.testing.assert_array_equal(out, [80, 100, 120, 140])


def test_center_crop_halves_then_crops_wide_image():
    # 20 wide x 8 high, target 4: short side 8 >= 8 -> box to 10 x 4 (2x2 means), then crop columns 3..6.
    rng = np.random.default_rng(0)
    base = rng.integers(1, 60, size=(4, 10)) * 4  # each 2x2 block is base + (1, -1; -1, 1): its mean is base
    img = np.kron(base, np.ones((2, 2), dtype=int)) + np.tile([[1, -1], [-1, 1]], (4, 10))
    out = np.asarray(center_crop(rgb(img), 4))[..., 0]
    expected = img.reshape(4, 2, 10, 2).mean(axis=(1, 3))[:, 3:7]
    np.testing.assert_array_equal(out, expected)


def test_center_crop_bicubic_step_sizes_and_constant_images():
    # 9 x 7, target 4: no halving (7 < 8), bicubic to round(9 * 4 / 7) = 5 x 4, crop left = 0
    img = Image.new("RGB", (9, 7), (37, 150, 201))
    out = center_crop(img, 4)
    assert out.size == (4, 4)
    assert np.all(np.asarray(out) == [37, 150, 201])  # bicubic keeps constants
    assert center_crop(Image.new("RGB", (500, 375)), 256).size == (256, 256)
    assert center_crop(Image.new("RGB", (1200, 900)), 256).size == (256, 256)  # halves once, then bicubic
    with pytest.raises(ValueError):
        center_crop(img, 0)


def test_scan_sorted_classes_and_files(tmp_path):
    write_standin_image_folder(tmp_path, num_classes=3, per_class=2, size=12)
    (tmp_path / ".hidden_dir").mkdir()
    (tmp_path / "class_02" / ".DS_Store").write_text("x")
    classes, files = scan_image_folder(tmp_path)
    assert classes == ["class_00", "class_01", "class_02"]
    assert files[:3] == [("class_00/broken.png", 0), ("class_00/img_000.png", 0), ("class_00/img_001.png", 0)]
    assert ("class_01/notes.txt", 1) in files and len(files) == 8  # hidden files are not candidates


def test_scan_errors_name_the_problem(tmp_path):
    with pytest.raises(ImageFolderError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")
    with pytest.raises(ImageFolderError, match="no class subfolders"):
        scan_image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"")
    (tmp_path / "b").mkdir()
    with pytest.raises(ImageFolderError, match="class folder .*b' is empty"):
        scan_image_folder(tmp_path)


def test_image_folder_skips_unreadable_files_and_names_them(tmp_path):
    write_standin_image_folder(tmp_path, num_classes=3, per_class=4, size=20)
    ds = ImageFolder(tmp_path, 16)
    assert ds.class_to_idx == {"class_00": 0, "class_01": 1, "class_02": 2}
    batches = list(DataLoader(ds, batch_size=5, num_workers=0, collate_fn=collate_images))
    images = torch.cat([b.images for b in batches])
    skipped = [(ds.files[i][0], why) for b in batches for i, why in b.skipped]
    assert images.shape == (12, 3, 16, 16) and images.dtype == torch.uint8
    assert [p for p, _ in skipped] == ["class_00/broken.png", "class_01/notes.txt"]
    assert all(why for _, why in skipped)
    labels = torch.cat([b.labels for b in batches])
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    indices = torch.cat([b.indices for b in batches]).tolist()
    assert all(ds.files[i][1] == y for i, y in zip(indices, labels.tolist()))
    x = to_model_range(images)
    assert x.min() >= -1 and x.max() <= 1 and x.dtype == torch.float32
