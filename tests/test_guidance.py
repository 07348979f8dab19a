"""Classifier-free guidance: which channels are guided, where the variance comes from, and scale 1."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from racedit.diffusion import combine_guidance, guided_model_fn

NUM_CLASSES = 5


class LabelledConv(nn.Module):
    """1x1 conv whose output depends on the label (incl. the null class) and the time; counts its calls."""

    def __init__(self, in_channels: int = 4, learn_sigma: bool = True):
        super().__init__()
        self.in_channels, self.num_classes, self.learn_sigma = in_channels, NUM_CLASSES, learn_sigma
        out_channels = 2 * in_channels if learn_sigma else in_channels
        self.conv = nn.Conv2d(in_channels, out_channels, 1)
        self.label = nn.Embedding(NUM_CLASSES + 1, out_channels)
        self.calls: list[int] = []  # batch size of each forward

    def forward(self, x, t, y, record=None):
        self.calls.append(x.shape[0])
        shift = self.label(y) * (1 + t[:, None] / 1000)
        return self.conv(x) + shift[:, :, None, None]


def inputs(batch: int = 3, channels: int = 4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, 2, 2, generator=g)
    t = torch.tensor([10.0, 500.0, 999.0])[:batch]
    y = torch.tensor([0, 3, 1])[:batch]
    return x, t, y


@torch.no_grad()
def test_scale_one_is_the_conditional_prediction():
    torch.manual_seed(0)
    model = LabelledConv()
    x, t, y = inputs()
    out = guided_model_fn(model, y, 1.0, guidance_channels=3)(x, t)
    assert model.calls == [3]  # no unconditional half
    assert torch.equal(out, model(x, t, y))


@torch.no_grad()
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_all_channels_guided_by_default(learn_sigma):
    torch.manual_seed(0)
    model = LabelledConv(learn_sigma=learn_sigma)
    x, t, y = inputs()
    out = guided_model_fn(model, y, 4.0)(x, t)
    assert model.calls == [6]  # one forward over the doubled batch
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NUM_CLASSES))
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]), rtol=1e-5, atol=1e-5)
    if learn_sigma:
        torch.testing.assert_close(out[:, 4:], cond[:, 4:], rtol=1e-5, atol=1e-6)  # variance: conditional half
    assert out.shape == cond.shape


@torch.no_grad()
def test_legacy_three_channel_guidance():
    torch.manual_seed(0)
    model = LabelledConv()
    x, t, y = inputs()
    out = guided_model_fn(model, y, 4.0, guidance_channels=3)(x, t)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NUM_CLASSES))
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 3:], cond[:, 3:], rtol=1e-5, atol=1e-6)  # channel 3 and all variance channels
    assert (out[:, :3] - cond[:, :3]).abs().min() > 1e-3  # guidance did change the guided channels


def test_combine_guidance_exact_and_validation():
    cond = torch.arange(8.0).reshape(1, 8, 1, 1)
    uncond = torch.full((1, 8, 1, 1), 1.0)
    out = combine_guidance(cond, uncond, 2.0, channels=4, guidance_channels=0)
    assert out.flatten().tolist() == [-1.0, 1.0, 3.0, 5.0, 4.0, 5.0, 6.0, 7.0]
    out = combine_guidance(cond, uncond, 2.0, channels=4, guidance_channels=3)
    assert out.flatten().tolist() == [-1.0, 1.0, 3.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    with pytest.raises(ValueError, match="guidance_channels"):
        combine_guidance(cond, uncond, 2.0, channels=4, guidance_channels=5)


@torch.no_grad()
def test_null_class_override():
    torch.manual_seed(0)
    model = LabelledConv(learn_sigma=False)
    x, t, y = inputs()
    out = guided_model_fn(model, y, 2.0, null_class=2)(x, t)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 2))
    torch.testing.assert_close(out, uncond + 2.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
