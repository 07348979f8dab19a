"""FID math, Inception weights handling, and the whole `racedit fid` path on random-init Inception weights (offline).

The Inception network is torch-fidelity's, with random weights saved to a temp file and passed as
--inception-weights. To keep CPU time low the extractor's resize target is patched from 299 to 75 (the
smallest input Inception-v3 accepts); everything else is the real path.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from racedit.cli import main
from racedit.evaluation import fid as F
from racedit.evaluation import inception as Inc
from racedit.evaluation import metrics as M

N = 64


# ------------------------------------------------------------------------------------------------ the math


def _random_orthogonal(d, rng):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


def test_frechet_distance_closed_form_commuting_covariances():
    rng = np.random.default_rng(0)
    d = 12
    q = _random_orthogonal(d, rng)
    a, b = rng.uniform(0.05, 3.0, d), rng.uniform(0.05, 3.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    # diagonal, and the same eigenbasis (commuting): sqrt(S1 S2) = Q diag(sqrt(a b)) Q^T
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)
    # torch tensors and float32 inputs work too; 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2
    assert M.frechet_distance(torch.tensor(mu1), torch.tensor(s1, dtype=torch.float32), mu2, s2) == pytest.approx(
        expected, rel=1e-4)
    assert M.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_distance_zero_for_identical_statistics():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 64)) @ rng.normal(size=(64, 64))
    mu, sigma = M.gaussian_statistics(x)
    assert abs(M.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)
    # rank-deficient covariances (fewer samples than dimensions): finite, and equal to the eigenvalue form
    y = rng.normal(size=(10, 40))
    z = rng.normal(size=(12, 40)) * 1.5 + 0.2
    (m1, s1), (m2, s2) = M.gaussian_statistics(y), M.gaussian_statistics(z)
    exact = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * M._trace_sqrt_product(s1, s2)
    assert M.frechet_distance(m1, s1, m2, s2) == pytest.approx(exact, rel=1e-6)
    with pytest.raises(ValueError, match="NaN"):
        M.frechet_distance(mu, sigma * np.nan, mu, sigma)


def test_precision_recall_matches_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    gen = torch.randn(40, 6, generator=g)
    ref = torch.randn(30, 6, generator=g) * 1.3 + 0.4
    k = 3

    def dist(p, q):
        return sum((a - b) ** 2 for a, b in zip(p, q)) ** 0.5

    def radii(x):  # distance to the k-th nearest other point
        return [sorted(dist(x[i], x[j]) for j in range(len(x)) if j != i)[k - 1] for i in range(len(x))]

    def covered(points, centers, r):
        return np.mean([any(dist(p, c) <= rc for c, rc in zip(centers, r)) for p in points])

    gl, rl = gen.double().tolist(), ref.double().tolist()
    precision, recall = M.precision_recall(gen, ref, k=k, batch_size=7)
    assert precision == pytest.approx(covered(gl, rl, radii(rl)), abs=1e-6)
    assert recall == pytest.approx(covered(rl, gl, radii(gl)), abs=1e-6)
    assert M.precision_recall(ref, ref, k=k) == (1.0, 1.0)


def test_inception_score_uses_ordered_splits():
    logits = torch.randn(50, 1008, generator=torch.Generator().manual_seed(0)) * 3
    mean, std = M.inception_score(logits, splits=10)
    p = logits.double().softmax(1)
    scores = []
    for part in p.split(5):
        kl = (part * (part.log() - part.mean(0, keepdim=True).log())).sum(1).mean()
        scores.append(kl.exp().item())
    assert mean == pytest.approx(np.mean(scores)) and std == pytest.approx(np.std(scores))


# ---------------------------------------------------------------------------------------------- weights


def test_weights_hash_in_the_name_is_checked(tmp_path):
    data = b"not really inception weights"
    digest = hashlib.sha256(data).hexdigest()
    good = tmp_path / f"weights-{digest[:8]}.pth"
    good.write_bytes(data)
    with pytest.warns(UserWarning, match="not torch-fidelity's weights"):
        w = Inc.resolve_inception_weights(good)
    assert w.verified and w.sha256 == digest and w.expected_prefix == digest[:8]
    bad = tmp_path / f"weights-inception-2015-12-05-{Inc.INCEPTION_SHA256_PREFIX}.pth"
    bad.write_bytes(data)
    with pytest.raises(Inc.InceptionWeightsError, match=f"does not start with {Inc.INCEPTION_SHA256_PREFIX}"):
        Inc.resolve_inception_weights(bad)
    plain = tmp_path / "inception.pth"  # no hash in the name: accepted, not verified, with a warning
    plain.write_bytes(data)
    with pytest.warns(UserWarning, match="not comparable"):
        assert not Inc.resolve_inception_weights(plain).verified
    with pytest.raises(Inc.InceptionWeightsError, match="not found"):
        Inc.resolve_inception_weights(tmp_path / "missing.pth")
    with pytest.warns(UserWarning), pytest.raises(Inc.InceptionWeightsError, match="cannot read"):
        Inc.load_inception(Inc.resolve_inception_weights(plain))


def test_default_weights_without_network_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(Inc.InceptionWeightsError, match="--inception-weights"):
        Inc.resolve_inception_weights(None)
    # a file already in the hub cache is used, and its hash is checked against torch-fidelity's
    cached = Inc.default_inception_path()
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"corrupt download")
    with pytest.raises(Inc.InceptionWeightsError, match="damaged"):
        Inc.resolve_inception_weights(None)


# ------------------------------------------------------------------------------------ the racedit fid path


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random (He-normal) weights, saved like the real file; input 75x75."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe, "load_state_dict_from_url", return_value=None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
        net = fe.FeatureExtractorInceptionV3("random", ["2048"])
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
            m.weight.data = torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fe.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)
        yield path


SAMPLING_KEYS = ("checkpoint", "weights", "sampler", "steps", "cfg_scale", "guidance_channels", "per_device_batch",
                 "inference_routing")


def _images(n, seed, size=16):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, 1, 3))  # per-image colour + noise: varied Inception features
    return np.clip(base + rng.integers(-60, 60, (n, size, size, 3)), 0, 255).astype(np.uint8)


def run_fid(argv) -> int:
    """`racedit fid ARGV...`: its exit status."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not torch-fidelity's weights.*")
        return main(["fid", *map(str, argv)])


def test_racedit_fid_npz_folder_and_adm_reference(inception_weights, tmp_path, capsys):
    images = _images(N, 0)
    meta = {"checkpoint": "runs/x/checkpoints/step_0400000", "step": 400000, "weights": "ema", "model": "DiT-XL/2",
            "sampler": "ddpm", "steps": 250, "cfg_scale": 1.5, "guidance_channels": "all", "per_device_batch": 32,
            "inference_routing": "threshold", "seed": 0, "labels": "uniform"}
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=images, labels=np.arange(N) % 10, metadata=np.array(json.dumps(meta)))
    folder = tmp_path / "samples_png"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:05d}.png")

    # 1. statistics of the samples (library call), as `racedit fid samples.npz --save-stats` writes them
    stats = tmp_path / "stats.npz"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not torch-fidelity's weights.*")
        report = F.evaluate(samples, None, inception_weights, save_stats_path=stats, progress=False)
    assert report["reference"] is None and "fid" not in report["metrics"] and report["saved_stats"] == str(stats)
    with np.load(stats) as z:
        mu, sigma, feats = z["mu"], z["sigma"], z["features"]
        mu_s, sigma_s = z["mu_s"], z["sigma_s"]
        stats_meta = json.loads(str(z["metadata"]))
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and feats.shape == (N, 2048)
    d_s = 7 * 3 * 3  # sFID features: 7 channels of Mixed_6d's 17x17 map, 3x3 at the tests' 75 px input
    assert mu_s.shape == (d_s,) and sigma_s.shape == (d_s, d_s)
    assert stats_meta["count"] == N and stats_meta["format"] == F.STATS_FORMAT
    assert np.isfinite(feats).all() and feats.std(0).mean() > 1e-3  # the random network separates the images

    # 2. an ADM-layout reference batch: mu/sigma (here the samples' own) and 32 other images for P/R
    ref_images = _images(32, 1, size=24)
    adm = tmp_path / "VIRTUAL_test_labeled.npz"
    np.savez(adm, arr_0=ref_images, mu=mu, sigma=sigma, mu_s=np.zeros(d_s), sigma_s=np.eye(d_s))
    out_json = tmp_path / "adm.json"
    assert run_fid([samples, "--ref", adm, "--inception-weights", inception_weights, "--kid",
                    "--out", out_json, "--quiet"]) == 0
    screen = capsys.readouterr().out
    r = json.loads(out_json.read_text())
    m = r["metrics"]
    # FID used the stored mu/sigma (the samples' own statistics), not the 32 reference images
    assert abs(m["fid"]) < 1e-5 * np.trace(sigma)
    # sFID against N(0, I): |mu_s|^2 + tr(S) + D - 2 sum(sqrt(eig(S))), the closed form
    eig = np.clip(np.linalg.eigvalsh(sigma_s), 0, None)
    expected = np.sum(mu_s ** 2) + np.trace(sigma_s) + d_s - 2 * np.sum(np.sqrt(eig))
    assert m["sfid"] == pytest.approx(expected, rel=1e-6)
    assert r["reference"]["kind"] == "adm_npz" and r["reference"]["fid_statistics"] == "stored mu/sigma"
    assert r["reference"]["images"] == 32 and r["reference"]["features_for_precision_recall"] == 32
    assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0 and np.isfinite(m["kid"])
    assert m["inception_score"] >= 1.0 and r["settings"]["isc_splits"] == 10
    assert r["samples"] == {"path": str(samples.resolve()), "format": "npz", "count": N, "available": N,
                            "image_size": [16, 16]}
    w = r["feature_extractor"]["weights"]
    assert w["sha256"] == hashlib.sha256(inception_weights.read_bytes()).hexdigest() and w["source"] == "path"
    assert not w["is_torch_fidelity_weights"]
    assert "torch-fidelity" in r["feature_extractor"]["name"] and r["feature_extractor"]["torch_fidelity_version"]
    assert r["label"] == f"FID-{N}" and r["sampling"] == meta
    assert all(k in r["sampling"] for k in SAMPLING_KEYS)
    for word in ("FID", "sFID", "IS", "precision", "KID", "samples", "reference", "weights", w["sha256"][:16],
                 "cfg_scale=1.5", "guidance_channels=all", "per_device_batch=32", "inference_routing=threshold"):
        assert word in screen, word

    # 3. the same images as a folder of PNGs, against the racedit stats file: identical features
    assert run_fid([folder, "--ref", stats, "--inception-weights", inception_weights, "--quiet"]) == 0
    r = json.loads((tmp_path / "samples_png.fid.json").read_text())
    assert r["samples"]["format"] == "folder" and r["samples"]["count"] == N
    assert r["reference"]["kind"] == "racedit_stats" and r["sampling"] is None
    assert abs(r["metrics"]["fid"]) < 1e-5 * np.trace(sigma)
    assert abs(r["metrics"]["sfid"]) < 1e-5 * np.trace(sigma_s)
    assert r["metrics"]["precision"] == 1.0 and r["metrics"]["recall"] == 1.0
    assert not any("different feature spaces" in n for n in r["notes"])


def test_racedit_fid_errors(inception_weights, tmp_path, capsys):
    floats = tmp_path / "float.npz"
    np.savez(floats, arr_0=np.zeros((4, 8, 8, 3), np.float32))
    assert run_fid([floats, "--ref", floats, "--inception-weights", inception_weights]) == 2
    assert "uint8 images (N, H, W, 3)" in capsys.readouterr().err
    wrong = tmp_path / f"weights-inception-2015-12-05-{Inc.INCEPTION_SHA256_PREFIX}.pth"
    wrong.write_bytes(inception_weights.read_bytes())  # the name promises torch-fidelity's hash
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=_images(4, 0))
    assert run_fid([good, "--ref", good, "--inception-weights", wrong]) == 2
    assert "does not start with 6726825d" in capsys.readouterr().err


def test_sfid_features_are_the_first_7_channels_of_mixed_6d_1x1_branch_in_hwc_order(inception_weights):
    """The spatial features against a hand-run conv + BN + ReLU on the input of Mixed_6d, index by index."""
    import torch.nn.functional as nnf

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not torch-fidelity's weights.*")
        extractor = Inc.load_inception(Inc.resolve_inception_weights(inception_weights))
    block_input = []
    hook = extractor.Mixed_6d.register_forward_pre_hook(lambda m, args: block_input.append(args[0].clone()))
    batch = _images(5, 3)

    class FiveImages:  # an image source without a file: one batch of 5
        def __len__(self):
            return 5

        def batches(self, batch_size, limit=None):
            return iter([batch])

    try:
        feats = Inc.extract_features(extractor, FiveImages(), progress=False)
    finally:
        hook.remove()
    (x,) = block_input
    branch = extractor.Mixed_6d.branch1x1
    bn = branch.bn
    ref = nnf.relu(nnf.batch_norm(nnf.conv2d(x, branch.conv.weight), bn.running_mean, bn.running_var, bn.weight,
                                  bn.bias, training=False, eps=bn.eps))
    spatial = feats[Inc.SFID_FEATURE]
    n, _, h, w = ref.shape
    assert spatial.shape == (5, h * w * 7) and (n, h, w) == (5, 3, 3)
    for i in range(n):
        for y in range(h):
            for xx in range(w):
                for c in range(7):
                    assert spatial[i, (y * w + xx) * 7 + c] == pytest.approx(float(ref[i, c, y, xx]), rel=1e-5, abs=1e-6)
    assert spatial.abs().sum() > 0 and not extractor.Mixed_6d.branch1x1._forward_hooks  # hook removed
