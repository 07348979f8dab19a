"""The checks between config values, and those that need the resolved model sizes or the process count:
divisibility, MoE quotas, batch layout, sampling steps and guidance, routing losses, the data against the batch
and the end-of-run evaluation, trackers, memory options. `racedit.config.validate` runs them at load time; the
training loop runs `check_batch_layout` again with its process count. Each raises one-line `ConfigError`s."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import ListConfig

from racedit.limits import (
    DIGITS_EXAMPLES,
    SAMPLERS,
    ConfigError,
    holdout_count,
    max_sampling_steps,
)
from racedit.presets import check_k_in_e, resolve_preset, selected_per_group


def resolved_sizes(model: Any) -> dict[str, int]:
    """depth, hidden_size, num_heads, patch_size, moe_k, moe_experts of a model config, the preset's where None;
    ConfigError for an unknown preset name."""
    try:
        preset = resolve_preset(model.name)
    except KeyError as e:
        raise ConfigError(f"bad value for 'model.name': {e.args[0]}") from None
    return {key: preset[key] if getattr(model, key) is None else getattr(model, key) for key in preset}


def check_quota(model: Any, batch: int, where: str) -> None:
    size = resolved_sizes(model)
    tokens = (model.input_size // size["patch_size"]) ** 2
    try:
        selected_per_group(model.routing, batch, tokens, size["moe_experts"], size["moe_k"])
    except ValueError as e:
        raise ConfigError(f"bad MoE shape for model.routing={model.routing}: {e} (L = (model.input_size / "
                          f"model.patch_size)^2 = {tokens}{where}); change model.moe_experts, moe_k or the "
                          "sizes") from None


def check_moe_shape(model: Any) -> None:
    """Raise ConfigError unless a model's k-in-E shape is sound: model.moe_k / model.moe_experts where set,
    else the preset's -kinE. E = 0 is a dense model (k must then be 0 too). Part of `check_model_shape`."""
    size = resolved_sizes(model)
    k, experts = size["moe_k"], size["moe_experts"]
    n = getattr(model, "expert_parallel", 1)
    if n > 1 and not experts:
        raise ConfigError(f"model.expert_parallel={n} splits the experts of MoE layers, but model '{model.name}' "
                          f"is dense; set it to 1")
    if n > 1 and experts % n:
        raise ConfigError(f"bad value for 'model.expert_parallel': {n} does not divide the {experts} experts "
                          f"(model.moe_experts or the name's -kinE); use a divisor of {experts}")
    if not (k or experts):
        return
    try:
        check_k_in_e(k, experts)
    except ValueError:
        raise ConfigError(f"bad MoE shape of model '{model.name}': need 1 <= model.moe_k <= model.moe_experts "
                          f"(the name's -kinE where they are not set), got k={k}, E={experts}") from None


def check_batch_layout(cfg: Any, world_size: int = 1) -> None:
    """Raise ConfigError unless train.global_batch splits into train.grad_accum x `world_size` equal
    micro-batches and each routing group of such a micro-batch (of all ranks' with race_scope=global) selects
    a whole number of pairs. `validate` checks one process; `racedit.training.loop.train` its process count
    (and `check_expert_parallel` the expert groups: a checkpoint of an expert-parallel run loads on one process)."""
    tc, model = cfg.train, cfg.model
    parts = tc.grad_accum * world_size
    if tc.global_batch % parts:
        raise ConfigError(f"bad value for 'train.global_batch': {tc.global_batch} is not divisible by "
                          f"train.grad_accum x processes = {tc.grad_accum} x {world_size}")
    if model.routing == "bl_choice" and resolved_sizes(model)["moe_experts"]:
        micro = tc.global_batch // parts
        batch = micro * world_size if model.race_scope == "global" else micro
        check_quota(model, batch, f", B = train.global_batch / (train.grad_accum x {world_size} process(es))"
                                   f"{' x processes (race_scope=global)' if model.race_scope == 'global' else ''}"
                                   f" = {batch}")


def check_expert_parallel(cfg: Any, world_size: int) -> None:
    """Raise ConfigError unless model.expert_parallel divides the number of processes a run is launched on."""
    n = cfg.model.expert_parallel
    if world_size % n:
        raise ConfigError(f"bad value for 'model.expert_parallel': {n} does not divide the {world_size} process(es) "
                          f"of this launch; expert groups of {n} processes must tile them")


def check_sampling_batch(cfg: Any, batch: int, what: str) -> None:
    """Raise ConfigError unless a sampling batch of `batch` images (`what`, e.g. the training loop's grids) can be
    routed: with model.inference_routing=topk the training rule routes it, doubled under guidance."""
    model = cfg.model
    if model.routing == "bl_choice" and model.inference_routing == "topk" and resolved_sizes(model)["moe_experts"]:
        images = batch * (2 if cfg.sample.cfg_scale != 1 else 1)
        check_quota(model, images, f", B = {images} images of {what} under inference_routing=topk")


def check_sample(cfg: Any, flags: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError unless the `sample:` settings apply to the model and objective of `cfg`: a sampler of
    the objective, at most `max_sampling_steps` steps, guidance of at most model.in_channels channels. `flags`
    names the command-line flag that set a key (e.g. {'sample.steps': '--steps'}) for the message."""
    flags = flags or {}  # (each flag's own range was checked when the arguments parsed)
    s, objective, T = cfg.sample, cfg.diffusion.objective, cfg.diffusion.num_timesteps
    if s.sampler not in SAMPLERS[objective]:
        raise ConfigError(f"bad value for {flags.get('sample.sampler', repr('sample.sampler'))}: {s.sampler!r} does "
                          f"not apply to diffusion.objective={objective}. Allowed: {list(SAMPLERS[objective])}")
    most = max_sampling_steps(s.sampler, T)
    if s.steps > most:
        raise ConfigError(f"bad value for {flags.get('sample.steps', repr('sample.steps'))}: {s.steps}. Must be <= "
                          f"{most} for sampler {s.sampler} with diffusion.num_timesteps={T}")
    if s.guidance_channels > cfg.model.in_channels:
        raise ConfigError(f"bad value for {flags.get('sample.guidance_channels', repr('sample.guidance_channels'))}: "
                          f"{s.guidance_channels}. Must be in [0, model.in_channels={cfg.model.in_channels}] (0 = all)")


def check_losses(cfg: Any) -> None:
    on = [f"loss.{key}={getattr(cfg.loss, key)}" for key in ("router_similarity", "per_layer_reg", "balance",
                                                           "z_loss") if getattr(cfg.loss, key) > 0]
    if on and not resolved_sizes(cfg.model)["moe_experts"]:
        raise ConfigError(f"{', '.join(on)}: an auxiliary routing loss, but model '{cfg.model.name}' has no MoE "
                          "layer; set it to 0 for a dense model")
    if cfg.loss.per_layer_reg > 0 and not cfg.model.router_target_head:
        raise ConfigError("loss.per_layer_reg > 0 needs the router target heads: set model.router_target_head=true")


def check_distributed(cfg: Any) -> None:
    if cfg.model.expert_parallel > 1 and cfg.train.mixed_precision == "fp16":
        raise ConfigError(f"train.mixed_precision=fp16 with model.expert_parallel={cfg.model.expert_parallel}: use "
                          "bf16 or no (the expert shards' gradient scaling is not implemented)")
    if cfg.train.distributed == "fsdp" and cfg.train.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision=fp16 with train.distributed=fsdp: use bf16 (sharded training keeps "
                          "float32 master weights and reduces gradients in float32) or no")


def check_data(cfg: Any) -> None:
    """The data against the batch and the end-of-run evaluation (what can be known before reading any data)."""
    d, tc = cfg.data, cfg.train
    # A checkpoint converted from pretrained weights (racedit.interop) has no latent directory; it names the
    # VAE to decode with in data.vae instead. Training such a config still needs data.latents (the dataset
    # then reports the empty path).
    if d.kind == "latents" and not d.latents and not d.vae:
        raise ConfigError("'data.latents' must name the latent directory when data.kind=latents "
                          "(a checkpoint used only for sampling may name its VAE in 'data.vae' instead)")
    if tc.eval_samples_per_class and d.kind != "digits":
        raise ConfigError(f"train.eval_samples_per_class={tc.eval_samples_per_class} applies to data.kind=digits "
                          f"only (the end-of-run digits evaluation); set it to 0 for data.kind={d.kind}")
    if tc.eval_samples_per_class and tc.seed == 2**32 - 1:
        raise ConfigError(f"bad value for 'train.seed': {tc.seed}. With train.eval_samples_per_class > 0 it must be "
                          "< 2**32 - 1 (the evaluation samples with seed + 1)")
    if d.kind != "digits":
        return  # the latent store's size is known from its manifest when training starts
    held = holdout_count(DIGITS_EXAMPLES, d.holdout_fraction)
    need = 2 if tc.eval_samples_per_class else 1
    if held < need:
        raise ConfigError(f"bad value for 'data.holdout_fraction': {d.holdout_fraction} holds out {held} of the "
                          f"{DIGITS_EXAMPLES} digits; need >= {need}" + (" (the end-of-run digits FD)" if need > 1 else "")
                          + f", i.e. a fraction above {(need - 0.5) / DIGITS_EXAMPLES:.5f}")
    if DIGITS_EXAMPLES - held < tc.global_batch:
        raise ConfigError(f"data.holdout_fraction={d.holdout_fraction} leaves {DIGITS_EXAMPLES - held} training digits, "
                          f"fewer than train.global_batch={tc.global_batch}")


def log_with_names(value: Any) -> list[str]:
    """The tracker names in `train.log_with` (a name, comma-separated names or a list; none or empty: []),
    each checked against accelerate's tracker registry."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS  # late import: read the registry only when needed

    # "all" is left out on purpose: it would pick whatever trackers happen to be installed
    accepted = sorted(LOGGER_TYPE_TO_CLASS)
    if value is None or isinstance(value, str):
        items = (value or "").split(",")
    elif isinstance(value, (list, tuple, ListConfig)):
        items = [str(v) for v in value]
    else:
        raise ConfigError(f"bad value for 'train.log_with': {value!r}. Allowed: a tracker name, a list of them "
                          f"or none; trackers: {accepted}")
    names = list(dict.fromkeys(n.strip() for n in items if n.strip() and n.strip() != "none"))
    for name in names:
        if name not in accepted:
            raise ConfigError(f"bad value for 'train.log_with': {name!r}. Allowed: {accepted + ['none']} "
                              "(one, a list or comma-separated)")
    return names


def validate_memory(model: Any) -> None:
    """The memory-layer options beyond their `RANGES` that do not depend on the preset (the rest is checked
    when the layers are built, racedit.models.memory)."""
    e = model.memory_expansion
    if e and int(e ** 0.5 + 0.5) ** 2 != e:
        raise ConfigError(f"bad value for 'model.memory_expansion': {e}. Must be 0 or a square (1, 4, 9, 16)")


