"""The embedded digits: dataset and split, the identity codec, the digits classifier and its cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from racedit.data import DigitsDataset, digits_split_indices
from racedit.data.digits import load_digits_arrays
from racedit.data.factory import build_codec, build_training_data
from racedit.evaluation import digits as ev
from racedit.evaluation.digits import (
    MIN_HOLDOUT_ACCURACY,
    classifier_features,
    load_digits_classifier,
    sample_class_accuracy,
)

# ---- dataset ---------------------------------------------------------------------------------------------


def test_dataset_shapes_range_labels_and_counts():
    train, hold = DigitsDataset("train"), DigitsDataset("holdout")
    assert len(train) + len(hold) == 1797
    assert len(hold) == round(1797 * 0.1)
    for ds in (train, hold):
        assert ds.images.shape == (len(ds), 1, 8, 8) and ds.images.dtype == torch.float32
        assert ds.labels.shape == (len(ds),) and ds.labels.dtype == torch.int64
        assert ds.images.min() == -1.0 and ds.images.max() == 1.0  # 0 and 16 both occur in the raw data
        assert set(ds.labels.tolist()) == set(range(10))
    x, y = train[5]
    assert x.shape == (1, 8, 8) and isinstance(y, int)
    assert torch.equal(x, train.images[5]) and y == train.labels[5]
    # the scaling is intensity / 16 * 2 - 1, and labels follow their images
    raw_images, raw_labels = load_digits_arrays()
    i = int(hold.indices[3])
    assert torch.allclose(hold.images[3, 0], torch.tensor(raw_images[i]) / 8.0 - 1.0)
    assert hold.labels[3] == raw_labels[i]


def test_split_disjoint_covering_deterministic_and_seeded():
    a_train, a_hold = DigitsDataset("train"), DigitsDataset("holdout")
    b_hold = DigitsDataset("holdout")
    train_idx, hold_idx = set(a_train.indices.tolist()), set(a_hold.indices.tolist())
    assert not train_idx & hold_idx
    assert train_idx | hold_idx == set(range(1797))
    assert torch.equal(a_hold.indices, b_hold.indices)
    assert not torch.equal(DigitsDataset("holdout", seed=1).indices, a_hold.indices)
    assert len(DigitsDataset("holdout", holdout_fraction=0.25)) == round(1797 * 0.25)
    # pinned: a change of algorithm or generator would silently change every "held-out" number
    assert a_hold.indices[:5].tolist() == _FIRST_HOLDOUT_INDICES


_FIRST_HOLDOUT_INDICES = [13, 19, 43, 48, 55]


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.37])
def test_split_is_stratified(fraction):
    _, labels = load_digits_arrays()
    _, hold = digits_split_indices(labels, fraction, seed=0)
    sizes = np.bincount(labels, minlength=10)
    held = np.bincount(labels[hold], minlength=10)
    assert held.sum() == round(len(labels) * fraction)
    share = sizes * held.sum() / sizes.sum()  # proportional share of the held-out total
    assert np.all(np.abs(held - share) < 1.0), (held, share)


def test_split_edge_fractions():
    _, labels = load_digits_arrays()
    train, hold = digits_split_indices(labels, 0.0)
    assert len(hold) == 0 and len(train) == 1797
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError):
            digits_split_indices(labels, bad)
    with pytest.raises(ValueError):
        DigitsDataset("test")


@pytest.mark.parametrize("size", [4, 16, 32])
def test_resize(size):
    native, ds = DigitsDataset("holdout"), DigitsDataset("holdout", image_size=size)
    assert ds.images.shape == (len(native), 1, size, size)
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0
    assert torch.equal(ds.labels, native.labels)
    # a resize keeps the picture: the mean intensity of each image barely moves
    assert torch.allclose(ds.images.mean((1, 2, 3)), native.images.mean((1, 2, 3)), atol=0.1)


# ---- codec -----------------------------------------------------------------------------------------------


def test_the_digits_codec_keeps_the_raw_pixels(tiny_config):
    """A digits run works in pixel space: what the training data hands the model is scikit-learn's raw
    0..16 intensities mapped linearly to [-1, 1] (0 -> -1, 16 -> 1; read here from sklearn directly), the
    codec decodes them unchanged, and the model side the codec derives from the data side is the configured
    model's."""
    from sklearn.datasets import load_digits

    cfg = tiny_config()
    codec = build_codec(cfg)
    assert codec.channels == cfg.model.in_channels
    assert codec.model_size(cfg.data.image_size) == cfg.model.input_size
    data = build_training_data(cfg)
    rows = torch.tensor([0, 1, 2, 500, len(data.labels) - 1])
    z = data.read(rows)  # model space: the digits need no encoding
    raw = load_digits()
    train = DigitsDataset("train", holdout_fraction=cfg.data.holdout_fraction)
    source = train.indices[rows].numpy()
    expected = torch.from_numpy(raw.images[source]).float().unsqueeze(1) / 8.0 - 1.0
    assert torch.equal(z, expected)
    assert torch.equal(data.labels[rows], torch.from_numpy(raw.target[source]))
    assert torch.equal(codec.decode(z), expected)
    with pytest.raises(ValueError):
        codec.decode(torch.zeros(2, 3, 8, 8))  # wrong channel count


# ---- classifier ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One classifier trained into a fresh cache dir (the slow part of this file, done once)."""
    cache = tmp_path_factory.mktemp("cache")
    model = load_digits_classifier(8, cache_dir=cache)
    return model, cache


def _cache_file(cache):
    files = list(cache.glob("digits_classifier_*.safetensors"))
    assert len(files) == 1, files
    return files[0]


def test_classifier_accuracy_and_cache_reuse(trained, monkeypatch):
    model, cache = trained
    hold = DigitsDataset("holdout")
    acc = sample_class_accuracy(model, hold.images, hold.labels)
    assert acc >= MIN_HOLDOUT_ACCURACY
    assert not model.training
    path = _cache_file(cache)
    mtime = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cache was valid")

    monkeypatch.setattr(ev, "train_digits_classifier", no_training)
    again = load_digits_classifier(8, cache_dir=cache)
    assert path.stat().st_mtime_ns == mtime
    assert again is not model
    assert again.holdout_accuracy == pytest.approx(model.holdout_accuracy, abs=1e-6)
    assert model.holdout_accuracy == pytest.approx(acc)  # measured on the same held-out split
    with torch.no_grad():
        assert torch.equal(again(hold.images), model(hold.images))
    assert not list(cache.glob("*.tmp"))  # the atomic write left no temporary file behind


def test_cache_dir_from_environment(trained, monkeypatch):
    _, cache = trained
    monkeypatch.setenv("RACEDIT_CACHE", str(cache))
    assert ev._cache_path(8, None) == _cache_file(cache)
    assert ev._cache_path(16, None) != ev._cache_path(8, None)  # settings that change the weights change the key


def test_sample_class_accuracy_hand_built(trained):
    model, _ = trained
    hold = DigitsDataset("holdout")
    assert sample_class_accuracy(model, hold.images, hold.labels) >= 0.97
    shuffled = hold.labels[torch.randperm(len(hold), generator=torch.Generator().manual_seed(0))]
    assert 0.0 <= sample_class_accuracy(model, hold.images, shuffled) <= 0.25
    wrong = (hold.labels + 1) % 10
    assert sample_class_accuracy(model, hold.images, wrong) <= 0.03
    # small batches give the same answer as one batch
    assert sample_class_accuracy(model, hold.images, hold.labels, batch_size=7) == \
        sample_class_accuracy(model, hold.images, hold.labels)
    with pytest.raises(ValueError):
        sample_class_accuracy(model, hold.images, hold.labels[:-1])


def test_classifier_any_size_and_features(trained):
    model, _ = trained
    hold16 = DigitsDataset("holdout", image_size=16)
    # the 8x8 classifier resizes internally; a 16x16 copy of the held-out set is still recognised
    assert sample_class_accuracy(model, hold16.images, hold16.labels) >= 0.9
    feats = classifier_features(model, hold16.images[:33], batch_size=10)
    assert feats.shape == (33, ev.FEATURE_DIM) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # after a ReLU
    assert torch.allclose(feats, classifier_features(model, hold16.images[:33]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_corrupt_cache_is_retrained(trained, tmp_path, monkeypatch, damage):
    model, cache = trained
    good = _cache_file(cache)
    path = tmp_path / good.name
    if damage == "truncated":  # what a crash mid-write would leave without the atomic rename
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a safetensors file")
    else:  # a valid safetensors file holding other tensors
        save_file({"weight": torch.zeros(3)}, path)
    calls = []

    def fake_train(image_size, verbose=True):  # stands in for the (already tested) training run
        calls.append(image_size)
        return model

    monkeypatch.setattr(ev, "train_digits_classifier", fake_train)
    with pytest.warns(UserWarning, match="unreadable"):
        recovered = load_digits_classifier(8, cache_dir=tmp_path)
    assert calls == [8] and recovered is model
    # the cache was rewritten and now loads without training
    monkeypatch.setattr(ev, "train_digits_classifier", None)
    reloaded = load_digits_classifier(8, cache_dir=tmp_path)
    hold = DigitsDataset("holdout")
    with torch.no_grad():
        assert torch.equal(reloaded(hold.images), model(hold.images))
    assert [p.name for p in tmp_path.iterdir()] == [good.name]  # no temporary file left behind


def test_crash_while_saving_keeps_the_old_cache(trained, tmp_path, monkeypatch):
    model, cache = trained
    path = tmp_path / _cache_file(cache).name
    path.write_bytes(_cache_file(cache).read_bytes())

    def crashing_save(tensors, filename, metadata=None):  # writes half a file, then dies
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "save_file", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        ev._save_atomic(model, path, 8)
    assert path.read_bytes() == _cache_file(cache).read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
