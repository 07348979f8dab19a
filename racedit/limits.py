"""The allowed ranges of racedit's numbers, in one table shared by the config (`racedit.config.validate`) and
the command line (`racedit.cli.parser`'s argument types), and the few limits that follow from the method.

A range is a short string: '>= 1', '> 0', '< 128', an interval such as '[0, 1)' or '(0, 1)', or 'finite'.
Whatever the range, only finite numbers are inside it: nan and inf are refused everywhere a number is read.
Nothing is imported here but the standard library, so `racedit --help` stays fast.
"""

from __future__ import annotations

import math
import re
from typing import Any

# The allowed range of every numeric config field, checked when a config loads; a field that may be None (the
# preset's value) is checked when it is set. List fields: each element of train.betas is in '[0, 1)' (and
# there are two), each of model.memory_blocks '>= 0'.
RANGES: dict[str, str] = {
    "model.input_size": ">= 1", "model.in_channels": ">= 1", "model.num_classes": ">= 1",
    "model.class_dropout_prob": "[0, 1)", "model.depth": ">= 1", "model.hidden_size": ">= 1",
    "model.num_heads": ">= 1", "model.patch_size": ">= 1", "model.mlp_ratio": "> 0",
    "model.timestep_freq_shift": "< 128",  # the frequencies divide by 128 - shift
    "model.moe_experts": ">= 0", "model.moe_k": ">= 0", "model.threshold_decay": "[0, 1)",
    "model.connections_n": ">= 1", "model.connections_m": ">= 1", "model.expert_parallel": ">= 1",
    "model.memory_keys": ">= 1", "model.memory_topk": ">= 1", "model.memory_heads": ">= 1",
    "model.memory_key_dim": ">= 0", "model.memory_value_dim": ">= 0", "model.memory_prevalue_dim": ">= 0",
    "model.memory_rank": ">= 1", "model.memory_cores": ">= 1", "model.memory_expansion": ">= 0",
    "model.memory_share": "(0, 1)", "model.memory_value_std": ">= 0", "model.memory_value_lr_scale": "> 0",
    "model.memory_value_lr_decay": "[0, 1]",
    "diffusion.num_timesteps": ">= 2", "diffusion.beta_start": "(0, 1)", "diffusion.beta_end": "(0, 1)",
    "diffusion.flow_logit_mean": "finite", "diffusion.flow_logit_std": "> 0",
    "loss.router_similarity": ">= 0", "loss.per_layer_reg": ">= 0", "loss.balance": ">= 0", "loss.z_loss": ">= 0",
    "data.image_size": ">= 1", "data.num_workers": ">= 0", "data.holdout_fraction": "(0, 1)",
    "train.steps": ">= 1", "train.global_batch": ">= 1", "train.grad_accum": ">= 1", "train.lr": "> 0",
    "train.weight_decay": ">= 0", "train.warmup_steps": ">= 0", "train.grad_clip": ">= 0",
    "train.ema_decay": "[0, 1)", "train.seed": "[0, 2**32)",  # racedit.seeding hashes it as one 32-bit word
    "train.log_every": ">= 1", "train.diagnostics_every": ">= -1", "train.ckpt_every": ">= 0",
    "train.keep_last": ">= 1", "train.sample_every": ">= 0", "train.max_nonfinite": ">= 1",
    "train.eval_samples_per_class": ">= 0", "train.num_threads": ">= 0",
    "sample.steps": ">= 1", "sample.cfg_scale": ">= 0", "sample.guidance_channels": ">= 0",
}
# The embedded digits (scikit-learn's load_digits, racedit.data.digits): how many, and the held-out count
DIGITS_EXAMPLES = 1797


def holdout_count(num_examples: int, fraction: float) -> int:
    """Images held out of `num_examples` at `data.holdout_fraction` (racedit.data.digits' split)."""
    return int(round(num_examples * fraction))


def max_sampling_steps(sampler: str, num_timesteps: int) -> float:
    """The most steps `sampler` takes over T = `num_timesteps` training timesteps: T for ddpm and ddim (every
    step once), T - 1 for dpm_solver (its grid of n + 1 rounded points from 0 to T - 1 repeats a step beyond
    that), unbounded for the flow samplers."""
    return {"ddpm": num_timesteps, "ddim": num_timesteps, "dpm_solver": num_timesteps - 1}.get(sampler, math.inf)


_BOUND = re.compile(r"(>=|>|<=|<) (\S+)")
_SPAN = re.compile(r"([\[(])(\S+), (\S+)([\])])")


def _number(token: str) -> float:
    base, _, power = token.partition("**")
    return float(base) ** float(power) if power else float(token)


def in_range(value: Any, spec: str) -> bool:
    """Whether `value` is a finite number inside `spec` (a `RANGES` entry: '>= 1', '> 0', '[0, 1)', 'finite')."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if bound := _BOUND.fullmatch(spec):
        op, limit = bound.group(1), _number(bound.group(2))
        return {">=": value >= limit, ">": value > limit, "<=": value <= limit, "<": value < limit}[op]
    if span := _SPAN.fullmatch(spec):
        left, low, high, right = span.group(1), _number(span.group(2)), _number(span.group(3)), span.group(4)
        return (low <= value if left == "[" else low < value) and (value <= high if right == "]" else value < high)
    assert spec == "finite", spec
    return True


def describe(spec: str, is_float: bool = True) -> str:
    """What a range allows, for a message: e.g. 'a finite number in [0, 1)', '>= 1' (an integer field)."""
    if spec == "finite":
        return "a finite number"
    return ("a finite number " if is_float else "") + (f"in {spec}" if spec[0] in "[(" else spec)


class ConfigError(ValueError):
    """A bad config key or value; the message names the key and what would be accepted."""


# The samplers of each objective (racedit.diffusion.samplers); `validate` checks the pairing.
SAMPLERS: dict[str, tuple[str, ...]] = {"ddpm": ("ddpm", "ddim", "dpm_solver"), "flow": ("euler", "heun")}

# Allowed values of the string-valued options, checked at load time.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.routing": ("token_choice", "expert_choice", "bl_choice", "be_choice", "le_choice", "expert_race"),
    "model.gating": ("identity", "sigmoid", "softmax"),
    "model.race_scope": ("local", "global"),
    "model.global_select": ("radix", "gather"),
    "model.inference_routing": ("threshold", "topk"),
    "model.connections": ("residual", "hyper", "frac"),
    "model.memory": ("none", "pkm", "ultramem", "ultramemv2"),
    "diffusion.objective": ("ddpm", "flow"),
    "diffusion.flow_t_sampling": ("uniform", "logit_normal"),
    "data.kind": ("digits", "latents"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "train.distributed": ("ddp", "fsdp"),
    "sample.sampler": tuple(s for samplers in SAMPLERS.values() for s in samplers),
}


def range_error(key: str, value: Any, spec: str, is_float: bool = True) -> ConfigError:
    """The one-line error of a number outside its range: the key, the value, what is allowed."""
    return ConfigError(f"bad value for '{key}': {value!r}. Must be {describe(spec, is_float)}")
