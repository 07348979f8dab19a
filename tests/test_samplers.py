"""Samplers: oracle models (exact epsilon / velocity of a known data distribution) must be carried to that
distribution by every sampler, which checks the wiring, the timestep scaling and the sign conventions;
single scheduler steps are compared with the closed-form respaced posterior / DDIM update in float64."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from racedit.diffusion import SAMPLERS, DDPMObjective, FlowObjective, generate, make_schedule

T = 1000
BETAS64 = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
ABAR64 = torch.cumprod(1.0 - BETAS64, dim=0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class GaussianOracle(nn.Module):
    """Exact E[eps | x_t] (ddpm) or E[eps - x0 | x_t] (flow) for data x0 ~ N(means[y], std^2 I).

    std = 0 is a point mass at means[y]. The null class (num_classes) has its own mean, so guidance is
    visible. Times arrive as the model sees them (ddpm: step; flow: t * 1000) and are recorded.
    """

    def __init__(self, kind: str, means: torch.Tensor, std: float = 0.0, learn_sigma: bool = False, v_value: float = 0.0):
        super().__init__()
        self.kind, self.std, self.learn_sigma, self.v_value = kind, std, learn_sigma, v_value
        self.means = means.double()  # (num_classes + 1, C, H, W)
        self.num_classes = means.shape[0] - 1
        self.in_channels = means.shape[1]
        self.seen_times: list[torch.Tensor] = []
        self.eval()

    def forward(self, x, t, y, record=None):
        self.seen_times.append(t.clone())
        mu, x, s2 = self.means[y], x.double(), self.std**2
        if self.kind == "ddpm":
            steps = t.round().long()
            assert torch.equal(steps.double(), t.double()), "ddpm model time must be an integer step"
            a = ABAR64[steps].reshape(-1, 1, 1, 1)
            pred = (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s2 + 1 - a)
        else:
            tt = (t.double() / 1000.0).reshape(-1, 1, 1, 1)
            pred = -mu + (tt - (1 - tt) * s2) / ((1 - tt) ** 2 * s2 + tt**2) * (x - (1 - tt) * mu)
        if self.learn_sigma:
            pred = torch.cat([pred, torch.full_like(pred, self.v_value)], dim=1)
        return pred.float()


def objective_for(sampler: str, learn_sigma: bool = False):
    return DDPMObjective(T, learn_sigma=learn_sigma) if sampler in SAMPLERS["ddpm"] else FlowObjective(learn_sigma=learn_sigma)


ALL_SAMPLERS = [s for names in SAMPLERS.values() for s in names]


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_point_mass_oracle_reaches_the_point(sampler, learn_sigma):
    means = torch.tensor([[0.7, -1.3, 2.0], [-0.4, 0.2, 0.9], [0.0, 0.0, 0.0]]).reshape(3, 3, 1, 1)
    objective = objective_for(sampler, learn_sigma)
    model = GaussianOracle(objective.name, means, learn_sigma=learn_sigma, v_value=0.3)
    y = torch.tensor([0, 1, 0, 1])
    x = generate(model, objective, y, sampler=sampler, steps=50, shape=(3, 1, 1), generator=gen(0))
    assert x.shape == (4, 3, 1, 1)
    torch.testing.assert_close(x, means[y], rtol=0, atol=2e-3)


# Steps per sampler for the Gaussian test: enough that the discretization error in the sample std is
# well under the tolerance (ancestral ddpm at 50 steps gives std ~0.44 for 0.5; at 250, ~0.49). The mean
# of ddim/dpm_solver is biased by ~std * sqrt(abar_999) * mean (~0.006 here): x_T ~ N(0, I) is not exactly
# q(x_999) for the linear schedule.
GAUSSIAN_STEPS = {"ddpm": 250, "ddim": 250, "dpm_solver": 50, "euler": 100, "heun": 50}


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_gaussian_oracle_reproduces_the_distribution(sampler):
    std = 0.5
    means = torch.tensor([[1.0, -2.0], [0.0, 0.0]]).reshape(2, 2, 1, 1)
    objective = objective_for(sampler)
    model = GaussianOracle(objective.name, means, std=std)
    y = torch.zeros(20_000, dtype=torch.long)
    x = generate(model, objective, y, sampler=sampler, steps=GAUSSIAN_STEPS[sampler], shape=(2, 1, 1),
                 generator=gen(1)).double()
    sample_mean, sample_std = x.mean(dim=0).flatten(), x.std(dim=0).flatten()
    # standard errors at n = 20000: 0.0035 on the mean, 0.0025 on the std
    assert (sample_mean - means[0].flatten()).abs().max() < 0.02, sample_mean
    assert (sample_std - std).abs().max() < 0.02, sample_std


def test_ddpm_step_is_the_respaced_posterior():
    for learn_sigma in (False, True):
        schedule = make_schedule(DDPMObjective(T, learn_sigma=learn_sigma), "ddpm", 50)
        grid = torch.linspace(0, T - 1, 50, dtype=torch.float64).round().long().flip(0)  # ADM respacing
        assert torch.equal(schedule.scheduler.timesteps, grid)
        assert torch.equal(schedule.objective_times, grid)
        for i in (0, 17, 48):
            t, t_prev = int(grid[i]), int(grid[i + 1])
            x = torch.randn(3, 2, 2, 2, generator=gen(i))
            eps = torch.randn(3, 2, 2, 2, generator=gen(100 + i))
            v = torch.empty(3, 2, 2, 2).uniform_(-1, 1, generator=gen(200 + i))
            out = torch.cat([eps, v], dim=1) if learn_sigma else eps
            stepped = schedule.scheduler.step(out, schedule.scheduler.timesteps[i], x, generator=gen(7)).prev_sample
            noise = torch.randn(3, 2, 2, 2, generator=gen(7)).double()  # the draw the scheduler made

            a, a_prev = ABAR64[t], ABAR64[t_prev]
            beta = 1 - a / a_prev  # respaced beta
            x0 = (x.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()
            mean = a_prev.sqrt() * beta / (1 - a) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a) * x.double()
            posterior_var = (1 - a_prev) / (1 - a) * beta
            if learn_sigma:
                frac = (v.double() + 1) / 2
                log_var = frac * beta.log() + (1 - frac) * posterior_var.log()
            else:
                log_var = posterior_var.log().expand_as(x0)
            expected = mean + (0.5 * log_var).exp() * noise
            torch.testing.assert_close(stepped.double(), expected, rtol=1e-4, atol=1e-4)
        # the last step (t = 0) returns the x0 prediction without noise
        last = schedule.scheduler.timesteps[-1]
        assert last == 0


@pytest.mark.parametrize("steps", [50, 300])
def test_ddim_step_on_the_respaced_grid(steps):
    schedule = make_schedule(DDPMObjective(T), "ddim", steps)
    grid = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().flip(0)
    assert torch.equal(schedule.objective_times, grid)
    for i in (0, steps // 3, steps - 1):
        x = torch.randn(2, 3, 2, 2, generator=gen(i))
        eps = torch.randn(2, 3, 2, 2, generator=gen(50 + i))
        stepped = schedule.scheduler.step(eps, schedule.scheduler.timesteps[i], x).prev_sample
        a = ABAR64[grid[i]]
        a_prev = ABAR64[grid[i + 1]] if i + 1 < steps else torch.tensor(1.0, dtype=torch.float64)
        x0 = (x.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()
        expected = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps.double()
        torch.testing.assert_close(stepped.double(), expected, rtol=1e-4, atol=1e-4)


def test_model_receives_the_right_times():
    means = torch.zeros(2, 2, 1, 1)
    y = torch.zeros(2, dtype=torch.long)

    euler = GaussianOracle("flow", means, std=1.0)
    generate(euler, FlowObjective(), y, sampler="euler", steps=10, shape=(2, 1, 1))
    times = torch.stack([t[0] for t in euler.seen_times])
    torch.testing.assert_close(times, torch.arange(10, 0, -1).float() * 100)  # sigma * 1000, sigma = 1 .. 1/10

    heun = GaussianOracle("flow", means, std=1.0)
    generate(heun, FlowObjective(), y, sampler="heun", steps=10, shape=(2, 1, 1))
    times = torch.stack([t[0] for t in heun.seen_times])
    assert len(times) == 19 and times[0] == 1000.0 and times.min() > 0 and (times[:-1] >= times[1:]).all()

    for sampler in ("ddpm", "ddim", "dpm_solver"):
        model = GaussianOracle("ddpm", means, std=1.0)
        generate(model, DDPMObjective(), y, sampler=sampler, steps=20, shape=(2, 1, 1))
        times = torch.stack([t[0] for t in model.seen_times])
        assert len(times) == 20 and times[0] == 999.0 and times.min() >= 0
        assert all(t.dtype == torch.float32 for t in model.seen_times)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_guidance_inside_generate(sampler):
    # point masses: the guided prediction is the oracle of the point xu + s (xc - xu)
    means = torch.tensor([[1.0, 0.5, -0.5, 2.0], [0.2, 0.1, 0.3, -0.4]]).reshape(2, 4, 1, 1)
    xc, xu = means[0], means[1]
    objective = objective_for(sampler)
    y = torch.zeros(3, dtype=torch.long)
    all_guided = generate(GaussianOracle(objective.name, means), objective, y, sampler=sampler, steps=30,
                          cfg_scale=3.0, shape=(4, 1, 1), generator=gen(0))
    torch.testing.assert_close(all_guided, (xu + 3.0 * (xc - xu)).expand(3, 4, 1, 1), rtol=0, atol=2e-3)
    legacy = generate(GaussianOracle(objective.name, means), objective, y, sampler=sampler, steps=30, cfg_scale=3.0,
                      guidance_channels=3, shape=(4, 1, 1), generator=gen(0))
    expected = torch.cat([xu[:3] + 3.0 * (xc[:3] - xu[:3]), xc[3:]]).expand(3, 4, 1, 1)
    torch.testing.assert_close(legacy, expected, rtol=0, atol=2e-3)


def test_unknown_sampler_names_the_allowed_ones():
    model = GaussianOracle("ddpm", torch.zeros(2, 2, 1, 1))
    y = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\['ddpm', 'ddim', 'dpm_solver'\]"):
        generate(model, DDPMObjective(), y, sampler="euler", steps=5, shape=(2, 1, 1))
    with pytest.raises(ValueError, match=r"\['euler', 'heun'\]"):
        generate(model, FlowObjective(), y, sampler="ddim", steps=5, shape=(2, 1, 1))
    with pytest.raises(ValueError, match="steps"):
        make_schedule(DDPMObjective(), "ddpm", 2000)


def test_shape_and_channel_checks_and_determinism():
    model = GaussianOracle("flow", torch.zeros(2, 2, 1, 1), std=1.0)
    y = torch.zeros(3, dtype=torch.long)
    a = generate(model, FlowObjective(), y, sampler="euler", steps=5, shape=(3, 2, 1, 1), generator=gen(4))
    b = generate(model, FlowObjective(), y, sampler="euler", steps=5, shape=(2, 1, 1), generator=gen(4))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="batch"):
        generate(model, FlowObjective(), y, sampler="euler", steps=5, shape=(4, 2, 1, 1))
    with pytest.raises(ValueError, match="channels"):  # objective expects 2C outputs, the model gives C
        generate(model, FlowObjective(learn_sigma=True), y, sampler="euler", steps=5, shape=(2, 1, 1))


@pytest.mark.parametrize("sampler,steps,calls", [("heun", 3, 5), ("euler", 4, 4), ("ddpm", 4, 4), ("ddim", 3, 3),
                                                  ("dpm_solver", 5, 5)])
def test_progress_bar_counts_the_model_evaluations(capfd, sampler, steps, calls):
    """The bar runs to the number of model evaluations the sampler makes, counted at the model: one per step,
    except Heun's second-order steps, two each but the last, a plain Euler step to sigma 0 (Karras et al. 2022,
    Algorithm 1): 2N - 1. Guidance batches the conditional and unconditional halves into one call."""
    objective = objective_for(sampler)
    model = GaussianOracle(objective.name, torch.zeros(3, 2, 1, 1), std=1.0)
    y = torch.zeros(2, dtype=torch.long)
    generate(model, objective, y, sampler=sampler, steps=steps, cfg_scale=2.0, shape=(2, 1, 1), progress=True)
    assert len(model.seen_times) == calls and all(len(t) == 2 * len(y) for t in model.seen_times)
    bars = re.findall(rf"sampling \({sampler}\):[^\r\n]*?(\d+)/(\d+)", capfd.readouterr().err)
    assert bars and bars[-1] == (str(calls), str(calls))
    generate(model, objective, y, sampler=sampler, steps=steps, shape=(2, 1, 1))
    assert capfd.readouterr().err == ""  # no bar unless asked for
