"""Training objectives: how data is noised, what the model regresses onto, and the loss.

Two objectives share one interface (`Objective`):

- `DDPMObjective`: discrete-time DDPM with linear betas, epsilon prediction. With a learned variance
  (`learn_sigma`) the loss is the DiT/ADM hybrid L_simple + L_vlb.
- `FlowObjective`: rectified flow, x_t = (1 - t) x0 + t * eps with t in [0, 1], velocity target eps - x0.

The objective owns the target: `sample()` returns it in an `ObjectiveSample`, so per-layer regularization
heads can regress onto the same tensor the final prediction is trained on.

Letters (docs/method/README.md): B images, C data channels, H x W spatial size. A model output has 2C channels
when the model learns its variance (first C: the epsilon / velocity prediction, last C: the variance
interpolation `v`), else C.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from racedit.config import DiffusionConfig

# The DiT timestep embedder was designed for integer DDPM steps in [0, 1000); continuous flow times in
# [0, 1] are multiplied by this so the embedder sees the same range.
FLOW_TIME_SCALE = 1000.0


# --------------------------------------------------------------------------------------------------------
# Gaussian helpers for the variational bound
# --------------------------------------------------------------------------------------------------------


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats; arguments broadcast.

    KL = 0.5 * (logvar2 - logvar1 + (var1 + (mean1 - mean2)^2) / var2 - 1)
    """
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor, bin_width: float = 2.0 / 255) -> Tensor:
    """Elementwise log-probability (nats) of the bin around `x` under N(mean, exp(log_scale)^2).

    The data are taken to be 8-bit values rescaled to [-1, 1] (bins of width 2/255 centred on the values); the
    outermost bins extend to -inf and +inf. `x` outside [-1, 1] (e.g. latents, which DiT still scores with this
    decoder at t=0) falls in the open edge bins. Computed in log space (log_ndtr), with bins in the upper half
    reflected so the two cdfs are small and their difference keeps its precision; the result is floored at
    log(1e-12), as ADM floors the probability, so a badly placed mean cannot blow the loss up.
    """
    inv_scale = torch.exp(-log_scale)
    upper = (x - mean + bin_width / 2) * inv_scale  # standardized upper edge of the bin
    lower = (x - mean - bin_width / 2) * inv_scale
    # P(lower < z < upper) = P(-upper < z < -lower): use the side where both cdfs are below 1/2
    flip = (upper + lower) > 0
    a, b = torch.where(flip, -upper, lower), torch.where(flip, -lower, upper)
    log_cdf_a, log_cdf_b = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    # log(cdf(b) - cdf(a)) = log cdf(b) + log(1 - cdf(a) / cdf(b)); the clamp keeps log1p finite for an empty bin
    inner = log_cdf_b + torch.log1p(-torch.exp(log_cdf_a - log_cdf_b).clamp(max=1.0 - 1e-7))
    edge = 1.0 - bin_width  # x below -edge is the lowest bin, above +edge the highest
    lowest_bin = torch.special.log_ndtr(upper)  # P(z < upper)
    highest_bin = torch.special.log_ndtr(-lower)  # P(z > lower)
    log_prob = torch.where(x < -edge, lowest_bin, torch.where(x > edge, highest_bin, inner))
    return log_prob.clamp(min=math.log(1e-12))


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def _per_sample(values: Tensor, ndim: int) -> Tensor:
    """(B,) -> (B, 1, ..., 1) with `ndim` dimensions in all, for broadcasting against (B, C, H, W)."""
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


# --------------------------------------------------------------------------------------------------------
# Interface
# --------------------------------------------------------------------------------------------------------


@dataclass
class ObjectiveSample:
    """One noised training batch and its regression target.

    t: (B,) timesteps: long in [0, T) for ddpm, float in [0, 1] for flow (pass `objective.model_time(t)` to the model)
    x0: (B, C, H, W) clean data
    noise: (B, C, H, W) the Gaussian noise eps
    x_t: (B, C, H, W) the model input
    target: (B, C, H, W) what the first C output channels regress onto (eps for ddpm, eps - x0 for flow)
    """

    t: Tensor
    x0: Tensor
    noise: Tensor
    x_t: Tensor
    target: Tensor


class Objective(ABC):
    """Noising process, target and loss of one training objective."""

    name: str
    learn_sigma: bool

    def sample(
        self, x0: Tensor, generator: torch.Generator | None = None, *, t: Tensor | None = None, noise: Tensor | None = None
    ) -> ObjectiveSample:
        """Draw t and eps (unless given) and noise `x0` (B, C, H, W).

        `generator` must live on `x0.device`. Passing `t` and/or `noise` fixes them (evaluation, tests).
        """
        if t is None:
            t = self.sample_t(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.add_noise(x0, t, noise)
        return ObjectiveSample(t=t, x0=x0, noise=noise, x_t=x_t, target=self.target(x0, noise))

    @abstractmethod
    def sample_t(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """(B,) training timesteps."""

    @abstractmethod
    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t (B, C, H, W) from x0, t (B,) and noise."""

    @abstractmethod
    def target(self, x0: Tensor, noise: Tensor) -> Tensor:
        """(B, C, H, W) regression target of the first C output channels."""

    @abstractmethod
    def model_time(self, t: Tensor) -> Tensor:
        """(B,) float time that the model's timestep embedder receives for objective time t (B,)."""

    @abstractmethod
    def loss(self, model_output: Tensor, s: ObjectiveSample) -> dict[str, Tensor]:
        """Loss terms of `model_output` (B, C or 2C, H, W) on the batch `s`.

        Returns scalars averaged over the batch: "loss" (what to backpropagate) and its components
        ("mse"; "vlb" for ddpm with learn_sigma).
        """

    def _split_output(self, model_output: Tensor, channels: int) -> tuple[Tensor, Tensor | None]:
        """(B, C or 2C, H, W) -> prediction (B, C, H, W), variance values (B, C, H, W) or None."""
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.shape[1] != expected:
            raise ValueError(
                f"model output has {model_output.shape[1]} channels; expected {expected} for {channels} data "
                f"channels with learn_sigma={self.learn_sigma}"
            )
        if self.learn_sigma:
            return model_output[:, :channels], model_output[:, channels:]
        return model_output, None


# --------------------------------------------------------------------------------------------------------
# DDPM (epsilon prediction)
# --------------------------------------------------------------------------------------------------------


class DDPMObjective(Objective):
    """Discrete DDPM: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t uniform in [0, T), target eps.

    Betas are linear from `beta_start` to `beta_end` over `num_timesteps` (taken as given; ADM's 1000/T
    rescaling of the endpoints is not applied). The schedule is kept in float64 and cast on use.

    With `learn_sigma` the model's last C channels `v` set the reverse-step log-variance to
    `frac * log(beta_t) + (1 - frac) * log(beta_tilde_t)` with `frac = (v + 1) / 2` (ADM "learned_range"),
    and the loss is L_simple + L_vlb, where L_vlb sees the mean through a stop-gradient so that only the
    variance is trained by it.
    """

    name = "ddpm"

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, learn_sigma: bool = False):
        if num_timesteps < 2:  # the posterior's log-variance at t=0 is taken from t=1
            raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        self.num_timesteps = num_timesteps
        self.learn_sigma = learn_sigma
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # q(x_{t-1} | x_t, x0) = N(coef_x0 * x0 + coef_xt * x_t, beta_tilde_t)
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # beta_tilde_0 = 0; its log is replaced by log(beta_tilde_1) so the learned range stays finite at t=0
        posterior_log_variance = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        self.betas = betas  # (T,) float64, also the schedule handed to the samplers
        self.alphas_cumprod = alphas_cumprod
        self._schedule64 = {
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            "log_betas": torch.log(betas),
            "posterior_log_variance_clipped": posterior_log_variance,
            "posterior_coef_x0": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_coef_xt": (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
        }
        self._schedule_on: dict[torch.device, dict[str, Tensor]] = {}  # float32 copies per device

    def _at(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Schedule entry `name` at timesteps t (B,), shaped (B, 1, 1, 1) to broadcast against `like`."""
        if t.device not in self._schedule_on:
            # float32 copies: some devices (mps) have no float64; 1000 entries each, made once per device
            self._schedule_on[t.device] = {k: v.float().to(t.device) for k, v in self._schedule64.items()}
        return _per_sample(self._schedule_on[t.device][name][t], like.ndim).to(like.dtype)

    def sample_t(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)

    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return self._at("sqrt_alphas_cumprod", t, x0) * x0 + self._at("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def target(self, x0: Tensor, noise: Tensor) -> Tensor:
        return noise

    def model_time(self, t: Tensor) -> Tensor:
        """The integer step itself, as float (the DiT embedder was built for steps in [0, 1000))."""
        return t.float()

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0 implied by an epsilon prediction: (x_t - sqrt(1 - abar) eps) / sqrt(abar). Shapes (B, C, H, W)."""
        return self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Mean of q(x_{t-1} | x_t, x0), (B, C, H, W)."""
        return self._at("posterior_coef_x0", t, x_t) * x0 + self._at("posterior_coef_xt", t, x_t) * x_t

    def model_log_variance(self, v: Tensor, t: Tensor) -> Tensor:
        """Learned log-variance (B, C, H, W): interpolate log(beta_t) and clipped log(beta_tilde_t) by (v + 1) / 2."""
        frac = (v + 1.0) / 2.0
        return frac * self._at("log_betas", t, v) + (1.0 - frac) * self._at("posterior_log_variance_clipped", t, v)

    def vlb_terms(self, eps_pred: Tensor, v: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Per-sample variational-bound term L_t in bits per dimension, (B,).

        t > 0: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)); t = 0: -log p(x0 | x_1) under the discretized
        Gaussian decoder. The caller decides whether `eps_pred` carries gradient (the hybrid loss detaches it).
        """
        true_mean = self.posterior_mean(x0, x_t, t)
        true_log_variance = self._at("posterior_log_variance_clipped", t, x_t)
        model_mean = self.posterior_mean(self.predict_x0(x_t, t, eps_pred), x_t, t)
        model_log_variance = self.model_log_variance(v, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / math.log(2.0)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def loss(self, model_output: Tensor, s: ObjectiveSample) -> dict[str, Tensor]:
        """L_simple = mean squared error on eps; with learn_sigma also L_vlb (times T/1000, as ADM does).

        The loss is computed in float32 whatever the output dtype (mixed precision).
        """
        eps_pred, v = self._split_output(model_output.float(), s.x_t.shape[1])
        mse = mean_flat((s.target.float() - eps_pred) ** 2)
        if v is None:
            return {"loss": mse.mean(), "mse": mse.mean()}
        # stop-gradient on the mean: the bound only trains the variance; L_simple trains the mean
        vlb = self.vlb_terms(eps_pred.detach(), v, s.x0.float(), s.x_t.float(), s.t) * (self.num_timesteps / 1000.0)
        return {"loss": (mse + vlb).mean(), "mse": mse.mean(), "vlb": vlb.mean()}


# --------------------------------------------------------------------------------------------------------
# Rectified flow (velocity prediction)
# --------------------------------------------------------------------------------------------------------


class FlowObjective(Objective):
    """Rectified flow: x_t = (1 - t) x0 + t eps, target velocity eps - x0, t in [0, 1] (t = 1 is pure noise).

    This is diffusers' flow-matching convention with sigma = t. Training t is uniform or logit-normal
    (t = sigmoid(n), n ~ N(logit_mean, logit_std^2)). The model sees t * 1000.

    With a learn_sigma model (2C output channels) the loss uses only the first C channels; the variance
    channels get no gradient and are ignored by the flow samplers.
    """

    name = "flow"

    def __init__(self, t_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0, learn_sigma: bool = False):
        if t_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"t_sampling must be one of ['uniform', 'logit_normal'], got {t_sampling!r}")
        self.t_sampling = t_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.learn_sigma = learn_sigma

    def sample_t(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        if self.t_sampling == "uniform":
            return torch.rand(batch, generator=generator, device=device)
        n = torch.randn(batch, generator=generator, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * n)

    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        t = _per_sample(t, x0.ndim).to(x0.dtype)
        return (1.0 - t) * x0 + t * noise

    def target(self, x0: Tensor, noise: Tensor) -> Tensor:
        return noise - x0

    def model_time(self, t: Tensor) -> Tensor:
        return t.float() * FLOW_TIME_SCALE

    def loss(self, model_output: Tensor, s: ObjectiveSample) -> dict[str, Tensor]:
        """Mean squared error of the velocity (first C channels, float32)."""
        velocity, _ = self._split_output(model_output.float(), s.x_t.shape[1])
        mse = mean_flat((s.target.float() - velocity) ** 2).mean()
        return {"loss": mse, "mse": mse}


def create_objective(cfg: DiffusionConfig, learn_sigma: bool) -> Objective:
    """The objective named by `cfg.objective` ("ddpm" | "flow"); `learn_sigma` comes from the model config."""
    if cfg.objective == "ddpm":
        return DDPMObjective(cfg.num_timesteps, cfg.beta_start, cfg.beta_end, learn_sigma=learn_sigma)
    if cfg.objective == "flow":
        return FlowObjective(cfg.flow_t_sampling, cfg.flow_logit_mean, cfg.flow_logit_std, learn_sigma=learn_sigma)
    raise ValueError(f"unknown diffusion.objective {cfg.objective!r}. Allowed: ['ddpm', 'flow']")
