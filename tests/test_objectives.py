"""Objectives: noising and targets against closed forms, the VLB helpers against torch.distributions,
the hybrid loss against an independent float64 computation, and each loss's minimiser for Gaussian data
against its closed form (a wrong target sign or scale moves it)."""

from __future__ import annotations

import math

import pytest
import torch
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


def test_create_objective_from_config_builds_the_configured_process():
    cfg = DiffusionConfig(objective="ddpm", num_timesteps=500, beta_start=2e-4, beta_end=0.04)
    ddpm = create_objective(cfg, True)
    betas, abar = reference_alphas_cumprod(500, 2e-4, 0.04)  # float64 product loop
    torch.testing.assert_close(ddpm.betas, betas, rtol=1e-12, atol=0)
    torch.testing.assert_close(ddpm.alphas_cumprod, abar, rtol=1e-12, atol=0)
    x0, noise = torch.randn(3, 2, 2, 2, generator=gen(0)), torch.randn(3, 2, 2, 2, generator=gen(1))
    t = torch.tensor([0, 250, 499])
    s = ddpm.sample(x0, t=t, noise=noise)
    a = abar[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(s.x_t.double(), a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double(), rtol=0, atol=2e-6)
    assert torch.equal(s.target, noise)
    drawn = ddpm.sample_t(20_000, torch.device("cpu"), gen(2))
    assert drawn.min() == 0 and drawn.max() == 499  # the configured T, not the default 1000
    assert "vlb" in ddpm.loss(torch.zeros(3, 4, 2, 2), s)  # learn_sigma=True: the hybrid loss on 2C channels

    cfg = DiffusionConfig(objective="flow", flow_t_sampling="logit_normal", flow_logit_mean=0.5, flow_logit_std=2.0)
    flow = create_objective(cfg, False)
    logits = torch.logit(flow.sample_t(50_000, torch.device("cpu"), gen(3)).double())
    assert abs(logits.mean().item() - 0.5) < 0.04 and abs(logits.std().item() - 2.0) < 0.04
    s = flow.sample(x0, t=torch.tensor([0.0, 0.25, 1.0]), noise=noise)
    torch.testing.assert_close(s.x_t, torch.stack([x0[0], 0.75 * x0[1] + 0.25 * noise[1], noise[2]]))
    torch.testing.assert_close(s.target, noise - x0)
    with pytest.raises(ValueError, match="channels"):  # learn_sigma=False: C output channels
        flow.loss(torch.zeros(3, 4, 2, 2), s)
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
# the minimiser of each loss, for Gaussian data, against its closed form
# ---------------------------------------------------------------------------------------------------------
#
# Data x0 ~ N(M, S^2) (1-D, as (B, 1, 1, 1) images). For x_t = a x0 + b eps (a, b fixed by t) every target
# below is linear in (x0, eps), so E[target | x_t] = alpha x_t + beta with
#   alpha = Cov(target, x_t) / Var(x_t),  beta = E[target] - alpha E[x_t],
# and the minimum of the expected squared error is Var(target) - Cov(target, x_t)^2 / Var(x_t).
# ddpm (a = sqrt(abar), b = sqrt(1 - abar), target eps): alpha = b / (a^2 S^2 + b^2), beta = -alpha a M,
#   minimum a^2 S^2 / (a^2 S^2 + b^2).
# flow (a = 1 - t, b = t, target eps - x0): alpha = (t - (1 - t) S^2) / ((1 - t)^2 S^2 + t^2),
#   beta = -M - alpha (1 - t) M, minimum 1 + S^2 - (t - (1 - t) S^2)^2 / ((1 - t)^2 S^2 + t^2).
# The "batch" is a product grid of normal quantiles, standardised, so its first and second moments (all
# these formulas use) are exactly the distribution's: the fitted minimiser is the closed form up to float32.

M, S = 0.7, 0.5


def gaussian_grid(n: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 = M + S z_i and eps = z_j over all n^2 pairs (i, j) of n standardised normal quantiles z."""
    z = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    z = (z - z.mean()) / z.std(unbiased=False)
    x0 = (M + S * z).repeat_interleave(n)
    return x0.float().reshape(-1, 1, 1, 1), z.repeat(n).float().reshape(-1, 1, 1, 1)


def fit_linear_prediction(objective, s, v: float = 0.0) -> tuple[float, float, float]:
    """(alpha, beta, loss) minimising the objective's own training loss of the prediction alpha x_t + beta
    (plus a constant variance channel v when the objective learns sigma), by L-BFGS."""
    params = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], lr=1, max_iter=100, tolerance_grad=1e-8, tolerance_change=0, history_size=10)

    def closure():
        opt.zero_grad()
        pred = params[0] * s.x_t.double() + params[1]
        if objective.learn_sigma:
            pred = torch.cat([pred, torch.full_like(pred, v)], dim=1)
        loss = objective.loss(pred, s)["loss"]
        loss.backward()
        return loss

    opt.step(closure)
    alpha, beta = params.detach().tolist()
    return alpha, beta, closure().item()


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_ddpm_loss_is_minimised_by_the_posterior_mean_of_the_noise(learn_sigma):
    objective = DDPMObjective(T, learn_sigma=learn_sigma)
    _, abar = reference_alphas_cumprod()
    x0, noise = gaussian_grid()
    for step in (1, 100, 500, 999):
        s = objective.sample(x0, t=torch.full((len(x0),), step), noise=noise)
        a, b = abar[step].sqrt().item(), (1 - abar[step]).sqrt().item()
        alpha = b / (a * a * S * S + b * b)
        fit_alpha, fit_beta, _ = fit_linear_prediction(objective, s)
        assert fit_alpha == pytest.approx(alpha, rel=1e-4, abs=1e-6), step
        assert fit_beta == pytest.approx(-alpha * a * M, rel=1e-4, abs=1e-6), step
        mse = objective.loss(torch.cat([fit_alpha * s.x_t + fit_beta] * (2 if learn_sigma else 1), dim=1), s)["mse"]
        assert mse.item() == pytest.approx(a * a * S * S / (a * a * S * S + b * b), rel=1e-4), step


def test_ddpm_hybrid_loss_is_minimised_by_the_variance_of_the_reverse_step():
    """With the exact mean, E[KL(q(x_{t-1} | x_t, x0) || N(mu, sigma^2))] over the data is least at
    sigma^2 = beta_tilde_t + c0^2 Var(x0 | x_t), c0 = sqrt(abar_{t-1}) beta_t / (1 - abar_t) the posterior
    mean's x0 coefficient and Var(x0 | x_t) = S^2 b^2 / (a^2 S^2 + b^2); learned_range reaches it at
    v = 2 (log sigma^2 - log beta_tilde) / (log beta - log beta_tilde) - 1. The expected KL is convex in v,
    so a loss gradient negative just below and positive just above v brackets the minimiser."""
    objective = DDPMObjective(T, learn_sigma=True)
    betas, abar = reference_alphas_cumprod()
    x0, noise = gaussian_grid()
    for step in (50, 100, 300):
        s = objective.sample(x0, t=torch.full((len(x0),), step), noise=noise)
        a2, b2, beta = abar[step].item(), 1 - abar[step].item(), betas[step].item()
        beta_tilde = beta * (1 - abar[step - 1].item()) / b2
        c0 = math.sqrt(abar[step - 1].item()) * beta / b2
        sigma2 = beta_tilde + c0 ** 2 * S * S * b2 / (a2 * S * S + b2)
        v = 2 * (math.log(sigma2) - math.log(beta_tilde)) / (math.log(beta) - math.log(beta_tilde)) - 1
        assert -0.9 < v < 0.9  # inside the learned range, away from both ends
        alpha = math.sqrt(b2) / (a2 * S * S + b2)
        eps = alpha * s.x_t - alpha * math.sqrt(a2) * M
        slopes = []
        for trial in (v - 0.05, v + 0.05):
            value = torch.tensor(trial, requires_grad=True)
            objective.loss(torch.cat([eps, value.expand_as(eps)], dim=1), s)["loss"].backward()
            slopes.append(value.grad.item())
        assert slopes[0] < 0 < slopes[1], (step, v, slopes)


def test_flow_loss_is_minimised_by_the_conditional_velocity():
    objective = FlowObjective()
    x0, noise = gaussian_grid()
    for t in (0.05, 0.3, 0.5, 0.8, 1.0):
        s = objective.sample(x0, t=torch.full((len(x0),), t), noise=noise)
        var_xt, cov = (1 - t) ** 2 * S * S + t * t, t - (1 - t) * S * S
        fit_alpha, fit_beta, loss = fit_linear_prediction(objective, s)
        assert fit_alpha == pytest.approx(cov / var_xt, rel=1e-4, abs=1e-6), t
        assert fit_beta == pytest.approx(-M - cov / var_xt * (1 - t) * M, rel=1e-4, abs=1e-6), t
        assert loss == pytest.approx(1 + S * S - cov * cov / var_xt, rel=1e-4), t
