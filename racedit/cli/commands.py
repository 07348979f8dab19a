"""What each `racedit` subcommand runs: parse (racedit.cli.parser), call the library, print the outcome.

Each command imports what it needs inside its function, on purpose: torch, diffusers and accelerate take
seconds to import, and `racedit --help` or a mistyped flag should not wait for them.

A user error (a bad config, checkpoint, file or argument: see `user_error`) prints one line `error: ...` on
stderr and exits with status 2, with no traceback; anything else is a bug and keeps its traceback. A job stopped by
a signal (`racedit.signals.Interrupted`: train, sample to an npz, extract-latents) prints its one line and
exits with 128 + the signal number; Ctrl-C anywhere else prints `interrupted` and exits with 130.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from racedit.cli.parser import PROG, parse_args
from racedit.fileio import verification

# The RuntimeError subclasses that are the user's to fix, by module. Every ValueError is one too: ConfigError,
# EvaluationError, NpzError, ConversionError, UpcycleError, GridError, ImageFolderError and bad arguments.
# A class can only have been raised if its module was imported, so they are looked up in sys.modules
# (importing them here would cost `--help` its speed).
USER_RUNTIME_ERRORS = (
    ("racedit.checkpoint", "CheckpointError"),
    ("racedit.data.latent_store", "LatentStoreError"),
    ("racedit.sampling.npz_job", "SamplingError"),
    ("racedit.training.loop", "TrainingDiverged"),
    ("racedit.runlock", "LockHeld"),
    ("racedit.outputs", "OutputExists"),
)

Command = Callable[..., int | None]
COMMANDS: dict[str, Command] = {}
EXTRA_USER_ERRORS: dict[str, tuple[type[BaseException], ...]] = {}


def command(name: str, user_errors: tuple[type[BaseException], ...] = ()):
    """Register a subcommand's function; `user_errors`: further exceptions that it reports as user errors."""

    def register(fn: Command) -> Command:
        COMMANDS[name] = fn
        EXTRA_USER_ERRORS[name] = user_errors
        return fn

    return register


def user_error(e: BaseException, name: str) -> bool:
    """Whether `e`, raised by subcommand `name`, is the user's to fix (then it is printed as one line)."""
    if isinstance(e, (ValueError, *EXTRA_USER_ERRORS.get(name, ()))):
        return True
    return any(isinstance(e, getattr(sys.modules[m], cls)) for m, cls in USER_RUNTIME_ERRORS if m in sys.modules)


def main(argv: list[str] | None = None) -> int:
    """`racedit SUBCOMMAND [flags]` (argv default: sys.argv[1:]); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    try:
        with verification(not getattr(args, "no_verify", False)):  # --no-verify: RACEDIT_VERIFY=0 for the command
            return COMMANDS[args.command](args) or 0
    except KeyboardInterrupt as e:  # racedit.signals.Interrupted: a job that stopped at a safe point
        if getattr(e, "show", True):
            print(str(e) or "interrupted", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except Exception as e:
        if not user_error(e, args.command):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def default_device(device: str | None) -> str:
    """--device, else cuda if there is one, else cpu."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


# --- train, sample (each command imports its own dependencies: a fast --help) --------------------------------


@command("train")
def run_train(args) -> int:
    from accelerate import PartialState

    from racedit.config import load_config
    from racedit.evaluation.digits import evaluate_digits_model
    from racedit.training.loop import train

    cfg = load_config(args.config, [*args.overrides, *args.set])
    result = train(cfg, resume=args.ckpt or args.resume, evaluate=evaluate_digits_model)
    if not PartialState().is_main_process:  # one summary line per run, not per process
        return 0
    parts = [f"done: {result.step} steps in {result.seconds:.0f}s", f"final loss {result.last_loss:.4f}",
             f"skipped {result.skipped_steps}", f"checkpoint {result.checkpoint}"]
    if "grid" in result.metrics:
        parts.append(f"grid {result.metrics['grid']}")
    if "sample_class_accuracy" in result.metrics:
        parts.append(f"sample class accuracy {100 * result.metrics['sample_class_accuracy']:.1f}% "
                     f"({result.metrics['eval_samples']} samples)")
    if "digits_fd" in result.metrics:
        floor = result.metrics.get("digits_fd_train_vs_holdout")
        parts.append(f"digits FD {result.metrics['digits_fd']:.3f}"
                     + (f" (train vs held-out {floor:.3f})" if floor is not None else ""))
    print(" | ".join(parts))
    return 0


@command("sample")
def run_sample(args) -> int:
    from dataclasses import replace

    import torch
    from accelerate import PartialState

    from racedit.config import CHOICES, check_sample
    from racedit.sampling import (
        check_grid_out,
        grid_for_classes,
        grid_metadata,
        load_for_sampling,
        sample_config_with,
        save_grid,
        write_samples_npz,
    )

    if args.sampler is not None and args.sampler not in CHOICES["sample.sampler"]:
        raise ValueError(f"--sampler {args.sampler!r}: allowed {list(CHOICES['sample.sampler'])}")
    to_npz = args.out.endswith(".npz")
    if not to_npz:
        check_grid_out(args.out, overwrite=args.overwrite)  # before loading anything: not a racedit grid
    device = args.device
    state = None
    if to_npz:
        # one process per device under `accelerate launch`; cpu=True lets CPU-only processes form a group
        state = PartialState(cpu=(device == "cpu") or not torch.cuda.is_available())
        device = device or str(state.device)
    try:
        loaded = load_for_sampling(args.ckpt, use_ema=not args.no_ema, device=default_device(device), vae=args.vae,
                                   calibrate_threshold=args.calibrate_threshold,
                                   calibration_batch=args.calibration_batch, progress=not args.quiet)
        main_process = state is None or state.is_main_process
        if loaded.threshold_calibration is not None and not args.quiet and main_process:
            print(loaded.threshold_calibration.summary())
        scfg = sample_config_with(loaded.config.sample, sampler=args.sampler, steps=args.steps,
                                  cfg_scale=args.cfg_scale, guidance_channels=args.guidance_channels)
        flags = {"sample.sampler": "--sampler", "sample.steps": "--steps", "sample.guidance_channels": "--guidance-channels"}
        check_sample(replace(loaded.config, sample=scfg),  # against this checkpoint's T and channels
                     {key: flag for key, flag in flags.items() if getattr(args, flag[2:].replace("-", "_")) is not None})
        if to_npz:
            if main_process and not args.quiet:
                n = args.num_samples or args.per_class * loaded.model.num_classes
                print(f"sampling {n} images from {loaded.path} ({loaded.weights} "
                      f"weights): {scfg.sampler} {scfg.steps} steps, cfg {scfg.cfg_scale} on "
                      f"{scfg.guidance_channels or 'all'} channels, seed {args.seed}, batch {args.batch_size} "
                      f"x {state.num_processes} process(es)")
            write_samples_npz(loaded, args.num_samples, args.out, scfg, seed=args.seed, batch_size=args.batch_size,
                              per_class=args.per_class, max_batches=args.max_batches, progress=not args.quiet,
                              overwrite=args.overwrite)
        else:
            per_class = args.per_class if args.per_class is not None else 8
            classes = args.classes if args.classes is not None else list(range(min(loaded.model.num_classes, 10)))
            metadata = grid_metadata(loaded, scfg, classes, per_class, args.seed)
            check_grid_out(args.out, metadata, overwrite=args.overwrite)
            images = grid_for_classes(loaded, classes, per_class, scfg, seed=args.seed)
            print(f"wrote grid {save_grid(images, args.out, nrow=per_class, metadata=metadata)}")
    finally:
        if state is not None:
            state.destroy_process_group()  # a no-op without one; avoids teardown noise under accelerate launch
    return 0


# --- evaluation -------------------------------------------------------------------------------------------


@command("fid")
def run_fid(args) -> int:
    from racedit.evaluation.fid import (
        EvalSettings,
        check_outputs,
        default_report_path,
        evaluate,
        format_report,
        save_report,
    )

    settings = EvalSettings(batch_size=args.batch_size, device=default_device(args.device), isc_splits=args.isc_splits,
                            prc=not args.no_prc, prc_k=args.prc_k, kid=args.kid, num_samples=args.num_samples)
    report_path = args.out or default_report_path(args.samples)
    check_outputs(args.samples, args.ref, settings, report_path, args.save_stats, overwrite=args.overwrite)
    report = evaluate(args.samples, args.ref, args.inception_weights, settings, save_stats_path=args.save_stats,
                      stats_max_features=args.stats_features, progress=not args.quiet)
    out = save_report(report, report_path)
    print(format_report(report))
    if report.get("saved_stats"):
        print(f"  stats      {report['saved_stats']}")
    print(f"  report     {out}")
    return 0


@command("routing-report")
def run_routing_report(args) -> int:
    from racedit.evaluation.routing_report import routing_report

    paths = routing_report(args.ckpt, args.out, timesteps=args.timesteps, classes=args.classes,
                           per_class=args.per_class, seed=args.seed, batch_size=args.batch_size,
                           device=default_device(args.device), use_ema=not args.no_ema,
                           calibrate_threshold=args.calibrate_threshold, calibration_batch=args.calibration_batch,
                           progress=not args.quiet, overwrite=args.overwrite)
    print(f"routing report: {len(paths) - 1} figures and {paths['summary'].name} in {paths['summary'].parent}")
    return 0


@command("ablate")
def run_ablate(args) -> int:
    from dataclasses import replace

    import torch

    from racedit.experiments.ablation import (
        check_compute,
        load_grid,
        overrides_text,
        resolve_variants,
        run_grid,
        variant_accounting,
    )
    from racedit.experiments.ablation.report import human_count

    if args.threads:
        torch.set_num_threads(args.threads)
    grid = load_grid(args.grid)
    if args.fid_ref:
        grid.eval = replace(grid.eval, ref=args.fid_ref)
    if args.list:
        configs = resolve_variants(grid, args.out, args.set)
        for name, cfg in configs.items():
            acc = variant_accounting(cfg)
            print(f"{name:28s} MACs {human_count(acc['macs']):>7s}  act. params {human_count(acc['params_activated']):>7s}"
                  f"  {overrides_text(grid.variant(name).overrides)}")
        check_compute(grid, {n: variant_accounting(c) for n, c in configs.items()})
        return 0
    from racedit.signals import Interrupted

    try:
        result = run_grid(grid, args.out, args.set, only=args.only, device=args.device,
                          command=f"{PROG} {shlex.join(args.argv)}", overwrite=args.overwrite)
    except Interrupted as e:  # a variant's training stopped: the same ablate command resumes the grid
        e.resume = f"{PROG} {shlex.join(args.argv)}"
        raise
    done = sum(s in ("skipped", "trained", "resumed") for s in result.status.values())
    lost = f", {len(result.diverged)} diverged ({', '.join(result.diverged)})" if result.diverged else ""
    print(f"{grid.name}: {done} of {len(grid.variants)} variants finished{lost} in {result.seconds / 60:.1f} min "
          f"-> {result.out_dir}")
    return 0


# --- data and interop -------------------------------------------------------------------------------------


@command("extract-latents", user_errors=(OSError,))  # OSError: an unreadable image root or VAE directory
def run_extract_latents(args) -> int:
    from racedit.data.latent_extract import extract_latents

    extract_latents(args.data, args.vae, args.out, image_size=args.image_size, batch_size=args.batch_size,
                    shard_size=args.shard_size, num_workers=args.num_workers, store_dtype=args.store_dtype,
                    vae_dtype=args.vae_dtype, verify_checksums=args.verify_checksums, progress=not args.quiet,
                    overwrite=args.overwrite)
    return 0


CONVERT_ERRORS = (OSError,)  # a VAE directory that is none


@command("convert from-dit", user_errors=CONVERT_ERRORS)
def run_convert_from_dit(args) -> int:
    from racedit.interop import DEFAULT_VAE, convert_dit_file

    return _wrote(convert_dit_file(args.path, args.out, image_size=args.image_size, vae=args.vae or DEFAULT_VAE,
                                   num_heads=args.num_heads))


@command("convert from-diffusers", user_errors=CONVERT_ERRORS)
def run_convert_from_diffusers(args) -> int:
    from racedit.interop import convert_diffusers_dir

    return _wrote(convert_diffusers_dir(args.path, args.out, vae=args.vae))


@command("convert to-diffusers", user_errors=CONVERT_ERRORS)
def run_convert_to_diffusers(args) -> int:
    from racedit.interop import export_diffusers

    return _wrote(export_diffusers(args.ckpt, args.out, vae=args.vae, use_ema=not args.no_ema))


@command("convert upcycle", user_errors=CONVERT_ERRORS)
def run_convert_upcycle(args) -> int:
    from racedit.interop import parse_model_overrides, upcycle_checkpoint

    out, gap = upcycle_checkpoint(args.ckpt, args.to, args.out, noise_std=args.noise_std, seed=args.seed,
                                  use_ema=not args.no_ema, overrides=parse_model_overrides(args.set),
                                  probe=not args.no_probe)
    if gap is not None:
        print("gap to the dense model on a random batch (relative L2 of the outputs; worst MoE layer): "
              f"eval routing {gap['eval_relative']:.2e}; {gap['eval_max_layer_relative']:.2e} | "
              f"train routing {gap['train_relative']:.2e}; {gap['train_max_layer_relative']:.2e}")
    return _wrote(out)


def _wrote(path: str | Path) -> int:
    print(f"wrote {path}")
    return 0
