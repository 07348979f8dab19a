"""Running an ablation grid: train every variant (resumable), evaluate it, record done/diverged markers,
and write the report. Fairness and resumability rules are in `racedit.experiments.ablation.grid`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from racedit.checkpoint import latest_checkpoint, step_of
from racedit.config import ABSENT, Config, config_diff, flatten_config, to_yaml
from racedit.evaluation.digits import evaluate_digits_model
from racedit.evaluation.fid import EvalSettings, evaluate, save_report
from racedit.experiments.ablation.grid import (
    DIVERGED,
    Grid,
    GridError,
    Variant,
    check_compute,
    load_grid,
    overrides_text,
    resolve_variants,
    variant_accounting,
)
from racedit.experiments.ablation.report import (
    REPORT_FILES,
    format_number,
    last_values,
    loss_curve,
    routing_columns,
    smooth,
    train_seconds,
    write_report,
)
from racedit.fileio import atomic_write_text, json_safe
from racedit.outputs import check_output_dir
from racedit.runlock import lock_on_main
from racedit.sampling import load_for_sampling, write_samples_npz
from racedit.training.loop import TrainingDiverged, train
from racedit.training.metrics import loss_column, read_metrics


@dataclass
class GridResult:
    """What `run_grid` did: the rows of the finished variants, each variant's status, the files written."""

    out_dir: Path
    rows: list[dict]
    status: dict[str, str]  # variant -> "trained" | "resumed" | "skipped" | "incomplete" | "diverged"
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    diverged: dict[str, str] = field(default_factory=dict)  # variant -> the divergence message


# ----------------------------------------------------------------------------------------------- running


def _evaluate(grid: Grid, cfg: Config, checkpoint: Path, run_dir: Path, device: str) -> dict:
    if grid.eval.kind == "none":
        return {}
    loaded = load_for_sampling(checkpoint, use_ema=True, device=device)
    if grid.eval.kind == "digits":
        return evaluate_digits_model(cfg, loaded.model, loaded.objective, device)
    t0 = time.perf_counter()
    npz = write_samples_npz(loaded, grid.eval.num_samples, run_dir / "samples.npz", cfg.sample,
                            seed=cfg.train.seed, batch_size=grid.eval.batch_size, progress=False,
                            overwrite=True)  # the variant's own samples: stale ones are from an earlier training
    if npz is None:
        raise RuntimeError(f"sampling for {run_dir} did not finish; run again to continue")
    report = evaluate(npz, grid.eval.ref or None, grid.eval.inception or None,
                      EvalSettings(device=device, prc=grid.eval.precision_recall), progress=False)
    save_report(report, run_dir / "fid.json")
    return {**{k: float(v) for k, v in report["metrics"].items()}, "eval_samples": grid.eval.num_samples,
            "eval_seconds": time.perf_counter() - t0}


def _variant_row(grid: Grid, v: Variant, accounting: dict, run_dir: Path) -> dict:
    header, rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "steps_per_s" in r]
    col = loss_column(header)
    steps, losses = loss_curve(train_rows, col)
    smoothed = smooth(losses, grid.smoothing)
    row = {"variant": v.name, "overrides": overrides_text(v.overrides),
           "final_loss": losses[-1] if losses else math.nan,
           "final_loss_smoothed": smoothed[-1] if smoothed else math.nan,
           "final_total_loss": last_values(train_rows, ["loss"]).get("loss", math.nan),
           "steps": int(steps[-1]) if steps else 0,
           "skipped_steps": int(last_values(train_rows, ["skipped_steps"]).get("skipped_steps", 0)),
           "train_seconds": train_seconds(train_rows), **accounting}
    aux = [c for c in header if c.startswith("loss/") and c != "loss/diffusion"]
    row.update({f"final_{c.replace('/', '_')}": val for c, val in last_values(train_rows, aux).items()})
    row.update(last_values(train_rows, routing_columns(header)))
    if v.reference is not None:
        row["reference"] = v.reference
    return row


def _fingerprint_changes(saved: dict, now: dict) -> list[str]:
    """What differs between a done.json fingerprint and the current one, as "key: then -> now" strings.

    Config fields added to racedit after the variant finished are ignored while they hold their default
    value, and fields since removed are ignored, so a library upgrade does not invalidate finished work.
    """
    then = yaml.safe_load(saved.get("config") or "{}") or {}
    default = flatten_config(yaml.safe_load(to_yaml(Config())))
    out = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in config_diff(then, yaml.safe_load(now["config"])).items()
           if b is not ABSENT and (a is not ABSENT or b != default.get(k))]
    out += [f"eval.{k}: {a!r} -> {b!r}" for k, (a, b) in config_diff(saved.get("eval") or {}, now["eval"]).items()
            if a is not ABSENT and b is not ABSENT]
    return out


def _finished_row(grid: Grid, v: Variant, accounting: dict, run_dir: Path, results: dict) -> dict:
    """A finished variant's row: recomputed from its metrics.csv (so report changes need no retraining) plus
    the evaluation results stored in done.json."""
    row = _variant_row(grid, v, accounting, run_dir)
    row.update(results)
    row["wall_seconds"] = row["train_seconds"] + float(results.get("eval_seconds") or 0.0)
    return json_safe(row)


def run_grid(grid: Grid | str | Path, out_dir: str | Path | None = None, extra: list[str] | None = None,
             only: list[str] | None = None, stop_after: int | None = None, device: str | None = None,
             command: str | None = None, report: bool = True, log=print, overwrite: bool = False) -> GridResult:
    """Train and evaluate every variant of `grid` (a Grid or a grid file) and write the report.

    out_dir: default the grid's out_dir. extra: `a.b=c` overrides for every variant (command-line `--set`).
    only: run just these variants (the report covers every finished one). stop_after: train each variant
    for at most this many steps in this call (an interruption, for tests). device: for evaluation
    (default cuda when available). command: the command line, quoted in results.md.
    Raises ComputeMismatchError before training anything when the grid is not at equal compute.
    The output directory holds this grid's variant directories and report only (else OutputExists, unless
    `overwrite`) and has one writer at a time (`racedit.runlock`).
    """
    from accelerate import PartialState

    if not isinstance(grid, Grid):
        grid = load_grid(grid)
    out = Path(out_dir) if out_dir is not None else grid.out_dir
    check_output_dir(out, [*(v.name for v in grid.variants), *REPORT_FILES], overwrite=overwrite,
                     what=f"grid {grid.name!r}'s variants and report")
    with lock_on_main(PartialState(), out, "ablate --out"):
        return _run_grid(grid, out, extra, only, stop_after, device, command, report, log)


def _run_grid(grid: Grid, out: Path, extra: list[str] | None, only: list[str] | None, stop_after: int | None,
              device: str | None, command: str | None, report: bool, log) -> GridResult:
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    configs = resolve_variants(grid, out, extra)
    accounting = {name: variant_accounting(cfg) for name, cfg in configs.items()}
    check_compute(grid, accounting)
    for name in only or []:
        grid.variant(name)
    t_grid = time.perf_counter()
    status: dict[str, str] = {}
    diverged: dict[str, str] = {}  # variant -> why: reported, and the grid goes on with the next variant
    rows: list[dict] = []
    out.mkdir(parents=True, exist_ok=True)
    for v in grid.variants:
        cfg = configs[v.name]
        run_dir = Path(cfg.train.out_dir)
        done = run_dir / "done.json"
        fingerprint = {"config": to_yaml(cfg), "eval": vars(grid.eval)}
        if done.exists():
            saved = json.loads(done.read_text())
            changed = _fingerprint_changes(saved.get("fingerprint", {}), fingerprint)
            if changed:
                raise GridError(f"variant {v.name!r}: {done} was made with another config or evaluation "
                                f"({'; '.join(changed[:5])}); delete {run_dir} to retrain it, or choose "
                                f"another --out")
            status[v.name] = "skipped"
            rows.append(_finished_row(grid, v, accounting[v.name], run_dir, saved["results"]))
            log(f"[{grid.name}] {v.name}: finished earlier, skipped")
            continue
        if only and v.name not in only:
            continue
        marker = run_dir / DIVERGED
        if marker.exists():
            saved = json.loads(marker.read_text())
            if not _fingerprint_changes(saved.get("fingerprint", {}), fingerprint):
                status[v.name], diverged[v.name] = "diverged", saved["message"]
                log(f"[{grid.name}] {v.name}: diverged earlier ({saved['message']}); delete {marker} to retry")
                continue
            marker.unlink()  # made with another config: this one gets its own attempt
        previous = latest_checkpoint(run_dir / "checkpoints")
        status[v.name] = "resumed" if previous is not None else "trained"
        log(f"[{grid.name}] {v.name}: {'resuming from ' + previous.name if previous else 'training'} "
            f"({overrides_text(v.overrides) or 'base'})")
        t0 = time.perf_counter()
        train_cfg = replace(cfg, train=replace(cfg.train, eval_samples_per_class=0))  # the runner evaluates
        try:
            result = train(train_cfg, resume=True, stop_after=stop_after, evaluate=evaluate_digits_model)
        except TrainingDiverged as e:
            message = str(e).splitlines()[0]
            status[v.name], diverged[v.name] = "diverged", message
            log(f"[{grid.name}] {v.name}: diverged ({message}); going on with the next variant")
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(marker, json.dumps(json_safe({"fingerprint": fingerprint, "message": message}), indent=1))
            continue
        if result.step < cfg.train.steps:
            status[v.name] = "incomplete"
            log(f"[{grid.name}] {v.name}: stopped at step {result.step} of {cfg.train.steps}; run again to resume")
            continue
        t_train = time.perf_counter() - t0
        results = _evaluate(grid, cfg, result.checkpoint, run_dir, device)
        results["resumed_from_step"] = step_of(previous) or 0
        results["this_call_seconds"] = time.perf_counter() - t0
        results = json_safe(results)
        row = _finished_row(grid, v, accounting[v.name], run_dir, results)
        log(f"[{grid.name}] {v.name}: {grid.metric}={format_number(row.get(grid.metric))} "
            f"final loss {row['final_loss']:.4f} train {t_train:.0f}s")
        record = json_safe({"fingerprint": fingerprint, "results": results, "row": row})
        atomic_write_text(done, json.dumps(record, indent=1, allow_nan=False))
        rows.append(row)
    result = GridResult(out_dir=out, rows=rows, status=status, seconds=time.perf_counter() - t_grid,
                        diverged=diverged)
    if report and rows:
        result.files = write_report(grid, rows, out, configs, command=command,
                                    pending=[v.name for v in grid.variants if status.get(v.name) not in
                                             ("skipped", "trained", "resumed", "diverged")],
                                    diverged=diverged)
        log(f"[{grid.name}] {len(rows)} of {len(grid.variants)} variants finished; "
            f"report in {result.files['md']}")
    return result
