"""One line per error: every entry point reports racedit's own errors and I/O errors as one line `error: ...`
naming the culprit, with the exit status of its kind (2 input, 74 environment, 1 bug, 130 interrupted), and a
traceback only with --debug or RACEDIT_DEBUG=1. YAML errors carry line and column; a full disk, a read-only
file system and a denied permission name the path (and, in training, the last good checkpoint).

A full disk is real where a small tmpfs can be mounted (root on Linux); elsewhere the writers are patched to
fail as a full disk makes them fail (an OSError ENOSPC without a file name; safetensors' wrapped error).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import inspect
import os
import pkgutil
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_config
from safetensors.torch import save_file

import racedit
from racedit.cli import commands, main
from racedit.config import to_yaml
from racedit.fileio import os_error_text, writing

ROOT = Path(__file__).resolve().parents[1]
ENOSPC_TEXT = "no space left on device"


# --- helpers ----------------------------------------------------------------------------------------------


def one_error_line(err: str, code_line: str = "error: ") -> str:
    """The one line that stderr must be: no traceback, one line, short; returned without its newline."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith(code_line) and len(lines[0]) < 600, err
    return lines[0]


def run(capsys, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.fixture
def quiet_training(monkeypatch):
    """No training progress bar on stderr (racedit train has no --quiet), so stderr holds only the report."""
    import racedit.training.loop as loop

    real = loop.tqdm
    monkeypatch.setattr(loop, "tqdm", lambda *a, **k: real(*a, **{**k, "disable": True}))


def tiny_yaml(path: Path, run_dir: Path, *overrides: str) -> Path:
    path.write_text(to_yaml(make_tiny_config(run_dir, "train.log_with=none", *overrides)))
    return path


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory) -> Path:
    from racedit.training.loop import train

    out = tmp_path_factory.mktemp("errors") / "run"
    train(make_tiny_config(out, "train.steps=2", "train.ckpt_every=0", "train.log_with=none"))
    return out


# --- a filesystem that fills up, one that is read-only ----------------------------------------------------


@contextlib.contextmanager
def tmpfs(where: Path, options: str):
    """A tmpfs mounted at `where` (yields True), or nothing mounted (yields False) where that is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = False
    if sys.platform == "linux" and os.geteuid() == 0 and shutil.which("mount"):
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                                 capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


class Disk:
    """`root` on a 16 MB tmpfs that `fill()` fills to the last byte, or (`real` False) a plain directory whose
    writers `fill()` makes fail the way a full disk does."""

    def __init__(self, root: Path, real: bool):
        self.root, self.real, self.full = root, real, False

    def fill(self) -> None:
        self.full = True
        if self.real:
            with open(self.root / "filler", "ab", buffering=0) as f, contextlib.suppress(OSError):
                while f.write(b"\0" * (1 << 16)):  # unbuffered: a short write, then ENOSPC
                    pass
            assert os.statvfs(self.root).f_bavail == 0

    def free(self) -> None:
        self.full = False
        (self.root / "filler").unlink(missing_ok=True)


@pytest.fixture
def disk(tmp_path, monkeypatch):
    with tmpfs(tmp_path / "disk", "size=16m") as real:
        d = Disk(tmp_path / "disk", real)
        if not real:
            _patch_writers_to_fail_when_full(monkeypatch, d)
        yield d


def _patch_writers_to_fail_when_full(monkeypatch, d: Disk) -> None:
    from safetensors import SafetensorError

    import racedit.checkpoint as checkpoint
    import racedit.npz as npz

    real_save, real_entry = checkpoint.save_file, npz._npy_entry

    def save_file_(*args, **kwargs):
        if d.full:  # what safetensors raises on a full disk
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(*args, **kwargs)

    class FullStream:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            if d.full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # no file name, as from a real write
            return self.f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(checkpoint, "save_file", save_file_)
    monkeypatch.setattr(npz, "_npy_entry", lambda zf, name: FullStream(real_entry(zf, name)))


# --- every racedit exception class, through the one dispatcher ---------------------------------------------


def racedit_exception_classes() -> list[type[BaseException]]:
    for info in pkgutil.walk_packages(racedit.__path__, "racedit."):
        importlib.import_module(info.name)
    found = {obj for name, module in list(sys.modules.items()) if name.startswith("racedit")
             for obj in vars(module).values()
             if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__.startswith("racedit")}
    return sorted(found, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def test_every_racedit_exception_class_is_one_line_exit_2_and_a_traceback_with_debug(monkeypatch, capsys):
    classes = racedit_exception_classes()
    names = {c.__name__ for c in classes}
    assert names >= {"ConfigError", "CheckpointError", "NpzError", "SamplingError", "LatentStoreError",
                     "TrainingDiverged", "ConversionError", "UpcycleError", "GridError", "ComputeMismatchError",
                     "ImageFolderError", "EvaluationError", "InceptionWeightsError"}, names
    for cls in [c for c in classes if issubclass(c, Exception)]:
        def fail(args, cls=cls):
            raise cls("/the/culprit.npz is damaged:\n  re-create it with racedit sample")

        monkeypatch.setitem(commands.COMMANDS, "fid", fail)
        expected = getattr(cls, "exit_code", 2)
        rc, err = run(capsys, ["fid", "x.npz", "--ref", "y.npz"])
        line = one_error_line(err)
        assert rc == expected, cls
        assert line == "error: /the/culprit.npz is damaged: re-create it with racedit sample", cls
        rc, err = run(capsys, ["fid", "x.npz", "--ref", "y.npz", "--debug"])
        assert rc == expected and err.startswith("Traceback") and cls.__name__ in err, cls
        assert err.splitlines()[-1] == line, cls


# --- one bad input per subcommand (real inputs, no patching) ---------------------------------------------


def bad_inputs(tmp: Path, dense: Path, moe: Path) -> dict[str, tuple[list[str], list[str]]]:
    """case -> (argv, what the line must name)."""
    tiny = tiny_yaml(tmp / "tiny.yaml", tmp / "fresh")
    junk = tmp / "samples.npz"
    junk.write_text("not a zip\n")
    pickle = tmp / "dit.pt"
    torch.save({"x": 1}, pickle)
    (tmp / "grid.yaml").write_text("name: g\nbase: [a, b\n")
    (tmp / "latents").mkdir()
    return {
        "train unknown key": (["train", "--config", str(tiny), "--set", "train.stpes=4"], ["train.stpes"]),
        "train missing config": (["train", "--config", str(tmp / "nope.yaml")], [str(tmp / "nope.yaml")]),
        "train missing resume": (["train", "--config", str(tiny), "--ckpt", str(tmp / "gone")], [str(tmp / "gone")]),
        "train empty latents": (["train", "--config", str(tiny), "--set", "data.kind=latents", "model.in_channels=4",
                                 f"data.latents={tmp / 'latents'}"], [str(tmp / "latents"), "manifest.json"]),
        "sample missing ckpt": (["sample", "--ckpt", str(tmp / "gone"), "--out", str(tmp / "g.png"), "--quiet"],
                                [str(tmp / "gone")]),
        "sample out under a file": (["sample", "--ckpt", str(dense), "--out", str(junk / "g.png"), "--steps", "1",
                                     "--classes", "0", "--per-class", "1", "--device", "cpu", "--quiet"], [str(junk)]),
        "fid not an npz": (["fid", str(junk), "--ref", str(junk), "--device", "cpu", "--quiet"], [str(junk)]),
        "fid missing samples": (["fid", str(tmp / "s.npz"), "--ref", str(junk), "--quiet"], [str(tmp / "s.npz")]),
        "extract-latents missing root": (["extract-latents", "--data", str(tmp / "imgs"), "--vae", str(tmp / "vae"),
                                          "--out", str(tmp / "lat"), "--quiet"], [str(tmp / "imgs")]),
        "convert from-dit pickle": (["convert", "from-dit", str(pickle), "--out", str(tmp / "c1")], [str(pickle)]),
        "convert from-diffusers": (["convert", "from-diffusers", str(tmp), "--out", str(tmp / "c2")],
                                   [str(tmp), "config.json"]),
        "convert to-diffusers moe": (["convert", "to-diffusers", "--ckpt", str(moe), "--out", str(tmp / "c3")],
                                     ["Mixture of Experts"]),
        "convert upcycle preset": (["convert", "upcycle", "--ckpt", str(dense), "--to", "RaceDiT-Q/2-1in4",
                                    "--out", str(tmp / "c4")], ["RaceDiT-Q/2-1in4"]),
        "ablate grid yaml": (["ablate", "--grid", str(tmp / "grid.yaml")], [f"{tmp / 'grid.yaml'}:3:1:"]),
        "routing-report dense": (["routing-report", "--ckpt", str(dense), "--device", "cpu", "--quiet"],
                                 ["dense model"]),
    }


def test_each_subcommand_reports_a_bad_input_in_one_line(tmp_path, dense_run, capsys, quiet_training):
    from racedit.training.loop import train

    moe = tmp_path / "moe"
    train(make_tiny_config(moe, "train.steps=1", "train.ckpt_every=0", "train.log_with=none",
                           "model.moe_experts=4", "model.moe_k=1"))
    for case, (argv, names) in bad_inputs(tmp_path, dense_run, moe).items():
        rc, err = run(capsys, argv)
        line = one_error_line(err)
        assert rc == 2, (case, line)
        assert all(n in line for n in names), (case, line)
    assert not (tmp_path / "routing_report").exists() and not (dense_run / "routing_report").exists()


@pytest.mark.parametrize("how", ["--debug first", "--debug last", "RACEDIT_DEBUG=1"])
def test_debug_adds_the_traceback_and_keeps_the_status(how, tmp_path, monkeypatch, capsys):
    argv = ["sample", "--ckpt", str(tmp_path / "gone"), "--out", str(tmp_path / "g.png"), "--quiet"]
    rc, err = run(capsys, argv)
    line = one_error_line(err)
    debug_argv = {"--debug first": ["--debug", *argv], "--debug last": [*argv, "--debug"]}.get(how, argv)
    if how == "RACEDIT_DEBUG=1":
        monkeypatch.setenv("RACEDIT_DEBUG", "1")
    rc_debug, err = run(capsys, debug_argv)
    assert rc_debug == rc == 2
    assert err.startswith("Traceback (most recent call last)") and "CheckpointError" in err
    assert err.splitlines()[-1] == line
    monkeypatch.setenv("RACEDIT_DEBUG", "0")  # off, as unset
    assert run(capsys, argv) == (2, line + "\n")


OS_ERRORS = [  # (the exception, the exit status, the line)
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x"), 2, "no such file or directory: /x"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/x"), 2, "a component of the path is not a directory: /f/x"),
    (PermissionError(errno.EACCES, "Permission denied", "/x"), 74, "permission denied: /x"),
    (OSError(errno.EROFS, "Read-only file system", "/x"), 74, "read-only file system: /x"),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/x"), 74, "disk quota exceeded while writing /x"),
    (OSError(errno.EIO, "Input/output error", "/x"), 74, "input/output error (a failing disk or network file system): /x"),
    (OSError(errno.ENOSPC, "No space left on device"), 74, ENOSPC_TEXT),  # a write that named no file
    (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), 74, "invalid cross-device link: /a -> /b"),
    (OSError("Error no file named config.json found in directory /vae."), 2,  # a library's "cannot load"
     "Error no file named config.json found in directory /vae."),
]


@pytest.mark.parametrize("exc,status,line", OS_ERRORS, ids=[type(e).__name__ + str(e.errno) for e, _, _ in OS_ERRORS])
def test_os_errors_in_words_input_2_environment_74(exc, status, line, monkeypatch, capsys):
    def fail(args):
        raise exc

    monkeypatch.setitem(commands.COMMANDS, "fid", fail)
    rc, err = run(capsys, ["fid", "x.npz", "--ref", "y.npz"])
    assert (rc, one_error_line(err)) == (status, f"error: {line}")


def test_an_exception_may_choose_its_exit_status(monkeypatch, capsys):
    class Preempted(RuntimeError):
        exit_code = 75

    def fail(args):
        raise Preempted("stopped at step 7: checkpoint runs/x/checkpoints/step_0000007")

    monkeypatch.setitem(commands.COMMANDS, "fid", fail)
    Preempted.__module__ = "racedit.training.loop"  # as if racedit defined it
    rc, err = run(capsys, ["fid", "x.npz", "--ref", "y.npz"])
    assert (rc, one_error_line(err)) == (75, "error: stopped at step 7: checkpoint runs/x/checkpoints/step_0000007")


def test_a_bug_keeps_its_traceback_and_says_it_is_one(monkeypatch, capsys):
    def bug(args):
        return {}["missing key"]

    monkeypatch.setitem(commands.COMMANDS, "fid", bug)
    rc, err = run(capsys, ["fid", "x.npz", "--ref", "y.npz"])
    assert rc == 1
    assert err.startswith("Traceback (most recent call last)") and "in bug" in err
    last = err.splitlines()[-1]
    assert last.startswith("internal error: KeyError: 'missing key'") and "bug in racedit" in last


def test_out_of_memory_and_ctrl_c_are_one_line(monkeypatch, capsys):
    def oom(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nSee the documentation")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(commands.COMMANDS, "fid", oom)
    rc, err = run(capsys, ["fid", "x.npz", "--ref", "y.npz"])
    assert rc == 74 and "out of device memory (CUDA out of memory. Tried to allocate 2.00 GiB." in one_error_line(err)
    monkeypatch.setitem(commands.COMMANDS, "fid", interrupted)
    rc, err = run(capsys, ["fid", "x.npz", "--ref", "y.npz"])
    assert rc == 130 and one_error_line(err) == "error: interrupted (Ctrl-C)"


def test_the_wrappers_and_python_m_report_the_same_way(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nope.yaml"
    for argv in (["train.py", "--config", str(missing)], ["train.py", "--config", str(missing), "--debug"]):
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as info:
            runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
        err = capsys.readouterr().err
        assert info.value.code == 2
        if "--debug" in argv:
            assert "Traceback" in err and err.splitlines()[-1] == f"error: config file not found: {missing}"
        else:
            assert one_error_line(err) == f"error: config file not found: {missing}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RACEDIT_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "racedit", "fid", str(tmp_path / "s.npz"), "--ref", "r.npz",
                           "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert one_error_line(done.stderr) == f"error: not found: {tmp_path / 's.npz'}"


# --- YAML --------------------------------------------------------------------------------------------------

# text with "@" where the error is (its line:column is the reference), and what the line must also say
YAML_CASES = {
    "bad indentation": ("train:\n  steps: 3\n @lr: 1\n", "did not find expected key"),
    "tab": ("train:\n@\tsteps: 3\n", "a tab: YAML indents with spaces"),
    "unclosed bracket": ("train:\n  betas: [0.9, 0.99\nmodel@:\n  depth: 2\n", "expected ',' or ']'"),
    "duplicate key": ("train:\n  steps: 3\n  lr: 0.1\n  @steps: 4\n", "duplicate key steps"),
    "mapping in a value": ("train:\n  steps: 3 lr@: 1\n", "mapping values are not allowed"),
    "a list at the top": ("@- train\n- model\n", "the top level is a list; a config is a mapping of sections"),
    "a scalar at the top": ("@hello\n", "the top level is the value 'hello'"),
    "a control character": ("train:\n  out_dir: ab@\x01\n", "control characters are not allowed"),
}


def line_column(marked: str) -> tuple[str, int, int]:
    i = marked.index("@")
    return marked.replace("@", "", 1), marked.count("\n", 0, i) + 1, i - (marked.rfind("\n", 0, i) + 1) + 1


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_yaml_errors_name_file_line_column_and_the_problem(case, tmp_path, capsys):
    marked, says = YAML_CASES[case]
    text, line, column = line_column(marked)
    config = tmp_path / "x.yaml"
    config.write_text(text)
    rc, err = run(capsys, ["train", "--config", str(config)])
    got = one_error_line(err)
    assert rc == 2
    assert got.startswith(f"error: {config}:{line}:{column}: "), got
    assert says in got, got


def test_yaml_context_is_named_with_where_it_starts(tmp_path, capsys):
    config = tmp_path / "x.yaml"
    config.write_text("train:\n  betas: [0.9, 0.99\nmodel:\n  depth: 2\n")
    got = one_error_line(run(capsys, ["train", "--config", str(config)])[1])
    assert got.endswith("(while parsing a flow sequence that starts at 2:10)"), got  # the '['


def test_config_files_that_are_empty_binary_a_directory_or_unreadable(tmp_path, capsys):
    cases = {"": "is empty", "# all commented out\n# train: {steps: 3}\n": "holds no settings (only comments)"}
    for text, says in cases.items():
        config = tmp_path / "c.yaml"
        config.write_text(text)
        rc, err = run(capsys, ["train", "--config", str(config)])
        assert rc == 2 and one_error_line(err).startswith(f"error: {config} {says}: a config is a mapping")
    binary = tmp_path / "state.pt"
    torch.save({"w": torch.arange(100.0)}, binary)
    rc, err = run(capsys, ["train", "--config", str(binary)])
    assert rc == 2 and "is not UTF-8 text" in one_error_line(err) and str(binary) in err
    rc, err = run(capsys, ["train", "--config", str(tmp_path)])
    assert rc == 2 and one_error_line(err) == (f"error: config file {tmp_path} is a directory; give a YAML file "
                                               "(e.g. configs/demo.yaml)")
    config.write_text("train: {steps: 3}\n")
    config.chmod(0)
    with as_nobody(config.parent) as real:
        if not real:
            pytest.skip("permissions are not enforced (root without seteuid)")
        rc, err = run(capsys, ["train", "--config", str(config)])
    assert rc == 74 and one_error_line(err) == f"error: permission denied: {config}"


@contextlib.contextmanager
def as_nobody(*dirs: Path):
    """Run the body with the effective uid of `nobody` (so that permissions apply to a root test run), `dirs`
    and their parents opened to it; yields False where that is not possible (not root, no seteuid)."""
    if not hasattr(os, "seteuid") or os.geteuid() != 0:
        yield os.geteuid() != 0  # an ordinary user: permissions apply as they are
        return
    for d in dirs:
        for p in (d, *d.parents):
            if p.stat().st_mode & 0o001 == 0:
                p.chmod(p.stat().st_mode | 0o111)
    try:
        os.seteuid(65534)
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        os.seteuid(0)


# --- I/O: a full disk, a read-only file system, permission denied ------------------------------------------


def test_writers_on_a_really_full_disk_name_the_file(tmp_path):
    with tmpfs(tmp_path / "disk", "size=1m") as real:
        if not real:
            pytest.skip("no tmpfs can be mounted here")
        d = Disk(tmp_path / "disk", True)
        d.fill()
        big = {"w": torch.zeros(1 << 18)}
        writers = {
            "model.safetensors": lambda p: save_file(big, p),
            "state.pt": lambda p: torch.save(big, open(p, "wb")),  # noqa: SIM115 - a file object, as checkpoint does
            "batch.npz": lambda p: np.savez(open(p, "wb"), images=np.zeros(1 << 18)),  # noqa: SIM115
            "metrics.csv": lambda p: open(p, "a").write("1,2\n" * 4096),  # noqa: SIM115
        }
        for name, write in writers.items():
            path = d.root / name
            with pytest.raises(OSError) as info, writing(path):
                write(path)
            assert info.value.errno == errno.ENOSPC and info.value.filename == str(path), name
            assert os_error_text(info.value) == f"{ENOSPC_TEXT} while writing {path}", name
        filler = d.root / "filler"
        os.truncate(filler, filler.stat().st_size - (1 << 16))  # 64 KB free: numpy's short write has no errno
        with pytest.raises(OSError) as info, writing(d.root / "a.npy"):
            np.save(d.root / "a.npy", np.zeros(1 << 18))
        assert info.value.errno is None
        assert re.fullmatch(rf"a short write \(\d+ of 262144 written: is the disk or the quota full\?\) while "
                            rf"writing {re.escape(str(d.root / 'a.npy'))}", os_error_text(info.value))


def test_a_full_disk_at_a_checkpoint_save_names_it_and_the_intact_last_good_one(disk, monkeypatch, capsys,
                                                                                 quiet_training):
    import racedit.training.checkpointing as loop  # where the training loop's saves call save_checkpoint

    run_dir = disk.root / "run"
    config = tiny_yaml(disk.root.parent / "tiny.yaml", run_dir)
    real_save, saved = loop.save_checkpoint, {}

    def save_checkpoint(root, step, **kw):
        if step == 8:
            saved.update(digest(Path(root) / "step_0000004"))
            disk.fill()
        return real_save(root, step, **kw)

    monkeypatch.setattr(loop, "save_checkpoint", save_checkpoint)
    rc, err = run(capsys, ["train", "--config", str(config)])
    ckpts = run_dir / "checkpoints"
    assert rc == 74
    assert one_error_line(err) == (f"error: {ENOSPC_TEXT} while writing {ckpts / 'step_0000008' / 'model.safetensors'}"
                                   f"; last good checkpoint: {ckpts / 'step_0000004'} (continue with --resume)")
    assert sorted(p.name for p in ckpts.iterdir()) == ["last", "step_0000004"]  # no .tmp-* left, no step 8
    assert (ckpts / "last").resolve().name == "step_0000004" and digest(ckpts / "step_0000004") == saved
    disk.free()
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    assert main(["train", "--config", str(config), "--resume"]) == 0  # the kept checkpoint resumes
    assert (ckpts / "step_0000012").is_dir()


def test_a_full_disk_while_logging_metrics_names_metrics_csv_and_the_last_checkpoint(tmp_path, monkeypatch, capsys,
                                                                                    quiet_training):
    """A real full disk fails a metrics row only when it needs a new block, so its OSError (ENOSPC, no file name:
    checked on a real full disk above) is raised here by the csv writer from step 6 on."""
    import racedit.training.metrics as metrics

    class FullAfterStep5(metrics.csv.DictWriter):
        def writerow(self, row):
            if str(row["step"]).isdigit() and int(row["step"]) > 5:  # not the header
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().writerow(row)

    monkeypatch.setattr(metrics.csv, "DictWriter", FullAfterStep5)
    run_dir = tmp_path / "run"
    rc, err = run(capsys, ["train", "--config", str(tiny_yaml(tmp_path / "tiny.yaml", run_dir))])
    assert rc == 74
    assert one_error_line(err) == (f"error: {ENOSPC_TEXT} while writing {run_dir / 'metrics.csv'}; last good "
                                   f"checkpoint: {run_dir / 'checkpoints' / 'step_0000004'} (continue with --resume)")


def test_a_full_disk_while_writing_the_sample_npz_leaves_no_partial_file(disk, dense_run, monkeypatch, capsys):
    import racedit.sampling.npz_job as npz_job

    out = disk.root / "samples.npz"
    real_write = npz_job.write_image_npz

    def write_image_npz(*args, **kwargs):  # the batches are sampled and saved; the disk fills before assembly
        disk.fill()
        return real_write(*args, **kwargs)

    monkeypatch.setattr(npz_job, "write_image_npz", write_image_npz)
    argv = ["sample", "--ckpt", str(dense_run), "--out", str(out), "--num-samples", "6", "--batch-size", "3",
            "--steps", "1", "--device", "cpu", "--quiet"]
    rc, err = run(capsys, argv)
    assert rc == 74 and one_error_line(err) == f"error: {ENOSPC_TEXT} while writing {out}"
    assert sorted(p.name for p in disk.root.iterdir() if p.name != "filler") == ["samples.npz.parts"]
    disk.free()
    monkeypatch.setattr(npz_job, "write_image_npz", real_write)
    assert main(argv) == 0 and len(np.load(out)["arr_0"]) == 6  # the saved batches are reused


def test_a_full_disk_while_writing_a_grid_leaves_no_partial_png(tmp_path, dense_run, capsys):
    with tmpfs(tmp_path / "disk", "size=1m") as real:
        if not real:
            pytest.skip("no tmpfs can be mounted here")
        d = Disk(tmp_path / "disk", True)
        d.fill()
        out = d.root / "grid.png"
        rc, err = run(capsys, ["sample", "--ckpt", str(dense_run), "--out", str(out), "--classes", *map(str, range(10)),
                               "--per-class", "8", "--steps", "1", "--device", "cpu", "--quiet"])
        assert rc == 74 and one_error_line(err) == f"error: {ENOSPC_TEXT} while writing {out}"
        assert sorted(p.name for p in d.root.iterdir()) == ["filler"]


def test_an_out_dir_below_a_file_read_only_or_not_permitted(tmp_path, monkeypatch, capsys, quiet_training):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    rc, err = run(capsys, ["train", "--config", str(tiny_yaml(tmp_path / "a.yaml", a_file / "run"))])
    assert rc == 2
    assert one_error_line(err) == f"error: a component of the path is not a directory: {a_file / 'run'}"

    config = tiny_yaml(tmp_path / "b.yaml", tmp_path / "ro" / "run")
    with tmpfs(tmp_path / "ro", "ro,size=64k") as real, pytest.MonkeyPatch.context() as patch:
        if not real:  # where no read-only mount can be made, mkdir fails as it does on one
            def read_only(self, *a, **k):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

            patch.setattr(Path, "mkdir", read_only)
        rc, err = run(capsys, ["train", "--config", str(config)])
    assert rc == 74 and one_error_line(err) == f"error: read-only file system: {tmp_path / 'ro' / 'run'}"

    locked = Path(tempfile.mkdtemp(dir=tmp_path))  # root's, 0700 -> opened to traverse only
    locked.chmod(0o555)
    config = tiny_yaml(tmp_path / "c.yaml", locked / "run")
    config.chmod(0o644)
    with as_nobody(locked) as real:
        if not real:
            pytest.skip("permissions are not enforced (root without seteuid)")
        rc, err = run(capsys, ["train", "--config", str(config)])
    assert rc == 74 and one_error_line(err) == f"error: permission denied: {locked / 'run'}"
