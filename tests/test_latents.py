"""Latent extraction (shards, manifest, skips, flips, resume), `LatentDataset`, the latent training loader
and the AutoencoderKL codec, on a tiny random-init VAE and a generated ImageFolder (no network).

Letters (docs/method/README.md): n_rows rows of a shard, n_img latents of a store, C latent channels, H x W
latent side.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from racedit.config import ConfigError, load_config
from racedit.data.codec import AutoencoderKLCodec, Codec
from racedit.data.factory import KeyedMicroBatches, LatentTrainingData, build_codec, build_training_data
from racedit.data.images import ImageFolder, load_image, to_model_range
from racedit.data.latent_extract import extract_latents, verify_shard
from racedit.data.latent_store import (
    KeyedIndices,
    LatentBatches,
    LatentDataset,
    LatentStoreError,
    read_manifest,
)
from racedit.data.order import ResumableBatchOrder
from racedit.testing import save_standin_vae, write_standin_image_folder

IMAGE_SIZE, SHARD_SIZE = 32, 12  # 32 files (30 images + 2 bad) -> shards of 12, 12, 8 files


def extract(images, vae, out, **kw):
    kw = {"image_size": IMAGE_SIZE, "batch_size": 5, "shard_size": SHARD_SIZE, "num_workers": 0,
          "progress": False, **kw}
    return extract_latents(images, vae, out, **kw)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    images = write_standin_image_folder(root / "images", num_classes=3, per_class=10, size=40)
    vae = save_standin_vae(root / "vae")
    result = extract(images, vae, root / "out")
    return {"root": root, "images": images, "vae": vae, "out": root / "out", "result": result}


# ---- extraction -----------------------------------------------------------------------------------------


def test_extraction_writes_shards_and_manifest(store):
    out, result = store["out"], store["result"]
    assert (result.num_files, result.num_latents, result.num_skipped) == (32, 30, 2)
    assert (result.shards_total, result.shards_written, result.shards_reused) == (3, 3, 0)
    m = read_manifest(out)
    assert m["vae"] == str(store["vae"]) and m["vae_path"] == str(store["vae"].resolve())
    assert m["resolution"] == IMAGE_SIZE and m["scaling_factor"] == pytest.approx(0.18215)
    assert m["latent_shape"] == [4, 4, 4] and m["downsample"] == 8 and m["store_dtype"] == "float16"
    assert m["classes"] == ["class_00", "class_01", "class_02"]
    assert m["class_to_idx"] == {"class_00": 0, "class_01": 1, "class_02": 2}
    assert json.loads((out / "class_to_idx.json").read_text()) == m["class_to_idx"]
    assert (m["num_files"], m["num_latents"], m["num_skipped"]) == (32, 30, 2)
    assert m["counts_per_class"] == [10, 10, 10]
    assert [s["path"] for s in m["skipped"]] == ["class_00/broken.png", "class_01/notes.txt"]
    assert all(s["reason"] for s in m["skipped"])
    assert [s["rows"] for s in m["shards"]] == [11, 11, 8]  # broken.png in shard 0, notes.txt in shard 1
    assert [s["files"] for s in m["shards"]] == [[0, 12], [12, 24], [24, 32]]
    assert not list(out.glob("*.tmp*"))
    folder = ImageFolder(store["images"], IMAGE_SIZE)
    for s in m["shards"]:
        d = out / s["name"]
        assert verify_shard(d, checksums=True) is None
        moments = np.load(d / "moments.npy", mmap_mode="r")
        labels, index = np.load(d / "labels.npy"), np.load(d / "file_index.npy")
        assert moments.shape == (s["rows"], 2, 2, 4, 4, 4) and moments.dtype == np.float16
        assert labels.shape == index.shape == (s["rows"],) and labels.dtype == np.int64
        assert all(s["files"][0] <= i < s["files"][1] for i in index)
        assert [folder.files[i][1] for i in index] == labels.tolist()
        assert np.all(np.asarray(moments[:, :, 1]) > 0)  # std


def test_stored_flips_are_the_mirrored_images(store):
    out = store["out"]
    folder = ImageFolder(store["images"], IMAGE_SIZE)
    codec = AutoencoderKLCodec(str(store["vae"]))
    moments = np.load(out / "shard-00001" / "moments.npy").astype(np.float32)
    index = np.load(out / "shard-00001" / "file_index.npy")
    rows = [0, 5, 10]
    x = torch.stack([torch.from_numpy(load_image(store["images"] / folder.files[index[r]][0], IMAGE_SIZE))
                     for r in rows]).permute(0, 3, 1, 2)
    x = to_model_range(x)
    for flip, images in ((0, x), (1, x.flip(-1))):
        mean, std = codec.encode_moments(images)
        np.testing.assert_allclose(moments[rows, flip, 0], mean.numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(moments[rows, flip, 1], std.numpy(), rtol=2e-3, atol=1e-5)
    # the two stored flips differ (the stand-in images are asymmetric)
    assert np.abs(moments[:, 0, 0] - moments[:, 1, 0]).max() > 1e-2


def test_killed_extraction_resumes_to_the_same_shards(store, tmp_path):
    out = tmp_path / "out"

    def crash(i):
        if i == 0:
            raise KeyboardInterrupt("simulated kill after the first shard")

    with pytest.raises(KeyboardInterrupt):
        extract(store["images"], store["vae"], out, on_shard_done=crash)
    assert (out / "shard-00000").is_dir() and not (out / "shard-00001").exists()
    assert not (out / "manifest.json").exists()
    with pytest.raises(LatentStoreError, match="did not finish"):
        read_manifest(out)
    # a half-written shard left by a kill (temporary name) is never taken for a complete one
    (out / "shard-00001.tmp-999").mkdir()
    (out / "shard-00001.tmp-999" / "moments.npy").write_bytes(b"partial")
    result = extract(store["images"], store["vae"], out)
    assert (result.shards_reused, result.shards_written) == (1, 2)
    assert not list(out.glob("*.tmp*"))
    for i in range(3):
        name = f"shard-{i:05d}"
        for f in ("moments.npy", "labels.npy", "file_index.npy", "shard.json"):
            assert (out / name / f).read_bytes() == (store["out"] / name / f).read_bytes(), (name, f)
    fresh, again = read_manifest(store["out"]), read_manifest(out)
    for key in ("num_latents", "skipped", "shards", "classes", "counts_per_class"):
        assert again[key] == fresh[key]


def test_rerun_verifies_reuses_and_repairs(store, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(store["out"], out)
    assert extract(store["images"], store["vae"], out).shards_reused == 3
    moments = out / "shard-00002" / "moments.npy"
    moments.write_bytes(moments.read_bytes()[:-10])  # damaged: a truncated array
    result = extract(store["images"], store["vae"], out, verify_checksums=True)
    assert (result.shards_reused, result.shards_written) == (2, 1)
    assert moments.read_bytes() == (store["out"] / "shard-00002" / "moments.npy").read_bytes()
    with pytest.raises(LatentStoreError, match="other settings"):
        extract(store["images"], store["vae"], out, store_dtype="float32")


# ---- LatentDataset --------------------------------------------------------------------------------------


def stored(store) -> tuple[np.ndarray, np.ndarray]:
    """All moments (n_img, 2, 2, C, H, W) float32 and labels (n_img,) in dataset order."""
    shards = read_manifest(store["out"])["shards"]
    m = np.concatenate([np.load(store["out"] / s["name"] / "moments.npy") for s in shards]).astype(np.float32)
    y = np.concatenate([np.load(store["out"] / s["name"] / "labels.npy") for s in shards])
    return m, y


def test_dataset_reads_one_of_the_flips_sampled_from_the_posterior(store):
    moments, labels = stored(store)
    mean_ds = LatentDataset(store["out"], sample_posterior=False)
    assert len(mean_ds) == 30 and mean_ds.num_classes == 3 and mean_ds.latent_shape == (4, 4, 4)
    assert torch.equal(mean_ds.labels, torch.from_numpy(labels))
    x, y = mean_ds.read(np.arange(30))
    assert x.shape == (30, 4, 4, 4) and x.dtype == torch.float32 and torch.equal(y, mean_ds.labels)
    is_flip = [[np.array_equal(x[i].numpy(), moments[i, f, 0]) for f in (0, 1)] for i in range(30)]
    assert all(any(pair) for pair in is_flip)
    flips = [pair.index(True) for pair in is_flip]
    assert 5 < sum(flips) < 25  # both flips occur
    noflip = LatentDataset(store["out"], sample_posterior=False, flip=False)
    np.testing.assert_array_equal(noflip.read(np.arange(30))[0].numpy(), moments[:, 0, 0])

    ds = LatentDataset(store["out"])  # posterior samples: mean + std * eps around the same flips
    xs, _ = ds.read(np.arange(30))
    for i in range(30):
        mean, std = moments[i, flips[i], 0], moments[i, flips[i], 1]
        z = (xs[i].numpy() - mean) / std
        assert np.abs(z).max() < 6 and 0.3 < z.std() < 2.0
    assert not torch.equal(xs, x)


def test_dataset_randomness_depends_only_on_seed_epoch_and_index(store):
    ds = LatentDataset(store["out"], seed=3)
    idx = [7, 2, 29, 11]
    x, _ = ds.read(idx, epoch=5)
    assert torch.equal(x, ds.read(idx, epoch=5)[0])
    singles = torch.stack([ds.read([i], epoch=5)[0][0] for i in idx])
    assert torch.equal(x, singles)  # the batch it is read in does not matter
    assert torch.equal(ds.read([2, 29], epoch=5)[0], x[1:3])
    assert not torch.equal(x, ds.read(idx, epoch=6)[0])
    assert not torch.equal(x, LatentDataset(store["out"], seed=4).read(idx, epoch=5)[0])
    ds.set_epoch(5)
    assert torch.equal(ds[29][0], x[2]) and ds[29][1] == int(ds.labels[29])
    got = ds.__getitems__(KeyedIndices(idx, epoch=5))
    assert torch.equal(torch.stack([g[0] for g in got]), x)
    assert ds.read([], epoch=5)[0].shape == (0, 4, 4, 4)
    with pytest.raises(IndexError):
        ds.read([30])


def test_dataset_with_dataloader_and_two_workers(store):
    ds = LatentDataset(store["out"], seed=1)
    ds.set_epoch(2)
    loader = DataLoader(ds, batch_size=8, shuffle=False, num_workers=2)
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(8, 4, 4, 4)] * 3 + [(6, 4, 4, 4)]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert torch.equal(y, ds.labels)
    assert torch.equal(x, ds.read(np.arange(30), epoch=2)[0])
    # whole batches per item (LatentBatches), keyed by the epoch the index list carries
    keyed = [KeyedIndices([4, 9, 0], epoch=2), KeyedIndices([29, 5], epoch=7)]
    got = list(DataLoader(LatentBatches(ds), batch_size=None, sampler=keyed, num_workers=2))
    assert torch.equal(got[0][0], x[[4, 9, 0]]) and torch.equal(got[0][1], ds.labels[[4, 9, 0]])
    assert torch.equal(got[1][0], ds.read([29, 5], epoch=7)[0]) and not torch.equal(got[1][0], x[[29, 5]])
    # item-wise access through workers too (no batch_size: __getitem__)
    items = list(DataLoader(ds, batch_size=None, sampler=[3, 17], num_workers=2))
    assert torch.equal(items[1][0], x[17]) and int(items[1][1]) == int(ds.labels[17])


def test_training_loader_is_resumable_and_the_same_for_any_number_of_processes(store):
    cfg = load_config(None, ["data.kind=latents", f"data.latents={store['out']}", "data.num_workers=2",
                             "train.seed=4"])
    data = build_training_data(cfg)
    assert isinstance(data, LatentTrainingData)
    assert (data.num_examples, data.channels, data.size, data.num_classes) == (30, 4, 4, 3)
    global_batch, steps = 8, 7  # 3 steps per epoch: crosses two epoch boundaries
    one = ResumableBatchOrder(30, global_batch, 4)
    it = data.loader(one, 0, "cpu")
    single = [next(it) for _ in range(steps)]
    for s in range(steps):  # the loader serves exactly what the dataset reads for the step's indices
        x, y = data.dataset.read(one.step_indices(s)[0], epoch=s // one.steps_per_epoch)
        assert torch.equal(single[s][0], x) and torch.equal(single[s][1], y)
    # two processes with two accumulation micro-batches each: concatenating (a, r) in order gives the batch
    parts = []
    for rank in range(2):
        order = ResumableBatchOrder(30, global_batch, 4, world_size=2, rank=rank, grad_accum=2)
        it = data.loader(order, 0, "cpu")
        parts.append([next(it) for _ in range(2 * steps)])
    for s in range(steps):
        xs = torch.cat([parts[r][2 * s + a][0] for a in range(2) for r in range(2)])
        ys = torch.cat([parts[r][2 * s + a][1] for a in range(2) for r in range(2)])
        # micro-batch (a, r) holds rows (a * 2 + r) * 2 ... of the step's batch
        assert torch.equal(xs, single[s][0]) and torch.equal(ys, single[s][1])
    resumed = data.loader(ResumableBatchOrder(30, global_batch, 4), 4, "cpu")
    for s in range(4, steps):
        x, y = next(resumed)
        assert torch.equal(x, single[s][0]) and torch.equal(y, single[s][1])
    batches = KeyedMicroBatches(one, 3)
    first = next(iter(batches))
    assert isinstance(first, KeyedIndices) and first.epoch == 1 and first == one.step_indices(3)[0].tolist()


def test_config_and_missing_latents_errors(store, tmp_path):
    with pytest.raises(ConfigError, match="data.latents"):
        load_config(None, ["data.kind=latents"])
    cfg = load_config(None, ["data.kind=latents", f"data.latents={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match="racedit extract-latents"):
        build_training_data(cfg)


# ---- the AutoencoderKL codec ----------------------------------------------------------------------------


def test_build_codec_is_lazy_and_decodes_with_the_manifest_vae(store, tmp_path):
    cfg = load_config(None, ["data.kind=latents", f"data.latents={store['out']}"])
    codec = build_codec(cfg)
    assert isinstance(codec, AutoencoderKLCodec) and isinstance(codec, Codec)
    assert (codec.channels, codec.downsample, codec.model_size(256)) == (4, 8, 32)
    assert codec.scaling_factor == pytest.approx(0.18215) and not codec.loaded  # training never loads it
    z = LatentDataset(store["out"], sample_posterior=False).read([0, 1])[0]
    images = codec.decode(z)
    assert codec.loaded and images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    # round trip through the encoding extraction uses (random VAE: only the scale must be right)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z2, std = codec.encode_moments(x)
    vae = codec.vae
    posterior = vae.encode(x).latent_dist
    torch.testing.assert_close(z2, posterior.mean * vae.config.scaling_factor)
    torch.testing.assert_close(std, posterior.std * vae.config.scaling_factor)
    torch.testing.assert_close(codec.decode(z2), vae.decode(z2 / vae.config.scaling_factor).sample)

    # an override VAE (sample.py --vae), and a checkpoint whose latent directory is not on this machine
    other = save_standin_vae(tmp_path / "other_vae", seed=1)
    assert build_codec(cfg, vae=str(other)).vae_id == str(other)
    gone = load_config(None, ["data.kind=latents", f"data.latents={tmp_path / 'moved'}"])
    with pytest.raises(ConfigError, match="--vae"):
        build_codec(gone)
    codec = build_codec(gone, vae=str(other))
    assert codec.scaling_factor == pytest.approx(0.18215) and codec.channels == 4  # from the VAE config
    with pytest.raises(FileNotFoundError):
        AutoencoderKLCodec(str(tmp_path / "missing" / "dir" / "x")).decode(torch.zeros(1, 4, 2, 2))
