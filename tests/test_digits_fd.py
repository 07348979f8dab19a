"""digits FD: the Fréchet distance between digits-classifier features of generated and held-out digits."""

from __future__ import annotations

import math

import pytest
import torch

from racedit.data.digits import DigitsDataset
from racedit.evaluation.digits import digits_fd, evaluate_digits_model, heldout_digits, load_digits_classifier
from racedit.models import create_model


@pytest.fixture(scope="module")
def classifier():
    return load_digits_classifier(8, verbose=False)  # the shared cache; trains once (seconds) when absent


def test_digits_fd_real_digits_near_zero_noise_far(classifier):
    holdout = DigitsDataset("holdout", 8, 0.1, 0).images
    train = DigitsDataset("train", 8, 0.1, 0).images
    assert digits_fd(classifier, holdout, holdout) == pytest.approx(0.0, abs=1e-9)
    real = digits_fd(classifier, train, holdout)  # other real digits: only the small-sample bias
    g = torch.Generator().manual_seed(0)
    noise = digits_fd(classifier, torch.rand(len(train), 1, 8, 8, generator=g) * 2 - 1, holdout)
    blank = digits_fd(classifier, torch.full((64, 1, 8, 8), -1.0) + 0.01 * torch.randn(64, 1, 8, 8, generator=g),
                      holdout)
    assert 0 <= real < 0.1 * noise and real < 0.1 * blank


def test_evaluate_digits_model_reports_digits_fd(tiny_config):
    cfg = tiny_config("train.eval_samples_per_class=3")
    torch.manual_seed(0)
    model = create_model(cfg.model).eval()
    from racedit.diffusion.objectives import create_objective

    objective = create_objective(cfg.diffusion, model.learn_sigma)
    result = evaluate_digits_model(cfg, model, objective, "cpu")
    assert result["eval_samples"] == 30 and 0.0 <= result["sample_class_accuracy"] <= 1.0
    assert math.isfinite(result["digits_fd"]) and result["digits_fd"] > result["digits_fd_train_vs_holdout"] > 0
    assert len(heldout_digits(cfg)) == 180
