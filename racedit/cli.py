"""Command-line entry points (`train.py`, `sample.py`, and the `racedit-train` / `racedit-sample` scripts)."""

from __future__ import annotations

import argparse
import sys


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="train.py", description="Train a (Race-)DiT. Extra arguments are config overrides: a.b=c.")
    parser.add_argument("--config", required=True, help="YAML config (see configs/ and racedit/config.py)")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                        help="continue the run: the latest checkpoint of train.out_dir, or the one given")
    parser.add_argument("overrides", nargs="*", help="config overrides such as train.steps=100")
    args = parser.parse_args(argv)

    from racedit.checkpoint import CheckpointError
    from racedit.config import ConfigError, load_config
    from racedit.evaluation.digits import evaluate_digits_model
    from racedit.training.loop import TrainingDiverged, train

    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg, resume=args.resume, evaluate=evaluate_digits_model)
    except (ConfigError, CheckpointError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from accelerate import PartialState

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


def sample_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sample.py", description="Sample images from a racedit checkpoint: a PNG grid, or an ADM-format .npz "
        "for FID (run under `accelerate launch` to use several devices; a re-run resumes). See docs/fid.md.")
    parser.add_argument("--ckpt", required=True, help="checkpoint dir, its run dir, or .../checkpoints/last")
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="class ids for a grid (one row each)")
    parser.add_argument("--per-class", type=int, default=None,
                        help="grid: samples per class (default 8); npz: K samples of every class (balanced labels)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="npz: this many samples with uniformly drawn (seeded) labels")
    parser.add_argument("--out", required=True, help="grid .png, or .npz (with --num-samples or --per-class)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: the config's)")
    parser.add_argument("--sampler", default=None, help="ddpm | ddim | dpm_solver | euler | heun")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps")
    parser.add_argument("--guidance-channels", type=int, default=None,
                        help="0 = guide all channels; 3 = DiT's legacy 3-of-4 channel guidance")
    parser.add_argument("--seed", type=int, default=0, help="labels and noise; sample i depends only on (seed, i)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward on each device")
    parser.add_argument("--max-batches", type=int, default=None,
                        help="npz: stop after this many batches per process (time-limited jobs); re-run to continue")
    parser.add_argument("--no-ema", action="store_true", help="use the live weights instead of the EMA")
    parser.add_argument("--calibrate-threshold", type=int, default=0, metavar="N",
                        help="Expert Race models: recalibrate the inference threshold of the sampled weights on N "
                             "training batches first (e.g. 100; reads the training data the config names)")
    parser.add_argument("--calibration-batch", type=int, default=None,
                        help="batch size of --calibrate-threshold (default: the config's train.global_batch)")
    parser.add_argument("--vae", default=None,
                        help="latent models: VAE hub id or local directory (default: the one in the checkpoint's "
                             "config or latent manifest)")
    parser.add_argument("--device", default=None, help="default: this process's accelerator, else cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from racedit.checkpoint import CheckpointError
    from racedit.config import CHOICES, ConfigError
    from racedit.sampling import (
        SamplingError,
        grid_for_classes,
        load_for_sampling,
        sample_config_with,
        save_grid,
        write_samples_npz,
    )

    if args.sampler is not None and args.sampler not in CHOICES["sample.sampler"]:
        parser.error(f"--sampler {args.sampler!r}: allowed {list(CHOICES['sample.sampler'])}")
    to_npz = args.out.endswith(".npz")
    if to_npz and args.num_samples is None and args.per_class is None:
        parser.error("an .npz needs --num-samples N (uniform labels) or --per-class K (K of every class)")
    if args.num_samples is not None and not to_npz:
        parser.error("--num-samples writes an .npz: give --out NAME.npz")
    device = args.device
    state = None
    if to_npz:
        from accelerate import PartialState

        # one process per device under `accelerate launch`; cpu=True lets CPU-only processes form a group
        state = PartialState(cpu=(device == "cpu") or not _cuda())
        device = device or str(state.device)
    device = device or ("cuda" if _cuda() else "cpu")
    try:
        loaded = load_for_sampling(args.ckpt, use_ema=not args.no_ema, device=device, vae=args.vae,
                                   calibrate_threshold=args.calibrate_threshold,
                                   calibration_batch=args.calibration_batch, progress=not args.quiet)
    except (CheckpointError, ConfigError, ValueError) as e:  # ConfigError: a saved config that builds no model
        print(f"error: {e}", file=sys.stderr)
        return 2
    if loaded.threshold_calibration is not None and not args.quiet and (state is None or state.is_main_process):
        print(loaded.threshold_calibration.summary())
    scfg = sample_config_with(loaded.config.sample, sampler=args.sampler, steps=args.steps,
                              cfg_scale=args.cfg_scale, guidance_channels=args.guidance_channels)
    try:
        if to_npz:
            if state.is_main_process and not args.quiet:
                n = args.num_samples or args.per_class * loaded.model.num_classes
                print(f"sampling {n} images from {loaded.path} ({loaded.weights} "
                      f"weights): {scfg.sampler} {scfg.steps} steps, cfg {scfg.cfg_scale} on "
                      f"{scfg.guidance_channels or 'all'} channels, seed {args.seed}, batch {args.batch_size} "
                      f"x {state.num_processes} process(es)")
            write_samples_npz(loaded, args.num_samples, args.out, scfg, seed=args.seed, batch_size=args.batch_size,
                              per_class=args.per_class, max_batches=args.max_batches, progress=not args.quiet)
        else:
            per_class = args.per_class if args.per_class is not None else 8
            classes = args.classes if args.classes is not None else list(range(min(loaded.model.num_classes, 10)))
            images = grid_for_classes(loaded, classes, per_class, scfg, seed=args.seed)
            print(f"wrote grid {save_grid(images, args.out, nrow=per_class)}")
    except (ValueError, SamplingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if state is not None:
            state.destroy_process_group()  # a no-op without one; avoids teardown noise under accelerate launch
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
