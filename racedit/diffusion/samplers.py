"""Sampling through diffusers schedulers.

| objective | sampler      | diffusers scheduler                                 | steps at (n_step = steps) |
|-----------|--------------|-----------------------------------------------------|---------------------------|
| ddpm      | `ddpm`       | DDPMScheduler (ancestral)                           | round(linspace(0, T-1, n_step)): ADM's respacing |
| ddpm      | `ddim`       | DDIMScheduler, eta=0, on the respaced process       | the same grid, last step to abar = 1 |
| ddpm      | `dpm_solver` | DPMSolverMultistepScheduler, dpmsolver++, 2nd order | round(linspace(0, T-1, n_step+1)) less 0, last step to sigma 0 |
| flow      | `euler`      | FlowMatchEulerDiscreteScheduler, shift=1            | t = 1, 1 - 1/n_step, ..., 1/n_step, last step to 0 |
| flow      | `heun`       | FlowMatchHeunDiscreteScheduler, shift=1             | diffusers' grid linspace(1, 0.001, n_step), last (Euler) step to 0; 2 n_step - 1 model calls |

DDPM schedulers get the objective's own betas. n_step is at most T for `ddpm` and `ddim` and T - 1 for
`dpm_solver`, whose rounded grid of n_step + 1 points repeats a step beyond that and samples nan
(`racedit.limits.max_sampling_steps`, checked when a config loads). Respacing: DDPMScheduler takes the
previous timestep from its timestep array, so each step uses the respaced beta_t = 1 - abar_t / abar_prev and
posterior variance (1 - abar_prev) / (1 - abar_t) * beta_t, as in ADM's respaced process. The learned variance of a
learn_sigma model is honoured by `ddpm` (variance_type "learned_range", the last C output channels are
passed through); `ddim` and `dpm_solver` have no use for it and receive only the first C channels.
(diffusers' DPM-Solver would otherwise cut a learned-variance output at a hard-coded 3 channels.)

DDIMScheduler computes the previous timestep as t - T//n_step, which is only consistent with an evenly
divided grid. To use ADM's grid for any n_step, `ddim` runs on the respaced process itself (as ADM does): a
DDIMScheduler over n_step steps whose betas are the respaced betas 1 - abar[g_i] / abar[g_{i-1}] of the grid
g, and the model is called at the original step g_i. `SamplingSchedule.objective_times` holds that map for every sampler.

Flow: our x_t = (1 - t) x0 + t eps and v = eps - x0 are diffusers' flow-matching convention with
sigma = t; its timesteps are sigma * 1000, and the model receives `objective.model_time(sigma)`.

Predicted x0 is never clipped (latents are not in [-1, 1]; `clip_sample=False`, no thresholding).

Letters (docs/method/README.md): B images, C data channels, H x W spatial size, T training timesteps,
n_step sampling steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    SchedulerMixin,
)
from torch import Tensor, nn
from tqdm.auto import tqdm

from racedit.config import SAMPLERS
from racedit.diffusion.guidance import guided_model_fn
from racedit.diffusion.objectives import FLOW_TIME_SCALE, DDPMObjective, FlowObjective, Objective
from racedit.limits import max_sampling_steps


def _check_sampler(objective: Objective, sampler: str) -> None:
    allowed = SAMPLERS.get(objective.name)
    if allowed is None:
        raise ValueError(f"no samplers for objective {objective.name!r}. Known objectives: {list(SAMPLERS)}")
    if sampler not in allowed:
        raise ValueError(f"sampler {sampler!r} does not apply to the {objective.name} objective. Allowed: {list(allowed)}")


@dataclass
class SamplingSchedule:
    """A diffusers scheduler with `set_timesteps` called, and the objective time of each of its steps.

    objective_times: (len(scheduler.timesteps),) the time at which the model is evaluated for each entry of
    `scheduler.timesteps`: the integer DDPM step in [0, T) for ddpm, sigma = t in [0, 1] for flow.
    """

    scheduler: SchedulerMixin
    objective_times: Tensor


def make_schedule(objective: Objective, sampler: str, steps: int) -> SamplingSchedule:
    """The scheduler for `sampler` over `steps` steps (see the module table).

    Timesteps and schedule tensors stay on the CPU, as in diffusers' own pipelines: the schedulers index
    their CPU tables with them, and 0-dim CPU tensors combine with samples on any device.
    """
    _check_sampler(objective, sampler)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if isinstance(objective, DDPMObjective):
        return _ddpm_schedule(objective, sampler, steps)
    assert isinstance(objective, FlowObjective)
    if sampler == "euler":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(FLOW_TIME_SCALE), shift=1.0)
        # uniform grid 1 .. 1/n_step; the scheduler appends the final sigma 0
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1].tolist())
    else:
        scheduler = FlowMatchHeunDiscreteScheduler(num_train_timesteps=int(FLOW_TIME_SCALE), shift=1.0)
        scheduler.set_timesteps(steps)
    # diffusers' flow-matching timesteps are sigma * num_train_timesteps
    return SamplingSchedule(scheduler, scheduler.timesteps / scheduler.config.num_train_timesteps)


def _ddpm_schedule(objective: DDPMObjective, sampler: str, steps: int) -> SamplingSchedule:
    T = objective.num_timesteps
    if steps > max_sampling_steps(sampler, T):
        raise ValueError(f"steps ({steps}) cannot exceed {max_sampling_steps(sampler, T)} for sampler {sampler} over the "
                         f"{T} training timesteps of the ddpm objective")
    no_clip = dict(prediction_type="epsilon", clip_sample=False)  # latents are not in [-1, 1]
    if sampler == "ddpm":
        variance = "learned_range" if objective.learn_sigma else "fixed_small"
        scheduler = DDPMScheduler(num_train_timesteps=T, trained_betas=objective.betas.numpy(),
                                  variance_type=variance, timestep_spacing="linspace", **no_clip)
        scheduler.set_timesteps(steps)
        return SamplingSchedule(scheduler, scheduler.timesteps)
    if sampler == "ddim":
        grid = torch.from_numpy(np.linspace(0, T - 1, steps).round().astype(np.int64))  # ADM's respacing, ascending
        abar = objective.alphas_cumprod[grid]
        respaced_betas = 1.0 - abar / torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
        scheduler = DDIMScheduler(num_train_timesteps=steps, trained_betas=respaced_betas.numpy(), set_alpha_to_one=True,
                                  timestep_spacing="leading", steps_offset=0, **no_clip)
        scheduler.set_timesteps(steps)  # respaced steps n_step-1 .. 0, previous = current - 1
        return SamplingSchedule(scheduler, grid[scheduler.timesteps])
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=T, trained_betas=objective.betas.numpy(),
                                            prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2,
                                            thresholding=False, timestep_spacing="linspace")
    scheduler.set_timesteps(steps)
    return SamplingSchedule(scheduler, scheduler.timesteps)


@torch.no_grad()
def generate(
    model: nn.Module,
    objective: Objective,
    y: Tensor,
    *,
    sampler: str = "ddpm",
    steps: int = 250,
    cfg_scale: float = 1.0,
    guidance_channels: int = 0,
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    progress: bool = False,
) -> Tensor:
    """Sample x0 (B, C, H, W) for labels y (B,) (the null class `model.num_classes` samples unconditionally).

    shape: (C, H, W), or (B, C, H, W) with B = len(y).
    generator: draws the initial noise (and the `ddpm` sampler's step noise); must live on `y.device`.
    noise: optional initial x_T (B, C, H, W) instead of drawing it.
    Runs on `y.device` under no_grad. The model's train/eval mode is left as it is: call `model.eval()`
    first (batch-dependent routing is training-mode behaviour).
    """
    _check_sampler(objective, sampler)
    batch, device = y.shape[0], y.device
    shape = tuple(shape)
    if len(shape) == 4:
        if shape[0] != batch:
            raise ValueError(f"shape {shape} has batch {shape[0]} but y has {batch} labels")
        shape = shape[1:]
    if len(shape) != 3:
        raise ValueError(f"shape must be (C, H, W) or (B, C, H, W), got {shape}")
    if getattr(model, "training", False):
        warnings.warn("generate() called with the model in training mode; call model.eval() first", stacklevel=2)
    channels = shape[0]
    expected_out = 2 * channels if objective.learn_sigma else channels
    model_fn = guided_model_fn(model, y, cfg_scale, guidance_channels=guidance_channels)
    schedule = make_schedule(objective, sampler, steps)
    scheduler = schedule.scheduler
    keep_variance = sampler == "ddpm" and objective.learn_sigma  # only DDPMScheduler uses the learned variance

    if noise is None:
        x = torch.randn((batch, *shape), generator=generator, device=device)
    else:
        x = noise.to(device=device, dtype=torch.float32)
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)  # flow-match schedulers start at sigma = 1
    steps_iter = zip(scheduler.timesteps, schedule.objective_times)
    total = len(scheduler.timesteps)
    for timestep, objective_time in tqdm(steps_iter, total=total, desc=f"sampling ({sampler})", disable=not progress):
        t_model = objective.model_time(objective_time.to(device).expand(batch))
        out = model_fn(x, t_model)
        if out.shape[1] != expected_out:
            raise ValueError(
                f"model output has {out.shape[1]} channels; expected {expected_out} for {channels} data channels "
                f"with learn_sigma={objective.learn_sigma}"
            )
        out = out.float() if keep_variance else out[:, :channels].float()
        x = scheduler.step(out, timestep, x, generator=generator).prev_sample
    return x
