"""The training loop (accelerate): `train(cfg, resume=...)`.

Determinism: the data order, the timesteps, the noise and the label-dropout mask of optimizer step s are
drawn for the whole global batch from a generator seeded by (seed, s), and each process takes its rows.
So a run does not depend on the number of processes, and resuming at step s needs nothing but s and the
saved model/optimizer/EMA state: on CPU a resumed run repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import shlex
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from racedit.checkpoint import (
    clean_leftovers,
    last_good_checkpoint,
    latest_checkpoint,
    load_config_of,
    load_into,
    load_train_state,
    load_weights,
    resolve_checkpoint,
    resume_checkpoint,
    verify_checkpoint,
)
from racedit.config import (
    Config,
    ConfigError,
    check_batch_layout,
    check_expert_parallel,
    check_sampling_batch,
    to_yaml,
)
from racedit.data.factory import build_codec, build_training_data
from racedit.data.order import ResumableBatchOrder
from racedit.diffusion.draws import StepRandomness
from racedit.diffusion.objectives import Objective, create_objective
from racedit.models import count_params, create_model, resolve_model_config
from racedit.models.compiling import compile_model
from racedit.models.expert_parallel import expert_layout
from racedit.models.moe import update_thresholds
from racedit.models.records import ForwardRecord
from racedit.models.routing_stats import diagnostics_due, routing_diagnostics, timestep_fraction
from racedit.runlock import lock_on_main
from racedit.sampling import sample_images, save_grid
from racedit.signals import Interrupted, StopSignals
from racedit.training.checkpointing import (
    restore_optimizer,
    save_training_checkpoint,
    weights_load_before_sharding,
    whole_state,
)
from racedit.training.expert_sharding import (
    clip_grad_norm_,
    expert_parameters,
    ignore_experts_in_ddp,
    reduce_expert_gradients,
    shard_model_experts,
)
from racedit.training.metrics import MetricsLogger, flat_config, trackers
from racedit.training.objective_step import training_losses
from racedit.training.resume import (
    adopt_hyperparameters,
    describe_changes,
    fresh_hyperparameters,
    resume_changes,
)
from racedit.training.sharding import (
    ema_update_,
    full,
    process_group,
    set_gradient_sync,
    shard_model,
)

# (cfg, EMA model, objective, device) -> {metric: value}; see `train`
EndOfRunEvaluation = Callable[[Config, torch.nn.Module, Objective, torch.device], dict]


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses or gradients."""


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    last_loss: float
    checkpoint: Path | None
    skipped_steps: int
    seconds: float
    metrics: dict


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight matrices decay; biases, norms, embeddings and `no_weight_decay` names do not.

    A module may define `no_weight_decay() -> set[str]` of its own parameter names (static connection
    weights, for instance) and `optimizer_groups() -> list[dict]` for parameters that need their
    own learning rate (memory value tables); those parameters are taken out of the default groups.
    """
    special: list[dict] = []
    taken: set[int] = set()
    no_decay_names: set[str] = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if hasattr(module, "no_weight_decay"):
            no_decay_names |= {prefix + n for n in module.no_weight_decay()}
        if hasattr(module, "optimizer_groups"):
            for group in module.optimizer_groups():
                special.append(group)
                taken |= {id(p) for p in group["params"]}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in taken:
            continue
        if p.ndim < 2 or "embedding_table" in name or name in no_decay_names:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups + special if g["params"]]


def group_lr_lambda(group: dict, warmup: int, total_steps: int):
    """The LR multiplier of one optimizer group at scheduler step s: the linear warm-up times the group's
    own `lr_scale` (default 1), which decays linearly to 1 over the fraction `lr_scale_decay` of
    `total_steps` when that is > 0 (UltraMem's value-table LR) and is constant otherwise."""
    scale, decay = float(group.get("lr_scale", 1.0)), float(group.get("lr_scale_decay", 0.0))

    def factor(s: int) -> float:
        warm = min(1.0, (s + 1) / warmup) if warmup else 1.0
        if decay > 0:
            return warm * (1.0 + (scale - 1.0) * max(0.0, 1.0 - s / (decay * total_steps)))
        return warm * scale

    return factor


def ema_avg_fn(decay: float):
    """EMA update for AveragedModel: floating tensors move towards the model's; other tensors (integer buffers
    such as a memory layer's fixed address shuffle) are copied, since averaging would round them."""
    lerp = get_ema_multi_avg_fn(decay)

    def update(ema_tensors, model_tensors, n_averaged):
        if torch.is_floating_point(ema_tensors[0]) or torch.is_complex(ema_tensors[0]):
            lerp(ema_tensors, model_tensors, n_averaged)
        else:
            for e, m in zip(ema_tensors, model_tensors):
                e.copy_(m)

    return update


def train(cfg: Config, resume: bool | str | None = None, stop_after: int | None = None,
          evaluate: EndOfRunEvaluation | None = None) -> TrainResult:
    """Train per `cfg`. `resume`: True = latest checkpoint in the run directory if any, or a checkpoint path.

    `stop_after` ends the loop after that many optimizer steps of this call (tests use it to simulate
    an interruption) without the end-of-run checkpoint, samples and evaluation. `evaluate(cfg, ema_model,
    objective, device) -> {name: value}` runs on the main process at the end of a digits run with
    `train.eval_samples_per_class` > 0 (the CLI passes `racedit.evaluation.digits.evaluate_digits_model`);
    its floats are logged as `eval/<name>` at the last step and returned in `TrainResult.metrics`.

    SIGINT, SIGTERM and SIGUSR1 (see `racedit.signals`) end the run after the current optimizer step with its
    checkpoint (if the step was finite; else the last good one stands) and raise `racedit.signals.Interrupted`
    (exit status 128 + the signal number). All processes stop at the same step: the stop request travels in
    the step's one collective. A second SIGINT raises at once, without saving.
    """
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    # MoE layers may leave parameters without gradient on a rank (the router's target head when
    # per-layer regularization is off), which DDP must be told about.
    moe = bool(resolve_model_config(cfg.model).moe_experts)
    check_sampling_batch(cfg, _grid_size(cfg.model.num_classes), "the sample grids")
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum,
                              step_scheduler_with_optimizer=False, log_with=trackers(tc.log_with, tc.out_dir),
                              project_dir=tc.out_dir,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=moe)])
    # installed after the Accelerator: its rendezvous keeps the default behaviour of the signals
    with StopSignals("this optimizer step and its checkpoint", announce=accelerator.is_main_process) as stop:
        try:
            check_batch_layout(cfg, accelerator.num_processes)  # the config was checked for one process
            check_expert_parallel(cfg, accelerator.num_processes)
            with (lock_on_main(accelerator, tc.out_dir, "train.out_dir"),  # one writer per run directory
                  process_group(accelerator.device, accelerator.num_processes, tc.distributed == "fsdp")):
                return _train(accelerator, cfg, resume, stop_after, evaluate, stop)
        finally:  # on every way out (done, stopped, diverged, interrupted) the trackers flush and close
            accelerator.end_training()


def _resume_command(out_dir: Path, num_processes: int) -> str:
    """The command that continues the run in `out_dir`: its saved config.yaml names the run directory and
    everything else the run was started with (overrides included), and `--resume` takes its latest checkpoint."""
    launcher = "accelerate launch [your options] -m racedit" if num_processes > 1 else "racedit"
    return f"{launcher} train --config {shlex.quote(str(out_dir / 'config.yaml'))} --resume"


def _train(accelerator: Accelerator, cfg: Config, resume: bool | str | None, stop_after: int | None,
           evaluate: EndOfRunEvaluation | None, stop: StopSignals) -> TrainResult:
    tc = cfg.train
    device, is_main = accelerator.device, accelerator.is_main_process
    out_dir = Path(tc.out_dir)
    ckpt_root = out_dir / "checkpoints"

    if is_main and (removed := clean_leftovers(ckpt_root)):
        accelerator.print(f"removed leftovers of crashed saves from {ckpt_root}: {', '.join(removed)}")
    accelerator.wait_for_everyone()
    ckpt = None
    if resume:  # a checkpoint that does not verify is refused (a path) or skipped (the newest that verifies)
        if isinstance(resume, (str, Path)):
            verify_checkpoint(ckpt := resolve_checkpoint(resume))
        else:
            ckpt = resume_checkpoint(ckpt_root, say=accelerator.print if is_main else lambda *a: None)
    elif latest_checkpoint(ckpt_root) is not None:
        raise ConfigError(f"{out_dir} already holds checkpoints; pass --resume to continue that run, "
                          f"or choose another train.out_dir")

    torch.manual_seed(tc.seed)
    data = build_training_data(cfg)
    # before anything is built: the data must hold one global batch (the latent store's size is known now)
    order = ResumableBatchOrder(data.num_examples, tc.global_batch, tc.seed, accelerator.num_processes,
                                accelerator.process_index, tc.grad_accum)
    model = create_model(cfg.model)
    if (data.channels, data.size) != (model.in_channels, model.input_size):
        raise ConfigError(f"the data gives {data.channels}x{data.size}x{data.size} inputs but the model expects "
                          f"model.in_channels={model.in_channels}, model.input_size={model.input_size}")
    if data.num_classes != model.num_classes:
        raise ConfigError(f"the data has {data.num_classes} classes but model.num_classes={model.num_classes}")
    objective = create_objective(cfg.diffusion, model.learn_sigma)
    codec = build_codec(cfg).to(device)  # for the sample grids: built once, the VAE loads on first decode
    model.grad_checkpointing = tc.grad_checkpointing

    ema = AveragedModel(model, multi_avg_fn=ema_avg_fn(tc.ema_decay), use_buffers=True)
    ema.requires_grad_(False)
    sharded = tc.distributed == "fsdp"
    # expert parallelism: a (data, expert) mesh; None without (racedit.models.expert_parallel.expert_layout)
    layout = expert_layout(device, cfg.model.expert_parallel)
    n_params = count_params(model)  # of the whole model, before any process keeps a share of it

    start_step, skipped_total = 0, 0
    changes: dict = {}
    if ckpt is not None:
        state = load_train_state(ckpt)
        changes = resume_changes(load_config_of(ckpt), cfg, ckpt, int(state["step"]))
        if weights_load_before_sharding(ckpt, sharded or layout is not None):
            load_into(model, load_weights(ckpt, "model"), f"checkpoint {ckpt} (model)")
            load_into(ema.module, load_weights(ckpt, "ema"), f"checkpoint {ckpt} (ema)")
    elif tc.init_from:  # fine-tuning: a converted, upcycled or earlier model's EMA weights, fresh optimizer
        source = resolve_checkpoint(tc.init_from)
        load_into(model, load_weights(source, "ema"), f"train.init_from={tc.init_from} (EMA weights)")
    if ckpt is None:
        ema.update_parameters(model)  # the EMA starts as an exact copy of the initial weights
    shard_model_experts(model, layout)  # every process keeps the experts of its share (nothing without a layout)
    shard_model_experts(ema.module, layout)
    if sharded:  # the EMA is sharded like the model, unit for unit (see racedit.training.sharding)
        # with expert parallelism the experts stay out of FSDP: their processes hold different ones
        shard_model(model, device, tc.mixed_precision, set(expert_parameters(model).values()) if layout else None)
        shard_model(ema.module, device, tc.mixed_precision,
                    set(expert_parameters(ema.module).values()) if layout else None)
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=tuple(tc.betas))
    warmup = max(tc.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # one schedule per group (memory tables scale their own LR)
        optimizer, [group_lr_lambda(g, warmup, tc.steps) for g in optimizer.param_groups])
    if ckpt is not None:
        fresh = fresh_hyperparameters(optimizer)
        restore_optimizer(ckpt, state, model, ema.module, optimizer, layout)
        scheduler.load_state_dict(state["scheduler"])
        adopt_hyperparameters(optimizer, scheduler, fresh)  # this config's lr schedule and weight decay
        ema.n_averaged.fill_(int(state["ema_n_averaged"]))
        torch.set_rng_state(state["torch_rng"])
        start_step, skipped_total = int(state["step"]), int(state["skipped_steps"])

    ema.to(device)
    loader = data.loader(order, start_step, device)
    if tc.compile:  # in place; under FSDP per block, whose sharding hooks stay outside the graphs
        compile_model(model, tc.compile_mode, unit="block" if sharded else "model")
    train_model = model
    if sharded:  # the model is FSDP's: accelerate wraps the optimizer only, autocast is applied below
        optimizer = accelerator.prepare(optimizer)
    else:
        if layout is not None:  # the experts differ between processes: DDP must neither average nor broadcast them
            ignore_experts_in_ddp(model)
        train_model, optimizer = accelerator.prepare(train_model, optimizer)
    forward_precision = accelerator.autocast if sharded else contextlib.nullcontext
    randomness = StepRandomness(objective, tc.seed, tc.global_batch, accelerator.num_processes,
                                accelerator.process_index, tc.grad_accum, model.config.class_dropout_prob,
                                model.num_classes)

    resolved = flat_config(asdict(replace(cfg, model=resolve_model_config(cfg.model))))  # preset values filled in
    logger = MetricsLogger(out_dir, resume_step=start_step if ckpt else None, accelerator=accelerator,
                           config=resolved) if is_main else None
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))
        accelerator.print(f"racedit: {cfg.model.name} | params {n_params['total'] / 1e6:.2f}M total, "
                          f"{n_params['activated'] / 1e6:.2f}M activated | {accelerator.num_processes} process(es) on "
                          f"{device}{f' | experts over {layout.size} processes' if layout else ''} | "
                          f"{'resuming at step ' + str(start_step) if ckpt else 'fresh run'} -> {out_dir}")
        if changes:
            accelerator.print(f"resuming with changed settings (applied): {describe_changes(changes)}")

    def save(step: int) -> Path | None:  # every process calls it: an FSDP checkpoint is written by all
        return save_training_checkpoint(
            ckpt_root, step, is_main=is_main, model=model, ema_module=ema.module, optimizer=optimizer, config=cfg,
            keep_last=tc.keep_last, layout=layout, train_state={"scheduler": scheduler.state_dict(), "step": step,
                                                 "skipped_steps": skipped_total, "ema_n_averaged": int(ema.n_averaged),
                                                 "torch_rng": torch.get_rng_state(),
                                                 "data_position": order.position(step)})

    def ema_for_sampling() -> torch.nn.Module | None:
        """The EMA model whole on the main process (gathered from the shards under FSDP and expert parallelism:
        collective)."""
        if not sharded and layout is None:
            return ema.module if is_main else None
        state = whole_state(ema.module, layout, is_main)
        if not is_main:
            return None
        copy = create_model(cfg.model)
        copy.load_state_dict(state)
        return copy.to(device).eval()

    last_good = ckpt
    resume_cmd = _resume_command(out_dir, accelerator.num_processes)

    def interrupted(what: str, second_sigint: bool = False) -> Interrupted:
        if second_sigint:
            signum, by = signal.SIGINT, "a second SIGINT"
        else:  # a process that got no signal stops with the others
            signum, by = stop.signum or signal.SIGTERM, stop.name or "a signal to another process"
        command = resume_cmd
        if last_good is not None and latest_checkpoint(ckpt_root) is None:
            # started from a checkpoint elsewhere (--ckpt) and stopped before its own first save: --resume here
            # would start afresh, so the command names the checkpoint to continue from
            command = command.replace(" --resume", f" --ckpt {shlex.quote(str(last_good))}")
        return Interrupted(signum, f"interrupted by {by} {what}", command, show=is_main)

    window: dict[str, list[float]] = {}
    consecutive_bad, last_loss = 0, float("nan")
    t0 = time.perf_counter()
    t_log, steps_since_log = t0, 0
    end_step = tc.steps if stop_after is None else min(tc.steps, start_step + stop_after)
    bar = tqdm(total=tc.steps, initial=start_step, disable=not is_main, desc="train", dynamic_ncols=True)
    model.train()
    step, stopping = start_step, False

    def second_sigint() -> Interrupted:
        bar.close()  # the line goes below the progress bar
        return interrupted(f"at step {step}: exited without saving; the last checkpoint is "
                           f"{last_good or 'none (no checkpoint yet)'}", True)

    stop.on_repeat = second_sigint
    while step < end_step:
        terms_acc: dict[str, float] = {}
        kth_scores = []  # per micro-batch: MoE layer -> the batch's K-th largest score
        diagnose = is_main and diagnostics_due(step + 1, tc.diagnostics_every, tc.log_every, end_step)
        for accum_index in range(tc.grad_accum):
            x0, y = next(loader)
            draws = randomness.for_micro_batch(step, accum_index, x0.shape[1:], device)
            with accelerator.accumulate(train_model):
                set_gradient_sync(model, accelerator.sync_gradients)  # FSDP: reduce-scatter on the last only
                record = ForwardRecord(diagnostics=diagnose and accum_index == tc.grad_accum - 1)
                with forward_precision():
                    terms = training_losses(train_model, objective, x0, y, draws, cfg.loss, record)
                accelerator.backward(terms["loss"])
                kth_scores.append(record.kth_scores())  # read after any recomputation in the backward
                for k, v in terms.items():  # kept on the device: no host sync per term
                    terms_acc[k] = terms_acc.get(k, 0.0) + v.detach().double() / tc.grad_accum
                if accelerator.sync_gradients:
                    max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
                    if layout is not None:  # the experts' gradients: over their replicas; each counted once
                        reduce_expert_gradients(model, layout)
                        grad_norm = clip_grad_norm_(model, max_norm, layout)
                    else:
                        grad_norm = full(accelerator.clip_grad_norm_(train_model.parameters(), max_norm))
                    # the step's one collective and one host sync: every logged term, averaged over the
                    # processes (the whole global batch's losses), whether any process was asked to stop
                    # (a fill, no copy from the host), and the gradient norm (already global)
                    keys = list(terms_acc)
                    local = torch.stack([*(terms_acc[k] for k in keys),
                                         terms_acc["loss"].new_full((), float(stop.requested))])
                    if accelerator.num_processes > 1:
                        local = accelerator.reduce(local, reduction="mean")
                    values = torch.cat([local, grad_norm.double().reshape(1)]).tolist()
                    terms_acc, grad_norm = dict(zip(keys, values[:-2])), values[-1]
                    # every process sees the same mean: all stop after this step, or none
                    stopping = values[-2] > 0 or (accelerator.num_processes == 1 and stop.requested)
                    # a non-finite loss on any process makes the mean non-finite, so every process skips
                    finite = math.isfinite(terms_acc["loss"]) and (tc.mixed_precision == "fp16"
                                                                   or math.isfinite(grad_norm))
                    if finite:
                        optimizer.step()
                        model.after_optimizer_step()  # e.g. UltraMem's Tucker pre-filter refresh
                    optimizer.zero_grad(set_to_none=True)
        # routing diagnostics of this process's last micro-batch, from the side channel (main process only)
        diag = routing_diagnostics(record, timestep_fraction(objective, draws.t)) if diagnose else {}
        # the inference thresholds' EMA: one step per micro-batch in order, also when the optimizer step was
        # skipped (its forwards ran), and before the EMA model averages tau
        update_thresholds(model, kth_scores)
        if finite:
            scheduler.step()
            if sharded:
                ema_update_(ema.module, model, tc.ema_decay, ema.n_averaged)
            else:
                ema.update_parameters(accelerator.unwrap_model(model))
            ema.module.after_optimizer_step()  # the EMA's pre-filter follows its own averaged cores
            consecutive_bad = 0
            last_loss = terms_acc["loss"]
        else:
            consecutive_bad += 1
            skipped_total += 1
            accelerator.print(f"step {step + 1}: non-finite loss or gradient, optimizer step skipped "
                              f"({consecutive_bad} in a row)")
            if consecutive_bad >= tc.max_nonfinite:
                raise TrainingDiverged(
                    f"{consecutive_bad} consecutive non-finite steps, the last at step {step + 1}; "
                    f"stopping without saving. Last good checkpoint: "
                    f"{last_good_checkpoint(last_good, ckpt_root) or 'none (no checkpoint yet)'}")
        step += 1
        stopping = stopping or (accelerator.num_processes == 1 and stop.requested)  # no sync needed on one
        steps_since_log += 1
        for k, v in terms_acc.items():
            window.setdefault(k, []).append(v)
        window.setdefault("grad_norm", []).append(grad_norm)
        bar.update(1)
        if step % tc.log_every == 0 or step == end_step or diag or stopping:
            now = time.perf_counter()
            row = {k: sum(v) / len(v) for k, v in window.items() if v and all(map(math.isfinite, v))}
            row.update(lr=scheduler.get_last_lr()[0], steps_per_s=steps_since_log / max(now - t_log, 1e-9),
                       skipped_steps=skipped_total)
            row.update(diag)
            if logger is not None:
                logger.log(step, row)
            bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", it_s=f"{row['steps_per_s']:.2f}")
            window, t_log, steps_since_log = {}, now, 0
        if ((stopping or tc.ckpt_every and step % tc.ckpt_every == 0) and step < tc.steps
                and consecutive_bad == 0):
            last_good = save(step) or last_good
            accelerator.wait_for_everyone()
        if stopping:
            break
        if tc.sample_every and step % tc.sample_every == 0 and step < tc.steps:
            sampler = ema_for_sampling()
            if is_main and not stop.requested:
                with stop.abandon_on_signal():  # a signal ends the grid; the next step stops the run
                    _sample_grid(cfg, sampler, objective, codec, out_dir / "samples" / f"step_{step:07d}.png", device)
    bar.close()
    if stopping and step < tc.steps:
        raise interrupted(f"at step {step}: saved {last_good}" if not consecutive_bad else
                          f"at step {step}: not saved, the last {consecutive_bad} step(s) were non-finite; the last "
                          f"good checkpoint is {last_good or 'none (no checkpoint yet)'}")

    summary: dict = {}
    if step >= tc.steps:
        # resuming a finished run trains nothing: keep its checkpoint rather than delete and rewrite it
        if ckpt is None or step > start_step or ckpt.parent != ckpt_root.resolve():
            last_good = save(step) or last_good
        accelerator.wait_for_everyone()
        sampler = ema_for_sampling() if not stopping else None
        if is_main and not stopping:  # the agreed stop, the same on every process
            with stop.abandon_on_signal():
                grid = out_dir / "samples" / f"step_{step:07d}.png"
                _sample_grid(cfg, sampler, objective, codec, grid, device)
                summary["grid"] = str(grid)
                if evaluate is not None and tc.eval_samples_per_class and cfg.data.kind == "digits":
                    summary.update(evaluate(cfg, sampler, objective, device))
                    logger.log(step, {f"eval/{k}": v for k, v in summary.items() if isinstance(v, float)})
        if stopping or stop.requested:  # the model is complete; what the end of the run makes comes on a resume
            raise interrupted(f"after the last step ({step}): saved {last_good}; the end-of-run sample grid "
                              f"and evaluation were not made")
    seconds = time.perf_counter() - t0
    return TrainResult(out_dir=out_dir, step=step, last_loss=last_loss, checkpoint=last_good,
                       skipped_steps=skipped_total, seconds=seconds, metrics=summary)


GRID_PER_ROW = 8  # samples per class row of the training grids


def _grid_size(num_classes: int) -> int:
    return min(num_classes, 10) * GRID_PER_ROW


@torch.no_grad()
def _sample_grid(cfg: Config, model: torch.nn.Module, objective, codec, path: Path, device) -> None:
    """A PNG grid with one row per class (at most 10 classes, 8 samples each), sampled with `cfg.sample`."""
    classes = torch.arange(min(model.num_classes, 10), device=device).repeat_interleave(GRID_PER_ROW)
    images = sample_images(model, objective, codec, classes, cfg.sample, seed=cfg.train.seed,
                           batch_size=len(classes))
    save_grid(images, path, nrow=GRID_PER_ROW)
