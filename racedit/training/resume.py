"""What a resume may change: settings that steer the rest of the run are applied (and reported), settings that
would make the checkpoint's model, optimizer moments or data order mean something else are refused.

Applied (the saved config.yaml and every later checkpoint record the new value, and it is what runs):
- `train.lr`, `train.warmup_steps`, `train.steps` (not below the checkpoint's step), `train.weight_decay`:
  the learning-rate schedule is the fresh run's formula with the new values, evaluated at the checkpoint's
  step; the optimizer's moments are kept;
- `train.ema_decay`, `loss.*` coefficients, `train.grad_clip`, `train.max_nonfinite`, `train.grad_accum` (the
  global batch is only split differently), `train.mixed_precision`, `train.grad_checkpointing`,
  `train.compile`, `train.compile_mode`, `train.distributed` (an FSDP checkpoint resumes under DDP and the reverse, on any number of
  processes: `racedit.training.checkpointing`), `train.num_threads`, `model.global_select` (how
  race_scope=global communicates; both methods select the same pairs), `model.expert_parallel` (how many
  processes share the experts; checkpoints hold every expert);
- logging and outputs: `train.log_every`, `log_with`, `diagnostics_every`, `ckpt_every`, `keep_last`,
  `sample_every`, `eval_samples_per_class`, and `sample.*` (the grids).
Free (not reported): `train.out_dir` (resuming another run's checkpoint into a new directory),
`train.init_from` (unused on resume), `data.num_workers`, `data.latents` (moved), `data.vae` (decoding only).
Refused: `model.*` (but `model.global_select`, `model.expert_parallel`), `diffusion.*`, other `data.*` (another model, objective or training set), `train.seed`
and `train.global_batch` (the data order, noise and label dropout of every step), `train.betas` (the saved
Adam moments were averaged, and are bias-corrected, with the old betas).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from racedit.config import Config, ConfigError, config_diff

FREE = frozenset({"train.out_dir", "train.init_from", "data.num_workers", "data.latents", "data.vae"})
REFUSED_SECTIONS = ("model", "diffusion", "data")
REFUSED_KEYS = frozenset({"train.seed", "train.global_batch", "train.betas"})
# communication only: the same selection either way; the experts spread over another number of processes
APPLIED_MODEL_KEYS = frozenset({"model.global_select", "model.expert_parallel"})


def resume_changes(saved: Config, cfg: Config, ckpt: Path, step: int) -> dict[str, tuple[Any, Any]]:
    """The settings of `cfg` that differ from the checkpoint's `saved` config and are applied, as
    {key: (old, new)}; raises ConfigError (one line, every refused key) when any differing key is refused,
    or when `train.steps` is below the checkpoint's `step`."""
    diff = {k: v for k, v in config_diff(saved, cfg).items() if k not in FREE}
    refused = [k for k in diff if (k.split(".")[0] in REFUSED_SECTIONS and k not in APPLIED_MODEL_KEYS)
               or k in REFUSED_KEYS]
    if refused:
        shown = "; ".join(f"{k}: {diff[k][0]!r} -> {diff[k][1]!r}" for k in refused)
        raise ConfigError(f"cannot resume from {ckpt}: {shown} would change the model, the objective, the data or "
                          f"its order, or the optimizer's saved moments; set them back to the checkpoint's values, "
                          f"or start a new run from its weights with train.init_from={ckpt}")
    if cfg.train.steps < step:
        raise ConfigError(f"cannot resume from {ckpt}: train.steps={cfg.train.steps} is below the checkpoint's "
                          f"step {step}; give train.steps >= {step}, or resume from an earlier checkpoint")
    return diff


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """One line: `key old -> new, ...`."""
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())


def fresh_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each group's base learning rate and weight decay as this run's config makes them (call before loading the
    saved optimizer state, which brings the checkpoint's values). The base rate is `initial_lr` once a scheduler
    was made (which has already scaled `lr` by its step-0 factor)."""
    return [{"lr": g.get("initial_lr", g["lr"]), "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]


def adopt_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                          fresh: list[dict]) -> None:
    """After loading a checkpoint's optimizer and scheduler state: put this run's base learning rates and weight
    decay back (the state brought the checkpoint's) and set each group's current rate to what this run's schedule
    gives at the checkpoint's step, base_lr * lr_lambda(step), the very product LambdaLR computes; with an
    unchanged config that is bit for bit the saved rate. The schedule's lambdas are always this run's (LambdaLR
    does not save plain functions), so warm-up and step changes apply through them."""
    scheduler.base_lrs = [h["lr"] for h in fresh]
    lrs = [base * lam(scheduler.last_epoch) for base, lam in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, h, lr in zip(optimizer.param_groups, fresh, lrs):
        group.update(initial_lr=h["lr"], weight_decay=h["weight_decay"], lr=lr)
    scheduler._last_lr = lrs  # what get_last_lr() (the metrics' lr column) reports until the next step
