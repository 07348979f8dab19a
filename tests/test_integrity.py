"""Integrity of what racedit writes and reads again: checkpoint manifests, the newest checkpoint that verifies,
the skip switch, sample batch digests, latent shard checks, fsync before publishing, umask modes, and the
clean-up of crashed saves.

Every damaged-file case asserts the exit code (2 through `racedit.cli.main`), that stderr is one line without
a traceback naming the damaged file, and that nothing on disk changed (the run directory hashed before and
after). One tiny run (checkpoints at steps 4 and 8) is trained per module and copied per test.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_config
from safetensors.torch import load_file, save_file

import racedit.checkpoint as checkpoint_mod
import racedit.fileio as fileio
from racedit.checkpoint import (
    CheckpointError,
    clean_leftovers,
    last_good_checkpoint,
    load_train_state,
    load_weights,
    save_checkpoint,
)
from racedit.cli import main
from racedit.config import to_yaml
from racedit.training.loop import train

CKPT_FILES = ("model.safetensors", "ema.safetensors", "state.pt", "config.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny digits run of 8 steps with checkpoints step_0000004 and step_0000008 (`last`)."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    train(make_tiny_config(out, "train.steps=8"))
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of the trained run (its `last` link kept), with its config as `run/train.yaml`."""
    copy = Path(shutil.copytree(trained, tmp_path / "run", symlinks=True))
    (copy / "train.yaml").write_text(to_yaml(make_tiny_config(copy, "train.steps=8")))
    return copy


def step(run: Path, n: int) -> Path:
    return run / "checkpoints" / f"step_{n:07d}"


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under `root`: a file's SHA-256 and mode, a link's target, a directory's mode."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = f"dir {oct(p.stat().st_mode)}"
            else:
                out[rel] = f"{hashlib.sha256(p.read_bytes()).hexdigest()} {oct(p.stat().st_mode)}"
    return out


# --- ways to damage a file ----------------------------------------------------------------------------------


class Payload:
    """A pickle that would create `marker` when unpickled: proof that a damaged file runs no code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def truncated(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def bit_flipped(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) * 2 // 3] ^= 0x10
    p.write_bytes(bytes(data))


def emptied(p: Path) -> None:
    p.write_bytes(b"")


def pickled(p: Path) -> None:
    p.write_bytes(pickle.dumps({"weights": Payload(p.parent.parent.parent / "PWNED")}))


DAMAGES = {"truncated": truncated, "bit_flipped": bit_flipped, "emptied": emptied, "pickled": pickled}


def manifest_deleted(ckpt: Path) -> None:
    (ckpt / "manifest.json").unlink()


def manifest_edited(ckpt: Path) -> None:
    m = json.loads((ckpt / "manifest.json").read_text())
    m["files"]["ema.safetensors"]["sha256"] = "0" * 64  # what a hand edit to "fix" a mismatch would do
    (ckpt / "manifest.json").write_text(json.dumps(m))


# --- the readers: (argv, the files of a checkpoint each reads) -------------------------------------------------


def resume_argv(run: Path, ckpt: Path) -> list[str]:
    return ["train", "--config", str(run / "train.yaml"), "--ckpt", str(ckpt)]


def sample_argv(run: Path, ckpt: Path) -> list[str]:
    return ["sample", "--ckpt", str(ckpt), "--out", str(run / "g.png"), "--classes", "1", "--per-class", "1",
            "--steps", "1", "--device", "cpu", "--quiet"]


def upcycle_argv(run: Path, ckpt: Path) -> list[str]:
    return ["convert", "upcycle", "--ckpt", str(ckpt), "--to", "RaceDiT-S/2-2in8", "--out", str(run / "moe"),
            "--no-probe"]


def report_argv(run: Path, ckpt: Path) -> list[str]:
    return ["routing-report", "--ckpt", str(ckpt), "--out", str(run / "report"), "--device", "cpu", "--quiet"]


READERS = {"resume": (resume_argv, CKPT_FILES), "sample": (sample_argv, ("ema.safetensors", "config.yaml")),
           "upcycle": (upcycle_argv, ("ema.safetensors", "config.yaml")),
           "routing-report": (report_argv, ("ema.safetensors",))}
CASES = [(reader, name, damage) for reader, (_, names) in READERS.items() for name in names for damage in DAMAGES
         if reader != "routing-report" or damage == "bit_flipped"]


def assert_refused(capsys, run: Path, argv: list[str], culprit: Path) -> str:
    """`racedit ARGV` exits 2 with one stderr line naming `culprit`, no traceback, and changes nothing on disk."""
    capsys.readouterr()
    before = tree_digest(run)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and str(culprit) in lines[0], err
    assert tree_digest(run) == before
    assert not (run / "PWNED").exists()
    return lines[0]


@pytest.mark.parametrize("reader,name,damage", CASES)
def test_a_damaged_checkpoint_file_is_refused_naming_it(capsys, run, reader, name, damage):
    ckpt = step(run, 8)
    DAMAGES[damage](ckpt / name)
    argv, _ = READERS[reader]
    line = assert_refused(capsys, run, argv(run, ckpt), ckpt / name)
    # what to do: the newest checkpoint beside it that verifies
    assert f"verifies is {step(run, 4).name}:" in line and "delete" in line


@pytest.mark.parametrize("reader", ["resume", "sample", "upcycle"])
@pytest.mark.parametrize("damage", [manifest_deleted, manifest_edited], ids=["deleted", "edited"])
def test_a_deleted_or_edited_manifest_is_refused(capsys, run, reader, damage):
    ckpt = step(run, 8)
    damage(ckpt)
    line = assert_refused(capsys, run, READERS[reader][0](run, ckpt), ckpt / "manifest.json")
    assert ("missing" if damage is manifest_deleted else "edited") in line
    assert "--no-verify" in line  # the files may be fine: the way to load them anyway


def test_sampling_reads_and_verifies_only_what_it_uses(capsys, run):
    bit_flipped(step(run, 8) / "state.pt")  # the optimizer state: sampling never reads it
    assert main(sample_argv(run, step(run, 8))) == 0
    assert (run / "g.png").exists()


def test_the_tests_fail_when_verification_is_disabled(capsys, run, monkeypatch):
    """Mutation check: with the manifest comparison switched off, a flipped bit passes and the checks above fail."""
    monkeypatch.setattr(checkpoint_mod, "file_problem", lambda *args: None)
    for reader, name in (("sample", "ema.safetensors"), ("resume", "state.pt")):
        ckpt = step(run, 8)
        shutil.copy2(step(run, 4) / name, ckpt / name)  # the previous step's file: readable, and wrong
        with pytest.raises(AssertionError):
            assert_refused(capsys, run, READERS[reader][0](run, ckpt), ckpt / name)


# --- resume picks the newest checkpoint that verifies ---------------------------------------------------------


def test_resume_skips_a_damaged_newest_checkpoint_and_repeats_the_run(capsys, run, trained):
    bit_flipped(step(run, 8) / "model.safetensors")
    capsys.readouterr()
    assert main(["train", "--config", str(run / "train.yaml"), "--resume"]) == 0
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if line.startswith("resume: skipped")]
    assert skipped == ["resume: skipped step_0000008: model.safetensors does not match its SHA-256 in "
                       "manifest.json (its bytes changed after it was written)"], out
    assert "resuming at step 4" in out
    # re-trained from step 4, step 8 is written again and equals the undamaged run's (CPU: bit for bit)
    again, reference = step(run, 8), step(trained, 8)
    assert load_train_state(again)["step"] == 8
    for which in ("model", "ema"):
        a, b = load_weights(again, which), load_weights(reference, which)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_when_no_checkpoint_verifies_is_refused_naming_each(capsys, run):
    bit_flipped(step(run, 8) / "ema.safetensors")
    truncated(step(run, 4) / "state.pt")
    line = assert_refused(capsys, run, ["train", "--config", str(run / "train.yaml"), "--resume"],
                          run / "checkpoints")
    assert "step_0000008: ema.safetensors" in line and "step_0000004: state.pt" in line


def test_the_divergence_guard_names_a_checkpoint_that_verifies(run):
    root = run / "checkpoints"
    assert last_good_checkpoint(step(run, 8).resolve(), root) == step(run, 8).resolve()
    bit_flipped(step(run, 8) / "model.safetensors")
    assert last_good_checkpoint(step(run, 8).resolve(), root) == step(run, 4).resolve()
    emptied(step(run, 4) / "ema.safetensors")
    assert last_good_checkpoint(step(run, 8).resolve(), root) is None


def test_each_file_is_hashed_once_per_resume(run, monkeypatch):
    fileio._DIGESTS.clear()
    hashed = []
    real = fileio.sha256_of
    monkeypatch.setattr(fileio, "sha256_of", lambda path, *a, **k: hashed.append(Path(path).name) or real(path, *a, **k))
    result = train(make_tiny_config(run, "train.steps=8"), resume=True)  # finished: loads everything, trains nothing
    assert result.step == 8
    assert sorted(hashed) == sorted(CKPT_FILES)  # step_0000008's four files, once each; step_0000004 not at all


# --- the switch ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["env", "flag"])
def test_verification_can_be_skipped(capsys, run, monkeypatch, how):
    ckpt = step(run, 8)
    bit_flipped(ckpt / "ema.safetensors")
    manifest_deleted(ckpt)
    argv = sample_argv(run, ckpt)
    if how == "env":
        monkeypatch.setenv("RACEDIT_VERIFY", "0")
    else:
        argv.append("--no-verify")
    assert main(argv) == 0
    assert os.environ.get("RACEDIT_VERIFY") == ("0" if how == "env" else None)  # the flag lasts one command
    assert main(sample_argv(run, ckpt)) == (0 if how == "env" else 2)


def test_a_bad_switch_value_is_one_line(capsys, run, monkeypatch):
    monkeypatch.setenv("RACEDIT_VERIFY", "yes")
    assert main(sample_argv(run, step(run, 8))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "RACEDIT_VERIFY='yes'" in err[0] and "allowed 0" in err[0]


def test_a_checkpoint_of_an_older_racedit_loads_with_one_warning(capsys, run):
    ckpt = step(run, 8)
    manifest_deleted(ckpt)
    for name in ("model.safetensors", "ema.safetensors"):  # no format tag in the header either
        save_file(load_file(ckpt / name), ckpt / name)
    capsys.readouterr()
    assert main(sample_argv(run, ckpt)) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {ckpt.resolve()} has no manifest.json (saved by an older racedit): its files are "
                   f"not verified"]


# --- how a checkpoint is written ------------------------------------------------------------------------------


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664)])
def test_checkpoint_modes_follow_the_umask(tiny_config, tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        final = save_checkpoint(tmp_path / "ckpts", 1, model_state={"w": torch.zeros(2)}, ema_state={"w": torch.zeros(2)},
                                train_state={"step": 1}, config=tiny_config())
    finally:
        os.umask(old)
    assert oct(final.stat().st_mode & 0o777) == oct(dir_mode)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in final.iterdir()}
    assert modes == {name: oct(file_mode) for name in (*CKPT_FILES, "manifest.json")}


def test_files_and_directories_are_fsynced_before_the_rename_that_publishes(tiny_config, tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a), str(b))) or real_replace(a, b))
    root = tmp_path / "ckpts"
    final = save_checkpoint(root, 1, model_state={"w": torch.zeros(2)}, ema_state={"w": torch.zeros(2)},
                            train_state={"step": 1}, config=tiny_config())
    publish = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(final))
    tmp = events[publish][1]
    synced_before = {e[1] for e in events[:publish] if e[0] == "fsync"}
    assert {f"{tmp}/{n}" for n in (*CKPT_FILES, "manifest.json")} | {tmp} <= synced_before
    assert ("fsync", str(root)) in events[publish + 1:]


def test_leftovers_of_dead_writers_are_removed_at_the_next_start(capsys, run):
    root = run / "checkpoints"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = os.getpid()  # alive: its leftovers are kept
    for name in (f".tmp-{dead.pid}-x", f".tmp-{mine}-y", f".old-step_0000004-{dead.pid}", ".tmp-ab12cd34"):
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(b"\0" * 10)
    os.symlink("step_0000004", root / f".last-{dead.pid}")
    capsys.readouterr()
    assert main(["train", "--config", str(run / "train.yaml"), "--resume"]) == 0
    out = capsys.readouterr().out
    removed = sorted([f".tmp-{dead.pid}-x", f".old-step_0000004-{dead.pid}", ".tmp-ab12cd34", f".last-{dead.pid}"])
    assert f"removed leftovers of crashed saves from {root}: {', '.join(removed)}" in out.splitlines()
    assert sorted(p.name for p in root.iterdir()) == sorted([f".tmp-{mine}-y", "last", "step_0000004", "step_0000008"])


def test_a_save_killed_while_rewriting_a_step_is_recovered(run):
    """Killed between moving the old step_0000008 aside and renaming the new copy into place: `last` names the
    complete new copy; the clean-up renames it into place instead of deleting it."""
    root = run / "checkpoints"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp = root / f".tmp-{dead.pid}-step_0000008"
    os.replace(root / "step_0000008", tmp)
    (root / "last").unlink()
    os.symlink(tmp.name, root / "last")
    assert clean_leftovers(root) == []
    assert os.readlink(root / "last") == "step_0000008" and not tmp.exists()
    checkpoint_mod.verify_checkpoint(root / "step_0000008")


# --- sample batches of an npz job -----------------------------------------------------------------------------


def npz_argv(run: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", "--ckpt", str(step(run, 8)), "--out", str(out), "--num-samples", "6", "--batch-size", "2",
            "--steps", "1", "--device", "cpu", "--quiet", *extra]


def test_a_damaged_sample_batch_is_removed_and_made_again(capsys, run):
    assert main(npz_argv(run, run / "ref.npz")) == 0  # the reference: one undisturbed job
    out = run / "s.npz"
    assert main(npz_argv(run, out, "--max-batches", "2")) == 0  # batches 0 and 1 of 3, then stopped
    parts = run / "s.npz.parts"
    assert sorted(p.name for p in parts.iterdir()) == ["batch_0000000.npz", "batch_0000001.npz", "digest_0000000.json",
                                                      "digest_0000001.json", "job.json"]
    bit_flipped(parts / "batch_0000000.npz")  # found by its SHA-256 before the npz is assembled
    truncated(parts / "batch_0000001.npz")  # found by its size when the job resumes
    capsys.readouterr()
    assert main(npz_argv(run, out)) == 0
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 2 and all(n.startswith("note: ") and "is damaged" in n for n in notes), notes
    assert {n.split()[1] for n in notes} == {str(parts / "batch_0000000.npz"), str(parts / "batch_0000001.npz")}
    with np.load(out) as a, np.load(run / "ref.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])


# --- latent shards ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> dict:
    from racedit.testing import save_standin_vae, write_standin_image_folder

    root = tmp_path_factory.mktemp("latent_integrity")
    images = write_standin_image_folder(root / "images", num_classes=2, per_class=2, size=16, corrupt=False)
    vae = save_standin_vae(root / "vae")
    argv = ["extract-latents", "--data", str(images), "--vae", str(vae), "--out", str(root / "latents"),
            "--image-size", "16", "--batch-size", "2", "--shard-size", "2", "--num-workers", "0", "--quiet"]
    assert main(argv) == 0
    return {"root": root, "out": root / "latents"}


def test_a_damaged_latent_shard_is_named_with_the_command_that_rebuilds_it(latents, tmp_path, monkeypatch):
    from racedit.data.latent_store import LatentDataset, LatentStoreError

    store = Path(shutil.copytree(latents["out"], tmp_path / "latents"))
    bit_flipped(store / "shard-00001" / "moments.npy")  # same size: found only by its SHA-256
    LatentDataset(store)
    for how in ("argument", "env"):
        with pytest.raises(LatentStoreError) as info:
            if how == "env":
                monkeypatch.setenv("RACEDIT_VERIFY", "2")
            LatentDataset(store, verify_checksums=True if how == "argument" else None)
        message = str(info.value)
        assert "shard-00001" in message and "moments.npy does not match its sha256" in message
        assert "--verify-checksums" in message and "\n" not in message
    monkeypatch.delenv("RACEDIT_VERIFY")
    truncated(store / "shard-00000" / "labels.npy")  # a size check, always
    with pytest.raises(LatentStoreError) as info:
        LatentDataset(store)
    message = str(info.value)
    assert f"{store / 'shard-00000'}" in message and "labels.npy has" in message
    # the command it names rebuilds exactly the damaged shards
    command = shlex.split(message.split("`")[1])
    assert command[:2] == ["racedit", "extract-latents"]
    assert main([*command[1:], "--verify-checksums", "--quiet", "--num-workers", "0"]) == 0
    rebuilt = LatentDataset(store, verify_checksums=True)
    reference = LatentDataset(latents["out"], sample_posterior=False)
    assert torch.equal(LatentDataset(store, sample_posterior=False).read([0, 1, 2, 3])[0], reference.read([0, 1, 2, 3])[0])
    assert len(rebuilt) == len(reference)


def test_verification_errors_are_checkpoint_errors(run):
    truncated(step(run, 8) / "config.yaml")
    with pytest.raises(CheckpointError, match="config.yaml has"):
        checkpoint_mod.load_config_of(step(run, 8))


def test_pruning_counts_only_the_steps_up_to_the_one_saved(tiny_config, tmp_path):
    """A resume from step 4 past a later (say damaged) step 8: the save at step 6 keeps step 4 and leaves step 8,
    so the good checkpoints the run came from are not pushed out by the one it skipped."""
    cfg = tiny_config()
    root = tmp_path / "checkpoints"
    state = {"w": torch.zeros(2)}
    for s in (4, 8, 6):
        save_checkpoint(root, s, model_state=state, ema_state=state, train_state={"step": s}, config=cfg,
                        keep_last=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000004", "step_0000006", "step_0000008"]
    save_checkpoint(root, 7, model_state=state, ema_state=state, train_state={"step": 7}, config=cfg, keep_last=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000006", "step_0000007", "step_0000008"]
