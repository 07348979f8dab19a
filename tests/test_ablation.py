"""The ablation runner (racedit.experiments.ablation): grid parsing, fairness, resumability, the report."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from conftest import TINY

from racedit.config import config_diff, load_config
from racedit.experiments import ablation
from racedit.experiments.ablation import (
    ComputeMismatchError,
    GridError,
    load_grid,
    resolve_variants,
    run_grid,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A tiny Expert Race model on the digits: 2 blocks, 32 wide, 2-in-8 experts (batch 16 x 16 tokens).
MOE = ["model.name=RaceDiT-S/2-2in8", "train.steps=8", "train.ckpt_every=4", "train.log_every=2"]


def _write_grid(tmp_path: Path, name: str = "tiny", **spec) -> Path:
    base = tmp_path / "base.yaml"
    if not base.exists():
        base.write_text("model:\n  name: DiT-S/2\n")
    grid = {"name": name, "base": "base.yaml", "overrides": [*TINY, *MOE],
            "eval": {"kind": "digits", "samples_per_class": 2}, **spec}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


TWO = {"variants": [{"name": "race", "overrides": {"model.routing": "expert_race"}, "reference": 8.03},
                    {"name": "token", "overrides": {"model.routing": "token_choice", "model.gating": "softmax"}}]}


def test_grid_runs_end_to_end_skips_finished_and_writes_report(tmp_path, monkeypatch):
    grid = _write_grid(tmp_path, **TWO)
    out = tmp_path / "out"
    result = run_grid(grid, out, log=lambda *a: None)
    assert result.status == {"race": "trained", "token": "trained"}
    for f in ("results.csv", "results.md", "loss_curves.png", "metric_vs_macs.png"):
        assert (out / f).is_file(), f
    for png in ("loss_curves.png", "metric_vs_macs.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["variant"] for r in rows} == {"race", "token"}
    fd = [float(r["digits_fd"]) for r in rows]
    assert fd == sorted(fd)  # sorted by the main metric, lower is better
    for r in rows:
        assert int(r["steps"]) == 8 and float(r["macs"]) > 0 and float(r["params_activated"]) > 0
        assert 0.0 <= float(r["sample_class_accuracy"]) <= 1.0 and float(r["final_loss"]) > 0
        assert r["routing/maxvio"] != ""  # routing diagnostics from the metrics.csv header
    md = (out / "results.md").read_text()
    assert "`race`" in md and "`token`" in md
    assert "baseline" in md and "paper" in md and "8.03" in md
    assert (out / "race" / "done.json").is_file()

    # A rerun trains nothing: both variants are skipped and the report is rewritten from done.json.
    def no_training(*a, **k):
        raise AssertionError("a finished variant was trained again")

    monkeypatch.setattr("racedit.training.loop.train", no_training)
    again = run_grid(grid, out, log=lambda *a: None)
    assert again.status == {"race": "skipped", "token": "skipped"}
    assert {r["variant"] for r in again.rows} == {"race", "token"}
    # ... but a finished variant whose config changed since is refused, naming the key
    with pytest.raises(GridError, match=r"race.*train.lr"):
        run_grid(grid, out, extra=["train.lr=0.5"], log=lambda *a: None)


def test_interrupted_variant_resumes_bit_for_bit(tmp_path):
    spec = {"variants": [{"name": "race", "overrides": {}}]}
    grid = _write_grid(tmp_path, eval={"kind": "none"}, **spec)
    cut = run_grid(grid, tmp_path / "cut", stop_after=4, log=lambda *a: None)  # "crash" after 4 of 8 steps
    assert cut.status == {"race": "incomplete"} and not (tmp_path / "cut" / "race" / "done.json").exists()
    resumed = run_grid(grid, tmp_path / "cut", log=lambda *a: None)
    assert resumed.status == {"race": "resumed"}
    assert resumed.rows[0]["resumed_from_step"] == 4
    straight = run_grid(grid, tmp_path / "straight", log=lambda *a: None)
    assert resumed.rows[0]["final_total_loss"] == straight.rows[0]["final_total_loss"]
    assert resumed.rows[0]["final_loss_smoothed"] == straight.rows[0]["final_loss_smoothed"]


def test_compute_guard_names_the_variants(tmp_path):
    bad = {"variants": [{"name": "narrow", "overrides": {}},
                        {"name": "wide", "overrides": {"model.mlp_ratio": 8.0}},
                        {"name": "same", "overrides": {"model.gating": "sigmoid"}}]}
    grid = _write_grid(tmp_path, **bad)
    with pytest.raises(ComputeMismatchError) as err:
        run_grid(grid, tmp_path / "out", log=lambda *a: None)
    msg = str(err.value)
    assert "wide" in msg and "narrow" in msg and "same" not in msg and "allow_compute_mismatch" in msg
    assert not (tmp_path / "out" / "narrow").exists()  # refused before anything trained
    # explicitly allowed, or within a wider tolerance: no error
    ok = load_grid(_write_grid(tmp_path, name="ok", allow_compute_mismatch=True, **bad))
    ablation.check_compute(ok, {n: ablation.variant_accounting(c) for n, c in resolve_variants(ok).items()})
    loose = load_grid(_write_grid(tmp_path, name="loose", mac_tolerance=10.0, **bad))
    ablation.check_compute(loose, {n: ablation.variant_accounting(c) for n, c in resolve_variants(loose).items()})


def test_variants_differ_only_in_their_overrides(tmp_path):
    axes = {"axes": {"model.gating": ["identity", "softmax"],
                     "size": [{"name": "1in4", "overrides": {"model.moe_k": 1, "model.moe_experts": 4}},
                              {"name": "4in16", "overrides": {"model.moe_k": 4, "model.moe_experts": 16}}]}}
    grid = load_grid(_write_grid(tmp_path, variants=[{"name": "plain", "overrides": {}}], **axes))
    assert [v.name for v in grid.variants] == ["plain", "identity-1in4", "identity-4in16", "softmax-1in4",
                                               "softmax-4in16"]
    configs = resolve_variants(grid, tmp_path / "out")
    base = load_config(tmp_path / "base.yaml", [*TINY, *MOE, "train.eval_samples_per_class=2"])
    for v in grid.variants:
        diff = config_diff(base, configs[v.name])
        diff.pop("train.out_dir")
        assert configs[v.name].train.out_dir == str(tmp_path / "out" / v.name)
        expected = {k for k, _ in v.overrides}
        changed = {k for k, (a, b) in diff.items()}
        assert changed <= expected, (v.name, diff)
        assert all(diff[k][1] == value for k, value in v.overrides if k in diff)
    # the shared budget stays shared: same seed, steps, batch, sampling in every variant
    assert len({(c.train.seed, c.train.steps, c.train.global_batch, c.sample.steps) for c in configs.values()}) == 1


def test_override_values_reach_the_config_with_their_yaml_types(tmp_path):
    """No round trip through "a.b=c" text: a string that reads as YAML ('x: y', 'null', '1e-3') stays a string."""
    odd = {"train.init_from": "runs/a: b #c", "train.lr": 0.002, "model.router_target_head": True}
    grid = load_grid(_write_grid(tmp_path, variants=[{"name": "odd", "overrides": odd},
                                                     {"name": "null", "overrides": {"train.init_from": "null"}},
                                                     {"name": "text", "overrides": ["train.lr=1e-3"]}]))
    configs = resolve_variants(grid, tmp_path / "out")
    got = configs["odd"]
    assert (got.train.init_from, got.train.lr, got.model.router_target_head) == ("runs/a: b #c", 0.002, True)
    assert configs["null"].train.init_from == "null" and configs["text"].train.lr == 1e-3
    assert grid.variant("odd").overrides == list(odd.items())
    assert ablation.overrides_text(grid.variant("odd").overrides) == (
        "train.init_from=runs/a: b #c train.lr=0.002 model.router_target_head=true")


def test_bad_grids_fail_with_a_clear_message(tmp_path):
    with pytest.raises(GridError, match="train.seed"):
        load_grid(_write_grid(tmp_path, variants=[{"name": "a", "overrides": {"train.seed": 3}}]))
    with pytest.raises(GridError, match="unknown key"):
        load_grid(_write_grid(tmp_path, variants=[{"name": "a"}], colour="red"))
    with pytest.raises(GridError, match="duplicate"):
        load_grid(_write_grid(tmp_path, variants=[{"name": "a"}, {"name": "a"}]))
    g = load_grid(_write_grid(tmp_path, variants=[{"name": "ec", "overrides": {"model.routing": "expert_choice",
                                                                               "model.moe_experts": 3}}]))
    with pytest.raises(GridError, match="ec"):
        resolve_variants(g)
    g = load_grid(_write_grid(tmp_path, variants=[{"name": "typo", "overrides": {"model.routng": "x"}}]))
    with pytest.raises(GridError, match="typo.*routng"):
        resolve_variants(g)


def test_shipped_grids_load_and_are_at_equal_compute():
    root = Path(__file__).resolve().parents[1] / "configs" / "ablations"
    grids = sorted(root.glob("*.yaml"))
    assert {"routing", "gating", "ladder", "granularity", "connections"} <= {g.stem for g in grids}
    for path in grids:
        grid = load_grid(path)
        configs = resolve_variants(grid)
        # B/2 models (even on the meta device) take a while to build: of the ImageNet grids, check the two
        # whose variants change the model's size; the others differ only in routing, gating and losses.
        if path.stem.endswith("_imagenet") and not path.stem.startswith(("granularity", "connections")):
            continue
        ablation.check_compute(grid, {n: ablation.variant_accounting(c) for n, c in configs.items()})


def test_a_diverging_variant_is_reported_and_the_grid_goes_on(tmp_path, monkeypatch):
    from racedit.experiments.ablation import run
    from racedit.training import loop

    real_train = loop.train
    calls = []

    def train_where_race_diverges(cfg, *a, **k):
        calls.append(Path(cfg.train.out_dir).name)
        if Path(cfg.train.out_dir).name == "race":
            raise loop.TrainingDiverged("step 5: 3 non-finite steps in a row; last good checkpoint step_0000004")
        return real_train(cfg, *a, **k)

    monkeypatch.setattr(run, "train", train_where_race_diverges)
    grid = _write_grid(tmp_path, **TWO)
    out = tmp_path / "out"
    result = run_grid(grid, out, log=lambda *a: None)
    assert result.status == {"race": "diverged", "token": "trained"} and calls == ["race", "token"]
    assert "non-finite" in result.diverged["race"] and (out / "race" / "diverged.json").is_file()
    with (out / "results.csv").open() as f:
        assert [r["variant"] for r in csv.DictReader(f)] == ["token"]
    md = (out / "results.md").read_text()
    assert "Diverged" in md and "- `race`: step 5: 3 non-finite steps" in md
    # a rerun neither retrains the diverged variant nor the finished one
    again = run_grid(grid, out, log=lambda *a: None)
    assert again.status == {"race": "diverged", "token": "skipped"} and calls == ["race", "token"]
    # deleting the marker retries it (and here it trains)
    (out / "race" / "diverged.json").unlink()
    monkeypatch.setattr(run, "train", real_train)
    third = run_grid(grid, out, log=lambda *a: None)
    assert third.status == {"race": "trained", "token": "skipped"} and not third.diverged
    assert "Diverged" not in (out / "results.md").read_text()


def test_fingerprint_changes_ignore_fields_added_at_their_default_and_fields_removed():
    from racedit.config import Config, to_yaml
    from racedit.experiments.ablation.run import _fingerprint_changes

    now_cfg = Config()
    now_cfg.train.steps = 9
    then = yaml.safe_load(to_yaml(Config()))
    del then["model"]["depth"], then["train"]["steps"]  # fields "added since": one at its default, one not
    then["train"]["retired_option"] = 1  # a field removed since
    then["train"]["lr"] = 0.5
    saved = {"config": yaml.safe_dump(then), "eval": {"kind": "digits", "gone": 1}}
    now = {"config": to_yaml(now_cfg), "eval": {"kind": "fid", "added": 2}}
    assert _fingerprint_changes(saved, now) == [
        f"train.lr: 0.5 -> {now_cfg.train.lr!r}", "train.steps: (absent) -> 9", "eval.kind: 'digits' -> 'fid'"]
