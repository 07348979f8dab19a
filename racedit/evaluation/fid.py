"""FID, sFID, Inception Score, KID and precision/recall comparable with the ADM evaluator (the library behind `eval/fid.py`).

Protocol (see docs/fid.md and the evaluation section of the reference notes):

- Features come from torch-fidelity's `FeatureExtractorInceptionV3`, the TF-compatible port of the TF Inception
  graph the ADM evaluator runs: uint8 input, TF1 bilinear resize to 299, (x - 128) / 128, pool_3 features
  (2048-d) for FID / KID / precision / recall, and the bias-free logits (`logits_unbiased`, 1008 classes) for
  the Inception Score. TF32 is switched off while features are extracted.
- FID uses the reference's stored `mu` / `sigma` when it has them (the ADM reference batch
  `VIRTUAL_imagenet256_labeled.npz`, or a racedit statistics file from `--save-stats`); otherwise they are
  computed from the reference images. `frechet_distance` is the single implementation, also used by the digits
  metrics.
- sFID: the same Fréchet distance on ADM's spatial features `mixed_6/conv:0[..., :7]`: the 1x1 branch of the
  fourth 17x17 block (Mixed_6d), after BN + ReLU, channels 0-6, flattened in (h, w, c) order (2023-d at 299 px),
  against the reference's `mu_s` / `sigma_s`. The layer follows the reference notes' reading of the TF graph;
  it has not been checked against the TF evaluator here (no network).
- Inception Score: 10 consecutive splits of the samples, no shuffling (ADM: splits of 5000, i.e. 10 for 50K).
- Precision / recall: the k-NN manifold estimate (Kynkäänniemi et al. 2019, k = 3) on pool_3 features against
  the reference images (ADM: its 10K reference images), via torch-fidelity's implementation.
- KID (optional): torch-fidelity's polynomial-kernel MMD, 100 subsets of up to 1000.
- Inception weights: torch-fidelity's file (downloaded into the torch hub cache once) or a local path. A name
  carrying a torch.hub hash suffix (`...-6726825d.pth`: the leading hex digits of the file's SHA-256) is checked;
  the full SHA-256 goes into the report.

Letters: N images, H x W image size, F feature width (2048 for pool_3).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import math
import re
import sys
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from racedit.fileio import atomic_path, atomic_write_text, sha256_of

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256_PREFIX = "6726825d"  # torch.hub convention: the leading hex digits of the file's SHA-256
FID_FEATURE = "2048"  # pool_3
IS_FEATURE = "logits_unbiased"  # pool_3 x fc weight, no bias (as ADM)
SFID_FEATURE = "spatial"  # ADM's mixed_6/conv:0, first 7 channels (a forward hook; not a torch-fidelity feature)
SPATIAL_MODULE = "Mixed_6d.branch1x1"  # TF's mixed_6/conv: the 1x1 branch of the fourth 17x17 block
SPATIAL_CHANNELS = 7
STATS_FORMAT = "racedit-fid-stats/1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[^.]+$")  # torch.hub names: <stem>-<sha256 prefix>.<ext>


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated (wrong format, missing keys, bad weights); the message says what to do."""


class InceptionWeightsError(EvaluationError):
    """An Inception weights file that is missing, unreadable, or whose hash does not match its name."""


# ----------------------------------------------------------------------------------------------- the math


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}) of two Gaussians.

    mu: (F,), sigma: (F, F), as numpy arrays or tensors (computed in float64). The matrix square root is
    scipy's `sqrtm`, as in the ADM evaluator and pytorch-fid (identical covariances skip it: the trace term is
    then exactly 0): when the product is singular and the root is not
    finite, `eps` is added to both diagonals; a small imaginary part from rounding is dropped. When the
    imaginary part is not small (rank-deficient covariances, e.g. fewer samples than dimensions) the trace is
    computed instead from the eigenvalues of sigma1^{1/2} sigma2 sigma1^{1/2} (symmetric, PSD: the same
    trace in exact arithmetic), with a warning.
    """
    from scipy import linalg

    mu1, mu2 = (np.atleast_1d(np.asarray(_numpy(m), dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(_numpy(s), dtype=np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means must be vectors of the same length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}), got {sigma1.shape} and {sigma2.shape}")
    if not (np.isfinite(mu1).all() and np.isfinite(mu2).all() and np.isfinite(sigma1).all()
            and np.isfinite(sigma2).all()):
        raise ValueError("statistics contain NaN or inf (features of broken images?)")
    diff = mu1 - mu2
    if np.array_equal(sigma1, sigma2):  # (S S)^{1/2} = S for a PSD S: exact, and skips the O(F^3) root
        return float(diff @ diff)

    with warnings.catch_warnings():  # "matrix is singular": handled below by the finiteness / imaginary checks
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            warnings.warn(f"Fréchet distance: singular product of covariances; adding {eps} to the diagonals",
                          stacklevel=2)
            offset = np.eye(d) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3) and np.isfinite(covmean).all():
            covmean = covmean.real
        else:
            warnings.warn("Fréchet distance: sqrtm left a large imaginary part (rank-deficient covariances: "
                          "too few samples for the feature width?); using the symmetric eigenvalue form",
                          stacklevel=2)
            return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * _trace_sqrt_product(sigma1, sigma2))
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((sigma1 sigma2)^{1/2}) = sum sqrt(eig(sigma1^{1/2} sigma2 sigma1^{1/2})) for PSD sigma1, sigma2."""
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def gaussian_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and covariance (F, F) in float64 of features (N, F) (N >= 2), as the ADM evaluator computes them."""
    x = np.asarray(_numpy(features), dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need features (N, F) with N >= 2, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the Inception Score over `splits` consecutive splits of logits (N, 1008), not shuffled.

    Uses torch-fidelity's implementation; on 50K samples this is ADM's 10 splits of 5000.
    """
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.as_tensor(logits)
    if len(logits) < splits:
        raise EvaluationError(f"Inception Score with {splits} splits needs at least {splits} samples, got {len(logits)}")
    out = isc_features_to_metric(logits, splits=splits, shuffle=False)
    return out["inception_score_mean"], out["inception_score_std"]


def precision_recall(gen_features, ref_features, k: int = 3, batch_size: int = 10000,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """Improved precision and recall (k-NN manifolds, Kynkäänniemi et al. 2019) of generated vs reference features.

    precision: fraction of generated points inside some reference point's k-NN ball; recall: fraction of
    reference points inside some generated point's ball. Uses torch-fidelity's batched implementation
    (memory: batch_size x N distances at a time).
    """
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    f1 = torch.as_tensor(gen_features, dtype=torch.float32).to(device)
    f2 = torch.as_tensor(ref_features, dtype=torch.float32).to(device)
    if min(len(f1), len(f2)) <= k:
        raise EvaluationError(f"precision/recall with k={k} needs more than {k} points on each side")
    precision, recall = calculate_precision_recall_part(f1, f2, neighborhood=k, batch_size=batch_size)
    return float(precision), float(recall)


def kernel_inception_distance(gen_features, ref_features, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 2020) -> tuple[float, float]:
    """(mean, std) of KID: torch-fidelity's unbiased polynomial-kernel MMD^2 over random subsets."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    f1, f2 = torch.as_tensor(gen_features), torch.as_tensor(ref_features)
    size = min(subset_size, len(f1), len(f2))
    out = kid_features_to_metric(f1, f2, kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False)
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]


def _numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


# ------------------------------------------------------------------------------------------------ weights


@dataclass
class InceptionWeights:
    """A resolved Inception weights file and what is known about it."""

    path: Path
    sha256: str
    source: str  # "default" (torch-fidelity's file in the torch hub cache) or "path"
    verified: bool  # the SHA-256 starts with the prefix its name (or torch-fidelity's file) promises
    expected_prefix: str | None  # the hash prefix that was checked, if any

    def describe(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "source": self.source,
                "verified": self.verified, "expected_sha256_prefix": self.expected_prefix,
                "is_torch_fidelity_weights": self.sha256.startswith(INCEPTION_SHA256_PREFIX)}


def default_inception_path() -> Path:
    """Where torch-fidelity's default download lives (the torch hub cache; `$TORCH_HOME` moves it)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def resolve_inception_weights(path: str | Path | None = None, download: bool = True) -> InceptionWeights:
    """The Inception weights to use: `path`, or torch-fidelity's file (downloaded into the hub cache if absent).

    The SHA-256 prefix is checked when the file name carries one (torch.hub's `<stem>-<hex>.<ext>`) and always
    for the default file; a mismatch raises InceptionWeightsError. A file without a hash in its name is
    accepted; if it is not torch-fidelity's file (SHA-256 prefix 6726825d) a warning says its numbers are not
    comparable with published ones.
    """
    if path is None:
        p = default_inception_path()
        if not p.exists():
            if not download:
                raise InceptionWeightsError(f"Inception weights not found at {p}; pass --inception-weights PATH")
            p.parent.mkdir(parents=True, exist_ok=True)
            print(f"downloading torch-fidelity's Inception weights to {p}", file=sys.stderr)
            try:
                torch.hub.download_url_to_file(INCEPTION_URL, str(p), hash_prefix=INCEPTION_SHA256_PREFIX)
            except Exception as e:  # URLError, timeouts, and the hash check of the download
                raise InceptionWeightsError(
                    f"could not download the Inception weights from {INCEPTION_URL} ({type(e).__name__}: {e}). "
                    f"On an offline machine copy that file from elsewhere and pass --inception-weights PATH"
                ) from e
        source, expected = "default", INCEPTION_SHA256_PREFIX
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsError(f"Inception weights file not found: {p}")
        m = _HASH_IN_NAME.search(p.name)
        source, expected = "path", (m.group(1) if m else None)
    digest = sha256_of(p)
    if expected is not None and not digest.startswith(expected):
        raise InceptionWeightsError(
            f"Inception weights {p}: SHA-256 {digest[:16]}... does not start with {expected}, the hash its name "
            f"promises. The file is damaged or not the file its name says; delete it and fetch it again "
            f"({INCEPTION_URL})"
        )
    if not digest.startswith(INCEPTION_SHA256_PREFIX):
        warnings.warn(f"Inception weights {p} (SHA-256 {digest[:16]}...) are not torch-fidelity's weights "
                      f"(SHA-256 {INCEPTION_SHA256_PREFIX}...): the numbers are not comparable with published ones",
                      stacklevel=2)
    return InceptionWeights(p, digest, source, expected is not None, expected)


def load_inception(weights: InceptionWeights, device: str | torch.device = "cpu"):
    """torch-fidelity's FeatureExtractorInceptionV3 with `weights`, producing pool_3 and the bias-free logits."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:  # a weights-only load first: it runs no code from the file (torch-fidelity's own load does not check)
        state = torch.load(weights.path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InceptionWeightsError(f"cannot read Inception weights {weights.path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InceptionWeightsError(f"{weights.path} is not a state dict of tensors")
    del state
    try:
        extractor = FeatureExtractorInceptionV3("inception-v3-compat", [FID_FEATURE, IS_FEATURE],
                                                feature_extractor_weights_path=str(weights.path))
    except RuntimeError as e:  # load_state_dict: missing / unexpected keys, wrong shapes
        raise InceptionWeightsError(f"{weights.path} does not fit torch-fidelity's Inception-v3: {e}") from e
    return extractor.to(device).eval()


# ------------------------------------------------------------------------------------------------- images


class NpzImages:
    """uint8 images (N, H, W, 3) stored as `key` (default arr_0) of an .npz, read in batches without loading all.

    The member is streamed out of the zip (stored or deflated), so a 50K x 256 x 256 x 3 batch (9.8 GB) never
    has to fit in memory.
    """

    def __init__(self, path: str | Path, key: str = "arr_0"):
        self.path = Path(path)
        self.key = key
        with zipfile.ZipFile(self.path) as zf:
            if f"{key}.npy" not in zf.namelist():
                raise EvaluationError(f"{self.path} has no '{key}' array (keys: {_npz_keys(zf)})")
            with zf.open(f"{key}.npy") as f:
                shape, fortran, dtype = _read_npy_header(f, self.path)
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or fortran:
            raise EvaluationError(
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
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as f:
            _read_npy_header(f, self.path)
            for start in range(0, n, batch_size):
                count = min(batch_size, n - start)
                buf = bytearray(_read_exact(f, count * row, self.path))  # writable, for torch.from_numpy
                yield np.frombuffer(buf, dtype=np.uint8).reshape(count, *self.shape[1:])


def _npz_keys(zf: zipfile.ZipFile) -> list[str]:
    return [n[:-4] if n.endswith(".npy") else n for n in zf.namelist()]


def _read_npy_header(f, path: Path):
    from numpy.lib import format as npy

    version = npy.read_magic(f)
    if version == (1, 0):
        return npy.read_array_header_1_0(f)
    if version == (2, 0):
        return npy.read_array_header_2_0(f)
    raise EvaluationError(f"{path}: unsupported .npy format version {version}")


def _read_exact(f, nbytes: int, path: Path) -> bytes:
    parts, got = [], 0
    while got < nbytes:
        chunk = f.read(nbytes - got)
        if not chunk:
            raise EvaluationError(f"{path}: array data ends early (truncated file?)")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class FolderImages:
    """The image files under a folder (recursively, sorted by path), read as RGB uint8 (H, W, 3)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise EvaluationError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {self.path}")
        from PIL import Image

        with Image.open(self.files[0]) as im:
            self._first_size = (im.height, im.width)
        if any(p.suffix.lower() in (".jpg", ".jpeg") for p in self.files[:100]):
            warnings.warn(f"{self.path} holds JPEG images: lossy compression changes FID; save samples as PNG",
                          stacklevel=2)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_size(self) -> tuple[int, int]:
        return self._first_size

    @staticmethod
    def _read(p: Path) -> np.ndarray:
        from PIL import Image

        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        files = self.files if limit is None else self.files[:limit]
        warned = False
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            for start in range(0, len(files), batch_size):
                images = list(pool.map(self._read, files[start:start + batch_size]))
                # consecutive runs of one size form a batch (the extractor resizes everything to 299 anyway)
                run: list[np.ndarray] = []
                for im in images:
                    if im.shape[:2] != self._first_size and not warned:
                        warnings.warn(f"{self.path}: images of different sizes; they are resized to 299x299 without "
                                      f"cropping (prepare references with ADM's center crop for comparable stats)",
                                      stacklevel=2)
                        warned = True
                    if run and im.shape != run[0].shape:
                        yield np.stack(run)
                        run = []
                    run.append(im)
                if run:
                    yield np.stack(run)


def open_images(path: str | Path) -> NpzImages | FolderImages:
    """Images from an ADM-format .npz (uint8 NHWC `arr_0`) or a folder of image files."""
    p = Path(path)
    if p.is_dir():
        return FolderImages(p)
    if p.is_file() and p.suffix == ".npz":
        return NpzImages(p)
    if not p.exists():
        raise EvaluationError(f"not found: {p}")
    raise EvaluationError(f"{p}: expected an .npz with uint8 NHWC 'arr_0' (ADM format) or a folder of images")


def read_npz_metadata(path: str | Path) -> dict | None:
    """The JSON `metadata` that sample.py stores in its npz, or None (absent, or not a JSON string)."""
    with np.load(path, allow_pickle=False) as z:
        if "metadata" not in z.files:
            return None
        try:
            meta = json.loads(str(z["metadata"]))
        except ValueError:  # a pickled object array, or text that is not JSON
            return None
    return meta if isinstance(meta, dict) else None


# ----------------------------------------------------------------------------------------------- features


@contextlib.contextmanager
def _no_tf32():
    """Full fp32 convolutions and matmuls (TF32 moves FID slightly); restores the previous settings."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def extract_features(extractor, images: NpzImages | FolderImages, batch_size: int = 100, limit: int | None = None,
                     progress: bool = True, desc: str = "inception") -> dict[str, torch.Tensor]:
    """{"2048": pool_3 features (N, 2048), "logits_unbiased": (N, 1008), "spatial": sFID features (N, 7 h w)}
    in float32 on the CPU (h = w = 17 at the standard 299 px input)."""
    from tqdm.auto import tqdm

    device = next(extractor.parameters()).device
    n = len(images) if limit is None else min(limit, len(images))
    outs: dict[str, list[torch.Tensor]] = {name: [] for name in [*extractor.features_list, SFID_FEATURE]}

    def keep_spatial(module, inputs, output):  # (B, 192, h, w) -> (B, h * w * 7) in TF's NHWC order
        spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
        outs[SFID_FEATURE].append(spatial.reshape(len(output), -1).float().cpu())

    hook = extractor.get_submodule(SPATIAL_MODULE).register_forward_hook(keep_spatial)
    try:
        with _no_tf32(), tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
            for batch in images.batches(batch_size, limit=n):
                x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
                if x.shape[1] == 1:
                    x = x.repeat(1, 3, 1, 1)
                feats = extractor(x.to(device))
                for name, f in zip(extractor.features_list, feats):
                    outs[name].append(f.float().cpu())
                bar.update(len(batch))
    finally:
        hook.remove()
    result = {name: torch.cat(v) for name, v in outs.items()}
    bad = (~torch.isfinite(result[FID_FEATURE])).any(1).sum().item()
    if bad:
        raise EvaluationError(f"{bad} images gave non-finite Inception features")
    return result


# ---------------------------------------------------------------------------------------------- reference


@dataclass
class Reference:
    """What a reference provides: FID statistics, and (optionally) pool_3 features for precision/recall and KID."""

    path: Path
    kind: str  # adm_npz | racedit_stats | npz_images | folder
    mu: np.ndarray
    sigma: np.ndarray
    stats_source: str  # "stored mu/sigma" or "computed from N images"
    features: torch.Tensor | None = None
    num_images: int | None = None  # reference images (arr_0 / folder), if any
    metadata: dict | None = None
    mu_s: np.ndarray | None = None  # sFID statistics of the spatial features, when the reference has them
    sigma_s: np.ndarray | None = None

    def describe(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "fid_statistics": self.stats_source,
                "sfid_statistics": None if self.mu_s is None else f"{len(self.mu_s)}-d",
                "images": self.num_images,
                "features_for_precision_recall": None if self.features is None else len(self.features),
                "stats_metadata": self.metadata}


def load_reference(path: str | Path, extractor=None, need_features: bool = True, batch_size: int = 100,
                   progress: bool = True) -> Reference:
    """Read REF: an ADM reference batch (stored mu/sigma + arr_0 images), a racedit stats file, an npz of images,
    or a folder of images. Reference images are run through `extractor` when their features are needed (always
    when there are no stored statistics; for precision/recall and KID when `need_features`)."""
    p = Path(path)
    if p.is_dir():
        return _reference_from_images(p, open_images(p), "folder", extractor, batch_size, progress)
    if not (p.is_file() and p.suffix == ".npz"):
        raise EvaluationError(f"--ref {p}: expected an ADM reference batch / racedit stats .npz or a folder of images"
                              + ("" if p.exists() else " (not found)"))
    with np.load(p, allow_pickle=False) as z:
        keys = set(z.files)
        mu_s = sigma_s = None
        if {"mu_s", "sigma_s"} <= keys:
            mu_s, sigma_s = np.asarray(z["mu_s"], np.float64), np.asarray(z["sigma_s"], np.float64)
            if mu_s.ndim != 1 or sigma_s.shape != (len(mu_s), len(mu_s)):
                raise EvaluationError(f"{p}: mu_s/sigma_s have shapes {mu_s.shape}/{sigma_s.shape}; expected (D,)/(D, D)")
        if {"mu", "sigma"} <= keys:
            mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
            meta = json.loads(str(z["metadata"])) if "metadata" in keys else None
            stored = z["features"] if "features" in keys else None
        elif "arr_0" in keys:
            mu = None
        else:
            raise EvaluationError(f"{p} has neither mu/sigma nor arr_0 (keys: {sorted(keys)})")
    if mu is None:
        return _reference_from_images(p, NpzImages(p), "npz_images", extractor, batch_size, progress)
    if mu.shape != (2048,) or sigma.shape != (2048, 2048):
        raise EvaluationError(f"{p}: mu/sigma have shapes {mu.shape}/{sigma.shape}; expected pool_3 (2048,)/(2048, 2048)")
    is_racedit = bool(meta) and meta.get("format") == STATS_FORMAT
    kind = "racedit_stats" if is_racedit else "adm_npz"
    ref = Reference(p, kind, mu, sigma, "stored mu/sigma", metadata=meta, mu_s=mu_s, sigma_s=sigma_s)
    if stored is not None:
        ref.features = torch.from_numpy(np.asarray(stored, np.float32))
    if "arr_0" in keys:
        images = NpzImages(p)
        ref.num_images = len(images)
        if need_features and ref.features is None:
            if extractor is None:
                raise EvaluationError("reference images need an Inception extractor")
            ref.features = extract_features(extractor, images, batch_size, progress=progress, desc="reference")[FID_FEATURE]
    return ref


def _reference_from_images(p: Path, images, kind: str, extractor, batch_size: int, progress: bool) -> Reference:
    if extractor is None:
        raise EvaluationError("reference images need an Inception extractor")
    all_feats = extract_features(extractor, images, batch_size, progress=progress, desc="reference")
    feats = all_feats[FID_FEATURE]
    mu, sigma = gaussian_statistics(feats)
    mu_s, sigma_s = gaussian_statistics(all_feats[SFID_FEATURE])
    return Reference(p, kind, mu, sigma, f"computed from {len(feats)} images", feats, len(feats), mu_s=mu_s,
                     sigma_s=sigma_s)


def save_stats(path: str | Path, features: torch.Tensor, source: dict, weights: InceptionWeights,
               max_features: int = 10000, spatial: torch.Tensor | None = None,
               statistics: tuple | None = None) -> Path:
    """Write a racedit statistics file: mu, sigma (float64) of pool_3 features (N, 2048), the first
    `max_features` features themselves (for precision/recall; 0 = none), mu_s, sigma_s of the sFID
    features (N, D) when `spatial` is given, and JSON metadata. `statistics`, (mu, sigma, mu_s, sigma_s)
    already computed from these features, saves computing them again."""
    mu, sigma, mu_s, sigma_s = statistics if statistics is not None else (*gaussian_statistics(features),
                                                                         None, None)
    if spatial is not None and mu_s is None:
        mu_s, sigma_s = gaussian_statistics(spatial)
    meta = {"format": STATS_FORMAT, "source": source, "count": len(features),
            "feature_extractor": _extractor_description(weights), "stored_features": min(max_features, len(features)),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    arrays = {"mu": mu, "sigma": sigma, "metadata": np.array(json.dumps(meta))}
    if max_features > 0:
        arrays["features"] = features[:max_features].numpy().astype(np.float32)
    if spatial is not None:
        arrays["mu_s"], arrays["sigma_s"] = mu_s, sigma_s
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


# --------------------------------------------------------------------------------------------- evaluation


def _extractor_description(weights: InceptionWeights) -> dict:
    import torch_fidelity
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return {"name": "torch-fidelity FeatureExtractorInceptionV3 (TF-compatible Inception-v3)",
            "torch_fidelity_version": torch_fidelity.__version__, "fid_feature": f"pool_3 ({FID_FEATURE}-d)",
            "is_feature": f"{IS_FEATURE} (1008 classes, no bias)",
            "sfid_feature": f"{SPATIAL_MODULE} (TF mixed_6/conv) after ReLU, channels 0-{SPATIAL_CHANNELS - 1}, "
                            "flattened in (h, w, c) order",
            "resize": f"TF1 bilinear to {FeatureExtractorInceptionV3.INPUT_IMAGE_SIZE}",
            "dtype": "float32, TF32 off", "weights": weights.describe()}


def _label(n: int) -> str:
    return f"{n // 1000}K" if n % 1000 == 0 and n >= 1000 else str(n)


@dataclass
class EvalSettings:
    batch_size: int = 100
    device: str = "cpu"
    isc_splits: int = 10
    prc: bool = True
    prc_k: int = 3
    prc_batch_size: int = 10000
    kid: bool = False
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    num_samples: int | None = None  # evaluate only the first N samples
    extra: dict = field(default_factory=dict)


def evaluate(samples: str | Path, ref: str | Path | None, inception_weights: str | Path | None = None,
             settings: EvalSettings | None = None, save_stats_path: str | Path | None = None,
             stats_max_features: int = 10000, progress: bool = True) -> dict:
    """Everything `eval/fid.py` computes, as the JSON-able report (see `format_report`).

    samples: ADM-format .npz or a folder of images. ref: see `load_reference`, or None (then only IS, and
    `save_stats_path` if given). The report holds the metrics and the full evaluation config: sample count,
    reference, feature extractor and weights hash, and the sampling metadata sample.py stored in the npz.
    """
    s = settings or EvalSettings()
    images = open_images(samples)  # check the inputs before loading the network
    weights = resolve_inception_weights(inception_weights)
    extractor = load_inception(weights, s.device)
    n = len(images) if s.num_samples is None else min(s.num_samples, len(images))
    if s.num_samples is not None and s.num_samples > len(images):
        raise EvaluationError(f"--num-samples {s.num_samples} but {samples} holds only {len(images)} images")
    sampling = read_npz_metadata(samples) if isinstance(images, NpzImages) else None
    feats = extract_features(extractor, images, s.batch_size, limit=n, progress=progress, desc="samples")
    gen, spatial = feats[FID_FEATURE], feats[SFID_FEATURE]
    mu, sigma = gaussian_statistics(gen)  # once: for the saved statistics and for FID / sFID
    mu_s, sigma_s = gaussian_statistics(spatial)

    report: dict = {
        "label": f"FID-{_label(n)}",
        "metrics": {},
        "samples": {"path": str(Path(samples).resolve()), "format": "npz" if isinstance(images, NpzImages) else "folder",
                    "count": n, "available": len(images), "image_size": list(images.image_size)},
        "reference": None,
        "feature_extractor": _extractor_description(weights),
        "settings": {"isc_splits": s.isc_splits, "isc_shuffle": False,
                     "precision_recall_k": s.prc_k if s.prc else None, "kid": s.kid,
                     "kid_subsets": s.kid_subsets if s.kid else None,
                     "batch_size": s.batch_size, "device": str(s.device), **s.extra},
        "sampling": sampling,
        "notes": [],
        "versions": {"racedit": _racedit_version(), "torch": torch.__version__, "numpy": np.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    m = report["metrics"]
    m["inception_score"], m["inception_score_std"] = inception_score(feats[IS_FEATURE], s.isc_splits)
    if n < 50000:
        report["notes"].append(f"{n} samples: FID from fewer than 50K samples is biased upwards; "
                               f"compare only with FID-{_label(n)} numbers")
    if save_stats_path is not None:
        src = {"path": str(Path(samples).resolve()), "format": report["samples"]["format"], "count": n}
        report["saved_stats"] = str(save_stats(save_stats_path, gen, src, weights, stats_max_features,
                                               spatial=spatial, statistics=(mu, sigma, mu_s, sigma_s)))
    if ref is not None:
        reference = load_reference(ref, extractor, need_features=s.prc or s.kid, batch_size=s.batch_size,
                                   progress=progress)
        report["reference"] = reference.describe()
        if reference.kind == "racedit_stats":
            made_with = (reference.metadata or {}).get("feature_extractor", {}).get("weights", {}).get("sha256")
            if made_with != weights.sha256:
                msg = (f"reference statistics were made with Inception weights {str(made_with)[:16]}..., "
                       f"these samples with {weights.sha256[:16]}...: the FID compares different feature spaces")
                warnings.warn(msg, stacklevel=2)
                report["notes"].append(msg)
        m["fid"] = frechet_distance(mu, sigma, reference.mu, reference.sigma)
        if reference.mu_s is None:
            report["notes"].append("no sFID: the reference has no spatial statistics (mu_s/sigma_s)")
        elif len(reference.mu_s) != spatial.shape[1]:
            report["notes"].append(f"no sFID: the reference's spatial statistics are {len(reference.mu_s)}-d, the "
                                   f"samples' {spatial.shape[1]}-d (another Inception input size?)")
        else:
            m["sfid"] = frechet_distance(mu_s, sigma_s, reference.mu_s, reference.sigma_s)
        if reference.features is not None:
            if s.prc:
                m["precision"], m["recall"] = precision_recall(gen, reference.features, s.prc_k, s.prc_batch_size,
                                                               device=s.device)
            if s.kid:
                m["kid"], m["kid_std"] = kernel_inception_distance(gen, reference.features, s.kid_subsets,
                                                                   s.kid_subset_size)
        elif s.prc or s.kid:
            report["notes"].append("precision/recall and KID need reference images or stored features; "
                                   "the reference has only mu/sigma")
    if sampling is None:
        report["notes"].append("no sampling metadata: the samples did not come from racedit's sample.py")
    return report


def _racedit_version() -> str:
    try:
        from importlib.metadata import version

        return version("racedit")
    except Exception:
        return "unknown"


_SAMPLING_SHOWN = ("checkpoint", "step", "weights", "model", "sampler", "steps", "cfg_scale", "guidance_channels",
                   "per_device_batch", "inference_routing", "labels", "seed", "dtype", "codec")


def format_report(report: dict) -> str:
    """The screen version of the report: numbers first, then the evaluation config."""
    m = report["metrics"]
    lines = [f"== {report['label']} (racedit eval/fid.py) =="]
    if "fid" in m:
        lines.append(f"  FID        {m['fid']:.4f}")
    if "sfid" in m:
        lines.append(f"  sFID       {m['sfid']:.4f}")
    lines.append(f"  IS         {m['inception_score']:.4f} +- {m['inception_score_std']:.4f} "
                 f"({report['settings']['isc_splits']} splits)")
    if "precision" in m:
        lines.append(f"  precision  {m['precision']:.4f}   recall {m['recall']:.4f}  (k={report['settings']['precision_recall_k']})")
    if "kid" in m:
        lines.append(f"  KID        {m['kid']:.6f} +- {m['kid_std']:.6f}")
    smp = report["samples"]
    lines.append(f"  samples    {smp['path']} ({smp['format']}, {smp['count']} of {smp['available']} images, "
                 f"{smp['image_size'][0]}x{smp['image_size'][1]})")
    ref = report["reference"]
    if ref:
        extra = f"; {ref['features_for_precision_recall']} reference features for P/R" \
            if ref["features_for_precision_recall"] else ""
        lines.append(f"  reference  {ref['path']} ({ref['kind']}: {ref['fid_statistics']}{extra})")
    else:
        lines.append("  reference  none (Inception Score only)")
    fe = report["feature_extractor"]
    w = fe["weights"]
    lines.append(f"  extractor  torch-fidelity {fe['torch_fidelity_version']} Inception-v3, {fe['resize']}, {fe['dtype']}")
    lines.append(f"  weights    {w['path']} sha256 {w['sha256'][:16]}... "
                 f"({'hash checked' if w['verified'] else 'hash not checked'}"
                 f"{'' if w['is_torch_fidelity_weights'] else '; NOT torch-fidelity weights'})")
    smpl = report["sampling"]
    if smpl:
        shown = ", ".join(f"{k}={smpl[k]}" for k in _SAMPLING_SHOWN if k in smpl)
        lines.append(f"  sampling   {shown}")
    for note in report["notes"]:
        lines.append(f"  note       {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """eval/fid.py: FID / sFID / IS / precision / recall (/ KID) of SAMPLES against REF; prints and writes one JSON."""
    parser = argparse.ArgumentParser(
        prog="eval/fid.py",
        description="FID, sFID, Inception Score, precision/recall (and KID) with torch-fidelity's TF-compatible "
                    "Inception, comparable with the ADM evaluator. See docs/fid.md.")
    parser.add_argument("samples", help="ADM-format .npz (uint8 NHWC arr_0, as sample.py writes) or a folder of images")
    parser.add_argument("--ref", default=None,
                        help="ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz: its stored mu/sigma for FID, "
                             "its images for precision/recall), a folder of images, or a --save-stats file")
    parser.add_argument("--inception-weights", default=None, metavar="PATH",
                        help="local Inception weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth); "
                             "default: download it into the torch hub cache once")
    parser.add_argument("--out", default=None, help="JSON report (default: SAMPLES with suffix .fid.json)")
    parser.add_argument("--save-stats", default=None, metavar="PATH",
                        help="also write the statistics of SAMPLES (mu, sigma, features) for later use as --ref")
    parser.add_argument("--stats-features", type=int, default=10000,
                        help="with --save-stats: how many features to keep for precision/recall (0 = none)")
    parser.add_argument("--num-samples", type=int, default=None, help="evaluate only the first N samples")
    parser.add_argument("--batch-size", type=int, default=100, help="images per Inception forward")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--kid", action="store_true", help="also compute KID (needs reference images or features)")
    parser.add_argument("--no-prc", action="store_true", help="skip precision/recall")
    parser.add_argument("--isc-splits", type=int, default=10)
    parser.add_argument("--prc-k", type=int, default=3, help="k of the k-NN manifold estimate (ADM: 3)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.ref is None and args.save_stats is None:
        parser.error("give --ref REF (to compute FID) and/or --save-stats PATH")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = EvalSettings(batch_size=args.batch_size, device=device, isc_splits=args.isc_splits,
                            prc=not args.no_prc, prc_k=args.prc_k, kid=args.kid, num_samples=args.num_samples)
    try:
        report = evaluate(args.samples, args.ref, args.inception_weights, settings, save_stats_path=args.save_stats,
                          stats_max_features=args.stats_features, progress=not args.quiet)
    except EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = save_report(report, Path(args.out) if args.out else _default_report_path(Path(args.samples)))
    print(format_report(report))
    if report.get("saved_stats"):
        print(f"  stats      {report['saved_stats']}")
    print(f"  report     {out}")
    return 0


def save_report(report: dict, path: str | Path) -> Path:
    """Write `evaluate`'s report as JSON (non-finite numbers as strings, so the file stays valid JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_jsonable(report), indent=2) + "\n")
    return path


def _default_report_path(samples: Path) -> Path:
    samples = samples.resolve()
    return samples.with_name((samples.stem if samples.suffix == ".npz" else samples.name) + ".fid.json")


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, np.generic):
        return x.item()
    return x
