"""The one interface between data space (images) and model space (what the DiT denoises).

Letters (docs/method/README.md): B images, C_img image channels (1 for digits, 3 for RGB), H_img x W_img
image side, C model-space channels, H x W model-space side = (H_img / downsample) x (W_img / downsample).

`decode` maps model-space tensors z (B, C, H, W) to images x (B, C_img, H_img, W_img) in [-1, 1].
Sampling only ever calls this interface, so nothing else knows whether the model works on pixels
(`IdentityCodec`, the digits) or on VAE latents (the diffusers AutoencoderKL codec, below). Training never
encodes: the digits are already pixels, and latents are encoded once, ahead of training, by
`racedit.data.latent_extract` (`AutoencoderKLCodec.encode_moments`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch


class Codec(ABC):
    """Decode model-space tensors to images.

    Subclasses set `channels` (C, model-space channels) and `downsample` (image side / model side), and
    override `to` when they hold weights.
    """

    channels: int
    downsample: int

    @abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Model-space z (B, C, H, W) -> images (B, C_img, H * downsample, W * downsample), nominally in
        [-1, 1]."""

    def model_size(self, image_size: int) -> int:
        """Model-space side for an image side; the image side must be a multiple of `downsample`."""
        if image_size % self.downsample:
            raise ValueError(f"image size {image_size} is not a multiple of the codec downsample {self.downsample}")
        return image_size // self.downsample

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Codec:
        """Move any weights; a codec without weights returns itself unchanged."""
        return self


class IdentityCodec(Codec):
    """Pixel space: z is the image itself (digits). `decode` returns its input, not a copy."""

    downsample = 1

    def __init__(self, channels: int = 1):
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = channels

    def _check(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if t.ndim != 4 or t.shape[1] != self.channels:
            raise ValueError(f"IdentityCodec.{what} expects (B, {self.channels}, H, W), got {tuple(t.shape)}")
        return t

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Model-space (B, C, H, W) -> the same tensor."""
        return self._check(z, "decode")

    def __repr__(self) -> str:
        return f"IdentityCodec(channels={self.channels})"


# --- Latent space ----------------------------------------------------------------------------------------


def load_autoencoder_kl(vae: str | Path, torch_dtype: torch.dtype | None = None):
    """A diffusers `AutoencoderKL` from a hub id (e.g. `stabilityai/sd-vae-ft-ema`) or a local directory.

    A local directory may hold the VAE itself (config.json + weights, as written by `save_pretrained` or
    `hf download`) or a whole pipeline with the VAE in `vae/`. A hub id is resolved by huggingface_hub
    (its cache, or the network; set HF_HUB_OFFLINE=1 to forbid the network), and only when one is passed.
    """
    from diffusers import AutoencoderKL  # late import: diffusers is slow to import

    path = Path(vae)
    kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            return AutoencoderKL.from_pretrained(path, subfolder="vae", **kwargs)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"VAE directory {str(path)!r} has no config.json (nor vae/config.json)")
        return AutoencoderKL.from_pretrained(path, **kwargs)
    if path.exists() or str(vae).startswith((".", "/", "~")) or str(vae).count("/") != 1:
        raise FileNotFoundError(f"VAE {str(vae)!r} is neither a local directory nor a hub id of the form owner/name")
    try:
        return AutoencoderKL.from_pretrained(str(vae), **kwargs)
    except OSError as e:
        raise OSError(f"could not load the VAE {str(vae)!r}: it is not a local directory, and as a hub id it failed "
                      f"({e}). Offline, pass a local directory holding the VAE (config.json + weights).") from e


class AutoencoderKLCodec(Codec):
    """SD-VAE latent space: a diffusers `AutoencoderKL`, loaded on first use.

    Model space is z = (posterior - shift_factor) * scaling_factor (DiT: 0.18215, no shift), so that z has
    roughly unit variance. C = the VAE's `latent_channels` (4 for SD-VAE); downsample = 2^(number of
    encoder blocks - 1) (8 for SD-VAE: 256 x 256 images <-> 32 x 32 latents).

    `vae` is a hub id or a local directory (`load_autoencoder_kl`), or an `AutoencoderKL` instance.
    `scaling_factor` / `shift_factor` default to the VAE config's; pass the values latents were *stored*
    with (the latent manifest's) when decoding stored latents with another VAE. `channels` / `downsample`
    may be given (from a manifest) so that reading them does not load the VAE; otherwise they come from
    the VAE config. The weights load at the first `encode_moments`/`decode` (training on stored latents never
    needs them; sampling does), on the device and dtype last given to `to` (default CPU, float32).
    """

    def __init__(self, vae, scaling_factor: float | None = None, shift_factor: float | None = None,
                 channels: int | None = None, downsample: int | None = None):
        self._module = None if isinstance(vae, (str, Path)) else vae
        self.vae_id = str(vae) if isinstance(vae, (str, Path)) else \
            str(getattr(getattr(vae, "config", None), "_name_or_path", "") or "<module>")
        self._scaling_factor, self._shift_factor = scaling_factor, shift_factor
        self._channels, self._downsample = channels, downsample
        self._device: torch.device = torch.device("cpu")
        self._dtype: torch.dtype = torch.float32
        if self._module is not None:
            p = next(self._module.parameters())
            self._device, self._dtype = p.device, p.dtype
            self._module.eval().requires_grad_(False)

    # --- lazily resolved properties ---
    @property
    def vae(self):
        """The `AutoencoderKL` (loaded now if it was not yet)."""
        if self._module is None:
            module = load_autoencoder_kl(self.vae_id, torch_dtype=self._dtype)
            self._module = module.to(self._device).eval().requires_grad_(False)
        return self._module

    @property
    def loaded(self) -> bool:
        return self._module is not None

    @property
    def scaling_factor(self) -> float:
        if self._scaling_factor is None:
            self._scaling_factor = float(self.vae.config.scaling_factor)
        return self._scaling_factor

    @property
    def shift_factor(self) -> float:
        if self._shift_factor is None:
            self._shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        return self._shift_factor

    @property
    def channels(self) -> int:  # type: ignore[override]
        if self._channels is None:
            self._channels = int(self.vae.config.latent_channels)
        return self._channels

    @property
    def downsample(self) -> int:  # type: ignore[override]
        if self._downsample is None:
            self._downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self._downsample

    # --- the Codec interface ---
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> AutoencoderKLCodec:
        """Where (and in which dtype) the VAE runs; moves it now if loaded, else remembers for the load."""
        if device is not None:
            self._device = torch.device(device)
        if dtype is not None:
            self._dtype = dtype
        if self._module is not None:
            current = next(self._module.parameters()).dtype
            self._module.to(self._device, None if self._dtype == current else self._dtype)
        return self

    @torch.no_grad()
    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H_img, W_img) in [-1, 1] -> the scaled posterior (mean, std), each (B, C, H, W) float32.

        mean = (posterior mean - shift) * scaling_factor and std = posterior std * scaling_factor, so a
        posterior sample in model space is mean + std * N(0, 1).
        """
        vae = self.vae
        dist = vae.encode(x.to(self._device, self._dtype)).latent_dist
        sf = self.scaling_factor
        mean = (dist.mean.float() - self.shift_factor) * sf
        return mean, dist.std.float() * sf

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Model-space z (B, C, H, W) -> images (B, 3, 8H, 8W) float32, nominally in [-1, 1] (not clamped)."""
        vae = self.vae
        latents = z.to(self._device, self._dtype) / self.scaling_factor + self.shift_factor
        return vae.decode(latents).sample.float()

    def __repr__(self) -> str:
        sf = self._scaling_factor if self._scaling_factor is not None else "<from VAE config>"
        return f"AutoencoderKLCodec(vae={self.vae_id!r}, scaling_factor={sf}, loaded={self.loaded})"
