"""The metric maths on features: Fréchet distance (FID, sFID and the digits FD), Gaussian statistics,
Inception Score, precision/recall and KID.

Letters (docs/method/README.md): n_img images, F feature width (2048 for pool_3).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated (wrong format, missing keys, bad weights); the message says what to do."""

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
    if np.array_equal(sigma1, sigma2):  # (Sigma Sigma)^{1/2} = Sigma for a PSD Sigma: exact, and skips the O(F^3) root
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
    """Mean (F,) and covariance (F, F) in float64 of features (n_img, F) (n_img >= 2), as the ADM evaluator computes them."""
    x = np.asarray(_numpy(features), dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need features (n_img, F) with n_img >= 2, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the Inception Score over `splits` consecutive splits of logits (n_img, 1008), not shuffled.

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
    (memory: batch_size x n_img distances at a time).
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


