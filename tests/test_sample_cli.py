"""`racedit sample` end to end on a tiny checkpoint: PNG grids, ADM-format npz, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_config
from PIL import Image

from racedit.cli import main
from racedit.sampling import to_uint8_nhwc
from racedit.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny digits run of 3 steps (checkpoint at the end): 1 x 8 x 8 images, 10 classes, ddpm objective."""
    out = tmp_path_factory.mktemp("sample_cli") / "run"
    train(make_tiny_config(out, "train.steps=3", "train.ckpt_every=0"))
    return out


def copy_checkpoint(run_dir: Path, dest: Path) -> Path:
    """A standalone copy of the run's last checkpoint directory (to damage without touching the original)."""
    src = (run_dir / "checkpoints" / "last").resolve()
    return Path(shutil.copytree(src, dest / src.name))


def grid_size(n: int, nrow: int, side: int, pad: int = 1) -> tuple[int, int]:
    """(width, height) of a torchvision grid: nrow columns, ceil(n / nrow) rows, `pad` pixels around each cell."""
    cols, rows = min(nrow, n), -(-n // nrow)
    return cols * (side + pad) + pad, rows * (side + pad) + pad


# --- uint8 conversion ----------------------------------------------------------------------------------------


def test_to_uint8_nhwc_hand_values():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0, -2.0, 0.5, -0.999, 0.999]).view(1, 1, 2, 4)
    # clamp(127.5 x + 128, 0, 255), truncated to uint8 as DiT's sampler does:
    # -1 -> 0.5 -> 0 | 0 -> 128 | 1 -> 255.5 -> 255 | 2 -> 383 -> 255 | -2 -> -127 -> 0
    # 0.5 -> 191.75 -> 191 | -0.999 -> 0.6275 -> 0 | 0.999 -> 255.3725 -> 255
    expected = np.array([[0, 128, 255, 255], [0, 191, 0, 255]], dtype=np.uint8)
    out = to_uint8_nhwc(x)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 4, 3)
    for c in range(3):  # grey repeated to RGB
        np.testing.assert_array_equal(out[0, :, :, c], expected)


def test_to_uint8_nhwc_keeps_rgb_channel_order():
    x = torch.zeros(2, 3, 2, 2)
    x[:, 0], x[:, 1], x[:, 2] = -1.0, 0.0, 1.0
    out = to_uint8_nhwc(x)
    assert out.shape == (2, 2, 2, 3)
    assert (out[..., 0] == 0).all() and (out[..., 1] == 128).all() and (out[..., 2] == 255).all()


# --- end to end ----------------------------------------------------------------------------------------------


def test_grid_png(run_dir, tmp_path):
    out = tmp_path / "grid.png"
    rc = main(["sample", "--ckpt", str(run_dir / "checkpoints" / "last"), "--classes", "1", "3", "7", "--per-class",
                      "4", "--steps", "2", "--sampler", "ddim", "--cfg-scale", "3.0", "--out", str(out),
                      "--device", "cpu"])
    assert rc == 0
    with Image.open(out) as img:
        img.load()
        assert img.format == "PNG"
        assert img.size == grid_size(12, nrow=4, side=8)  # 3 rows (classes) x 4 columns
        pixels = np.asarray(img.convert("RGB"))
    assert (pixels[0] == 255).all() and (pixels[:, 0] == 255).all()  # white padding around the cells


def test_default_grid_is_one_row_per_class(run_dir, tmp_path):
    out = tmp_path / "all.png"
    assert main(["sample", "--ckpt", str(run_dir), "--per-class", "2", "--steps", "1", "--sampler", "ddim",
                        "--out", str(out), "--device", "cpu"]) == 0
    with Image.open(out) as img:
        assert img.size == grid_size(20, nrow=2, side=8)  # 10 classes x 2


def test_npz_is_adm_format_with_metadata(run_dir, tmp_path):
    out = tmp_path / "samples.npz"
    args = ["--ckpt", str(run_dir), "--num-samples", "7", "--batch-size", "4", "--steps", "2", "--sampler", "ddim",
            "--cfg-scale", "1.5", "--seed", "3", "--out", str(out), "--device", "cpu"]
    assert main(["sample", *args]) == 0
    with np.load(out) as f:
        arr, labels, meta = f["arr_0"], f["labels"], json.loads(str(f["metadata"]))
    assert arr.dtype == np.uint8 and arr.shape == (7, 8, 8, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()  # grey digits
    assert labels.shape == (7,) and labels.min() >= 0 and labels.max() < 10
    assert meta["sampler"] == "ddim" and meta["steps"] == 2 and meta["cfg_scale"] == 1.5
    assert meta["weights"] == "ema" and meta["num_samples"] == 7
    assert not list(tmp_path.glob("*.tmp*"))  # written through a temporary file, nothing left behind
    # the same seed gives the same samples
    again = tmp_path / "again.npz"
    assert main(["sample", *args[:-3], str(again), "--device", "cpu"]) == 0
    with np.load(again) as f:
        assert np.array_equal(f["arr_0"], arr) and np.array_equal(f["labels"], labels)


def test_sample_py_script_runs(run_dir, tmp_path, monkeypatch):
    """The thin script itself, run as __main__ (in this interpreter: a fresh one costs ~20 s of imports here)."""
    out = tmp_path / "script.png"
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", str(run_dir / "checkpoints" / "last"), "--classes", "0",
                                      "--per-class", "3", "--steps", "1", "--sampler", "ddim", "--out", str(out),
                                      "--device", "cpu"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / "sample.py"), run_name="__main__")
    assert info.value.code == 0
    with Image.open(out) as img:
        assert img.size == grid_size(3, nrow=3, side=8)


# --- clear errors --------------------------------------------------------------------------------------------


def run_error(capsys, args: list[str]) -> str:
    rc = main(["sample", *args, "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    return err


def test_missing_checkpoint(capsys, tmp_path):
    missing = tmp_path / "nope"
    err = run_error(capsys, ["--ckpt", str(missing), "--out", str(tmp_path / "g.png")])
    assert "not found" in err and str(missing) in err


def test_directory_that_is_not_a_checkpoint(capsys, tmp_path):
    err = run_error(capsys, ["--ckpt", str(tmp_path), "--out", str(tmp_path / "g.png")])
    assert "not a racedit checkpoint" in err


def test_checkpoint_that_does_not_fit_its_config(capsys, run_dir, tmp_path):
    """The config edits of these tests are refused by the manifest first (tests/test_integrity.py); --no-verify
    lets them reach the checks behind it."""
    ckpt = copy_checkpoint(run_dir, tmp_path)
    cfg = ckpt / "config.yaml"
    text = cfg.read_text()
    assert "hidden_size: 32" in text
    cfg.write_text(text.replace("hidden_size: 32", "hidden_size: 48"))
    err = run_error(capsys, ["--ckpt", str(ckpt), "--no-verify", "--out", str(tmp_path / "g.png")])
    assert "does not fit" in err and "shape" in err


def test_checkpoint_whose_config_builds_no_model(capsys, run_dir, tmp_path):
    ckpt = copy_checkpoint(run_dir, tmp_path)
    cfg = ckpt / "config.yaml"
    cfg.write_text(cfg.read_text().replace("hidden_size: 32", "hidden_size: 33"))  # 2 heads do not divide 33
    err = run_error(capsys, ["--ckpt", str(ckpt), "--no-verify", "--out", str(tmp_path / "g.png")])
    assert "hidden_size=33" in err and "num_heads=2" in err


def test_checkpoint_with_a_bad_config(capsys, run_dir, tmp_path):
    ckpt = copy_checkpoint(run_dir, tmp_path)
    cfg = ckpt / "config.yaml"
    cfg.write_text(cfg.read_text().replace("hidden_size: 32", "hidden_size: 32\n  widht: 3"))
    err = run_error(capsys, ["--ckpt", str(ckpt), "--no-verify", "--out", str(tmp_path / "g.png")])
    assert "model.widht" in err


def test_checkpoint_with_missing_or_damaged_weights(capsys, run_dir, tmp_path):
    ckpt = copy_checkpoint(run_dir, tmp_path)
    (ckpt / "ema.safetensors").unlink()
    err = run_error(capsys, ["--ckpt", str(ckpt), "--out", str(tmp_path / "g.png")])
    assert "ema.safetensors" in err and "missing" in err
    assert main(["sample", "--ckpt", str(ckpt), "--no-ema", "--classes", "2", "--per-class", "1", "--steps", "1",
                        "--sampler", "ddim", "--out", str(tmp_path / "live.png"), "--device", "cpu"]) == 0
    model = ckpt / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])  # truncated
    err = run_error(capsys, ["--ckpt", str(ckpt), "--no-ema", "--out", str(tmp_path / "g.png")])
    assert "model.safetensors" in err


def test_bad_class_and_sampler(capsys, run_dir, tmp_path):
    err = run_error(capsys, ["--ckpt", str(run_dir), "--classes", "12", "--out", str(tmp_path / "g.png")])
    assert "12" in err and "[0, 9]" in err
    err = run_error(capsys, ["--ckpt", str(run_dir), "--sampler", "euler", "--classes", "1", "--out",
                             str(tmp_path / "g.png")])
    assert "euler" in err and "ddpm" in err
    with pytest.raises(SystemExit) as info:  # argparse: --num-samples needs an .npz
        main(["sample", "--ckpt", str(run_dir), "--num-samples", "2", "--out", str(tmp_path / "x.png")])
    assert info.value.code == 2
