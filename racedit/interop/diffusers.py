"""diffusers' `DiTTransformer2DModel` / `DiTPipeline` <-> racedit `DiT`, in both directions.

Two conventions differ between DiT and diffusers' DiTTransformer2DModel, and racedit reproduces either:
- the timestep frequencies: DiT uses exp(-ln(1e4) i / 128), diffusers exp(-ln(1e4) i / 127) (its
  `Timesteps(downscale_freq_shift=1)`); `model.timestep_freq_shift` (0 or 1) selects one. Imports from
  diffusers set 1, so the racedit model computes what the diffusers model computes. diffusers cannot
  express 0, so exporting a DiT-convention model (0) to diffusers changes its function slightly (a warning
  says so); the official diffusers port `facebook/DiT-XL-2-256` carries the same difference.
- the LayerNorm before the MLP: eps 1e-6 in DiT, `norm_eps` (default 1e-5) in diffusers. racedit uses
  1e-6; exports set `norm_eps=1e-6`; importing a model with another norm_eps warns (the effect is
  relative (norm_eps - 1e-6) / (2 var(h)) on that LayerNorm's output, negligible for trained models).
"""


from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from racedit.checkpoint import load_model
from racedit.config import (
    DiffusionConfig,
    ModelConfig,
)
from racedit.data.codec import load_autoencoder_kl
from racedit.interop.common import (
    DEFAULT_VAE,
    DIT_NORM_EPS,
    ConversionError,
    build_dense_model,
    check_tensors,
    converted_config,
    dense_model_config,
    fit_report,
    fresh_out_dir,
    save_converted,
)
from racedit.models import DiT
from racedit.models.dit import sincos_2d

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
    return check_tensors(state, str(path)), config, root


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
    return dense_model_config(int(c["num_layers"]), hidden, int(c["patch_size"]), heads, source,
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
    sd = check_tensors(state_dict, source)
    cfg = _diffusers_model_config(config, source)
    fc1 = sd.get("transformer_blocks.0.ff.net.0.proj.weight")
    if fc1 is not None and fc1.ndim == 2 and fc1.shape[1] == cfg.hidden_size:
        cfg = replace(cfg, mlp_ratio=fc1.shape[0] / cfg.hidden_size)
    model = build_dense_model(cfg)
    m = model.config
    fit_report(_diffusers_expected(model), sd,
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
    fresh_out_dir(out)
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

    out = fresh_out_dir(out)
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

