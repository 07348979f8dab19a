"""FID, sFID, Inception Score, KID and precision/recall comparable with the ADM evaluator: references,
statistics files, `evaluate` and its report (the library behind `racedit fid`).

Protocol (docs/fid.md; it follows the ADM evaluator of Dhariwal & Nichol, arXiv 2105.05233,
`evaluations/evaluator.py` in openai/guided-diffusion):

- Features come from torch-fidelity's `FeatureExtractorInceptionV3`, the TF-compatible port of the TF Inception
  graph the ADM evaluator runs: uint8 input, TF1 bilinear resize to 299, (x - 128) / 128, pool_3 features
  (2048-d) for FID / KID / precision / recall, and the bias-free logits (`logits_unbiased`, 1008 classes) for
  the Inception Score. TF32 is switched off while features are extracted.
- FID uses the reference's stored `mu` / `sigma` when it has them (the ADM reference batch
  `VIRTUAL_imagenet256_labeled.npz`, or a racedit statistics file from `--save-stats`); otherwise they are
  computed from the reference images. `frechet_distance` is the single implementation, also used by the digits
  metrics.
- sFID: the same Fréchet distance on ADM's spatial features `mixed_6/conv:0[..., :7]`: the 1x1 branch of the
  fourth 17x17 block (Mixed_6d), after BN + ReLU, channels 0-6, flattened in (height, width, channel) order
  (2023-d at 299 px), against the reference's `mu_s` / `sigma_s`. The layer is our reading of the TF graph the
  ADM evaluator runs; it has not been checked against the TF evaluator here (no network).
- Inception Score: 10 consecutive splits of the samples, no shuffling (ADM: splits of 5000, i.e. 10 for 50K).
- Precision / recall: the k-NN manifold estimate (Kynkäänniemi et al. 2019, k = 3) on pool_3 features against
  the reference images (ADM: its 10K reference images), via torch-fidelity's implementation.
- KID (optional): torch-fidelity's polynomial-kernel MMD, 100 subsets of up to 1000.
- Inception weights: torch-fidelity's file (downloaded into the torch hub cache once) or a local path. A name
  carrying a torch.hub hash suffix (`...-6726825d.pth`: the leading hex digits of the file's SHA-256) is checked;
  the full SHA-256 goes into the report.

Letters (docs/method/README.md): n_img images, H_img x W_img image size, F feature width (2048 for pool_3).
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from racedit.evaluation.inception import (
    FID_FEATURE,
    IS_FEATURE,
    SFID_FEATURE,
    SPATIAL_CHANNELS,
    SPATIAL_MODULE,
    InceptionWeights,
    extract_features,
    load_inception,
    resolve_inception_weights,
)
from racedit.evaluation.metrics import (
    EvaluationError,
    frechet_distance,
    gaussian_statistics,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from racedit.fileio import atomic_path, atomic_write_text, json_safe
from racedit.npz import NpzImages, read_npz_metadata
from racedit.outputs import OutputExists, refuse_existing

STATS_FORMAT = "racedit-fid-stats/1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
class FolderImages:
    """The image files under a folder (recursively, sorted by path), read as RGB uint8 (H_img, W_img, 3)."""

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


# ---------------------------------------------------------------------------------------------- reference


@dataclass
class Reference:
    """What a reference provides: FID statistics, and (optionally) pool_3 features for precision/recall and KID."""

    path: Path
    kind: str  # adm_npz | racedit_stats | npz_images | folder
    mu: np.ndarray
    sigma: np.ndarray
    stats_source: str  # "stored mu/sigma" or "computed from n_img images"
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
    """Write a racedit statistics file: mu, sigma (float64) of pool_3 features (n_img, 2048), the first
    `max_features` features themselves (for precision/recall; 0 = none), mu_s, sigma_s of the sFID
    features (n_img, 2023) when `spatial` is given, and JSON metadata. `statistics`, (mu, sigma, mu_s, sigma_s)
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
    num_samples: int | None = None  # evaluate only the first n_img samples
    extra: dict = field(default_factory=dict)


def evaluate(samples: str | Path, ref: str | Path | None, inception_weights: str | Path | None = None,
             settings: EvalSettings | None = None, save_stats_path: str | Path | None = None,
             stats_max_features: int = 10000, progress: bool = True) -> dict:
    """Everything `racedit fid` computes, as the JSON-able report (see `format_report`).

    samples: ADM-format .npz or a folder of images. ref: see `load_reference`, or None (then only IS, and
    `save_stats_path` if given). The report holds the metrics and the full evaluation config: sample count,
    reference, feature extractor and weights hash, and the sampling metadata `racedit sample` stored in the npz.
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
        "settings": _report_settings(s),
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
        report["notes"].append("no sampling metadata: the samples did not come from `racedit sample`")
    return report


def _racedit_version() -> str:
    try:
        from importlib.metadata import version

        return version("racedit")
    except Exception:
        return "unknown"


_SAMPLING_SHOWN = ("checkpoint", "step", "weights", "model", "sampler", "steps", "cfg_scale", "guidance_channels",
                   "per_device_batch", "inference_routing", "labels", "seed", "dtype", "codec")


def _number(x: float | None, digits: int = 4) -> str:
    """A metric on screen; None is a non-finite value after a JSON round trip (`json_safe`)."""
    return "nan" if x is None else f"{x:.{digits}f}"


def format_report(report: dict) -> str:
    """The screen version of the report (as `evaluate` returns it or as read back from its JSON): numbers
    first, then the evaluation config."""
    m = report["metrics"]
    lines = [f"== {report['label']} (racedit fid) =="]
    if "fid" in m:
        lines.append(f"  FID        {_number(m['fid'])}")
    if "sfid" in m:
        lines.append(f"  sFID       {_number(m['sfid'])}")
    lines.append(f"  IS         {_number(m['inception_score'])} +- {_number(m['inception_score_std'])} "
                 f"({report['settings']['isc_splits']} splits)")
    if "precision" in m:
        lines.append(f"  precision  {_number(m['precision'])}   recall {_number(m['recall'])}  (k={report['settings']['precision_recall_k']})")
    if "kid" in m:
        lines.append(f"  KID        {_number(m['kid'], 6)} +- {_number(m['kid_std'], 6)}")
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


def _report_settings(s: EvalSettings) -> dict:
    return {"isc_splits": s.isc_splits, "isc_shuffle": False, "precision_recall_k": s.prc_k if s.prc else None,
            "kid": s.kid, "kid_subsets": s.kid_subsets if s.kid else None, "batch_size": s.batch_size,
            "device": str(s.device), **s.extra}


NOT_THE_JOB = ("batch_size", "device")  # settings that do not change what a report says


def check_outputs(samples: str | Path, ref: str | Path | None, settings: EvalSettings, report_path: str | Path,
                  stats_path: str | Path | None = None, overwrite: bool = False) -> None:
    """Before evaluating: refuse (OutputExists) an existing report or statistics file that racedit did not write
    for this same job, unless `overwrite`. The same job: a racedit report of the same samples file (path, count,
    sampling metadata), the same reference path and the same settings (batch size and device aside); racedit
    statistics of the same samples (path, format, count). Writing over SAMPLES or REF is refused always."""
    inputs = {Path(p).resolve() for p in (samples, ref) if p is not None}
    for flag, out in (("--out", report_path), ("--save-stats", stats_path)):
        if out is not None and Path(out).resolve() in inputs:
            raise OutputExists(f"{flag} {out} is an input of this evaluation; choose another path")
    if overwrite:
        return
    images = open_images(samples)
    n = len(images) if settings.num_samples is None else min(settings.num_samples, len(images))
    samples_path = str(Path(samples).resolve())
    report_path = Path(report_path)
    if report_path.exists():
        why = _report_mismatch(report_path, samples_path, n, images, ref, settings)
        if why:
            refuse_existing(report_path, why)
    if stats_path is not None and Path(stats_path).exists():
        source = {"path": samples_path, "format": "npz" if isinstance(images, NpzImages) else "folder", "count": n}
        try:
            with np.load(stats_path, allow_pickle=False) as z:
                meta = json.loads(str(z["metadata"]))
        except Exception:
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != STATS_FORMAT:
            refuse_existing(stats_path, "is not a statistics file that racedit fid wrote")
        if meta.get("source") != source:
            refuse_existing(stats_path, f"holds the statistics of other samples ({meta.get('source')})")


def _report_mismatch(path: Path, samples_path: str, n: int, images, ref, settings: EvalSettings) -> str | None:
    """Why the existing report `path` is not this job's, or None when it is."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    if not (isinstance(old, dict) and all(isinstance(old.get(k), dict) for k in ("metrics", "samples", "settings"))
            and "feature_extractor" in old and isinstance(old.get("reference") or {}, dict)):
        return "is not a report that racedit fid wrote"
    old_samples, old_settings, old_ref = old["samples"], old["settings"], (old.get("reference") or {}).get("path")
    sampling = read_npz_metadata(samples_path) if isinstance(images, NpzImages) else None
    same_ref = (old_ref is None and ref is None) or (old_ref is not None and ref is not None
                                                     and Path(old_ref).resolve() == Path(ref).resolve())
    mine = {k: v for k, v in _report_settings(settings).items() if k not in NOT_THE_JOB}
    differ = [name for name, same in (
        ("samples", old_samples.get("path") == samples_path and old_samples.get("count") == n),
        ("the samples' sampling metadata", old.get("sampling") == json.loads(json.dumps(sampling))),
        ("reference", same_ref),
        ("settings", {k: v for k, v in old_settings.items() if k not in NOT_THE_JOB} == mine)) if not same]
    return f"is the report of another evaluation (differs in: {', '.join(differ)})" if differ else None


def save_report(report: dict, path: str | Path) -> Path:
    """Write `evaluate`'s report as JSON (`json_safe`: non-finite numbers as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    return path


def default_report_path(samples: str | Path) -> Path:
    """Where `racedit fid` writes its report without --out: beside SAMPLES, suffix .fid.json."""
    samples = Path(samples).resolve()
    return samples.with_name((samples.stem if samples.suffix == ".npz" else samples.name) + ".fid.json")

