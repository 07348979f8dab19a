"""Interoperability: official DiT checkpoints and diffusers DiT models in and out, and dense -> MoE upcycling.

Three conversions, each checked strictly (every key and shape named when something does not fit):

- `from_dit_state_dict`: a state dict of the facebookresearch/DiT layout (`DiT-XL-2-256x256.pt`, ...) ->
  a racedit `DiT`. The layouts share their parameter names, so the map is the identity; what it does is
  infer the architecture from the shapes and refuse anything that does not match it. `load_dit_checkpoint`
  reads the file with `torch.load(weights_only=True)`: a pickle that carries code is refused, not run.
- `from_diffusers_state_dict` / `to_diffusers`: diffusers' `DiTTransformer2DModel` <-> racedit `DiT`.
- `upcycle`: a dense DiT -> a Race-DiT (every MLP becomes a k-in-E MoE initialised from it).

A converted model is saved as an ordinary racedit checkpoint (`save_converted`), so `sample.py` samples it.

Two conventions differ between DiT and diffusers' DiTTransformer2DModel, and racedit reproduces either:
- the timestep frequencies: DiT uses exp(-ln(1e4) i / 128), diffusers exp(-ln(1e4) i / 127) (its
  `Timesteps(downscale_freq_shift=1)`); `model.timestep_freq_shift` (0 or 1) selects one. Imports from
  diffusers set 1, so the racedit model computes what the diffusers model computes. diffusers cannot
  express 0, so exporting a DiT-convention model (0) to diffusers changes its function slightly (a warning
  says so); the official diffusers port `facebook/DiT-XL-2-256` carries the same difference.
- the LayerNorm before the MLP: eps 1e-6 in DiT, `norm_eps` (default 1e-5) in diffusers. racedit uses
  1e-6; exports set `norm_eps=1e-6`; importing a model with another norm_eps warns (the effect is
  relative (norm_eps - 1e-6) / (2 var(h)) on that LayerNorm's output, negligible for trained models).

Upcycling (`upcycle`, `init_moe_from_dense`), for a target of k-in-E experts (m = E / k copies per chunk):

1. Experts. The dense hidden units (k h of them, h = the expert width) are split into k contiguous chunks.
   Chunk c seeds experts c m, ..., c m + m - 1: each copy gets the chunk's rows of fc1 and columns of fc2,
   plus Gaussian noise of std `noise_std` times the std of those weights when m > 1 (no noise when m = 1:
   the experts are distinct chunks already). Each expert's output bias is fc2.bias / k, so the k chunks of
   one token add up to the dense bias. Outputs are divided by the nominal gate value s0 (below).
2. Router: "bins". A fixed random unit direction w projects each token's input u to f = w . u (about
   N(0, 1) for LayerNorm-ed inputs); m - 1 thresholds at the standard-normal quantiles i / m cut f into m
   equal-mass bins, and a token in bin j uses copy j of every chunk. The router trunk computes the ramps
   GELU(+-a (f - theta_i)) in 2 (m - 1) of its D units, and the gating head gives expert (c, j) the logit
   l0 - (eps / a) (ramps measuring how far f lies outside bin j): l0 inside the bin, about l0 - eps d at a
   distance d outside. l0 = 1 for identity gating, 0 for sigmoid and softmax; s0 is the gate value of a
   selected pair (1, 1/2, 1/k). Every token then has exactly k pairs at the top score, one per chunk, and
   all its other pairs lower. Identity and sigmoid scores compare across tokens as they are, so Expert
   Race's global top-K (K = B L k), token choice's per-token top-k and the eval threshold tau = s0 all
   select exactly one copy of every chunk for every token (a = 1e3, eps = 1). softmax normalises each
   token's scores, which couples tokens in a global race: its outside pairs must score ~0, hence a steep
   a = 1e5, eps = 1e4 (and tau = s0 / 2). The other D - 2 (m - 1) trunk units keep a fresh init with zero
   gating-head columns (silent at first, but they learn); the target head ignores the ramp units at first.
   Under Adam the gating head's ramp weights (eps / a: 1e-3, softmax 0.1) can move the bins within tens
   (softmax: about a thousand) of steps at lr 1e-4: the routing is learnt from there on.
3. The gap. With m = 1 (E = k) every expert is selected with gate value s0 and the MoE output equals the
   dense MLP up to float rounding. With m > 1 and no noise the selection is still exact (except for tokens
   within float resolution of a bin edge) and gate values exceed s0 by at most 0.34 eps / a relative (only
   within ~5 / a of an edge, where the GELU tail is not yet 0); the expert noise adds its own difference
   (about noise_std relative, measured). `moe_dense_gap` measures the gap; tests/test_upcycle.py bounds it.
   Capacity-style strategies (expert choice, BL/BE/LE choice) select per expert or per group, so their
   step-0 output is only approximately dense (bins are equal-mass only for N(0, 1) projections).
Every other weight is copied.

Letters: B images, L (= T) tokens per image, N = B L, D width, E experts, k experts per token, h expert
hidden width, m = E / k copies of each chunk, C input channels, p patch side.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path
from statistics import NormalDist

import torch
from torch import nn

from racedit.config import (
    Config,
    ConfigError,
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    SampleConfig,
    validate,
)
from racedit.models import DiT, resolve_model_config
from racedit.models.dit import sincos_2d
from racedit.models.presets import PATCHES, SIZES, resolve_preset
from racedit.training.checkpoint import load_model

__all__ = [
    "ConversionError", "DEFAULT_VAE", "load_dit_checkpoint", "infer_dit_config", "from_dit_state_dict",
    "read_diffusers_transformer", "from_diffusers_state_dict", "to_diffusers_state_dict", "to_diffusers",
    "converted_config", "save_converted", "convert_dit_file", "convert_diffusers_dir", "export_diffusers",
    "upcycle", "init_moe_from_dense", "moe_dense_gap", "upcycle_checkpoint", "parse_model_overrides",
]

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # the VAE the official DiT checkpoints were trained with
VAE_DOWNSAMPLE = 8  # SD-VAE: 256 x 256 images <-> 32 x 32 latents
DIT_NORM_EPS = 1e-6  # every LayerNorm of DiT (racedit's too)


class ConversionError(ValueError):
    """Weights that cannot be converted as asked; the message names the key, the shapes or the setting."""


# ----------------------------------------------------------------------------------------------- helpers


def _fmt(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def _check_tensors(state: dict, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not state:
        raise ConversionError(f"{source}: expected a non-empty state dict (parameter name -> tensor), "
                              f"got {type(state).__name__}")
    bad = [f"{k!r}: {type(v).__name__}" for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{source}: not a state dict; these entries are not tensors: {bad[:5]}")
    return state


def _need(state: dict, key: str, ndim: int, source: str) -> torch.Tensor:
    if key not in state:
        near = sorted(state)[:8]
        raise ConversionError(f"{source}: key {key!r} is missing (the file's first keys: {near}); "
                              f"is this a checkpoint of the expected layout?")
    t = state[key]
    if t.ndim != ndim:
        raise ConversionError(f"{source}: {key!r} has shape {_fmt(t.shape)}; expected {ndim} dimensions")
    return t


def _fit_report(expected: dict[str, tuple], given: dict[str, torch.Tensor], what: str) -> None:
    """Raise ConversionError listing missing and unexpected keys and shape mismatches."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = [f"{k}: file {_fmt(given[k].shape)} vs expected {_fmt(expected[k])}"
             for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k])]
    if missing or unexpected or wrong:
        lines = [f"{what}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
        if wrong:
            lines.append(f"  shape mismatches ({len(wrong)}): {wrong[:6]}{' ...' if len(wrong) > 6 else ''}")
        raise ConversionError("\n".join(lines))


def _size_name(depth: int, hidden: int) -> str | None:
    for size, (d, h, _) in SIZES.items():
        if (d, h) == (depth, hidden):
            return size
    return None


def _model_config(depth: int, hidden: int, patch: int, num_heads: int | None, source: str, **fixed) -> ModelConfig:
    """A dense ModelConfig named after the DiT preset of (depth, hidden) when there is one."""
    size = _size_name(depth, hidden)
    if size is None:
        if num_heads is None:
            known = {f"DiT-{s}": (d, h) for s, (d, h, _) in SIZES.items()}
            raise ConversionError(f"{source}: depth {depth} x width {hidden} is no DiT preset {known}; the number "
                                  f"of attention heads cannot be read from the weights, so pass num_heads "
                                  f"(--num-heads)")
        size = "S"
    heads = num_heads if num_heads is not None else SIZES[size][2]
    if hidden % heads:
        raise ConversionError(f"{source}: width {hidden} is not divisible by num_heads={heads}")
    name = f"DiT-{size}/{patch if patch in PATCHES else 2}"
    return ModelConfig(name=name, depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch,
                       moe_experts=0, moe_k=0, **fixed)


def _dense_model(cfg: ModelConfig) -> DiT:
    try:
        return DiT(resolve_model_config(cfg))
    except ConfigError as e:
        raise ConversionError(str(e)) from None


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
            return _check_tensors(load_file(str(path)), str(path))
        except ConversionError:
            raise
        except Exception as e:
            raise ConversionError(f"{path} cannot be read as safetensors ({type(e).__name__}: {e})") from None
    try:
        with _allow_namespace():
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
    return _check_tensors(obj, str(path))


def infer_dit_config(state_dict: dict[str, torch.Tensor], image_size: int | None = None,
                     num_heads: int | None = None, source: str = "DiT state dict") -> ModelConfig:
    """The dense ModelConfig an official-layout state dict describes, read from its shapes.

    width D, in-channels C and patch p from x_embedder.proj.weight (D, C, p, p); depth from the block
    indices; latent side from pos_embed (1, T, D) (T = (side / p)^2); learn_sigma from the final layer's
    p^2 C_out outputs (C_out = 2C or C); num_classes from the label table (rows - 1, the last row being
    the null class of classifier-free guidance); the MLP ratio from fc1. Heads come from the DiT preset of
    (depth, D) unless `num_heads` is given. `image_size`, when given, must be 8 x the latent side.
    """
    sd = _check_tensors(state_dict, source)
    proj = _need(sd, "x_embedder.proj.weight", 4, source)
    hidden, channels, p, q = proj.shape
    if p != q:
        raise ConversionError(f"{source}: x_embedder.proj.weight {_fmt(proj.shape)} has a non-square patch")
    pos = _need(sd, "pos_embed", 3, source)
    tokens = pos.shape[1]
    side = math.isqrt(tokens)
    if pos.shape[0] != 1 or pos.shape[2] != hidden or side * side != tokens:
        raise ConversionError(f"{source}: pos_embed {_fmt(pos.shape)} should be (1, T, {hidden}) with T a square")
    input_size = side * p
    if image_size is not None and image_size != input_size * VAE_DOWNSAMPLE:
        raise ConversionError(f"{source}: image_size {image_size} does not match the weights: pos_embed "
                              f"{_fmt(pos.shape)} with patch {p} means {input_size} x {input_size} latents, i.e. "
                              f"{input_size * VAE_DOWNSAMPLE} x {input_size * VAE_DOWNSAMPLE} images")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = len(blocks)
    if depth == 0 or blocks != set(range(depth)):
        raise ConversionError(f"{source}: block indices {sorted(blocks)[:10]} are not 0..depth-1")
    table = _need(sd, "y_embedder.embedding_table.weight", 2, source)
    if table.shape[0] < 2:
        raise ConversionError(f"{source}: y_embedder.embedding_table.weight {_fmt(table.shape)} has no class rows")
    fc1 = _need(sd, "blocks.0.mlp.fc1.weight", 2, source)
    mlp_ratio = fc1.shape[0] / hidden
    final = _need(sd, "final_layer.linear.weight", 2, source)
    out_ch, rest = divmod(final.shape[0], p * p)
    if rest or out_ch not in (channels, 2 * channels):
        raise ConversionError(f"{source}: final_layer.linear.weight {_fmt(final.shape)} gives {final.shape[0]} "
                              f"outputs per token; expected p^2 C = {p * p * channels} or p^2 2C = "
                              f"{p * p * 2 * channels} (learned variance)")
    return _model_config(depth, hidden, p, num_heads, source, input_size=input_size, in_channels=channels,
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
    model = _dense_model(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    m = model.config
    _fit_report(expected, state_dict, f"{source} does not fit {m.name} as inferred from its shapes (depth "
                f"{m.depth}, width {m.hidden_size}, patch {m.patch_size}, {m.input_size}x{m.input_size}x"
                f"{m.in_channels} latents, {m.num_classes} classes, learn_sigma={m.learn_sigma})")
    model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return model.eval()


# -------------------------------------------------------------------------------------------- diffusers

_DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
_EMB = "transformer_blocks.{i}.norm1.emb."
# racedit name -> diffusers name, for the parts held once (the conditioning embedders live in every block).
_GLOBAL = {
    "x_embedder.proj.weight": "pos_embed.proj.weight",
    "x_embedder.proj.bias": "pos_embed.proj.bias",
    "t_embedder.mlp.0.weight": "timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "timestep_embedder.linear_2.bias",
    "y_embedder.embedding_table.weight": "class_embedder.embedding_table.weight",
    "final_layer.adaLN_modulation.1.weight": "proj_out_1.weight",
    "final_layer.adaLN_modulation.1.bias": "proj_out_1.bias",
    "final_layer.linear.weight": "proj_out_2.weight",
    "final_layer.linear.bias": "proj_out_2.bias",
}
_EMBEDDER_KEYS = ("t_embedder.", "y_embedder.")
_BLOCK = {  # blocks.{i}.<racedit> -> transformer_blocks.{i}.<diffusers> (qkv handled apart)
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}


def _diffusers_defaults() -> dict:
    from diffusers import DiTTransformer2DModel

    sig = inspect.signature(DiTTransformer2DModel.__init__)
    return {n: p.default for n, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


def read_diffusers_transformer(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, Path | None]:
    """(state dict, config, pipeline root or None) of a diffusers DiT directory.

    `path` is a transformer directory (config.json + diffusion_pytorch_model[.fp16].safetensors, sharded
    safetensors with their index, or a .bin read with weights_only=True) or a pipeline directory holding
    it in `transformer/` (then the root is returned too, for its scheduler and VAE).
    """
    path = Path(path)
    root = None
    if not path.is_dir():
        raise ConversionError(f"diffusers directory not found: {path}")
    if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        root, path = path, path / "transformer"
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConversionError(f"{path} has no config.json (nor transformer/config.json): not a diffusers model")
    config = json.loads(cfg_file.read_text())
    cls = config.get("_class_name")
    if cls not in _DIFFUSERS_CLASSES:
        raise ConversionError(f"{cfg_file}: _class_name {cls!r}; expected one of {list(_DIFFUSERS_CLASSES)}")
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for stem in ("diffusion_pytorch_model", "diffusion_pytorch_model.fp16"):
        single, index = path / f"{stem}.safetensors", path / f"{stem}.safetensors.index.json"
        if single.is_file():
            state = load_file(str(single))
            break
        if index.is_file():
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(load_file(str(path / shard)))
            break
    else:
        binary = path / "diffusion_pytorch_model.bin"
        if not binary.is_file():
            raise ConversionError(f"{path}: no diffusion_pytorch_model.safetensors (or .bin) weights")
        try:
            state = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConversionError(f"{binary} was refused by torch.load(weights_only=True) ({type(e).__name__}); "
                                  f"racedit never runs code from a checkpoint") from None
    return _check_tensors(state, str(path)), config, root


def _diffusers_pairs(depth: int) -> Iterator[tuple[str, str]]:
    """(racedit key, diffusers key) for every tensor but q/k/v (racedit fuses them) and pos_embed (diffusers
    recomputes it). racedit's one timestep/class embedder appears once per diffusers block, block 0 first."""
    for ours, theirs in _GLOBAL.items():
        if ours.startswith(_EMBEDDER_KEYS):
            for i in range(depth):
                yield ours, _EMB.format(i=i) + theirs
        else:
            yield ours, theirs
    for i in range(depth):
        for ours, theirs in _BLOCK.items():
            for leaf in ("weight", "bias"):
                yield f"blocks.{i}.{ours}.{leaf}", f"transformer_blocks.{i}.{theirs}.{leaf}"


def _diffusers_expected(model: DiT) -> dict[str, tuple]:
    """The diffusers key -> shape list of the DiTTransformer2DModel equivalent to a dense racedit model."""
    sd = model.state_dict()
    d = model.config.hidden_size
    out = {theirs: tuple(sd[ours].shape) for ours, theirs in _diffusers_pairs(model.config.depth)}
    for i in range(model.config.depth):
        pre = f"transformer_blocks.{i}."
        for name in ("to_q", "to_k", "to_v"):
            out[f"{pre}attn1.{name}.weight"] = (d, d)
            out[f"{pre}attn1.{name}.bias"] = (d,)
    return out


def _diffusers_model_config(config: dict, source: str) -> ModelConfig:
    """The racedit ModelConfig equivalent to a DiTTransformer2DModel config (diffusers' defaults filled in)."""
    c = {**_diffusers_defaults(), **{k: v for k, v in config.items() if not k.startswith("_")}}
    required = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
                "norm_elementwise_affine": False}
    for key, value in required.items():
        if c.get(key) != value:
            raise ConversionError(f"{source}: config {key}={c.get(key)!r}; racedit's DiT block needs {value!r}")
    if c.get("num_embeds_ada_norm") is None:
        raise ConversionError(f"{source}: config num_embeds_ada_norm is null; a class-conditional DiT needs it")
    eps = float(c.get("norm_eps", DIT_NORM_EPS))
    if not math.isclose(eps, DIT_NORM_EPS, rel_tol=1e-6):
        warnings.warn(f"{source}: norm_eps={eps:g} in the MLP-branch LayerNorm; racedit uses {DIT_NORM_EPS:g} "
                      f"(DiT's): outputs differ by about ({eps:g} - 1e-6) / (2 var) of that LayerNorm's input",
                      stacklevel=3)
    heads, head_dim = int(c["num_attention_heads"]), int(c["attention_head_dim"])
    hidden = heads * head_dim
    channels = int(c["in_channels"])
    out_ch = int(c["out_channels"]) if c.get("out_channels") is not None else channels
    if out_ch not in (channels, 2 * channels):
        raise ConversionError(f"{source}: out_channels={out_ch} with in_channels={channels}; expected "
                              f"{channels} or {2 * channels} (learned variance)")
    return _model_config(int(c["num_layers"]), hidden, int(c["patch_size"]), heads, source,
                         input_size=int(c["sample_size"]), in_channels=channels,
                         num_classes=int(c["num_embeds_ada_norm"]), learn_sigma=out_ch == 2 * channels,
                         class_dropout_prob=0.1, mlp_ratio=4.0, timestep_freq_shift=1.0)


def from_diffusers_state_dict(state_dict: dict[str, torch.Tensor], config: dict,
                              source: str = "diffusers DiTTransformer2DModel") -> DiT:
    """A diffusers DiTTransformer2DModel (state dict + config.json dict) -> a racedit `DiT` in eval mode
    that computes the same function (timestep_freq_shift=1; see the module docstring for norm_eps).

    diffusers keeps a copy of the timestep and class embedders in every block; they must all equal block
    0's (racedit holds one), else ConversionError names the first block that differs.
    """
    sd = _check_tensors(state_dict, source)
    cfg = _diffusers_model_config(config, source)
    fc1 = sd.get("transformer_blocks.0.ff.net.0.proj.weight")
    if fc1 is not None and fc1.ndim == 2 and fc1.shape[1] == cfg.hidden_size:
        cfg = replace(cfg, mlp_ratio=fc1.shape[0] / cfg.hidden_size)
    model = _dense_model(cfg)
    m = model.config
    _fit_report(_diffusers_expected(model), sd,
                f"{source} does not fit a DiTTransformer2DModel of its config (depth {m.depth}, width "
                f"{m.hidden_size}, patch {m.patch_size}, {m.num_classes} classes)")
    for i in range(1, m.depth):
        for theirs in (v for k, v in _GLOBAL.items() if k.startswith(_EMBEDDER_KEYS)):
            first, this = sd[_EMB.format(i=0) + theirs], sd[_EMB.format(i=i) + theirs]
            if not torch.equal(first, this):
                raise ConversionError(f"{source}: {_EMB.format(i=i) + theirs} differs from block 0's; racedit "
                                      f"shares one timestep/class embedding between all blocks")
    ours = {}
    for k, theirs in _diffusers_pairs(m.depth):
        ours.setdefault(k, sd[theirs])  # the embedders: block 0's copy (all equal, checked above)
    for i in range(m.depth):
        pre = f"transformer_blocks.{i}."
        for leaf in ("weight", "bias"):
            ours[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([sd[f"{pre}attn1.to_{n}.{leaf}"] for n in "qkv"])
    ours["pos_embed"] = model.pos_embed.detach().clone()  # diffusers recomputes the same sin-cos table
    model.load_state_dict({k: v.float() for k, v in ours.items()})
    return model.eval()


def _check_exportable(cfg: ModelConfig) -> None:
    problems = []
    if cfg.moe_experts:
        problems.append(f"it is a Mixture of Experts ({cfg.moe_k}in{cfg.moe_experts}); diffusers' DiT is dense")
    if cfg.connections != "residual":
        problems.append(f"model.connections={cfg.connections!r} (diffusers: residual only)")
    if cfg.memory != "none":
        problems.append(f"model.memory={cfg.memory!r} (diffusers has no memory layers)")
    if cfg.qk_norm:
        problems.append("model.qk_norm=true (diffusers' DiT has no query/key norm)")
    if cfg.class_dropout_prob <= 0:
        problems.append("model.class_dropout_prob=0: no null-class row (diffusers always has one)")
    if cfg.mlp_ratio != 4.0:
        problems.append(f"model.mlp_ratio={cfg.mlp_ratio} (diffusers' DiT: 4)")
    if cfg.timestep_freq_shift not in (0.0, 1.0):
        problems.append(f"model.timestep_freq_shift={cfg.timestep_freq_shift} (diffusers: 1; DiT: 0)")
    if problems:
        raise ConversionError(f"{cfg.name} cannot be exported to a diffusers DiTTransformer2DModel: "
                              + "; ".join(problems))


def to_diffusers_state_dict(model: DiT) -> tuple[dict[str, torch.Tensor], dict]:
    """A dense racedit `DiT` -> (state dict, constructor config) of the equivalent DiTTransformer2DModel."""
    cfg = model.config
    _check_exportable(cfg)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    d = cfg.hidden_size
    table = sincos_2d(d, cfg.input_size // cfg.patch_size).float().unsqueeze(0)
    if not torch.allclose(sd["pos_embed"].float(), table, atol=1e-5):
        raise ConversionError(f"{cfg.name}: pos_embed is not the fixed sin-cos table that diffusers recomputes (and "
                              f"does not store); max difference {float((sd['pos_embed'] - table).abs().max()):.3g}")
    # the embedder copies are separate tensors: safetensors refuses shared storage
    out = {theirs: sd[ours].clone() if ours.startswith(_EMBEDDER_KEYS) else sd[ours]
           for ours, theirs in _diffusers_pairs(cfg.depth)}
    for i in range(cfg.depth):
        pre = f"transformer_blocks.{i}."
        for leaf in ("weight", "bias"):
            for name, part in zip("qkv", sd[f"blocks.{i}.attn.qkv.{leaf}"].split(d)):
                out[f"{pre}attn1.to_{name}.{leaf}"] = part.clone()
    config = {
        "num_attention_heads": cfg.num_heads, "attention_head_dim": d // cfg.num_heads,
        "in_channels": cfg.in_channels, "out_channels": model.out_channels, "num_layers": cfg.depth,
        "sample_size": cfg.input_size, "patch_size": cfg.patch_size, "num_embeds_ada_norm": cfg.num_classes,
        "activation_fn": "gelu-approximate", "attention_bias": True, "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False, "norm_eps": DIT_NORM_EPS,
    }
    return out, config


def to_diffusers(model: DiT):
    """A dense racedit `DiT` -> an equivalent diffusers `DiTTransformer2DModel` (eval mode, float32).

    Exact for models with timestep_freq_shift=1 (e.g. imported from diffusers). A DiT-convention model
    (shift 0) is exported with a warning: diffusers computes its timestep frequencies with shift 1.
    """
    from diffusers import DiTTransformer2DModel

    state, config = to_diffusers_state_dict(model)
    if model.config.timestep_freq_shift != 1.0:
        warnings.warn("this model uses DiT's timestep frequencies (model.timestep_freq_shift=0); diffusers' "
                      "DiTTransformer2DModel always uses its own (shift 1), so the exported model's outputs "
                      "differ slightly, as those of diffusers' own port of the DiT weights do", stacklevel=2)
    out = DiTTransformer2DModel(**config)
    out.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return out.eval()


# ---------------------------------------------------------------------------------- racedit checkpoints


def converted_config(model_cfg: ModelConfig, vae: str = DEFAULT_VAE, diffusion: DiffusionConfig | None = None,
                     sample: SampleConfig | None = None) -> Config:
    """The run config saved with a converted checkpoint.

    data.kind=latents with no latent directory and data.vae naming the decoder (a hub id or a local
    directory); diffusion: DDPM, 1000 linear betas 1e-4..0.02 (DiT's); sampling: DDPM, 250 steps, CFG 4.0
    on all channels (`sample.py --guidance-channels 3` gives DiT's legacy 3-channel guidance).
    """
    cfg = Config(model=model_cfg, diffusion=diffusion or DiffusionConfig(),
                 data=DataConfig(kind="latents", latents="", vae=str(vae)),
                 sample=sample or SampleConfig(sampler="ddpm", steps=250, cfg_scale=4.0, guidance_channels=0))
    validate(cfg)
    return cfg


def _fresh_out_dir(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"output {out} exists and is not an empty directory; choose a new --out")
    return out


def save_converted(model: DiT, out: str | Path, config: Config, source: str, provenance: dict | None = None) -> Path:
    """Save `model` as racedit checkpoint `step_0000000` under `out` (with `last` pointing at it): its weights
    as both the live and the EMA weights (converted weights are EMA weights). The train state records
    `provenance`, by default {"converted_from": source}. Returns the checkpoint dir."""
    from racedit.training.checkpoint import save_checkpoint

    out = _fresh_out_dir(out)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return save_checkpoint(out, 0, model_state=state, ema_state=state, config=config,
                           train_state={"step": 0, **(provenance or {"converted_from": str(source)})})


def convert_dit_file(path: str | Path, out: str | Path, image_size: int | None = None, vae: str = DEFAULT_VAE,
                     num_heads: int | None = None) -> Path:
    """An official DiT checkpoint file -> a racedit checkpoint under `out` (see `from_dit_state_dict`)."""
    _fresh_out_dir(out)
    model = from_dit_state_dict(load_dit_checkpoint(path), image_size, num_heads, source=str(path))
    return save_converted(model, out, converted_config(model.config, vae), source=str(path))


def _scheduler_diffusion(root: Path | None) -> DiffusionConfig:
    """DDPM settings from a pipeline's scheduler config when it has one (DiT's defaults otherwise)."""
    default = DiffusionConfig()
    f = root / "scheduler" / "scheduler_config.json" if root is not None else None
    if f is None or not f.is_file():
        return default
    s = json.loads(f.read_text())
    if s.get("beta_schedule", "linear") != "linear" or s.get("trained_betas"):
        warnings.warn(f"{f}: beta_schedule {s.get('beta_schedule')!r}; racedit's DDPM objective uses linear betas, "
                      f"keeping DiT's", stacklevel=3)
        return default
    return replace(default, num_timesteps=int(s.get("num_train_timesteps", default.num_timesteps)),
                   beta_start=float(s.get("beta_start", default.beta_start)),
                   beta_end=float(s.get("beta_end", default.beta_end)))


def convert_diffusers_dir(path: str | Path, out: str | Path, vae: str | None = None) -> Path:
    """A diffusers DiT directory (transformer or whole pipeline) -> a racedit checkpoint under `out`.

    The VAE: `vae` if given, else the pipeline's own `vae/` directory (an absolute path), else DEFAULT_VAE.
    """
    _fresh_out_dir(out)
    state, config, root = read_diffusers_transformer(path)
    model = from_diffusers_state_dict(state, config, source=str(path))
    if vae is None:
        vae = str((root / "vae").resolve()) if root is not None and (root / "vae").is_dir() else DEFAULT_VAE
    cfg = converted_config(model.config, vae, diffusion=_scheduler_diffusion(root))
    return save_converted(model, out, cfg, source=str(path))


def export_diffusers(ckpt: str | Path, out: str | Path, vae: str | None = None, use_ema: bool = True) -> Path:
    """A dense racedit checkpoint (ddpm objective) -> a diffusers DiTPipeline directory at `out`.

    Writes transformer/ (DiTTransformer2DModel), scheduler/ (DDIMScheduler with the checkpoint's betas, as
    the official port has) and model_index.json; plus vae/ when `vae` (or the checkpoint's data.vae) is a
    local directory. Without it, load with `DiTPipeline.from_pretrained(out, vae=AutoencoderKL...)`.
    Written into a temporary directory and renamed into place.
    """
    from diffusers import DDIMScheduler, DiTPipeline

    out = _fresh_out_dir(out)
    model, cfg, path = load_model(ckpt, "ema" if use_ema else "model")
    if cfg.diffusion.objective != "ddpm":
        raise ConversionError(f"{path}: objective {cfg.diffusion.objective!r}; DiTPipeline's schedulers sample "
                              f"epsilon-prediction (ddpm) models only")
    transformer = to_diffusers(model)
    if model.num_classes != 1000:
        warnings.warn(f"{path}: {model.num_classes} classes; DiTPipeline takes class 1000 as the null class of "
                      f"guidance (ImageNet), so sample this export with guidance_scale=1", stacklevel=2)
    d = cfg.diffusion
    scheduler = DDIMScheduler(num_train_timesteps=d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
                              beta_schedule="linear", clip_sample=False)
    vae = vae or cfg.data.vae or None
    vae_module = None
    if vae is not None and Path(vae).is_dir():
        from racedit.data.codec import load_autoencoder_kl

        vae_module = load_autoencoder_kl(vae)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if vae_module is not None:
            DiTPipeline(transformer=transformer, vae=vae_module, scheduler=scheduler).save_pretrained(tmp)
        else:
            import diffusers

            transformer.save_pretrained(tmp / "transformer")
            scheduler.save_pretrained(tmp / "scheduler")
            (tmp / "model_index.json").write_text(json.dumps({
                "_class_name": "DiTPipeline", "_diffusers_version": diffusers.__version__,
                "scheduler": ["diffusers", "DDIMScheduler"], "transformer": ["diffusers", "DiTTransformer2DModel"],
                "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------------------- upcycling

# Router bins per gating: (a, the ramp slope per unit of the projection f; eps, the logit drop per unit of
# distance to the bin). softmax normalises each token's scores, which couples tokens in a global race, so
# its outside logits must fall steeply for the selection to stay one copy per chunk.
BIN_RAMP_MARGIN = {"identity": (1e3, 1.0), "sigmoid": (1e3, 1.0), "softmax": (1e5, 1e4)}


def _nominal_logit(gating: str) -> float:
    return 1.0 if gating == "identity" else 0.0


def _nominal_gate(gating: str, k: int) -> float:
    """s0: the gate value of a selected pair when a token's k selected pairs have logit l0 and the rest -inf."""
    l0 = _nominal_logit(gating)
    return {"identity": l0, "sigmoid": 1.0 / (1.0 + math.exp(-l0)), "softmax": 1.0 / k}[gating]


@torch.no_grad()
def init_moe_from_dense(moe: nn.Module, dense: nn.Module, noise_std: float = 0.01,
                        generator: torch.Generator | None = None) -> None:
    """Initialise a `MoEFeedForward` from a dense `FeedForward` (fc1, fc2) in place; see the module docstring.

    Needs E divisible by k, the expert width equal to the dense hidden width / k, and D >= 2 (E/k - 1)
    router units for the bins.
    """
    E, k, D, h = moe.num_experts, moe.k, moe.dim, moe.hidden
    W1, b1, W2, b2 = dense.fc1.weight, dense.fc1.bias, dense.fc2.weight, dense.fc2.bias
    if E % k:
        raise ConversionError(f"upcycling needs E divisible by k (each chunk seeds E/k experts); got {k}in{E}")
    if W1.shape != (k * h, D):
        raise ConversionError(f"layer {moe.layer_index}: dense fc1.weight {_fmt(W1.shape)} cannot be split into "
                              f"k={k} experts of width {h} over D={D} (needs ({k * h}, {D}))")
    m = E // k
    if D < 2 * (m - 1):
        raise ConversionError(f"the router needs 2 (E/k - 1) = {2 * (m - 1)} trunk units for its bins; D={D}")
    dev, dt = moe.experts.w1.device, moe.experts.w1.dtype
    gating = moe.router.gating
    s0 = _nominal_gate(gating, k)
    experts = moe.experts
    for c in range(k):
        rows = slice(c * h, (c + 1) * h)
        w1 = W1[rows].t().to(dev, dt)  # (D, h)
        w2 = W2[:, rows].t().to(dev, dt)  # (h, D)
        for j in range(m):
            e = c * m + j
            n1 = n2 = 0.0
            if m > 1 and noise_std > 0:
                n1 = noise_std * w1.std() * torch.randn(w1.shape, generator=generator).to(dev, dt)
                n2 = noise_std * w2.std() * torch.randn(w2.shape, generator=generator).to(dev, dt)
            experts.w1[e].copy_(w1 + n1)
            experts.b1[e].copy_(b1[rows].to(dev, dt))
            experts.w2[e].copy_((w2 + n2) / s0)
            experts.b2[e].copy_(b2.to(dev, dt) / (k * s0))

    router = moe.router
    trunk, head = router.trunk[0], router.gate_head
    head.weight.zero_()
    head.bias.fill_(_nominal_logit(gating))
    if m > 1:
        a, eps = BIN_RAMP_MARGIN[gating]
        w = torch.randn(D, generator=generator, dtype=torch.float64)
        w = (w / w.norm()).to(trunk.weight.dtype)
        thetas = [NormalDist().inv_cdf(i / m) for i in range(1, m)]
        for i, theta in enumerate(thetas):  # unit 2i: GELU(a (f - theta)); unit 2i + 1: GELU(a (theta - f))
            trunk.weight[2 * i].copy_(a * w)
            trunk.bias[2 * i] = -a * theta
            trunk.weight[2 * i + 1].copy_(-a * w)
            trunk.bias[2 * i + 1] = a * theta
            if router.target_head is not None:
                router.target_head.weight[:, 2 * i:2 * i + 2].zero_()
        for c in range(k):
            for j in range(m):
                e = c * m + j
                if j >= 1:  # below bin j: f < theta_j, measured by unit 2 (j - 1) + 1
                    head.weight[e, 2 * (j - 1) + 1] = -eps / a
                if j <= m - 2:  # above bin j: f > theta_{j+1}, measured by unit 2 j
                    head.weight[e, 2 * j] = -eps / a
    # eval threshold: every selected pair scores ~s0; for softmax the others score < s0 / 2
    moe.tau.fill_(s0 / 2 if gating == "softmax" and m > 1 else s0)
    moe.threshold_initialized.fill_(True)


def _target_config(dense_cfg: ModelConfig, target: str | ModelConfig, overrides: dict) -> ModelConfig:
    if dense_cfg.moe_experts:
        raise ConversionError(f"upcycling starts from a dense model; this one is {dense_cfg.name}")
    if isinstance(target, ModelConfig):
        cfg = target
    else:
        try:
            preset = resolve_preset(target)
            own = resolve_preset(dense_cfg.name)
        except KeyError as e:
            raise ConversionError(e.args[0]) from None
        if not preset["moe_experts"]:
            raise ConversionError(f"upcycle target {target!r} is dense; name a RaceDiT-<size>/<p>-<k>in<E> preset")
        dims = ("depth", "hidden_size", "num_heads", "patch_size")
        if any(preset[f] != own[f] for f in dims):
            raise ConversionError(
                f"{target} is {'x'.join(str(preset[f]) for f in dims)} (depth x width x heads x patch) but the dense "
                f"model is a {dense_cfg.name} ({'x'.join(str(own[f]) for f in dims)}); upcycling keeps the "
                f"architecture, so name RaceDiT-{dense_cfg.name.split('-', 1)[1]}-<k>in<E>")
        cfg = replace(dense_cfg, name=target, moe_experts=preset["moe_experts"], moe_k=preset["moe_k"])
    allowed = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ConversionError(f"unknown model option(s) {unknown}; allowed: {sorted(allowed)}")
    try:
        cfg = resolve_model_config(replace(cfg, **overrides))
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    for f in ("depth", "hidden_size", "num_heads", "patch_size", "input_size", "in_channels", "mlp_ratio"):
        if getattr(cfg, f) != getattr(dense_cfg, f):
            raise ConversionError(f"upcycling keeps the architecture, but model.{f} would change from "
                                  f"{getattr(dense_cfg, f)} to {getattr(cfg, f)}")
    return cfg


@torch.no_grad()
def upcycle(dense: DiT, target: str | ModelConfig, noise_std: float = 0.01, seed: int = 0, **overrides) -> DiT:
    """A Race-DiT initialised from a dense DiT: every MLP becomes a MoE (`init_moe_from_dense`), every other
    weight is copied. `target`: a RaceDiT preset of the dense model's size (e.g. RaceDiT-XL/2-4in32 for a
    DiT-XL/2) or a full ModelConfig; `overrides`: ModelConfig fields (routing, gating, ...). Returns the MoE
    model in eval mode (its inference thresholds set), on the dense model's device and dtype.
    """
    cfg = _target_config(dense.config, target, overrides)
    p = next(dense.parameters())
    moe_model = DiT(cfg).to(p.device, p.dtype)
    dense_sd = dense.state_dict()
    own = moe_model.state_dict()
    generator = torch.Generator().manual_seed(seed)
    used = set()
    ffn = re.compile(r"^blocks\.\d+\.mlp\.")  # the feed-forward slots: rebuilt below, not copied
    for key, value in own.items():
        if ffn.match(key):
            continue
        if key not in dense_sd:
            raise ConversionError(f"upcycle: {key} of {cfg.name} has no counterpart in the dense model")
        if dense_sd[key].shape != value.shape:
            raise ConversionError(f"upcycle: {key}: dense {_fmt(dense_sd[key].shape)} vs {cfg.name} {_fmt(value.shape)}")
        value.copy_(dense_sd[key])
        used.add(key)
    left = sorted(k for k in dense_sd if k not in used and not ffn.match(k))
    if left:
        raise ConversionError(f"upcycle: dense weights with no place in {cfg.name}: {left[:8]}")
    for dense_block, block in zip(dense.blocks, moe_model.blocks):
        init_moe_from_dense(block.mlp, dense_block.mlp, noise_std=noise_std, generator=generator)
    return moe_model.eval()


@torch.no_grad()
def moe_dense_gap(dense: DiT, moe_model: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                  train_mode: bool = False) -> dict[str, float]:
    """How far the upcycled model is from the dense one on (x, t, y): {"relative": ||a - b|| / ||b||,
    "max_abs": max |a - b|} of the whole outputs, and "max_layer_relative": the worst per-layer gap of the
    MoE layers on the dense model's own MLP inputs. train_mode=True routes with the training rule (the
    batch race, local to this process; no forward moves the thresholds), else with the eval rule (the threshold)."""
    inputs: dict[int, torch.Tensor] = {}
    hooks = [b.mlp.register_forward_hook(lambda mod, args, out, i=i: inputs.__setitem__(i, args[0]))
             for i, b in enumerate(dense.blocks)]
    try:
        ref = dense.eval()(x, t, y)
    finally:
        for hook in hooks:
            hook.remove()
    from racedit.models.moe import local_selection

    layer = 0.0
    with local_selection(moe_model):
        moe_model.train(train_mode)
        out = moe_model(x, t, y, label_dropout=False)
        for i, (dense_block, block) in enumerate(zip(dense.blocks, moe_model.blocks)):
            a, b = block.mlp(inputs[i]), dense_block.mlp(inputs[i])
            layer = max(layer, float((a - b).norm() / b.norm().clamp_min(1e-30)))
    moe_model.eval()
    diff = out - ref
    return {"relative": float(diff.norm() / ref.norm().clamp_min(1e-30)), "max_abs": float(diff.abs().max()),
            "max_layer_relative": layer}


def upcycle_checkpoint(ckpt: str | Path, to: str, out: str | Path, noise_std: float = 0.01, seed: int = 0,
                       use_ema: bool = True, overrides: dict | None = None,
                       probe: bool = True) -> tuple[Path, dict[str, float] | None]:
    """Upcycle a dense racedit checkpoint (its EMA weights by default) into a new checkpoint under `out`:
    the upcycled weights as both live and EMA weights, the same config with the model replaced. Returns
    (checkpoint dir, gap on a random probe batch in eval and train routing, or None without `probe`)."""
    out = _fresh_out_dir(out)
    dense, cfg, path = load_model(ckpt, "ema" if use_ema else "model")
    moe_model = upcycle(dense, to, noise_std=noise_std, seed=seed, **(overrides or {}))
    gap = None
    if probe:
        g = torch.Generator().manual_seed(seed)
        m = dense.config
        x = torch.randn(2, m.in_channels, m.input_size, m.input_size, generator=g)
        t = torch.randint(0, cfg.diffusion.num_timesteps, (2,), generator=g).float()
        y = torch.randint(0, m.num_classes, (2,), generator=g)
        ev, tr = moe_dense_gap(dense, moe_model, x, t, y), moe_dense_gap(dense, moe_model, x, t, y, train_mode=True)
        gap = {f"eval_{k}": v for k, v in ev.items()} | {f"train_{k}": v for k, v in tr.items()}
    new_cfg = replace(cfg, model=moe_model.config)
    validate(new_cfg)
    final = save_converted(moe_model, out, new_cfg, str(path),
                           provenance={"upcycled_from": str(path), "noise_std": float(noise_std)})
    return final, gap


def parse_model_overrides(items: list[str]) -> dict:
    """`model.key=value` strings -> {key: typed value} for `upcycle` (types checked against ModelConfig)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    out = {}
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key.startswith("model."):
            raise ConversionError(f"override {item!r} is not of the form model.key=value (e.g. model.gating=sigmoid)")
        try:
            merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise ConversionError(f"override {item!r}: {str(e).splitlines()[0]}") from None
        name = key.split(".", 1)[1]
        out[name] = OmegaConf.to_object(merged.model).__dict__[name]
    return out
