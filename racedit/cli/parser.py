"""The argument parser of the `racedit` command: every subcommand, one flag vocabulary.

A flag means the same thing in every subcommand that has it:

    --ckpt CKPT           a racedit checkpoint to read: its directory, its run directory, or .../checkpoints/last
    --no-ema              the live weights instead of the EMA (the EMA is the default everywhere)
    --device DEVICE       torch device (default: this process's accelerator if there is one, else cpu)
    --quiet               no progress bars or status lines (results and errors are still printed)
    --out PATH            what the command writes: a file or a directory, as its help says
    --overwrite           replace existing outputs that racedit did not write for this same job (without it, such
                          an output is refused: sample, fid, routing-report, extract-latents, ablate)
    --seed N              the seed of everything random the command draws
    --batch-size N        images per forward pass (on each device)
    --vae VAE             an AutoencoderKL: hub id or local directory
    --calibrate-threshold N, --calibration-batch B
                          recalibrate Expert Race's inference threshold on N training batches of B first
    --no-verify           read checkpoints (and sample batches) without checking them against their manifest
                          (the same as RACEDIT_VERIFY=0); every command that has --ckpt has it, and ablate
    --set KEY=VALUE ...   config overrides, applied in order (train, ablate, convert upcycle); repeatable.
                          `racedit train` also takes them as bare positional arguments (`train.steps=100`).

Every number a flag takes is checked when the arguments parse, against its range (`ranged`: the ranges of
racedit.limits, the same as the config's where a flag sets a config value); nan and inf are refused. An
argument error is one line on stderr, `racedit COMMAND: error: ...`, with exit status 2.

Only argparse (and racedit.limits, which imports nothing) is imported here, so `racedit --help` answers at
once; `racedit.cli.commands` runs the subcommands.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from racedit.limits import RANGES, describe, in_range

PROG = "racedit"

CKPT_HELP = "racedit checkpoint: its directory, its run directory, or .../checkpoints/last"
NO_EMA_HELP = "use the live weights instead of the EMA"
DEVICE_HELP = "torch device (default: this process's accelerator if there is one, else cpu)"
QUIET_HELP = "no progress bars or status lines"
SET_HELP = "config overrides such as train.steps=100 (repeatable; later ones win)"
CALIBRATE_HELP = ("Expert Race models: recalibrate the inference threshold of the loaded weights on N training "
                  "batches first (e.g. 100; reads the training data the config names)")
NO_VERIFY_HELP = ("skip the integrity check of what is read: the sizes and SHA-256 in each checkpoint's "
                  "manifest.json, and the digests of sample batches (the same as RACEDIT_VERIFY=0)")
DEBUG_HELP = ("on an error, print the traceback too (the same as RACEDIT_DEBUG=1); without it an error is one "
              "line 'error: ...'")
CALIBRATION_BATCH_HELP = "batch size of --calibrate-threshold (default: the config's train.global_batch)"
OVERWRITE_HELP = "replace existing outputs that racedit did not write for this same job (default: refuse them)"


def ranged(kind: type, spec: str, name: str) -> Callable[[str], int | float]:
    """An argparse type: a number of `kind` (int or float) inside the range `spec` (racedit.limits: '>= 1',
    '[0, 2**32)', ...), finite. The function keeps its range as `.spec`."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}; "
                                             f"must be {describe(spec, kind is float)}") from None
        if not in_range(value, spec):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {describe(spec, kind is float)}")
        return value

    parse.__name__ = parse.__qualname__ = name
    parse.spec = spec  # type: ignore[attr-defined]
    return parse


positive_int = ranged(int, ">= 1", "positive_int")
nonnegative_int = ranged(int, ">= 0", "nonnegative_int")
nonnegative_float = ranged(float, ">= 0", "nonnegative_float")
seed_int = ranged(int, RANGES["train.seed"], "seed_int")  # racedit.seeding hashes a seed as one 32-bit word
# the flags that override a config value take that value's range
sample_steps = ranged(int, RANGES["sample.steps"], "sample_steps")
cfg_scale = ranged(float, RANGES["sample.cfg_scale"], "cfg_scale")
guidance_channels = ranged(int, RANGES["sample.guidance_channels"], "guidance_channels")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, `racedit COMMAND: error: MESSAGE; see racedit COMMAND --help`,
    with exit status 2 (argparse's own prints the usage first, which can run to many lines)."""

    def error(self, message: str):
        for action in self._actions:  # a missing command: say which there are
            if isinstance(action, argparse._SubParsersAction) and f"required: {action.metavar}" in message:
                message += f" (one of: {', '.join(action.choices)})"
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


# --- the shared flags: each defined once ------------------------------------------------------------------


def add_ckpt(p: argparse.ArgumentParser, required: bool = True, help: str = CKPT_HELP) -> None:
    p.add_argument("--ckpt", required=required, metavar="CKPT", help=help)
    add_no_verify(p)  # every reader of a checkpoint can skip its verification


def add_no_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)


def add_no_ema(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-ema", action="store_true", help=NO_EMA_HELP)


def add_device(p: argparse.ArgumentParser, help: str = DEVICE_HELP) -> None:
    p.add_argument("--device", default=None, help=help)


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)


def add_out(p: argparse.ArgumentParser, help: str, required: bool = True) -> None:
    p.add_argument("--out", required=required, help=help)


def add_overwrite(p: argparse.ArgumentParser, help: str = "") -> None:
    p.add_argument("--overwrite", action="store_true", help=f"{OVERWRITE_HELP}{help}")


def add_seed(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--seed", type=seed_int, default=0, help=help)


def add_batch_size(p: argparse.ArgumentParser, default: int, help: str = "images per forward pass") -> None:
    p.add_argument("--batch-size", type=positive_int, default=default, help=f"{help} (default {default})")


def add_vae(p: argparse.ArgumentParser, help: str, required: bool = False) -> None:
    p.add_argument("--vae", required=required, default=None, help=help)


def add_calibration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibrate-threshold", type=nonnegative_int, default=0, metavar="N", help=CALIBRATE_HELP)
    p.add_argument("--calibration-batch", type=positive_int, default=None, help=CALIBRATION_BATCH_HELP)


def add_set(p: argparse.ArgumentParser, help: str = SET_HELP, metavar: str = "KEY=VALUE") -> None:
    p.add_argument("--set", dest="set", nargs="+", action="extend", default=[], metavar=metavar, help=help)


# --- the subcommands --------------------------------------------------------------------------------------


def _train(sub) -> None:
    p = _command(sub, "train", "train a (Race-)DiT from a YAML config",
                 "For example `racedit train --config configs/demo.yaml --set train.steps=500`; under "
                 "`accelerate launch -m racedit train ...` on several processes")
    p.add_argument("--config", required=True, help="YAML config (see configs/ and racedit/config.py)")
    add_set(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, the same as --set")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                   help="continue the run from the latest checkpoint of train.out_dir "
                        "(`--resume CKPT` is the same as --ckpt CKPT)")
    add_ckpt(p, required=False, help=f"continue the run from this checkpoint ({CKPT_HELP})")


def _sample(sub) -> None:
    p = _command(sub, "sample", "sample a PNG grid, or an ADM-format .npz for FID, from a checkpoint",
                 "An .npz job runs under `accelerate launch -m racedit sample ...` on several devices, and a "
                 "re-run resumes it. See docs/fid.md")
    add_ckpt(p)
    add_out(p, "grid .png, or .npz (with --num-samples or --per-class)")
    p.add_argument("--classes", type=nonnegative_int, nargs="+", default=None, help="class ids for a grid (one row each)")
    p.add_argument("--per-class", type=positive_int, default=None,
                   help="grid: samples per class (default 8); npz: K samples of every class (balanced labels)")
    p.add_argument("--num-samples", type=positive_int, default=None,
                   help="npz: this many samples with uniformly drawn (seeded) labels")
    p.add_argument("--cfg-scale", type=cfg_scale, default=None,
                   help="guidance scale, >= 0; 1 = no guidance (default: the config's)")
    p.add_argument("--sampler", default=None, help="ddpm | ddim | dpm_solver | euler | heun (default: the config's)")
    p.add_argument("--steps", type=sample_steps, default=None,
                   help="sampling steps (default: the config's); at most T for ddpm and ddim, T - 1 for dpm_solver")
    p.add_argument("--guidance-channels", type=guidance_channels, default=None,
                   help="0 = guide all channels; 3 = DiT's legacy 3-of-4 channel guidance")
    add_seed(p, "labels and noise; sample i depends only on (seed, i)")
    add_batch_size(p, 64, "images per forward on each device")
    p.add_argument("--max-batches", type=positive_int, default=None,
                   help="npz: stop after this many batches per process (time-limited jobs); re-run to continue")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model as one graph (first batch slower; pays on long jobs)")
    p.add_argument("--expert-parallel", type=positive_int, default=1, metavar="N",
                   help="npz on several processes: split every MoE layer's experts over groups of N processes "
                        "(default 1: every process holds all experts, whatever the checkpoint was trained with). "
                        "One process samples the whole model")
    add_no_ema(p)
    add_calibration(p)
    add_vae(p, "latent models: VAE hub id or local directory to decode with (default: the one in the "
               "checkpoint's config or latent manifest)")
    add_device(p)
    add_quiet(p)
    add_overwrite(p, "; the same job is the same checkpoint weights and settings, as recorded in the npz's metadata "
                     "or the PNG's text chunk")


def _check_sample(args) -> str | None:
    to_npz = args.out.endswith(".npz")
    if to_npz and args.num_samples is None and args.per_class is None:
        return "an .npz needs --num-samples N (uniform labels) or --per-class K (K of every class)"
    if args.num_samples is not None and not to_npz:
        return "--num-samples writes an .npz: give --out NAME.npz"
    return None


def _check_train(args) -> str | None:
    if args.ckpt is not None and isinstance(args.resume, str):
        return "give the checkpoint once: --ckpt CKPT (or the older --resume CKPT)"
    if isinstance(args.resume, str) and "=" in args.resume and not os.path.exists(args.resume):
        return (f"--resume took {args.resume!r} for a checkpoint; put overrides before --resume, or after --set")
    return None


def _fid(sub) -> None:
    p = _command(sub, "fid", "FID, sFID, Inception Score, precision/recall (and KID) of samples",
                 "Against REF, with torch-fidelity's TF-compatible Inception, comparable with the ADM evaluator; "
                 "prints the numbers and writes one JSON report. See docs/fid.md")
    p.add_argument("samples", help="ADM-format .npz (uint8 NHWC arr_0, as `racedit sample` writes) or a folder "
                                   "of images")
    p.add_argument("--ref", default=None,
                   help="ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz: its stored mu/sigma for FID, "
                        "its images for precision/recall), a folder of images, or a --save-stats file")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="local Inception weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth); "
                        "default: download it into the torch hub cache once")
    add_out(p, "JSON report (default: SAMPLES with suffix .fid.json)", required=False)
    p.add_argument("--save-stats", default=None, metavar="PATH",
                   help="also write the statistics of SAMPLES (mu, sigma, features) for later use as --ref")
    p.add_argument("--stats-features", type=nonnegative_int, default=10000,
                   help="with --save-stats: how many features to keep for precision/recall (0 = none)")
    p.add_argument("--num-samples", type=positive_int, default=None, help="evaluate only the first N samples")
    add_batch_size(p, 100, "images per Inception forward")
    add_device(p)
    p.add_argument("--kid", action="store_true", help="also compute KID (needs reference images or features)")
    p.add_argument("--no-prc", action="store_true", help="skip precision/recall")
    p.add_argument("--isc-splits", type=positive_int, default=10, help="Inception Score splits (default 10)")
    p.add_argument("--prc-k", type=positive_int, default=3, help="k of the k-NN manifold estimate (ADM: 3)")
    add_quiet(p)
    add_overwrite(p, ": the report and the --save-stats file; the same job is the same samples, reference and settings")


def _check_fid(args) -> str | None:
    if args.ref is None and args.save_stats is None:
        return "give --ref REF (to compute FID) and/or --save-stats PATH"
    return None


def _extract_latents(sub) -> None:
    p = _command(sub, "extract-latents", "encode an ImageFolder into sharded VAE latents for data.kind=latents",
                 "`accelerate launch -m racedit extract-latents ...` splits the work over GPUs. Re-running the "
                 "same command resumes: complete shards are verified and kept")
    p.add_argument("--data", required=True, help="image root with one subfolder per class")
    add_vae(p, "AutoencoderKL to encode with: hub id (stabilityai/sd-vae-ft-ema) or local directory",
            required=True)
    add_out(p, "output directory (shards + manifest.json)")
    p.add_argument("--image-size", type=positive_int, default=256, help="side of the ADM center crop")
    add_batch_size(p, 32, "images per VAE call (each also encoded mirrored)")
    p.add_argument("--shard-size", type=positive_int, default=20_000, help="image files per shard")
    p.add_argument("--num-workers", type=nonnegative_int, default=None, help="image decoding workers per process")
    p.add_argument("--store-dtype", choices=["float16", "float32"], default="float16", help="dtype of the shards")
    p.add_argument("--vae-dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="dtype the encoder runs in")
    p.add_argument("--verify-checksums", action="store_true", help="re-hash existing shards before reusing them")
    add_quiet(p)
    add_overwrite(p, ": write into an --out directory that holds other files (never mixes shards of other settings)")
    p.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)  # the older name


def _convert(sub) -> None:
    p = _command(sub, "convert", "convert DiT weights to racedit checkpoints and back; upcycle a dense DiT",
                 "`racedit convert CONVERSION --help` shows each one's flags. See docs/interop.md")
    conversions = p.add_subparsers(dest="conversion", required=True, metavar="CONVERSION")

    q = _command(conversions, "from-dit", "official DiT checkpoint (.pt, facebookresearch/DiT layout) -> racedit",
                 command="convert from-dit")
    q.add_argument("path", help="e.g. DiT-XL-2-256x256.pt (read with torch.load(weights_only=True))")
    add_out(q, "new checkpoint directory (racedit sample --ckpt OUT)")
    q.add_argument("--image-size", type=positive_int, choices=(256, 512), default=None,
                   help="check the weights are for this image size (default: read from pos_embed)")
    q.add_argument("--num-heads", type=positive_int, default=None, help="only for sizes that are no DiT preset")
    add_vae(q, "VAE for decoding: hub id or local dir (default stabilityai/sd-vae-ft-ema)")

    q = _command(conversions, "from-diffusers", "diffusers DiTTransformer2DModel / DiTPipeline directory -> racedit",
                 command="convert from-diffusers")
    q.add_argument("path", help="transformer directory, or a pipeline directory with transformer/")
    add_out(q, "new checkpoint directory")
    add_vae(q, "VAE for decoding (default: the pipeline's vae/, else stabilityai/sd-vae-ft-ema)")

    q = _command(conversions, "to-diffusers", "dense racedit checkpoint -> diffusers DiTPipeline directory",
                 command="convert to-diffusers")
    add_ckpt(q)
    add_out(q, "new DiTPipeline directory")
    add_vae(q, "local VAE directory to include as vae/ (default: data.vae if local)")
    add_no_ema(q)

    q = _command(conversions, "upcycle", "dense racedit checkpoint -> Race-DiT checkpoint (MoE from the dense MLPs)",
                 command="convert upcycle")
    add_ckpt(q, help=f"dense {CKPT_HELP}")
    q.add_argument("--to", required=True, help="RaceDiT preset of the same size, e.g. RaceDiT-XL/2-4in32")
    add_out(q, "new checkpoint directory")
    q.add_argument("--noise-std", type=nonnegative_float, default=0.01,
                   help="expert noise, relative to the weights' std (>= 0)")
    add_seed(q, "noise and router direction")
    add_no_ema(q)
    q.add_argument("--no-probe", action="store_true", help="skip measuring the gap on a random batch")
    add_set(q, "model options of the MoE model, e.g. --set model.gating=sigmoid model.routing=token_choice",
            metavar="model.KEY=VALUE")


def _ablate(sub) -> None:
    p = _command(sub, "ablate", "train and compare the variants of an ablation grid",
                 "Writes results.csv, results.md and PNG plots. See docs/ablations.md")
    p.add_argument("--grid", required=True, help="grid YAML (configs/ablations/*.yaml)")
    add_out(p, "output directory (default: the grid's out_dir)", required=False)
    add_set(p, "config overrides for every variant, e.g. --set data.latents=latents/in256 (repeatable)")
    p.add_argument("--only", nargs="+", default=None, help="run only these variants")
    p.add_argument("--fid-ref", default=None, help="FID reference (overrides the grid's eval.ref)")
    add_device(p, f"evaluation {DEVICE_HELP}; training runs where accelerate puts it")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads (1 is fastest for tiny models on a busy CPU)")
    p.add_argument("--list", action="store_true", help="print the variants, their overrides and MACs; train nothing")
    add_overwrite(p, ": write into an --out directory that holds files other than this grid's variants and report")
    add_no_verify(p)  # resuming variants reads their checkpoints


def _routing_report(sub) -> None:
    p = _command(sub, "routing-report", "expert-usage figures and a markdown summary of a MoE checkpoint's routing",
                 "See docs/routing/")
    add_ckpt(p)
    add_out(p, "output directory (default: <run dir>/routing_report/<checkpoint name>)", required=False)
    p.add_argument("--timesteps", type=positive_int, default=10, help="evenly spaced timesteps (default 10)")
    p.add_argument("--classes", type=nonnegative_int, nargs="*", default=None,
                   help="class labels (default: all classes if at most 10, else 10 evenly spaced)")
    p.add_argument("--per-class", type=positive_int, default=4, help="images per class (default 4)")
    add_batch_size(p, 64)
    add_seed(p, "the image choice and the noise")
    add_no_ema(p)
    add_calibration(p)
    add_device(p)
    add_quiet(p)
    add_overwrite(p, ": an --out directory holding anything but a routing report of this checkpoint with these "
                     "settings")


SUBCOMMANDS = (_train, _sample, _fid, _extract_latents, _convert, _ablate, _routing_report)
CHECKS = {"train": _check_train, "sample": _check_sample, "fid": _check_fid}


def _command(sub, name: str, summary: str, details: str = "", command: str | None = None) -> argparse.ArgumentParser:
    """A subcommand's parser: `summary` in the list of commands, `summary` + `details` in its own --help.
    `command` (default: `name`) is the key racedit.cli.commands runs it by."""
    text = f"{summary[0].upper()}{summary[1:]}. {details}".strip().rstrip(".") + "."
    p = sub.add_parser(name, help=summary, description=text)  # a Parser, as its parent
    p.set_defaults(command=command or name, parser=p)
    add_debug(p, default=argparse.SUPPRESS)  # after the subcommand too (train.py passes its flags after it)
    return p


def add_debug(p: argparse.ArgumentParser, default=False) -> None:
    p.add_argument("--debug", action="store_true", default=default, help=DEBUG_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG, description="Class-conditional Diffusion Transformers with Expert Race MoE routing: train, "
        "sample, evaluate, convert. `racedit COMMAND --help` shows each command's flags; a flag means the same "
        "thing in every command (--ckpt, --no-ema, --device, --quiet, --out, --seed, --batch-size, --vae, --set).")
    add_debug(parser)
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv` (default: sys.argv[1:]) and check the flags that depend on each other; on any error the
    parser prints one line and exits with status 2."""
    args = build_parser().parse_args(argv)
    check = CHECKS.get(args.command)
    problem = check(args) if check is not None else None
    if problem:
        args.parser.error(problem)
    return args
