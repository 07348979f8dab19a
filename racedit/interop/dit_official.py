"""Official DiT checkpoints (facebookresearch/DiT layout, `DiT-XL-2-256x256.pt`, ...) -> racedit.

The layouts share their parameter names, so the map is the identity; what `from_dit_state_dict` does is
infer the architecture from the shapes and refuse anything that does not match it. `load_dit_checkpoint`
reads the file with `torch.load(weights_only=True)`: a pickle that carries code is refused, not run.
"""


from __future__ import annotations

import argparse
import contextlib
import math
import re
import warnings
from pathlib import Path

import torch

from racedit.config import (
    ModelConfig,
)
from racedit.interop.common import (
    DEFAULT_VAE,
    VAE_DOWNSAMPLE,
    ConversionError,
    build_dense_model,
    check_tensors,
    converted_config,
    dense_model_config,
    fit_report,
    fresh_out_dir,
    need_tensor,
    save_converted,
    shape_str,
)
from racedit.models import DiT

# ------------------------------------------------------------------------------ official DiT checkpoints


def _allow_namespace():
    """A context in which weights_only unpickling also accepts argparse.Namespace (DiT training checkpoints)."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is not None:
        return safe_globals([argparse.Namespace])
    torch.serialization.add_safe_globals([argparse.Namespace])  # torch 2.4: no context manager
    return contextlib.nullcontext()



def load_dit_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an official DiT checkpoint file, read without running any code from it.

    `.pt`/`.pth` files load with `torch.load(weights_only=True)` (tensors and plain containers only; a
    pickle carrying code raises ConversionError and executes nothing); `.safetensors` files with
    safetensors. A training checkpoint of DiT's train.py ({"model", "ema", "opt", "args"}) gives its EMA
    weights; its `args` (an argparse.Namespace) is the one non-container type allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return check_tensors(load_file(str(path)), str(path))
        except ConversionError:
            raise
        except Exception as e:
            raise ConversionError(f"{path} cannot be read as safetensors ({type(e).__name__}: {e})") from None
    try:
        with _allow_namespace(), warnings.catch_warnings():
            # torch's note on a pickle protocol other than 2 is noise: the load either works or is refused below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code-carrying pickles; RuntimeError for damaged files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"{path} was refused by torch.load(weights_only=True): it is damaged or holds more than tensors and "
            f"plain containers (e.g. objects whose unpickling would run code), and racedit never runs code from "
            f"a checkpoint. Loader said: {type(e).__name__}: {first}") from None
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
        obj = obj["ema"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        warnings.warn(f"{path}: no EMA weights, using 'model'", stacklevel=2)
        obj = obj["model"]
    return check_tensors(obj, str(path))


def infer_dit_config(state_dict: dict[str, torch.Tensor], image_size: int | None = None,
                     num_heads: int | None = None, source: str = "DiT state dict") -> ModelConfig:
    """The dense ModelConfig an official-layout state dict describes, read from its shapes.

    width D, in-channels C and patch p from x_embedder.proj.weight (D, C, p, p); depth from the block
    indices; latent side from pos_embed (1, L, D) (L = (side / p)^2); learn_sigma from the final layer's
    p^2 C_out outputs (C_out = 2C or C); num_classes from the label table (rows - 1, the last row being
    the null class of classifier-free guidance); the MLP ratio from fc1. Heads come from the DiT preset of
    (depth, D) unless `num_heads` is given. `image_size`, when given, must be 8 x the latent side.
    """
    sd = check_tensors(state_dict, source)
    proj = need_tensor(sd, "x_embedder.proj.weight", 4, source)
    hidden, channels, p, q = proj.shape
    if p != q:
        raise ConversionError(f"{source}: x_embedder.proj.weight {shape_str(proj.shape)} has a non-square patch")
    pos = need_tensor(sd, "pos_embed", 3, source)
    tokens = pos.shape[1]
    side = math.isqrt(tokens)
    if pos.shape[0] != 1 or pos.shape[2] != hidden or side * side != tokens:
        raise ConversionError(f"{source}: pos_embed {shape_str(pos.shape)} should be (1, L, {hidden}) with L a square")
    input_size = side * p
    if image_size is not None and image_size != input_size * VAE_DOWNSAMPLE:
        raise ConversionError(f"{source}: image_size {image_size} does not match the weights: pos_embed "
                              f"{shape_str(pos.shape)} with patch {p} means {input_size} x {input_size} latents, i.e. "
                              f"{input_size * VAE_DOWNSAMPLE} x {input_size * VAE_DOWNSAMPLE} images")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = len(blocks)
    if depth == 0 or blocks != set(range(depth)):
        raise ConversionError(f"{source}: block indices {sorted(blocks)[:10]} are not 0..depth-1")
    table = need_tensor(sd, "y_embedder.embedding_table.weight", 2, source)
    if table.shape[0] < 2:
        raise ConversionError(f"{source}: y_embedder.embedding_table.weight {shape_str(table.shape)} has no class rows")
    fc1 = need_tensor(sd, "blocks.0.mlp.fc1.weight", 2, source)
    mlp_ratio = fc1.shape[0] / hidden
    final = need_tensor(sd, "final_layer.linear.weight", 2, source)
    out_ch, rest = divmod(final.shape[0], p * p)
    if rest or out_ch not in (channels, 2 * channels):
        raise ConversionError(f"{source}: final_layer.linear.weight {shape_str(final.shape)} gives {final.shape[0]} "
                              f"outputs per token; expected p^2 C = {p * p * channels} or p^2 2C = "
                              f"{p * p * 2 * channels} (learned variance)")
    return dense_model_config(depth, hidden, p, num_heads, source, input_size=input_size, in_channels=channels,
                         num_classes=table.shape[0] - 1, learn_sigma=out_ch == 2 * channels,
                         class_dropout_prob=0.1, mlp_ratio=mlp_ratio)


def from_dit_state_dict(state_dict: dict[str, torch.Tensor], image_size: int | None = None,
                        num_heads: int | None = None, source: str = "DiT state dict") -> DiT:
    """An official DiT state dict (facebookresearch/DiT layout) -> a racedit `DiT` in eval mode.

    The architecture is inferred from the shapes (`infer_dit_config`); then every key and shape must be
    exactly those of that architecture, else ConversionError names the missing, unexpected and mismatched
    keys with both shapes. Weights are cast to float32.
    """
    cfg = infer_dit_config(state_dict, image_size, num_heads, source)
    model = build_dense_model(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    m = model.config
    fit_report(expected, state_dict, f"{source} does not fit {m.name} as inferred from its shapes (depth "
                f"{m.depth}, width {m.hidden_size}, patch {m.patch_size}, {m.input_size}x{m.input_size}x"
                f"{m.in_channels} latents, {m.num_classes} classes, learn_sigma={m.learn_sigma})")
    model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return model.eval()


def convert_dit_file(path: str | Path, out: str | Path, image_size: int | None = None, vae: str = DEFAULT_VAE,
                     num_heads: int | None = None) -> Path:
    """An official DiT checkpoint file -> a racedit checkpoint under `out` (see `from_dit_state_dict`)."""
    fresh_out_dir(out)
    model = from_dit_state_dict(load_dit_checkpoint(path), image_size, num_heads, source=str(path))
    return save_converted(model, out, converted_config(model.config, vae), source=str(path))


