"""The training loop: exact resume, crash-safe checkpoints, non-finite steps, run-directory guards, metrics.csv.

All runs are the tiny digits config of conftest.py (2 blocks, 32 wide, global batch 16, 12 steps,
checkpoint every 4, a metrics row every step). References are the uninterrupted run itself (resume must
repeat it bit for bit) and the state before a skipped step (a skipped step must not change it).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_config
from safetensors.torch import load_file

import racedit.checkpoint as checkpoint_mod
import racedit.training.loop as loop_mod
from racedit.checkpoint import (
    latest_checkpoint,
    load_config_of,
    load_train_state,
    load_weights,
    resolve_checkpoint,
    save_checkpoint,
    step_dir_name,
    step_of,
)
from racedit.config import ConfigError
from racedit.training.loop import TrainingDiverged, train


def read_metrics(out_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of metrics.csv, values as the strings written (so == is bit-exact for floats)."""
    with (Path(out_dir) / "metrics.csv").open() as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def losses_by_step(out_dir: Path) -> dict[int, str]:
    return {int(r["step"]): r["loss"] for r in read_metrics(out_dir)[1]}


def weights_of(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {w: load_file(str(ckpt / f"{w}.safetensors")) for w in ("model", "ema")}


def assert_same_weights(a: dict, b: dict) -> None:
    for which in ("model", "ema"):
        assert a[which].keys() == b[which].keys()
        for k in a[which]:
            assert torch.equal(a[which][k], b[which][k]), f"{which}.{k} differs"


# --- exact resume --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad_accum,stop_after", [(1, 4), (2, 6)])
def test_resume_repeats_the_uninterrupted_run_bit_for_bit(tiny_config, tmp_path, grad_accum, stop_after):
    """stop_after=4 stops right at a checkpoint; stop_after=6 also loses steps 5-6 (logged, not checkpointed),
    which the resumed run must redo and re-log exactly once."""
    over = f"train.grad_accum={grad_accum}"
    full = train(tiny_config(over, out_dir=tmp_path / "full"))
    assert full.step == 12 and full.skipped_steps == 0

    cfg = tiny_config(over, out_dir=tmp_path / "split")
    first = train(cfg, stop_after=stop_after)
    assert first.step == stop_after
    assert latest_checkpoint(tmp_path / "split" / "checkpoints").name == "step_0000004"
    resumed = train(cfg, resume=True)
    assert resumed.step == 12

    want, got = losses_by_step(tmp_path / "full"), losses_by_step(tmp_path / "split")
    assert sorted(want) == list(range(1, 13))
    assert [r["step"] for r in read_metrics(tmp_path / "split")[1]] == [str(s) for s in range(1, 13)]
    assert got == want  # every step's loss, as written, identical: before, across and after the resume
    assert len(set(want.values())) > 1  # (the losses do change from step to step)
    assert resumed.last_loss == full.last_loss

    a = weights_of(resolve_checkpoint(tmp_path / "full"))
    b = weights_of(resolve_checkpoint(tmp_path / "split"))
    assert_same_weights(a, b)
    sa = load_train_state(resolve_checkpoint(tmp_path / "full"))
    sb = load_train_state(resolve_checkpoint(tmp_path / "split"))
    assert sa["step"] == sb["step"] == 12 and sa["ema_n_averaged"] == sb["ema_n_averaged"]
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in ("exp_avg", "exp_avg_sq", "step"))


def test_resume_of_a_finished_run_changes_nothing(tiny_config, monkeypatch):
    cfg = tiny_config("train.steps=4")
    done = train(cfg)
    before = weights_of(done.checkpoint)

    def no_save(*args, **kwargs):
        raise AssertionError("a finished run's checkpoint was deleted and written again")

    monkeypatch.setattr(checkpoint_mod, "save_file", no_save)
    again = train(cfg, resume=True)
    assert again.step == 4 and again.checkpoint == done.checkpoint
    assert_same_weights(before, weights_of(resolve_checkpoint(cfg.train.out_dir)))


# --- crash during a checkpoint save ---------------------------------------------------------------------------


def test_crash_during_save_keeps_the_previous_checkpoint(tiny_config, monkeypatch):
    cfg = tiny_config()
    real_save_file = checkpoint_mod.save_file
    calls = []

    def flaky_save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 4:  # the second checkpoint: model.safetensors written, crash on ema.safetensors
            raise OSError("disk full (simulated)")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint_mod, "save_file", flaky_save_file)
    with pytest.raises(OSError, match="simulated"):
        train(cfg)
    monkeypatch.setattr(checkpoint_mod, "save_file", real_save_file)

    root = Path(cfg.train.out_dir) / "checkpoints"
    last = latest_checkpoint(root)
    assert last is not None and last.name == "step_0000004"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["last", "step_0000004"]
    assert not (root / "step_0000008").exists()
    # the previous checkpoint is complete and loads
    assert load_train_state(last)["step"] == 4
    assert load_config_of(last) == cfg
    assert set(load_weights(last, "model")) == set(load_weights(last, "ema"))
    # and the run resumes from it (named explicitly here), ending where an uninterrupted run ends
    resumed = train(cfg, resume=last)
    assert resumed.step == 12
    assert list(losses_by_step(cfg.train.out_dir)) == list(range(1, 13))


def test_checkpoint_without_last_link_is_still_found(tiny_config):
    """A crash between renaming step_N into place and switching `last` (or a filesystem without links)."""
    cfg = tiny_config("train.steps=8")
    train(cfg, stop_after=4)
    root = Path(cfg.train.out_dir) / "checkpoints"
    (root / "last").unlink()
    incomplete = root / "step_0000006"  # not made by racedit (a rename is atomic), but must not be taken
    incomplete.mkdir()
    (incomplete / "model.safetensors").write_bytes(b"")
    assert latest_checkpoint(root).name == "step_0000004"
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(cfg)
    assert train(cfg, resume=True).step == 8


def test_stray_temporary_dir_is_never_a_checkpoint(tiny_config):
    """What a killed save leaves behind (a `.tmp-*` dir with some files) is ignored by resume and by `last`."""
    cfg = tiny_config("train.steps=4")
    train(cfg)
    root = Path(cfg.train.out_dir) / "checkpoints"
    stray = root / ".tmp-killed"
    stray.mkdir()
    (stray / "model.safetensors").write_bytes(b"\x00" * 10)  # half-written
    assert latest_checkpoint(root).name == "step_0000004"
    assert resolve_checkpoint(root.parent).name == "step_0000004"
    done = train(tiny_config("train.steps=8"), resume=True)
    assert done.step == 8 and latest_checkpoint(root).name == "step_0000008"


def test_step_directory_names_and_their_step():
    assert [step_dir_name(s) for s in (0, 12, 9_999_999, 12_345_678)] == [
        "step_0000000", "step_0000012", "step_9999999", "step_12345678"]
    for s in (0, 12, 12_345_678):
        assert step_of(Path("/runs/a/checkpoints") / step_dir_name(s)) == s
    assert step_of("step_12") == 12 and step_of(Path("step_0000004")) == 4
    for other in ("last", "step_", "step_12x", "xstep_1", ".tmp-step_1", "step_-1", None):
        assert step_of(other) is None, other
    names = [step_dir_name(s) for s in (3, 20, 100, 7)]
    assert sorted(names) == [step_dir_name(s) for s in (3, 7, 20, 100)]  # zero padding: names sort by step


# --- non-finite losses and gradients ----------------------------------------------------------------------------


class NaNGradient(torch.autograd.Function):
    """Identity forward; NaN gradient backward (a finite loss whose gradient is not)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison_steps(monkeypatch, bad_steps: set[int], kind: str = "loss", snapshots: list | None = None):
    """Make the loss (or only its gradient) non-finite at the given 1-based optimizer steps (grad_accum 1).

    `snapshots` receives a copy of the live parameters as each step starts (= after the previous step).
    """
    real = loop_mod.training_losses
    calls = []

    def wrapped(model, *args, **kwargs):
        calls.append(1)
        step = len(calls)
        if snapshots is not None:
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        terms = real(model, *args, **kwargs)
        if step in bad_steps:
            if kind == "loss":
                terms["loss"] = terms["loss"] * float("nan")
            else:
                terms["loss"] = NaNGradient.apply(terms["loss"])
        return terms

    monkeypatch.setattr(loop_mod, "training_losses", wrapped)


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_nonfinite_steps_are_skipped_and_counted(tiny_config, monkeypatch, kind):
    snapshots: list[dict] = []
    poison_steps(monkeypatch, {5, 6}, kind, snapshots)
    result = train(tiny_config("train.ckpt_every=0"))
    assert result.step == 12 and result.skipped_steps == 2
    assert len(snapshots) == 12
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)
    # snapshots[i] is the state before step i+1: steps 5 and 6 (skipped) leave it untouched ...
    assert same(snapshots[4], snapshots[5]) and same(snapshots[5], snapshots[6])
    # ... while the ordinary steps around them change it (so the check above can fail)
    assert not same(snapshots[3], snapshots[4]) and not same(snapshots[6], snapshots[7])
    rows = {int(r["step"]): r for r in read_metrics(result.out_dir)[1]}
    assert [float(rows[s]["skipped_steps"]) for s in (4, 5, 6, 12)] == [0.0, 1.0, 2.0, 2.0]
    final = weights_of(result.checkpoint)
    assert all(torch.isfinite(t).all() for w in final.values() for t in w.values())


def test_too_many_nonfinite_steps_stop_the_run_naming_step_and_checkpoint(tiny_config, monkeypatch):
    poison_steps(monkeypatch, set(range(6, 13)))
    cfg = tiny_config("train.max_nonfinite=3")
    with pytest.raises(TrainingDiverged) as info:
        train(cfg)
    msg = str(info.value)
    assert "step 8" in msg  # bad steps 6, 7, 8: the third in a row
    assert "step_0000004" in msg  # the last good checkpoint (the one at 8 must not be written)
    root = Path(cfg.train.out_dir) / "checkpoints"
    assert latest_checkpoint(root).name == "step_0000004"
    assert not (root / "step_0000008").exists()


def test_short_nonfinite_streak_over_a_checkpoint_step_does_not_save_it(tiny_config, monkeypatch):
    poison_steps(monkeypatch, {8})
    cfg = tiny_config("train.max_nonfinite=3")
    result = train(cfg)
    assert result.skipped_steps == 1
    root = Path(cfg.train.out_dir) / "checkpoints"
    assert not (root / "step_0000008").exists()
    assert latest_checkpoint(root).name == "step_0000012"


def test_corrupted_weights_stop_the_run_before_any_checkpoint(tiny_config, monkeypatch):
    """A weight that turns NaN (set by hand after the forward of step 3) makes every later loss NaN: steps
    4, 5, 6 are skipped, so the checkpoint due at step 4 is never written, and the run stops at step 6."""
    real = loop_mod.training_losses
    calls = []

    def wrapped(model, *args, **kwargs):
        calls.append(1)
        terms = real(model, *args, **kwargs)
        if len(calls) == 3:
            with torch.no_grad():  # a bias: its value is not needed by the backward of this step
                model.final_layer.adaLN_modulation[-1].bias[0] = float("nan")
        return terms

    monkeypatch.setattr(loop_mod, "training_losses", wrapped)
    cfg = tiny_config("train.max_nonfinite=3")
    with pytest.raises(TrainingDiverged, match="step 6") as info:
        train(cfg)
    assert "none" in str(info.value)  # no good checkpoint yet
    root = Path(cfg.train.out_dir) / "checkpoints"
    assert latest_checkpoint(root) is None and not (root / "step_0000004").exists()


# --- the inference thresholds ------------------------------------------------------------------------------------


def test_tau_is_the_ema_of_every_micro_batchs_recorded_kth_score(tiny_config, monkeypatch):
    """grad_accum 2, activation checkpointing on, and step 10 skipped (a micro-batch's loss made NaN after its
    forward). Reference: a float64 EMA over all 24 micro-batches in order of the K-th largest score (K = N k of
    the N E scores each forward recorded, sorted here), the skipped step's included (its forwards ran, as
    they always moved tau); the EMA model's tau averages the live tau after each finite step only."""
    decay, k, E = 0.7, 2, 8
    cfg = tiny_config("model.name=RaceDiT-S/2-2in8", f"model.threshold_decay={decay}", "train.grad_accum=2",
                      "train.grad_checkpointing=true", "train.ckpt_every=0")
    real = loop_mod.training_losses
    recorded: list[dict[int, torch.Tensor]] = []  # per micro-batch: block -> (N, E) scores as recorded

    def wrapped(*args, **kwargs):
        terms = real(*args, **kwargs)
        recorded.append({i: r.scores.detach().double().flatten() for i, r in args[-1].moe.items()})
        if len(recorded) == 19:  # the first micro-batch of step 10
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(loop_mod, "training_losses", wrapped)
    result = train(cfg)
    assert result.step == 12 and result.skipped_steps == 1 and len(recorded) == 24
    tau: dict[int, float] = {}
    ema_tau = {0: 0.0, 1: 0.0}  # the EMA model starts as a copy of the fresh model: tau = 0
    for step in range(12):
        for scores in recorded[2 * step: 2 * step + 2]:
            for i, s in scores.items():
                kth = float(torch.sort(s, descending=True).values[s.numel() // E * k - 1])
                tau[i] = decay * tau[i] + (1 - decay) * kth if i in tau else kth
        if step != 9:
            for i in ema_tau:
                ema_tau[i] += (1 - cfg.train.ema_decay) * (tau[i] - ema_tau[i])
    final = weights_of(result.checkpoint)
    for i in (0, 1):
        assert float(final["model"][f"blocks.{i}.mlp.tau"]) == pytest.approx(tau[i], rel=1e-6, abs=1e-7)
        assert float(final["ema"][f"blocks.{i}.mlp.tau"]) == pytest.approx(ema_tau[i], rel=1e-6, abs=1e-7)
    assert tau[0] != pytest.approx(tau[1])  # the layers really differ


# --- run-directory guards --------------------------------------------------------------------------------------


def test_fresh_run_into_a_directory_with_checkpoints_is_refused(tiny_config):
    cfg = tiny_config("train.steps=4")
    train(cfg)
    with pytest.raises(ConfigError, match="already holds checkpoints") as info:
        train(cfg)
    assert "resume" in str(info.value)


def test_resume_with_a_different_model_names_the_key(tiny_config):
    train(tiny_config("train.steps=4"))
    with pytest.raises(ConfigError) as info:
        train(tiny_config("train.steps=8", "model.hidden_size=64"), resume=True)
    msg = str(info.value)
    assert "model.hidden_size" in msg and "32" in msg and "64" in msg


def test_resume_without_checkpoint_starts_fresh(tiny_config):
    result = train(tiny_config("train.steps=2"), resume=True)
    assert result.step == 2


# --- metrics.csv -----------------------------------------------------------------------------------------------


def test_metrics_csv_has_a_header_and_one_row_per_logged_step(tiny_config):
    result = train(tiny_config("train.log_every=5", "train.ckpt_every=0"))
    header, rows = read_metrics(result.out_dir)
    assert header[0] == "step"
    assert {"loss", "lr", "grad_norm", "steps_per_s", "skipped_steps"} <= set(header)
    assert [int(r["step"]) for r in rows] == [5, 10, 12]  # every 5 steps, and the last one
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert (Path(result.out_dir) / "tensorboard").is_dir()


def test_init_from_starts_a_new_run_from_a_checkpoints_ema_weights(tmp_path):
    """train.init_from loads the EMA weights into a fresh run (new optimizer, step 0): with lr 1e-30 (an lr
    must be > 0) the new run's weights stay the source's EMA weights to within the 2 steps' 2e-30."""
    from racedit.checkpoint import latest_checkpoint, load_weights

    source = train(make_tiny_config(tmp_path / "a"))
    ema = load_weights(source.checkpoint, "ema")
    result = train(make_tiny_config(tmp_path / "b", f"train.init_from={tmp_path / 'a'}", "train.steps=2",
                                    "train.lr=1e-30", "train.ckpt_every=0"))
    assert result.step == 2
    tuned = load_weights(latest_checkpoint(tmp_path / "b" / "checkpoints"), "model")
    assert all(torch.allclose(tuned[k], ema[k], rtol=0, atol=1e-25) for k in ema)
    assert not all(torch.equal(tuned[k], v) for k, v in load_weights(source.checkpoint, "model").items())


def test_resaving_a_step_has_a_complete_copy_at_every_rename(tiny_config, tmp_path, monkeypatch):
    """A kill at any point of re-saving step 4 leaves a loadable step 4 (old or new weights): checked at
    the moment of every rename the save makes, as a kill there would leave the directory."""
    import os

    cfg = tiny_config()
    root = tmp_path / "ckpts"
    old, new = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
    save_checkpoint(root, 4, model_state=old, ema_state=old, train_state={"step": 4}, config=cfg)
    real_replace = os.replace
    seen = []

    def checked_replace(src, dst):
        found = latest_checkpoint(root)
        assert found is not None and load_train_state(found)["step"] == 4  # `last` may name the new copy
        seen.append(float(load_weights(found, "model")["w"][0]))
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint_mod.os, "replace", checked_replace)
    final = save_checkpoint(root, 4, model_state=new, ema_state=new, train_state={"step": 4}, config=cfg)
    monkeypatch.setattr(checkpoint_mod.os, "replace", real_replace)
    assert len(seen) >= 3 and seen[0] == 0.0 and seen[-1] == 1.0 and set(seen) == {0.0, 1.0}
    assert latest_checkpoint(root) == final.resolve() and float(load_weights(final, "model")["w"][0]) == 1.0
    assert sorted(p.name for p in root.iterdir()) == ["last", "step_0000004"]  # nothing left aside
