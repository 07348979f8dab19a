"""The embedded default's quality scores: sample class accuracy and the digits Fréchet distance (digits FD).

digits FD is the FID recipe with the digits classifier in place of Inception: the Fréchet distance between
Gaussians fitted to the classifier's penultimate features (`classifier_features`, 128-d) of generated
samples and of the held-out digits (the split training never sees). Like FID it is biased by the sample
counts (the held-out split has ~180 images), so `digits_fd_train_vs_holdout`, the same distance between the
training split and the held-out split, is reported beside it as the floor real digits reach.

Letters: N images, S image side, F feature width.
"""

from __future__ import annotations

import time

import torch

from racedit.config import Config
from racedit.data.digits import DigitsDataset
from racedit.data.factory import build_codec
from racedit.evaluation.digits import (
    DigitsClassifier,
    classifier_features,
    load_digits_classifier,
    sample_class_accuracy,
)
from racedit.evaluation.fid import frechet_distance, gaussian_statistics
from racedit.sampling import sample_images


def digits_fd(classifier: DigitsClassifier, images: torch.Tensor, reference: torch.Tensor) -> float:
    """Fréchet distance between the classifier features of images (N, 1, S, S) and reference images (M, 1, S, S),
    both in [-1, 1] (N, M >= 2)."""
    mu1, sigma1 = gaussian_statistics(classifier_features(classifier, images))
    mu2, sigma2 = gaussian_statistics(classifier_features(classifier, reference))
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def heldout_digits(cfg: Config) -> DigitsDataset:
    """The held-out digits split of `cfg.data` (the same seeded split training leaves out)."""
    return DigitsDataset("holdout", image_size=cfg.data.image_size, holdout_fraction=cfg.data.holdout_fraction, seed=0)


def evaluate_digits_model(cfg: Config, model, objective, device) -> dict:
    """Sample `cfg.train.eval_samples_per_class` images per class with `cfg.sample`; classify and compare them.

    Returns {"sample_class_accuracy": fraction classified as the class they were conditioned on,
    "digits_fd": digits FD of the samples against the held-out split, "digits_fd_train_vs_holdout": the same
    distance for the real training split, "eval_samples", "eval_seconds"}.
    """
    n = cfg.train.eval_samples_per_class
    labels = torch.arange(model.num_classes).repeat_interleave(n)
    t0 = time.perf_counter()
    images = sample_images(model, objective, build_codec(cfg), labels, cfg.sample, seed=cfg.train.seed + 1,
                           batch_size=500)
    classifier = load_digits_classifier(cfg.data.image_size, verbose=False)
    acc = sample_class_accuracy(classifier, images, labels)
    holdout = heldout_digits(cfg).images
    train = DigitsDataset("train", image_size=cfg.data.image_size, holdout_fraction=cfg.data.holdout_fraction,
                          seed=0).images
    return {"sample_class_accuracy": float(acc), "digits_fd": digits_fd(classifier, images, holdout),
            "digits_fd_train_vs_holdout": digits_fd(classifier, train, holdout),
            "eval_samples": int(len(labels)), "eval_seconds": time.perf_counter() - t0}
