"""Objectives: noising and targets against closed forms, the VLB helpers against torch.distributions,
the hybrid loss against an independent float64 computation, and that both objectives train."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from racedit.config import DiffusionConfig
from racedit.diffusion import (
    DDPMObjective,
    FlowObjective,
    create_objective,
    discretized_gaussian_log_likelihood,
    normal_kl,
)

T = 1000


def reference_alphas_cumprod(num_timesteps: int = T, beta_start: float = 1e-4, beta_end: float = 0.02):
    """float64 betas and abar, computed here independently of the library."""
    betas = torch.tensor([beta_start + (beta_end - beta_start) * i / (num_timesteps - 1) for i in range(num_timesteps)],
                         dtype=torch.float64)
    abar = torch.ones(num_timesteps, dtype=torch.float64)
    running = 1.0
    for i in range(num_timesteps):
        running *= 1.0 - betas[i].item()
        abar[i] = running
    return betas, abar


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# noising and targets
# ---------------------------------------------------------------------------------------------------------


def test_ddpm_noising_matches_closed_form():
    objective = DDPMObjective(T, 1e-4, 0.02)
    _, abar = reference_alphas_cumprod()
    x0 = torch.randn(64, 4, 3, 3, generator=gen(1))
    s = objective.sample(x0, gen(2))
    assert s.t.dtype == torch.long and s.t.shape == (64,)
    a = abar[s.t].reshape(-1, 1, 1, 1)
    expected = a.sqrt() * x0.double() + (1 - a).sqrt() * s.noise.double()
    torch.testing.assert_close(s.x_t.double(), expected, rtol=0, atol=2e-6)
    assert torch.equal(s.target, s.noise)
    assert torch.equal(s.x0, x0)


def test_ddpm_timesteps_cover_range_uniformly():
    objective = DDPMObjective(T)
    t = objective.sample_t(50_000, torch.device("cpu"), gen(3))
    assert t.min() == 0 and t.max() == T - 1
    assert abs(t.double().mean().item() - (T - 1) / 2) < 5.0
    torch.testing.assert_close(objective.model_time(t), t.float())


def test_ddpm_fixed_t_and_noise():
    objective = DDPMObjective(T)
    x0 = torch.randn(3, 2, 2, 2, generator=gen(0))
    noise = torch.randn(3, 2, 2, 2, generator=gen(1))
    t = torch.tensor([0, 500, 999])
    s = objective.sample(x0, t=t, noise=noise)
    _, abar = reference_alphas_cumprod()
    a = abar[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(s.x_t.double(), a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double(), rtol=0, atol=2e-6)


def test_flow_noising_and_target():
    objective = FlowObjective("uniform")
    x0 = torch.randn(64, 4, 3, 3, generator=gen(1))
    s = objective.sample(x0, gen(2))
    assert s.t.dtype == torch.float32 and ((s.t >= 0) & (s.t < 1)).all()
    t = s.t.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(s.x_t, (1 - t) * x0 + t * s.noise)
    torch.testing.assert_close(s.target, s.noise - x0)
    # at t=0 the input is the data, at t=1 pure noise
    ends = objective.sample(x0[:2], t=torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(ends.x_t[0], x0[0])
    torch.testing.assert_close(ends.x_t[1], ends.noise[1])
    torch.testing.assert_close(objective.model_time(torch.tensor([0.0, 0.25, 1.0])), torch.tensor([0.0, 250.0, 1000.0]))


def test_flow_time_distributions():
    uniform = FlowObjective("uniform").sample_t(50_000, torch.device("cpu"), gen(0))
    assert abs(uniform.mean().item() - 0.5) < 0.01 and abs(uniform.var().item() - 1 / 12) < 0.003
    logit_normal = FlowObjective("logit_normal", logit_mean=0.5, logit_std=0.7).sample_t(50_000, torch.device("cpu"), gen(0))
    assert ((logit_normal > 0) & (logit_normal < 1)).all()
    logits = torch.logit(logit_normal.double())
    assert abs(logits.mean().item() - 0.5) < 0.02 and abs(logits.std().item() - 0.7) < 0.02


def test_create_objective_from_config():
    ddpm = create_objective(DiffusionConfig(objective="ddpm", num_timesteps=500, beta_start=2e-4, beta_end=0.04), True)
    assert isinstance(ddpm, DDPMObjective) and ddpm.learn_sigma and ddpm.num_timesteps == 500
    betas, _ = reference_alphas_cumprod(500, 2e-4, 0.04)
    torch.testing.assert_close(ddpm.betas, betas)
    flow = create_objective(DiffusionConfig(objective="flow", flow_t_sampling="logit_normal", flow_logit_std=2.0), False)
    assert isinstance(flow, FlowObjective) and flow.t_sampling == "logit_normal" and flow.logit_std == 2.0
    with pytest.raises(ValueError, match="ddpm"):
        create_objective(DiffusionConfig(objective="edm"), False)


def test_wrong_output_channels_raise():
    x0 = torch.randn(2, 4, 2, 2)
    for objective in (DDPMObjective(learn_sigma=True), FlowObjective(learn_sigma=False)):
        s = objective.sample(x0)
        bad = torch.zeros(2, 4 if objective.learn_sigma else 8, 2, 2)
        with pytest.raises(ValueError, match="channels"):
            objective.loss(bad, s)


# ---------------------------------------------------------------------------------------------------------
# VLB helpers
# ---------------------------------------------------------------------------------------------------------


def test_normal_kl_matches_torch_distributions():
    g = gen(5)
    m1, m2 = torch.randn(1000, generator=g, dtype=torch.float64), torch.randn(1000, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(1000, generator=g, dtype=torch.float64), torch.randn(1000, generator=g, dtype=torch.float64)
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)


def test_normal_kl_monte_carlo():
    m1, lv1, m2, lv2 = torch.tensor(0.3), torch.tensor(-0.5), torch.tensor(-0.2), torch.tensor(0.4)
    p, q = Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp())
    z = p.sample((400_000,))
    mc = (p.log_prob(z) - q.log_prob(z)).mean()
    assert abs(normal_kl(m1, lv1, m2, lv2).item() - mc.item()) < 0.01


def reference_discretized_log_likelihood(x, mean, log_scale):
    """float64, straight from the definition with Normal.cdf; edge bins open to +-inf."""
    d = Normal(mean.double(), log_scale.double().exp())
    x = x.double()
    upper = torch.where(x > 0.999, torch.ones_like(x), d.cdf(x + 1 / 255))
    lower = torch.where(x < -0.999, torch.zeros_like(x), d.cdf(x - 1 / 255))
    return torch.log(upper - lower)


def test_discretized_log_likelihood_matches_normal_cdf():
    g = gen(7)
    levels = torch.arange(256, dtype=torch.float32) / 127.5 - 1.0  # 8-bit values scaled to [-1, 1]
    x = levels[torch.randint(0, 256, (4000,), generator=g)]
    x[:4] = torch.tensor([-1.0, 1.0, -1.0, 1.0])
    mean = (x + 0.1 * torch.randn(4000, generator=g)).clamp(-1.2, 1.2)
    log_scale = torch.empty(4000).uniform_(-4.0, -0.5, generator=g)
    ours = discretized_gaussian_log_likelihood(x, mean, log_scale).double()
    ref = reference_discretized_log_likelihood(x, mean, log_scale)
    ok = ref > -20  # where the float64 difference of cdfs is still accurate
    assert ok.float().mean() > 0.8
    torch.testing.assert_close(ours[ok], ref[ok], rtol=1e-4, atol=1e-4)
    assert (ours[~ok] < -15).all()  # far-off bins stay (finitely) improbable


def test_discretized_likelihood_sums_to_one_over_bins():
    levels = torch.arange(256, dtype=torch.float32) / 127.5 - 1.0
    for mean, log_scale in [(0.1, -2.0), (-0.95, -1.0), (1.3, -3.0)]:
        logp = discretized_gaussian_log_likelihood(levels, torch.tensor(mean), torch.tensor(log_scale))
        assert abs(logp.double().exp().sum().item() - 1.0) < 1e-4


# ---------------------------------------------------------------------------------------------------------
# hybrid loss
# ---------------------------------------------------------------------------------------------------------


def reference_vlb_bits(x0, x_t, t, eps_pred, v, num_timesteps=T):
    """float64 L_t per sample, from the formulas, with torch.distributions for KL and the decoder."""
    betas, abar = reference_alphas_cumprod(num_timesteps)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_var_clipped = torch.cat([post_var[1:2], post_var[1:]])
    x0, x_t, eps_pred, v = (z.double() for z in (x0, x_t, eps_pred, v))
    out = []
    for i in range(x0.shape[0]):
        k = int(t[i])
        c_x0 = abar_prev[k].sqrt() * betas[k] / (1 - abar[k])
        c_xt = (1 - betas[k]).sqrt() * (1 - abar_prev[k]) / (1 - abar[k])
        true_mean = c_x0 * x0[i] + c_xt * x_t[i]
        x0_pred = (x_t[i] - (1 - abar[k]).sqrt() * eps_pred[i]) / abar[k].sqrt()
        model_mean = c_x0 * x0_pred + c_xt * x_t[i]
        frac = (v[i] + 1) / 2
        model_logvar = frac * betas[k].log() + (1 - frac) * post_var_clipped[k].log()
        if k == 0:
            nats = -reference_discretized_log_likelihood(x0[i], model_mean, 0.5 * model_logvar)
        else:
            nats = kl_divergence(Normal(true_mean, post_var_clipped[k].sqrt()), Normal(model_mean, (0.5 * model_logvar).exp()))
        out.append(nats.mean() / math.log(2))
    return torch.stack(out)


def test_ddpm_vlb_against_float64_reference():
    objective = DDPMObjective(T, learn_sigma=True)
    g = gen(11)
    levels = torch.arange(256, dtype=torch.float32) / 127.5 - 1.0
    x0 = levels[torch.randint(0, 256, (8, 3, 4, 4), generator=g)]
    t = torch.tensor([0, 0, 1, 2, 10, 250, 700, 999])
    s = objective.sample(x0, g, t=t)
    eps_pred = s.noise + 0.3 * torch.randn(x0.shape, generator=g)
    v = torch.empty(x0.shape).uniform_(-1, 1, generator=g)
    ours = objective.vlb_terms(eps_pred, v, s.x0, s.x_t, s.t)
    ref = reference_vlb_bits(s.x0, s.x_t, t, eps_pred, v)
    torch.testing.assert_close(ours.double(), ref, rtol=2e-3, atol=1e-5)


def test_ddpm_vlb_closed_form_with_exact_eps():
    objective = DDPMObjective(T, learn_sigma=True)
    betas, abar = reference_alphas_cumprod()
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    x0 = torch.rand(5, 2, 3, 3, generator=gen(0)) * 1.6 - 0.8
    t = torch.tensor([1, 5, 100, 500, 999])
    s = objective.sample(x0, gen(1), t=t)
    ones = torch.ones_like(x0)
    # exact eps and v = -1 (posterior variance): the model step equals q, so KL = 0
    at_posterior = objective.vlb_terms(s.noise, -ones, s.x0, s.x_t, s.t)
    assert at_posterior.abs().max() < 1e-3
    # exact eps and v = +1 (variance beta): KL between two zero-mean-difference Gaussians
    at_beta = objective.vlb_terms(s.noise, ones, s.x0, s.x_t, s.t)
    ratio = post_var[t] / betas[t]
    expected = 0.5 * (ratio - 1 - ratio.log()) / math.log(2)
    torch.testing.assert_close(at_beta.double(), expected, rtol=1e-3, atol=1e-4)


def test_ddpm_hybrid_loss_terms_and_stop_gradient():
    objective = DDPMObjective(500, learn_sigma=True)  # T/1000 = 0.5 scales the vlb
    g = gen(3)
    x0 = torch.randn(6, 2, 4, 4, generator=g).clamp(-1, 1)
    s = objective.sample(x0, g)
    out = torch.randn(6, 4, 4, 4, generator=g, requires_grad=True)
    terms = objective.loss(out, s)
    assert set(terms) == {"loss", "mse", "vlb"} and all(v.ndim == 0 for v in terms.values())
    eps_pred, v = out[:, :2].detach(), out[:, 2:].detach()
    torch.testing.assert_close(terms["mse"], ((eps_pred - s.noise) ** 2).mean())
    torch.testing.assert_close(terms["vlb"], 0.5 * objective.vlb_terms(eps_pred, v, s.x0, s.x_t, s.t).mean())
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vlb"])
    # the bound trains only the variance channels; L_simple only the mean channels
    (grad_vlb,) = torch.autograd.grad(terms["vlb"], out, retain_graph=True)
    assert grad_vlb[:, :2].abs().max() == 0 and grad_vlb[:, 2:].abs().max() > 0
    (grad_mse,) = torch.autograd.grad(terms["mse"], out)
    assert grad_mse[:, 2:].abs().max() == 0


def test_ddpm_loss_without_learned_sigma():
    objective = DDPMObjective(learn_sigma=False)
    s = objective.sample(torch.randn(4, 3, 2, 2), gen(0))
    out = torch.randn(4, 3, 2, 2)
    terms = objective.loss(out, s)
    assert set(terms) == {"loss", "mse"}
    torch.testing.assert_close(terms["loss"], ((out - s.noise) ** 2).mean())


def test_flow_loss_uses_first_channels_only():
    objective = FlowObjective(learn_sigma=True)
    s = objective.sample(torch.randn(4, 3, 2, 2), gen(0))
    out = torch.randn(4, 6, 2, 2, requires_grad=True)
    terms = objective.loss(out, s)
    assert set(terms) == {"loss", "mse"}
    torch.testing.assert_close(terms["loss"], ((out[:, :3].detach() - (s.noise - s.x0)) ** 2).mean())
    (grad,) = torch.autograd.grad(terms["loss"], out)
    assert grad[:, 3:].abs().max() == 0 and grad[:, :3].abs().max() > 0


# ---------------------------------------------------------------------------------------------------------
# training on a toy distribution
# ---------------------------------------------------------------------------------------------------------


class TinyConditionalMLP(nn.Module):
    """Per-pixel MLP conditioned on model time t (sinusoidal) and label y; the DiT call signature."""

    def __init__(self, in_channels: int = 2, num_classes: int = 3, learn_sigma: bool = False, hidden: int = 64):
        super().__init__()
        self.in_channels, self.num_classes, self.learn_sigma = in_channels, num_classes, learn_sigma
        self.register_buffer("freqs", torch.exp(-math.log(1000.0) * torch.arange(16) / 16))
        self.time = nn.Linear(32, hidden)
        self.label = nn.Embedding(num_classes + 1, hidden)
        self.inp = nn.Linear(in_channels, hidden)
        out_channels = 2 * in_channels if learn_sigma else in_channels
        self.net = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out_channels))

    def forward(self, x, t, y, record=None):
        angles = t.float()[:, None] * self.freqs[None]
        cond = self.time(torch.cat([angles.sin(), angles.cos()], dim=1)) + self.label(y)  # (B, hidden)
        h = self.inp(x.permute(0, 2, 3, 1)) + cond[:, None, None, :]
        return self.net(h).permute(0, 3, 1, 2)


def toy_batch(batch: int, g: torch.Generator):
    """2-D Gaussian mixture, one component per class, as (B, 2, 1, 1) images."""
    y = torch.randint(0, 3, (batch,), generator=g)
    angle = y.float() * (2 * math.pi / 3)
    centers = torch.stack([angle.cos(), angle.sin()], dim=1)
    x0 = centers + 0.1 * torch.randn(batch, 2, generator=g)
    return x0[:, :, None, None], y


def train_losses(objective, model, steps: int = 200, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    g = gen(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        x0, y = toy_batch(256, g)
        s = objective.sample(x0, g)
        terms = objective.loss(model(s.x_t, objective.model_time(s.t), y), s)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(terms["loss"].item())
    return losses


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_ddpm_trains_on_toy_mixture(learn_sigma):
    torch.manual_seed(0)
    losses = train_losses(DDPMObjective(learn_sigma=learn_sigma), TinyConditionalMLP(learn_sigma=learn_sigma))
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.75 * first, (first, last)


def test_flow_trains_on_toy_mixture():
    torch.manual_seed(0)
    losses = train_losses(FlowObjective("logit_normal"), TinyConditionalMLP())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.75 * first, (first, last)
