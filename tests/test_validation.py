"""Validation at the door: every config value and every flag is checked when the config loads or the arguments
parse, each refusal one line naming the key or flag, the value and what is allowed; a run that could only fail
at its end (the final grid, the evaluation) or at its first step fails before anything is written.

The allowed ranges in the tables below are written out by hand from what each value means (they are the
independent reference, not read from racedit.limits); `GOOD` holds the values at the edges that must load.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_config

from racedit.cli import main
from racedit.cli.parser import build_parser
from racedit.config import (
    Config,
    ConfigError,
    check_batch_layout,
    check_sampling_batch,
    load_config,
    validate,
)
from racedit.limits import RANGES

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"

# (override(s), the key the message names, a piece of what it says is allowed). The defaults: DiT-S/2 on
# 32x32x4 inputs (L = 256 tokens), T = 1000, ddpm sampler, 64 images per step, the 1797 digits.
BAD: list[tuple[str | tuple[str, ...], str, str]] = [
    # model: sizes are positive; probabilities and decays in [0, 1)
    ("model.input_size=0", "model.input_size", ">= 1"), ("model.in_channels=0", "model.in_channels", ">= 1"),
    ("model.num_classes=0", "model.num_classes", ">= 1"),
    ("model.class_dropout_prob=1.0", "model.class_dropout_prob", "in [0, 1)"),
    ("model.class_dropout_prob=-0.1", "model.class_dropout_prob", "in [0, 1)"),
    ("model.depth=0", "model.depth", ">= 1"), ("model.hidden_size=0", "model.hidden_size", ">= 1"),
    ("model.num_heads=-2", "model.num_heads", ">= 1"), ("model.patch_size=0", "model.patch_size", ">= 1"),
    ("model.mlp_ratio=0", "model.mlp_ratio", "> 0"), ("model.mlp_ratio=nan", "model.mlp_ratio", "finite"),
    ("model.timestep_freq_shift=128", "model.timestep_freq_shift", "< 128"),
    ("model.moe_experts=-1", "model.moe_experts", ">= 0"), ("model.moe_k=-1", "model.moe_k", ">= 0"),
    ("model.threshold_decay=1.0", "model.threshold_decay", "in [0, 1)"),
    ("model.connections_n=0", "model.connections_n", ">= 1"), ("model.connections_m=0", "model.connections_m", ">= 1"),
    ("model.expert_parallel=0", "model.expert_parallel", ">= 1"),
    ("model.memory_keys=0", "model.memory_keys", ">= 1"), ("model.memory_topk=0", "model.memory_topk", ">= 1"),
    ("model.memory_heads=0", "model.memory_heads", ">= 1"), ("model.memory_key_dim=-8", "model.memory_key_dim", ">= 0"),
    ("model.memory_value_dim=-1", "model.memory_value_dim", ">= 0"),
    ("model.memory_prevalue_dim=-1", "model.memory_prevalue_dim", ">= 0"),
    ("model.memory_rank=0", "model.memory_rank", ">= 1"), ("model.memory_cores=0", "model.memory_cores", ">= 1"),
    ("model.memory_expansion=-4", "model.memory_expansion", ">= 0"),
    ("model.memory_share=1.0", "model.memory_share", "in (0, 1)"),
    ("model.memory_value_std=-0.1", "model.memory_value_std", ">= 0"),
    ("model.memory_value_lr_scale=0", "model.memory_value_lr_scale", "> 0"),
    ("model.memory_value_lr_decay=1.5", "model.memory_value_lr_decay", "in [0, 1]"),
    ("model.memory_blocks=[0,-1]", "model.memory_blocks", ">= 0"),
    # diffusion: T >= 2 (the posterior at t=0 borrows t=1's variance), betas strictly inside (0, 1)
    ("diffusion.num_timesteps=1", "diffusion.num_timesteps", ">= 2"),
    ("diffusion.beta_start=0", "diffusion.beta_start", "in (0, 1)"),
    ("diffusion.beta_end=1.0", "diffusion.beta_end", "in (0, 1)"),
    ("diffusion.beta_end=nan", "diffusion.beta_end", "finite"),
    ("diffusion.flow_logit_mean=inf", "diffusion.flow_logit_mean", "a finite number"),
    ("diffusion.flow_logit_std=0", "diffusion.flow_logit_std", "> 0"),
    # loss coefficients: >= 0 and finite
    ("loss.router_similarity=-1", "loss.router_similarity", ">= 0"), ("loss.per_layer_reg=-0.5", "loss.per_layer_reg", ">= 0"),
    ("loss.balance=inf", "loss.balance", "finite"), ("loss.z_loss=nan", "loss.z_loss", "finite"),
    # data
    ("data.image_size=0", "data.image_size", ">= 1"), ("data.num_workers=-1", "data.num_workers", ">= 0"),
    ("data.holdout_fraction=0", "data.holdout_fraction", "in (0, 1)"),
    ("data.holdout_fraction=1", "data.holdout_fraction", "in (0, 1)"),
    # train
    ("train.steps=0", "train.steps", ">= 1"), ("train.global_batch=0", "train.global_batch", ">= 1"),
    ("train.grad_accum=0", "train.grad_accum", ">= 1"),
    ("train.lr=0", "train.lr", "> 0"), ("train.lr=-1e-4", "train.lr", "> 0"), ("train.lr=inf", "train.lr", "finite"),
    ("train.lr=nan", "train.lr", "finite"), ("train.weight_decay=-0.01", "train.weight_decay", ">= 0"),
    ("train.warmup_steps=-1", "train.warmup_steps", ">= 0"), ("train.grad_clip=-1", "train.grad_clip", ">= 0"),
    ("train.grad_clip=nan", "train.grad_clip", "finite"), ("train.ema_decay=1.0", "train.ema_decay", "in [0, 1)"),
    ("train.seed=-1", "train.seed", "[0, 2**32)"), ("train.seed=4294967296", "train.seed", "[0, 2**32)"),
    ("train.log_every=0", "train.log_every", ">= 1"), ("train.diagnostics_every=-2", "train.diagnostics_every", ">= -1"),
    ("train.ckpt_every=-1", "train.ckpt_every", ">= 0"), ("train.keep_last=0", "train.keep_last", ">= 1"),
    ("train.sample_every=-1", "train.sample_every", ">= 0"), ("train.max_nonfinite=0", "train.max_nonfinite", ">= 1"),
    ("train.eval_samples_per_class=-1", "train.eval_samples_per_class", ">= 0"),
    ("train.num_threads=-1", "train.num_threads", ">= 0"),
    ("train.betas=[0.9]", "train.betas", "two finite numbers in [0, 1)"),
    ("train.betas=[0.9,1.0]", "train.betas", "two finite numbers in [0, 1)"),
    ("train.betas=[-0.1,0.999]", "train.betas", "two finite numbers in [0, 1)"),
    ("train.betas=[0.9,nan]", "train.betas", "two finite numbers in [0, 1)"),
    ("train.betas=[0.9,0.99,0.999]", "train.betas", "two finite numbers in [0, 1)"),
    ("train.out_dir=''", "train.out_dir", "run directory"),
    # sample
    ("sample.steps=0", "sample.steps", ">= 1"), ("sample.cfg_scale=-1", "sample.cfg_scale", ">= 0"),
    ("sample.cfg_scale=nan", "sample.cfg_scale", "finite"), ("sample.cfg_scale=inf", "sample.cfg_scale", "finite"),
    ("sample.guidance_channels=-1", "sample.guidance_channels", ">= 0"),
    # between values
    ("sample.steps=1001", "sample.steps", "<= 1000"),  # ddpm: each of the T steps at most once
    (("sample.sampler=ddim", "diffusion.num_timesteps=50", "sample.steps=51"), "sample.steps", "<= 50"),
    (("sample.sampler=dpm_solver", "sample.steps=1000"), "sample.steps", "<= 999"),  # its grid repeats a step
    ("sample.guidance_channels=5", "sample.guidance_channels", "model.in_channels=4"),
    ("diffusion.beta_start=0.03", "diffusion.beta_start", "beta_start <= beta_end"),
    ("train.grad_accum=3", "train.global_batch", "divisible by train.grad_accum"),
    (("model.hidden_size=34", "model.num_heads=2"), "model.hidden_size", "multiple of 4"),
    (("model.hidden_size=36", "model.num_heads=8"), "model.hidden_size", "num_heads=8"),
    ("model.input_size=31", "model.input_size", "patch_size=2"),
    (("model.connections=frac", "model.connections_m=5"), "model.connections_m", "hidden_size=384"),
    ("model.mlp_ratio=0.001", "model.mlp_ratio", "rounds to 0"),
    (("model.name=RaceDiT-S/2-2in8", "model.mlp_ratio=0.002"), "model.mlp_ratio", "mlp_ratio * D / k"),
    # expert choice: k*L/E = 1*256/3 tokens per (image, expert); bl choice: B*L*k/E = 64*256/3 per expert
    (("model.name=RaceDiT-S/2-1in3", "model.routing=expert_choice"), "model.routing", "k*L/E"),
    (("model.name=RaceDiT-S/2-1in3", "model.routing=bl_choice"), "model.routing", "B*L*k/E"),
    ("loss.balance=0.01", "loss.balance", "no MoE layer"),
    (("model.name=RaceDiT-S/2-2in8", "loss.per_layer_reg=0.1", "model.router_target_head=false"),
     "loss.per_layer_reg", "model.router_target_head=true"),
    # the end of the run: the digits evaluation needs digits, seed + 1 < 2**32 and two held-out images
    (("train.eval_samples_per_class=2", "data.kind=latents", "data.latents=lat"), "train.eval_samples_per_class",
     "data.kind=digits"),
    (("train.eval_samples_per_class=2", "train.seed=4294967295"), "train.seed", "< 2**32 - 1"),
    ("data.holdout_fraction=0.0002", "data.holdout_fraction", "holds out 0"),  # round(0.36) = 0 of 1797
    (("data.holdout_fraction=0.0006", "train.eval_samples_per_class=1"), "data.holdout_fraction", "need >= 2"),
    ("data.holdout_fraction=0.97", "data.holdout_fraction", "leaves 54 training digits"),  # 1797 - 1743 < 64
]

# Values at the edges of what is allowed: each must load.
GOOD: list[tuple[str, ...]] = [
    ("train.lr=1e-12",), ("train.betas=[0.0,0.999]",), ("train.keep_last=1",), ("train.diagnostics_every=-1",),
    ("train.ckpt_every=0", "train.sample_every=0", "train.warmup_steps=0", "train.grad_clip=0"),
    ("train.seed=4294967295",), ("train.ema_decay=0",), ("sample.cfg_scale=0",), ("sample.steps=1000",),
    ("sample.sampler=dpm_solver", "sample.steps=999"), ("sample.guidance_channels=4",),
    ("diffusion.beta_start=0.02",),  # = beta_end: a constant schedule
    ("diffusion.num_timesteps=2", "sample.sampler=ddim", "sample.steps=2"),
    ("diffusion.objective=flow", "sample.sampler=euler", "sample.steps=5000"),
    ("data.holdout_fraction=0.0003",),  # holds out round(0.54) = 1 image
    ("data.holdout_fraction=0.9643",),  # leaves 1797 - 1733 = 64 training digits, one global batch
    ("model.hidden_size=36", "model.num_heads=1"), ("model.mlp_ratio=0.003",),  # hidden int(1.15) = 1
    ("model.timestep_freq_shift=127.5",), ("model.memory_value_lr_decay=1.0",),
    ("model.name=RaceDiT-S/2-1in3", "model.routing=bl_choice", "train.global_batch=48"),  # 48*256/3 whole
    ("model.name=RaceDiT-S/2-1in4", "model.routing=expert_choice"),
    ("model.name=RaceDiT-S/2-2in8", "loss.balance=0.01", "loss.per_layer_reg=0.1"),
]


def as_list(items: str | tuple[str, ...]) -> list[str]:
    return [items] if isinstance(items, str) else list(items)


def one_line_error(items: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, items)
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("items,key,allowed", BAD, ids=[" ".join(as_list(b[0])) for b in BAD])
def test_a_bad_value_is_refused_at_load_naming_key_value_and_what_is_allowed(items, key, allowed):
    message = one_line_error(as_list(items))
    assert key in message and allowed in message, message
    last_key, value = as_list(items)[-1].split("=", 1)
    try:
        number = float(value)
    except ValueError:
        return  # a list or a string: the key and the rule are named
    if last_key == key:  # the value as given (an int) or as the float it became (0 -> 0.0, -1e-4 -> -0.0001)
        assert f" {value}" in message or f" {number!r}" in message or f"={value}" in message, message


@pytest.mark.parametrize("items", GOOD, ids=[" ".join(g) for g in GOOD])
def test_values_at_the_edge_of_their_range_load(items):
    load_config(None, list(items))


def numeric_fields(node, prefix: str = ""):
    """Dotted keys of the int and float fields (optional ones included, lists not) of a config dataclass."""
    for f in fields(node):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(default):
            yield from numeric_fields(default, f"{f.name}.")
        elif re.search(r"\b(int|float)\b", str(f.type)) and "list" not in str(f.type):
            yield f"{prefix}{f.name}"


def test_every_numeric_field_has_a_range_and_a_bad_value_in_the_table():
    """A new number in the config cannot slip through: it needs a RANGES entry, and this table a bad value."""
    numeric = set(numeric_fields(Config))
    assert numeric == set(RANGES), numeric ^ set(RANGES)
    tested = {key for _, key, _ in BAD}
    assert numeric <= tested, sorted(numeric - tested)


def test_every_default_and_shipped_config_validates():
    validate(Config())
    load_config(None)
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        if "base" not in yaml.safe_load(path.read_text()):  # ablation grids: their variants, below
            load_config(path)
    from racedit.experiments.ablation import load_grid, resolve_variants

    for path in sorted((ROOT / "configs" / "ablations").glob("*.yaml")):
        assert resolve_variants(load_grid(path), None, []), path


# --- through the command ----------------------------------------------------------------------------------

CLI_SAMPLE = ["train.lr=inf", "train.log_every=0", "sample.cfg_scale=nan", "train.ckpt_every=-1", "model.depth=0",
              "train.grad_accum=3", "sample.steps=1001", "train.betas=[0.9,1.0]"]


@pytest.mark.parametrize("item", CLI_SAMPLE)
def test_racedit_train_refuses_a_bad_value_in_one_line_and_writes_nothing(item, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", str(DEMO), "--set", f"train.out_dir={out}", item]) == 2
    captured = capsys.readouterr()
    key = item.split("=")[0]
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and key in captured.err, captured.err
    assert "Traceback" not in captured.err and not out.exists()


# (argv, the flag, what the one line says): sample, fid, extract-latents, convert, ablate, routing-report
BAD_FLAGS = [
    (["sample", "--ckpt", "c", "--out", "g.png", "--cfg-scale", "nan"], "--cfg-scale", "finite number >= 0"),
    (["sample", "--ckpt", "c", "--out", "g.png", "--cfg-scale", "inf"], "--cfg-scale", "finite number >= 0"),
    (["sample", "--ckpt", "c", "--out", "g.png", "--cfg-scale", "-1"], "--cfg-scale", ">= 0"),
    (["sample", "--ckpt", "c", "--out", "g.png", "--steps", "0"], "--steps", ">= 1"),
    (["sample", "--ckpt", "c", "--out", "g.png", "--steps", "ten"], "--steps", "not an integer"),
    (["sample", "--ckpt", "c", "--out", "g.png", "--steps", "2.5"], "--steps", "not an integer"),
    (["sample", "--ckpt", "c", "--out", "g.png", "--seed", "-1"], "--seed", "[0, 2**32)"),
    (["sample", "--ckpt", "c", "--out", "g.png", "--seed", "4294967296"], "--seed", "[0, 2**32)"),
    (["sample", "--ckpt", "c", "--out", "g.png", "--batch-size", "0"], "--batch-size", ">= 1"),
    (["sample", "--ckpt", "c", "--out", "s.npz", "--num-samples", "0"], "--num-samples", ">= 1"),
    (["sample", "--ckpt", "c", "--out", "s.npz", "--per-class", "0"], "--per-class", ">= 1"),
    (["sample", "--ckpt", "c", "--out", "g.png", "--guidance-channels", "-1"], "--guidance-channels", ">= 0"),
    (["sample", "--ckpt", "c", "--out", "g.png", "--calibrate-threshold", "-5"], "--calibrate-threshold", ">= 0"),
    (["sample", "--ckpt", "c", "--out", "g.png", "--calibration-batch", "0"], "--calibration-batch", ">= 1"),
    (["sample", "--ckpt", "c", "--out", "s.npz", "--max-batches", "0"], "--max-batches", ">= 1"),
    (["sample", "--ckpt", "c", "--out", "g.png", "--classes", "3", "-1"], "--classes", ">= 0"),
    (["fid", "s.npz", "--ref", "r.npz", "--stats-features", "-1"], "--stats-features", ">= 0"),
    (["fid", "s.npz", "--ref", "r.npz", "--isc-splits", "0"], "--isc-splits", ">= 1"),
    (["fid", "s.npz", "--ref", "r.npz", "--prc-k", "0"], "--prc-k", ">= 1"),
    (["fid", "s.npz", "--ref", "r.npz", "--batch-size", "-3"], "--batch-size", ">= 1"),
    (["extract-latents", "--data", "d", "--vae", "v", "--out", "o", "--image-size", "0"], "--image-size", ">= 1"),
    (["extract-latents", "--data", "d", "--vae", "v", "--out", "o", "--shard-size", "0"], "--shard-size", ">= 1"),
    (["extract-latents", "--data", "d", "--vae", "v", "--out", "o", "--num-workers", "-1"], "--num-workers", ">= 0"),
    (["convert", "upcycle", "--ckpt", "c", "--to", "RaceDiT-S/2-2in8", "--out", "o", "--noise-std", "nan"],
     "--noise-std", "finite number >= 0"),
    (["convert", "upcycle", "--ckpt", "c", "--to", "RaceDiT-S/2-2in8", "--out", "o", "--noise-std", "-0.1"],
     "--noise-std", ">= 0"),
    (["convert", "from-dit", "w.pt", "--out", "o", "--image-size", "300"], "--image-size", "invalid choice"),
    (["convert", "from-dit", "w.pt", "--out", "o", "--num-heads", "0"], "--num-heads", ">= 1"),
    (["ablate", "--grid", "g.yaml", "--threads", "0"], "--threads", ">= 1"),
    (["routing-report", "--ckpt", "c", "--timesteps", "0"], "--timesteps", ">= 1"),
    (["routing-report", "--ckpt", "c", "--classes", "-2"], "--classes", ">= 0"),
    (["routing-report", "--ckpt", "c", "--seed", "4294967296"], "--seed", "[0, 2**32)"),
]


@pytest.mark.parametrize("argv,flag,says", BAD_FLAGS, ids=[" ".join(a[:1] + a[-2:]) for a, _, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_naming_flag_value_and_range_with_status_2(argv, flag, says, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"argument {flag}" in err and repr(argv[-1]) in err or argv[-1] in err, err
    assert says in err and "--help" in err, err


# Flags that take text (paths, names, devices, overrides) and the choice flags: everything else is a number
TEXT_FLAGS = {"config", "set", "overrides", "resume", "ckpt", "out", "sampler", "vae", "device", "samples", "ref",
              "inception_weights", "save_stats", "data", "path", "to", "grid", "only", "fid_ref"}


def parser_actions(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from parser_actions(child, (*path, name))
        elif action.nargs != 0 and not isinstance(action, argparse._HelpAction):
            yield " ".join(path), action


def test_every_number_a_flag_takes_has_a_range_checking_type():
    """Walks the whole parser tree: a new numeric flag with type=int or float (no range, nan accepted) fails here."""
    seen = 0
    for command, action in parser_actions(build_parser()):
        where = f"racedit {command} {action.option_strings or action.dest}"
        if action.dest in TEXT_FLAGS or (action.choices and action.type is None):
            assert action.type is None, where
            continue
        assert action.type not in (int, float, None), f"{where}: a number flag needs a type with a range"
        assert hasattr(action.type, "spec"), f"{where}: type {action.type} checks no range"
        for text in ("nan", "inf", "-inf"):
            with pytest.raises(argparse.ArgumentTypeError):
                action.type(text)
        if action.default is not None:  # the default is inside its own range
            assert action.type(str(action.default)) == action.default, where
        seen += 1
    assert seen >= 30


# --- what only a checkpoint, the process count or the data can tell -----------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny digits run of 1 step: 1 x 8 x 8 inputs, T = 1000, ddim sampler."""
    from racedit.training.loop import train

    out = tmp_path_factory.mktemp("validation") / "run"
    train(make_tiny_config(out, "train.steps=1", "train.ckpt_every=0"))
    return out


@pytest.mark.parametrize("flags,says", [
    (["--steps", "1001"], "bad value for --steps: 1001. Must be <= 1000 for sampler ddim"),
    (["--sampler", "dpm_solver", "--steps", "1000"], "bad value for --steps: 1000. Must be <= 999 for sampler dpm_solver"),
    (["--guidance-channels", "2"], "bad value for --guidance-channels: 2. Must be in [0, model.in_channels=1]"),
    (["--sampler", "heun"], "bad value for --sampler: 'heun' does not apply to diffusion.objective=ddpm"),
])
def test_sample_flags_are_checked_against_the_checkpoint_before_sampling(checkpoint, flags, says, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert main(["sample", "--ckpt", str(checkpoint), "--out", str(out), "--num-samples", "2", "--device", "cpu",
                 "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {says}\n" or (err.startswith(f"error: {says}") and err.count("\n") == 1), err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_the_batch_layout_is_checked_again_with_the_process_count(tiny_config):
    cfg = tiny_config("train.global_batch=48")
    check_batch_layout(cfg, 2)
    with pytest.raises(ConfigError, match=r"'train.global_batch': 48 is not divisible by train.grad_accum x "
                                          r"processes = 1 x 5"):
        check_batch_layout(cfg, 5)
    # bl choice with E = 3 on L = 16 tokens: B*16/3 needs B divisible by 3; 48 / 3 processes = 16 images each
    moe = tiny_config("model.name=RaceDiT-S/2-1in3", "model.routing=bl_choice", "train.global_batch=48")
    check_batch_layout(moe, 2)  # 24 images each
    with pytest.raises(ConfigError, match=r"bl_choice selects B\*L\*k/E tokens per expert: B=16, L=16, k=1, E=3 gives 256/3"):
        check_batch_layout(moe, 3)
    check_batch_layout(tiny_config("model.name=RaceDiT-S/2-1in3", "model.routing=bl_choice", "train.global_batch=48",
                                   "model.race_scope=global"), 3)  # the race spans the ranks: 48 images


def test_a_grid_the_routing_cannot_sample_fails_before_training(tiny_config, tmp_path):
    """bl choice routes eval batches by the training rule under inference_routing=topk: the end-of-run grid of
    10 x 8 images (160 with guidance) has 160*16/3 pairs per expert, not whole; the run would only fail after
    all its steps."""
    from racedit.training.loop import train

    cfg = tiny_config("model.name=RaceDiT-S/2-1in3", "model.routing=bl_choice", "train.global_batch=48",
                      "model.inference_routing=topk")
    with pytest.raises(ConfigError, match=r"B=160, .*the sample grids under inference_routing=topk"):
        train(cfg)
    assert not Path(cfg.train.out_dir).exists()
    check_sampling_batch(tiny_config("model.name=RaceDiT-S/2-1in3", "model.routing=bl_choice", "train.global_batch=48"),
                         80, "the sample grids")  # threshold routing: any batch


def test_a_latent_store_smaller_than_a_batch_fails_before_anything_is_written(tmp_path, capsys):
    from racedit.data.latent_extract import extract_latents
    from racedit.testing import save_standin_vae, write_standin_image_folder

    images = write_standin_image_folder(tmp_path / "images", num_classes=2, per_class=3, size=16)
    store = tmp_path / "latents"
    extract_latents(images, save_standin_vae(tmp_path / "vae"), store, image_size=16, batch_size=6, shard_size=6,
                    num_workers=0, progress=False)
    out = tmp_path / "run"
    assert main(["train", "--config", str(DEMO), "--set", "data.kind=latents", f"data.latents={store}",
                 "train.global_batch=16", "train.eval_samples_per_class=0", f"train.out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err == "error: the dataset has 6 examples, fewer than train.global_batch=16\n", err
    assert not out.exists()


def test_the_limits_are_where_the_maths_breaks():
    """The reasons behind three limits: T = 1 has no posterior variance to borrow for t = 0; dpm_solver over
    T steps repeats a step (diffusers' own grid); a width that is no multiple of 4 does not fit the 2-D sin-cos
    position embedding (it failed with a RuntimeError when the model was built)."""
    import numpy as np
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from racedit.diffusion.objectives import DDPMObjective
    from racedit.models import create_model

    objective = DDPMObjective(num_timesteps=2, learn_sigma=True)
    s = objective.sample(torch.zeros(2, 1, 4, 4), torch.Generator().manual_seed(0))
    assert all(math.isfinite(float(v)) for v in objective.loss(torch.zeros(2, 2, 4, 4), s).values())
    for T in (10, 1000):
        scheduler = DPMSolverMultistepScheduler(num_train_timesteps=T, timestep_spacing="linspace")
        scheduler.set_timesteps(T - 1)
        assert len(np.unique(scheduler.timesteps.numpy())) == T - 1
        scheduler.set_timesteps(T)
        assert len(np.unique(scheduler.timesteps.numpy())) < T
    tiny = dict(input_size=8, in_channels=1, num_classes=10, depth=1, learn_sigma=False, num_heads=1)
    create_model("DiT-S/2", hidden_size=36, **tiny)
    with pytest.raises(ConfigError, match="'model.hidden_size': 34. Must be a multiple of 4"):
        create_model("DiT-S/2", hidden_size=34, **tiny)
