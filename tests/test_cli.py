"""The `racedit` command: every subcommand listed and documented, one flag vocabulary across the argparse tree,
user errors as one line and exit status 2, the console script, and the thin wrappers (train.py, sample.py,
eval/*.py) that run this checkout's racedit."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_config

from racedit.cli import commands, main
from racedit.cli.parser import CKPT_HELP, build_parser, positive_int

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["train", "sample", "fid", "extract-latents", "convert", "ablate", "routing-report"]
CONVERSIONS = ["from-dit", "from-diffusers", "to-diffusers", "upcycle"]
# the script beside the checkout root -> the subcommand it runs
WRAPPERS = {"train.py": "train", "sample.py": "sample", "eval/fid.py": "fid", "eval/extract_latents.py":
            "extract-latents", "eval/convert.py": "convert", "eval/ablate.py": "ablate",
            "eval/routing_report.py": "routing-report"}
# the subcommands that read a racedit checkpoint: each names it --ckpt
READS_A_CHECKPOINT = ["train", "sample", "routing-report", "convert to-diffusers", "convert upcycle"]


def env_with_this_checkout() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) of every runnable subcommand, e.g. (("convert", "upcycle"), <parser>)."""
    children = subparsers(parser)
    if not children and path:
        yield path, parser
    for name, child in children.items():
        yield from leaves(child, (*path, name))


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The visible options of a parser (hidden older spellings and -h left out), by option string."""
    return {s: a for a in parser._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
            for s in a.option_strings}


def help_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    return capsys.readouterr().out


# --- the command tree -------------------------------------------------------------------------------------


def test_python_m_racedit_help_lists_every_subcommand_without_importing_torch():
    done = subprocess.run([sys.executable, "-m", "racedit", "--help"], cwd=ROOT, env=env_with_this_checkout(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: racedit")
    for name in SUBCOMMANDS:
        assert f"\n    {name}" in done.stdout, name
    # --help stays fast: building every parser imports none of the heavy dependencies
    code = ("import sys; from racedit.cli import main; from racedit.cli.parser import build_parser; build_parser(); "
            "print([m for m in ('torch', 'numpy', 'diffusers', 'accelerate', 'omegaconf') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env_with_this_checkout(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_main_help_lists_every_subcommand_and_each_help_works(capsys):
    top = help_of(["--help"], capsys)
    for name in SUBCOMMANDS:
        assert f"\n    {name}" in top, name
    assert sorted(subparsers(build_parser())) == sorted(SUBCOMMANDS)
    assert sorted(subparsers(subparsers(build_parser())["convert"])) == sorted(CONVERSIONS)
    convert = help_of(["convert", "--help"], capsys)
    assert all(c in convert for c in CONVERSIONS)
    for path, _ in leaves(build_parser()):
        assert help_of([*path, "--help"], capsys).startswith(f"usage: racedit {' '.join(path)} "), path


def test_a_command_without_its_subcommand_is_a_usage_error(capsys):
    for argv, says in (([], ", ".join(SUBCOMMANDS)), (["convert"], ", ".join(CONVERSIONS)), (["sample"], "--ckpt")):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"racedit{''.join(' ' + a for a in argv)}: error: "), err
        assert says in err and err.endswith(f"see racedit{''.join(' ' + a for a in argv)} --help\n"), err


# --- one flag vocabulary ----------------------------------------------------------------------------------


def test_a_flag_means_the_same_thing_in_every_subcommand():
    seen: dict[str, dict[str, tuple]] = {}  # option -> {subcommand: what it is}
    for path, parser in leaves(build_parser()):
        name = " ".join(path)
        for opt, a in options(parser).items():
            seen.setdefault(opt, {})[name] = (a.dest, type(a).__name__, a.type, a.nargs, a.default)
    for opt, where in seen.items():  # one option string: one dest and one kind of action everywhere
        assert len({what[:2] for what in where.values()}) == 1, (opt, where)
    for opt, dest in {"--ckpt": "ckpt", "--no-ema": "no_ema", "--device": "device", "--quiet": "quiet",
                      "--out": "out", "--seed": "seed", "--batch-size": "batch_size", "--vae": "vae",
                      "--set": "set", "--calibrate-threshold": "calibrate_threshold",
                      "--calibration-batch": "calibration_batch"}.items():
        assert {w[0] for w in seen[opt].values()} == {dest}, opt
    assert {w[1:] for w in seen["--no-ema"].values()} == {("_StoreTrueAction", None, 0, False)}
    assert {w[1:] for w in seen["--quiet"].values()} == {("_StoreTrueAction", None, 0, False)}
    assert {w[4] for w in seen["--device"].values()} == {None}  # the default is decided at run time
    assert {w[2] for w in seen["--batch-size"].values()} == {positive_int}
    assert {w[1:4] for w in seen["--set"].values()} == {("_ExtendAction", None, "+")}
    assert set(seen["--set"]) == {"train", "ablate", "convert upcycle"}
    # the older spellings exist only as hidden aliases
    assert not set(seen) & {"--weights", "--no-progress", "--checkpoint", "--output", "--ema", "--threads-per-proc"}


def test_the_same_flag_has_the_same_help_where_its_meaning_cannot_vary():
    helps: dict[str, set[str]] = {}
    for _, parser in leaves(build_parser()):
        for opt, a in options(parser).items():
            helps.setdefault(opt, set()).add(a.help)
    for opt in ("--no-ema", "--quiet", "--calibrate-threshold", "--calibration-batch"):
        assert len(helps[opt]) == 1, (opt, helps[opt])
    assert all(CKPT_HELP in h for h in helps["--ckpt"])


def test_every_subcommand_that_reads_a_checkpoint_calls_it_ckpt():
    tree = dict(leaves(build_parser()))
    for path, parser in tree.items():
        name = " ".join(path)
        opts = options(parser)
        assert ("--ckpt" in opts) == (name in READS_A_CHECKPOINT), name
        for a in parser._actions:  # no positional checkpoint, no other flag taking a CKPT (but train's --resume)
            if a.option_strings == ["--resume"]:
                assert "--ckpt CKPT" in a.help
                continue
            assert a.metavar != "CKPT" or a.option_strings == ["--ckpt"], (name, a)
            assert a.option_strings or "ckpt" not in a.dest, (name, a)
    for name in ("sample", "routing-report", "convert to-diffusers", "convert upcycle"):
        assert tree[tuple(name.split())]._option_string_actions["--ckpt"].required, name


# --- errors -----------------------------------------------------------------------------------------------


def test_user_errors_are_one_line_and_exit_2_and_bugs_keep_their_traceback(monkeypatch, capsys):
    def bad_argument(args):
        raise ValueError("--seed 3 makes no sense here")

    monkeypatch.setitem(commands.COMMANDS, "fid", bad_argument)
    assert main(["fid", "x.npz", "--ref", "y.npz"]) == 2
    assert capsys.readouterr().err == "error: --seed 3 makes no sense here\n"

    from racedit.checkpoint import CheckpointError

    def missing(args):
        raise CheckpointError("checkpoint not found: nope")

    monkeypatch.setitem(commands.COMMANDS, "fid", missing)
    assert main(["fid", "x.npz", "--ref", "y.npz"]) == 2
    assert capsys.readouterr().err == "error: checkpoint not found: nope\n"

    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setitem(commands.COMMANDS, "fid", bug)  # a bug: its traceback, then one line saying so; status 1
    assert main(["fid", "x.npz", "--ref", "y.npz"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("internal error: KeyError: 'a bug'")


def test_argument_errors_are_usage_errors(capsys):
    for argv, says in ((["fid", "x.npz"], "--ref REF"), (["sample", "--ckpt", "c", "--out", "g.png", "--batch-size",
                                                             "0"], "must be >= 1"),
                       (["train", "--config", "c.yaml", "--resume", "a", "--ckpt", "b"], "give the checkpoint once"),
                       (["train", "--config", "c.yaml", "--resume", "train.steps=5"], "put overrides before --resume")):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2 and says in capsys.readouterr().err, argv


# --- train, ablate and extract-latents through the command ------------------------------------------------


def last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_train_with_overrides_refusal_and_resume(tmp_path, capsys):
    from racedit.config import to_yaml

    config = tmp_path / "tiny.yaml"
    run = tmp_path / "run"
    config.write_text(to_yaml(make_tiny_config(run, "train.log_with=none", "train.ckpt_every=0")))
    assert main(["train", "--config", str(config), "--set", "train.steps=2"]) == 0
    assert last_line(capsys).startswith("done: 2 steps")
    assert main(["train", "--config", str(config), "--set", "train.steps=3"]) == 2  # never overwrites a run
    assert "already holds checkpoints" in capsys.readouterr().err
    # today's positional overrides and --resume still work; --ckpt names the checkpoint to continue from
    assert main(["train", "--config", str(config), "train.steps=3", "--resume"]) == 0
    assert last_line(capsys).startswith("done: 3 steps")
    assert main(["train", "--config", str(config), "--set", "train.steps=4", "--ckpt", str(run)]) == 0
    assert last_line(capsys).startswith("done: 4 steps")
    assert main(["train", "--config", str(config), "--set", "train.stpes=4", "--resume"]) == 2
    assert "train.stpes" in capsys.readouterr().err


def test_ablate_lists_and_records_its_own_command(monkeypatch, capsys):
    grid = str(ROOT / "configs" / "ablations" / "routing.yaml")
    assert main(["ablate", "--grid", grid, "--list", "--set", "train.steps=10"]) == 0
    listed = capsys.readouterr().out
    assert "expert_race" in listed and "MACs" in listed

    import racedit.experiments.ablation as ablation

    calls = []

    def fake_run_grid(grid, out, extra, **kw):
        calls.append((out, extra, kw))
        return ablation.GridResult(out_dir=Path(out), rows=[], status={v.name: "skipped" for v in grid.variants})

    monkeypatch.setattr(ablation, "run_grid", fake_run_grid)
    assert main(["ablate", "--grid", grid, "--out", "runs/x", "--set", "train.seed=1", "--set", "train.lr=1e-3",
                 "--only", "expert_race"]) == 0
    (out, extra, kw), = calls
    assert (out, extra, kw["only"]) == ("runs/x", ["train.seed=1", "train.lr=1e-3"], ["expert_race"])
    assert kw["command"] == (f"racedit ablate --grid {grid} --out runs/x --set train.seed=1 --set train.lr=1e-3 "
                             "--only expert_race")
    assert main(["ablate", "--grid", str(ROOT / "configs" / "nope.yaml")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_extract_latents_runs_resumes_and_names_a_bad_image_root(tmp_path, capsys):
    from racedit.testing import save_standin_vae, write_standin_image_folder

    images = write_standin_image_folder(tmp_path / "images", num_classes=2, per_class=2, size=16, corrupt=False)
    vae = save_standin_vae(tmp_path / "vae")
    argv = ["extract-latents", "--data", str(images), "--vae", str(vae), "--out", str(tmp_path / "latents"),
            "--image-size", "16", "--batch-size", "2", "--shard-size", "2", "--num-workers", "0"]
    assert main([*argv, "--quiet"]) == 0
    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    assert manifest["image_size"] == 16
    assert main([*argv, "--no-progress"]) == 0  # the older spelling of --quiet; a re-run keeps the shards
    capsys.readouterr()
    assert main(["extract-latents", "--data", str(tmp_path / "none"), "--vae", str(vae), "--out",
                 str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and err.count("\n") == 1


# --- the console script and the wrappers ------------------------------------------------------------------


def test_pyproject_has_exactly_the_racedit_script_and_it_exists():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"racedit": "racedit.cli:main"}
    module, _, attr = scripts["racedit"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_installed_racedit_executable_answers():
    exe = Path(sys.executable).with_name("racedit")
    if not exe.exists():
        pytest.skip(f"no {exe}: racedit is not installed into this environment (make install does that)")
    done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and all(f"\n    {name}" in done.stdout for name in SUBCOMMANDS), done.stderr


@pytest.mark.parametrize("script", sorted(WRAPPERS))
def test_wrapper_runs_its_subcommand(script, monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the wrapper puts the checkout first; undone afterwards
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: racedit {WRAPPERS[script]} ")
    assert len((ROOT / script).read_text().splitlines()) <= 20  # thin


def test_wrappers_import_the_racedit_of_their_own_checkout(tmp_path):
    """Each wrapper copied beside a fake racedit runs that one, even with another racedit first on PYTHONPATH
    (here: this checkout's)."""
    fake = tmp_path / "racedit" / "cli"
    fake.mkdir(parents=True)
    (tmp_path / "racedit" / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("import json\n\ndef main(argv):\n"
                                      "    print(json.dumps({'marker': 'the fake racedit', 'argv': argv}))\n"
                                      "    return 0\n")
    for script, subcommand in WRAPPERS.items():
        (tmp_path / script).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / script, tmp_path / script)
        done = subprocess.run([sys.executable, str(tmp_path / script), "--flag", "value"], cwd=tmp_path / "racedit",
                              env=env_with_this_checkout(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (script, done.stderr)
        assert json.loads(done.stdout) == {"marker": "the fake racedit", "argv": [subcommand, "--flag", "value"]}
