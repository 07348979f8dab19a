"""The ablation runner behind `eval/ablate.py`: one grid file -> trained variants, a table and plots.

A grid file (YAML) names a base config and its variants:

```yaml
name: routing                      # used in titles and the default output directory runs/ablations/<name>
base: ../demo.yaml                 # the base config, relative to this file (or to the working directory)
overrides: {model.depth: 3}        # applied to every variant (mapping or list of "a.b=c")
variants:                          # named override sets ...
  - {name: token_choice, overrides: {model.routing: token_choice}, reference: 9.50}
axes:                              # ... and/or a product of override axes (variants first, then the product)
  model.gating: [identity, sigmoid, softmax]           # scalar entries: the axis name is the config key
  size: [{name: 1in4, overrides: {model.moe_k: 1, model.moe_experts: 4}}]   # or named override sets
eval: {kind: digits, samples_per_class: 50}   # digits | fid (latents) | none (losses only); see EvalSpec
metric: digits_fd                  # main metric; the table is sorted by it (lower is better unless metric_mode: max)
baseline: token_choice             # the comparison column is relative to this variant (default: the first)
mac_tolerance: 0.05                # refuse when activated MACs differ by more than this fraction ...
allow_compute_mismatch: false      # ... unless this is true
references: {token_choice: 9.50}   # the paper's number per variant (also `reference:` in a variant), shown
reference_label: paper FID         # ... beside the results under this column title
```

Fairness. Every variant trains from the same resolved base: same seed (so the same data order, timesteps,
noise and label-dropout masks step for step), steps, batch and schedule, and is evaluated the same way.
A variant may not override the keys in `FIXED_KEYS` (seed, steps, batch, data, sampling, logging);
set those for the whole grid in `overrides`. Before anything trains the runner builds every variant's
model and refuses, naming the variants, when their activated MACs per image differ by more than
`mac_tolerance` (`ComputeMismatchError`).

Resumability. Variant v lives in `<out>/<v>/` (a normal run directory: checkpoints, metrics.csv, config.yaml).
Training uses `train(cfg, resume=True)`, so an interrupted variant continues from its last checkpoint
(bit for bit on CPU). After evaluation `<out>/<v>/done.json` holds the variant's results row and its
resolved config; a rerun skips a variant with a done.json whose config matches, and refuses one whose
config changed (delete the variant directory to retrain it). A skipped variant's row is rebuilt from its metrics.csv and
the evaluation results in done.json. A variant whose training diverges (`TrainingDiverged`) gets
`<out>/<v>/diverged.json` with the reason; the grid goes on with the next variant, results.md lists it
under "Diverged", and reruns skip it while its config is unchanged (delete diverged.json to retry).

Outputs in `<out>/`: `results.csv` (every recorded column), `results.md` (the table sorted by the main
metric, with the comparison columns), `loss_curves.png` (smoothed training loss of every variant on one
axis) and `metric_vs_macs.png` (main metric against activated MACs per image).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from racedit.config import Config, ConfigError, load_config, to_yaml
from racedit.fileio import atomic_write_text

__all__ = [
    "GridError",
    "ComputeMismatchError",
    "Variant",
    "EvalSpec",
    "Grid",
    "GridResult",
    "FIXED_KEYS",
    "load_grid",
    "resolve_variants",
    "variant_accounting",
    "check_compute",
    "config_diff",
    "read_metrics",
    "smooth",
    "routing_columns",
    "run_grid",
    "write_report",
    "main",
]


class GridError(ValueError):
    """A bad grid file or an unfair comparison; the message names the key or the variants."""


class ComputeMismatchError(GridError):
    """Variants whose activated MACs per image differ by more than the grid's tolerance."""


# Keys a variant may not override: they define the shared budget, data order and evaluation.
FIXED_KEYS = ("train.seed", "train.steps", "train.global_batch", "train.grad_accum", "train.out_dir",
              "train.log_every", "train.eval_samples_per_class", "data.", "sample.")
GRID_KEYS = ("name", "description", "base", "out_dir", "overrides", "variants", "axes", "eval", "metric",
             "metric_mode", "baseline", "mac_tolerance", "allow_compute_mismatch", "smoothing",
             "reference_label", "references")
EVAL_KINDS = ("digits", "fid", "none")
# Metric -> whether higher is better (anything not listed is lower-is-better, like FID and losses).
HIGHER_IS_BETTER = {"sample_class_accuracy": True, "inception_score": True, "precision": True, "recall": True}
DEFAULT_METRIC = {"digits": "digits_fd", "fid": "fid", "none": "final_loss"}
DIVERGED = "diverged.json"  # in a variant's run dir: it diverged with this config; skipped until deleted
# metrics.csv columns that look like routing diagnostics (names vary: read from the header).
_ROUTING_NAME = re.compile(r"routing|router|maxvio|comb|expert|threshold|tau|load|balance", re.IGNORECASE)
_PER_LAYER = re.compile(r"block_?\d+|t_bin|layer_?\d+", re.IGNORECASE)
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


@dataclass
class Variant:
    """One named set of overrides (`a.b=c` strings) and the paper's number for it, if the grid gives one."""

    name: str
    overrides: list[str]
    reference: float | None = None


@dataclass
class EvalSpec:
    """How every variant is evaluated.

    kind: digits (sample class accuracy + digits FD, racedit.evaluation.demo) | fid (FID of latent models via
    racedit.evaluation.fid against `ref`) | none (losses only). samples_per_class: digits samples per class
    (default: the base config's train.eval_samples_per_class, else 50). fid: num_samples, ref (ADM reference
    npz or racedit stats), inception (local weights path; empty = torch-fidelity's download), batch_size,
    precision_recall. Sampling uses the resolved `sample:` section (set it in the grid's overrides).
    """

    kind: str = "digits"
    samples_per_class: int | None = None
    num_samples: int = 10000
    ref: str = ""
    inception: str = ""
    batch_size: int = 64
    precision_recall: bool = False

    def describe(self) -> str:
        if self.kind == "digits":
            return f"digits: sample class accuracy and digits FD of {self.samples_per_class} samples per class"
        if self.kind == "fid":
            return f"FID-{self.num_samples} against {self.ref or '(no reference)'}"
        return "no sampling (losses only)"


@dataclass
class Grid:
    """A loaded grid file (see the module docstring)."""

    name: str
    path: Path | None
    base: Path | None
    overrides: list[str]
    variants: list[Variant]
    eval: EvalSpec
    metric: str
    higher_is_better: bool
    baseline: str
    mac_tolerance: float = 0.05
    allow_compute_mismatch: bool = False
    smoothing: float = 0.9
    out_dir: Path = Path("runs/ablations")
    description: str = ""
    reference_label: str = "paper"

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise GridError(f"grid {self.name!r} has no variant {name!r}; variants: {[v.name for v in self.variants]}")


@dataclass
class GridResult:
    """What `run_grid` did: the rows of the finished variants, each variant's status, the files written."""

    out_dir: Path
    rows: list[dict]
    status: dict[str, str]  # variant -> "trained" | "resumed" | "skipped" | "incomplete" | "diverged"
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    diverged: dict[str, str] = field(default_factory=dict)  # variant -> the divergence message


# ----------------------------------------------------------------------------------------------- grid files


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _override_list(value: Any, where: str) -> list[str]:
    """A mapping {a.b: c} or a list of "a.b=c" strings -> ["a.b=c", ...]."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{k}={_format_value(v)}" for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(x, str) and "=" in x for x in value):
        return list(value)
    raise GridError(f"{where}: overrides must be a mapping of config keys to values or a list of 'a.b=c' "
                    f"strings, got {value!r}")


def _override_keys(overrides: list[str]) -> list[str]:
    return [o.split("=", 1)[0].strip() for o in overrides]


def _check_name(name: Any, where: str) -> str:
    name = str(name)
    if not _VARIANT_NAME.match(name):
        raise GridError(f"{where}: variant name {name!r} must be a plain file name "
                        f"(letters, digits and . _ + = -, not starting with a symbol)")
    return name


def _parse_variant(entry: Any, where: str) -> Variant:
    if not isinstance(entry, dict) or "name" not in entry:
        raise GridError(f"{where}: each variant must be a mapping with 'name' and 'overrides', got {entry!r}")
    unknown = sorted(set(entry) - {"name", "overrides", "reference"})
    if unknown:
        raise GridError(f"{where}: unknown variant key(s) {unknown}; allowed: ['name', 'overrides', 'reference']")
    name = _check_name(entry["name"], where)
    ref = entry.get("reference")
    return Variant(name, _override_list(entry.get("overrides"), f"{where} ({name})"),
                   None if ref is None else float(ref))


def _axis_entries(axis: str, values: Any, where: str) -> list[Variant]:
    if not isinstance(values, list) or not values:
        raise GridError(f"{where}: axis {axis!r} must be a non-empty list of values or of named override sets")
    out = []
    for value in values:
        if isinstance(value, dict):
            out.append(_parse_variant(value, f"{where}, axis {axis!r}"))
        else:
            if "." not in axis:
                raise GridError(f"{where}: axis {axis!r} has plain values, so its name must be a config key "
                                f"(e.g. model.gating); or give entries as {{name, overrides}}")
            out.append(Variant(_check_name(value, f"{where}, axis {axis!r}"), [f"{axis}={_format_value(value)}"]))
    return out


def _product(axes: dict, where: str) -> list[Variant]:
    if not isinstance(axes, dict) or not axes:
        raise GridError(f"{where}: 'axes' must be a mapping of axis name -> list")
    lists = [_axis_entries(str(axis), values, where) for axis, values in axes.items()]
    return [Variant("-".join(v.name for v in combo), [o for v in combo for o in v.overrides])
            for combo in itertools.product(*lists)]


def _find_base(base: str, grid_path: Path | None) -> Path:
    p = Path(base)
    candidates = [p] if p.is_absolute() else ([grid_path.parent / p] if grid_path else []) + [Path.cwd() / p]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise GridError(f"base config {base!r} not found (looked at {', '.join(str(c) for c in candidates)})")


def parse_grid(spec: dict, path: Path | None = None) -> Grid:
    """A grid from its parsed YAML mapping; `path` resolves a relative base config."""
    where = str(path) if path else "grid"
    if not isinstance(spec, dict):
        raise GridError(f"{where}: a grid file must be a mapping with keys {list(GRID_KEYS)}")
    unknown = sorted(set(spec) - set(GRID_KEYS))
    if unknown:
        raise GridError(f"{where}: unknown key(s) {unknown}; allowed: {list(GRID_KEYS)}")
    name = _check_name(spec.get("name") or (path.stem if path else "grid"), where)
    variants = [_parse_variant(v, f"{where}, variants[{i}]") for i, v in enumerate(spec.get("variants") or [])]
    if spec.get("axes") is not None:
        variants += _product(spec["axes"], where)
    if not variants:
        raise GridError(f"{where}: no variants (give 'variants' and/or 'axes')")
    names = [v.name for v in variants]
    refs = spec.get("references") or {}
    if not isinstance(refs, dict) or sorted(set(refs) - set(names)):
        raise GridError(f"{where}: 'references' must map variant names to numbers; unknown names: "
                        f"{sorted(set(refs) - set(names)) if isinstance(refs, dict) else refs!r}")
    variants = [replace(v, reference=float(refs[v.name])) if v.name in refs else v for v in variants]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise GridError(f"{where}: duplicate variant names {dupes}")
    for v in variants:
        fixed = [k for k in _override_keys(v.overrides) if any(k == f or (f.endswith(".") and k.startswith(f))
                                                             for f in FIXED_KEYS)]
        if fixed:
            raise GridError(f"{where}: variant {v.name!r} overrides {fixed}, which every variant must share "
                            f"(seed, steps, batch, data, sampling, logging); set them in the grid's 'overrides'")
    ev = spec.get("eval") or {}
    if not isinstance(ev, dict):
        raise GridError(f"{where}: 'eval' must be a mapping")
    eval_keys = [f for f in EvalSpec.__dataclass_fields__]
    bad = sorted(set(ev) - set(eval_keys))
    if bad:
        raise GridError(f"{where}: unknown eval key(s) {bad}; allowed: {eval_keys}")
    espec = EvalSpec(**ev)
    if espec.kind not in EVAL_KINDS:
        raise GridError(f"{where}: eval.kind {espec.kind!r}; allowed: {list(EVAL_KINDS)}")
    metric = str(spec.get("metric") or DEFAULT_METRIC[espec.kind])
    mode = spec.get("metric_mode")
    if mode not in (None, "min", "max"):
        raise GridError(f"{where}: metric_mode {mode!r}; allowed: ['min', 'max']")
    higher = HIGHER_IS_BETTER.get(metric, False) if mode is None else mode == "max"
    baseline = str(spec.get("baseline") or variants[0].name)
    if baseline not in names:
        raise GridError(f"{where}: baseline {baseline!r} is not a variant; variants: {names}")
    tol = float(spec.get("mac_tolerance", 0.05))
    smoothing = float(spec.get("smoothing", 0.9))
    if tol < 0 or not 0 <= smoothing < 1:
        raise GridError(f"{where}: need mac_tolerance >= 0 and 0 <= smoothing < 1, got {tol}, {smoothing}")
    base = _find_base(str(spec["base"]), path) if spec.get("base") else None
    return Grid(name=name, path=path.resolve() if path else None, base=base,
                overrides=_override_list(spec.get("overrides"), f"{where}: overrides"), variants=variants,
                eval=espec, metric=metric, higher_is_better=higher, baseline=baseline, mac_tolerance=tol,
                allow_compute_mismatch=bool(spec.get("allow_compute_mismatch", False)), smoothing=smoothing,
                out_dir=Path(spec.get("out_dir") or f"runs/ablations/{name}"),
                description=str(spec.get("description") or ""),
                reference_label=str(spec.get("reference_label") or "paper"))


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file (see the module docstring); raises GridError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise GridError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_grid(spec, path)


def resolve_variants(grid: Grid, out_dir: str | Path | None = None, extra: list[str] | None = None
                     ) -> dict[str, Config]:
    """Variant name -> its validated Config: base file, grid overrides, `extra` (command-line `--set`),
    the variant's overrides, then train.out_dir = <out>/<variant> and the grid's digits sample count."""
    out = Path(out_dir) if out_dir is not None else grid.out_dir
    common = [*grid.overrides, *(extra or [])]
    resolved = {}
    for v in grid.variants:
        own = [f"train.out_dir={out / v.name}"]
        if grid.eval.kind == "digits" and grid.eval.samples_per_class is not None:
            own.append(f"train.eval_samples_per_class={grid.eval.samples_per_class}")
        try:
            cfg = load_config(grid.base, [*common, *v.overrides, *own])
        except ConfigError as e:
            raise GridError(f"grid {grid.name!r}, variant {v.name!r}: {e}") from None
        if grid.eval.kind == "digits" and grid.eval.samples_per_class is None and not cfg.train.eval_samples_per_class:
            cfg.train.eval_samples_per_class = 50
        _check_routing_shape(cfg, v.name)
        resolved[v.name] = cfg
    return resolved


def _check_routing_shape(cfg: Config, name: str) -> None:
    """Fail before training when a strategy cannot select a whole number of pairs for the training batch."""
    from racedit.models import resolve_model_config
    from racedit.models.routing import group_layout

    m = resolve_model_config(cfg.model)
    if not m.moe_experts:
        return
    tokens = (m.input_size // m.patch_size) ** 2
    micro = cfg.train.global_batch // cfg.train.grad_accum
    try:
        group_layout(m.routing, micro, tokens, m.moe_experts, m.moe_k)
    except ValueError as e:
        raise GridError(f"variant {name!r}: {e}") from None


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def config_diff(a: Config, b: Config) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (value in a, value in b) for every field where two resolved configs differ."""
    fa, fb = _flatten(yaml.safe_load(to_yaml(a))), _flatten(yaml.safe_load(to_yaml(b)))
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


# ----------------------------------------------------------------------------------------------- accounting


def variant_accounting(cfg: Config) -> dict[str, int]:
    """Parameter counts (racedit's "all" and Race-DiT's "paper" convention) and MACs per image of a variant."""
    import torch

    from racedit.models import count_macs, count_params, create_model

    with torch.device("meta"):
        model = create_model(cfg.model)
    n, paper = count_params(model), count_params(model, convention="paper")
    return {"params_total": n["total"], "params_activated": n["activated"], "paper_params_total": paper["total"],
            "paper_params_activated": paper["activated"], "macs": int(count_macs(model))}


def check_compute(grid: Grid, accounting: dict[str, dict]) -> None:
    """Raise ComputeMismatchError naming the variants whose activated MACs per image exceed the smallest
    variant's by more than `grid.mac_tolerance`, unless the grid sets `allow_compute_mismatch: true`."""
    if grid.allow_compute_mismatch or len(accounting) < 2:
        return
    macs = {name: a["macs"] for name, a in accounting.items()}
    low_name = min(macs, key=macs.get)
    low = macs[low_name]
    over = {n: m for n, m in macs.items() if m > low * (1 + grid.mac_tolerance)}
    if over:
        listed = ", ".join(f"{n} ({m / 1e6:.3f}M, {100 * (m / low - 1):+.1f}%)" for n, m in over.items())
        raise ComputeMismatchError(
            f"grid {grid.name!r}: activated MACs per image differ by more than {100 * grid.mac_tolerance:g}%: "
            f"{listed} vs {low_name} ({low / 1e6:.3f}M). Such variants do not compare at equal compute. Make "
            f"them match, raise mac_tolerance, or set 'allow_compute_mismatch: true' in the grid to compare anyway.")


# ----------------------------------------------------------------------------------------------- metrics.csv


def read_metrics(run_dir: str | Path) -> tuple[list[str], list[dict[str, float]]]:
    """(header, rows) of a run's metrics.csv, values as floats (empty cells left out)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return [], []
    with path.open() as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = []
        for r in reader:
            row = {}
            for k, v in r.items():
                if k is None or v in (None, ""):
                    continue
                with contextlib.suppress(ValueError):
                    row[k] = float(v)
            rows.append(row)
    return header, rows


def loss_column(header: list[str]) -> str:
    """The diffusion loss column: "loss/diffusion" when auxiliary losses are on (then "loss" is the total)."""
    return "loss/diffusion" if "loss/diffusion" in header else "loss"


def loss_curve(rows: list[dict], column: str) -> tuple[list[float], list[float]]:
    """(steps, values) of a metrics.csv column over its training rows."""
    pts = [(r["step"], r[column]) for r in rows if column in r and "step" in r and math.isfinite(r[column])]
    return [p[0] for p in pts], [p[1] for p in pts]


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard-style bias-corrected exponential moving average (weight 0 = no smoothing)."""
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg = weight * avg + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(avg / norm if norm else v)
    return out


def routing_columns(header: list[str], per_layer: bool = False) -> list[str]:
    """metrics.csv columns that look like routing diagnostics (not losses, not eval); aggregated ones only
    unless `per_layer`."""
    return [c for c in header if _ROUTING_NAME.search(c) and not c.startswith(("loss", "eval/"))
            and (per_layer or not _PER_LAYER.search(c))]


def _last_values(rows: list[dict], columns: list[str]) -> dict[str, float]:
    out = {}
    for c in columns:
        for r in reversed(rows):
            if c in r:
                out[c] = r[c]
                break
    return out


def _train_seconds(rows: list[dict]) -> float:
    """Training time from the logged throughput: sum over rows of steps since the previous row / steps_per_s
    (survives interruptions: the rows of a resumed run describe one continuous run)."""
    total, prev = 0.0, 0.0
    for r in rows:
        if "steps_per_s" in r and "step" in r and r["steps_per_s"] > 0:
            total += (r["step"] - prev) / r["steps_per_s"]
            prev = r["step"]
    return total


# ----------------------------------------------------------------------------------------------- running


def _evaluate(grid: Grid, cfg: Config, checkpoint: Path, run_dir: Path, device: str) -> dict:
    if grid.eval.kind == "none":
        return {}
    from racedit.sampling import load_for_sampling

    loaded = load_for_sampling(checkpoint, use_ema=True, device=device)
    if grid.eval.kind == "digits":
        from racedit.evaluation.demo import evaluate_digits_model

        return evaluate_digits_model(cfg, loaded.model, loaded.objective, device)
    from racedit.evaluation.fid import EvalSettings, evaluate, save_report
    from racedit.sampling import write_samples_npz

    t0 = time.perf_counter()
    npz = write_samples_npz(loaded, grid.eval.num_samples, run_dir / "samples.npz", cfg.sample,
                            seed=cfg.train.seed, batch_size=grid.eval.batch_size, progress=False)
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
    row = {"variant": v.name, "overrides": " ".join(v.overrides),
           "final_loss": losses[-1] if losses else math.nan,
           "final_loss_smoothed": smoothed[-1] if smoothed else math.nan,
           "final_total_loss": _last_values(train_rows, ["loss"]).get("loss", math.nan),
           "steps": int(steps[-1]) if steps else 0,
           "skipped_steps": int(_last_values(train_rows, ["skipped_steps"]).get("skipped_steps", 0)),
           "train_seconds": _train_seconds(train_rows), **accounting}
    aux = [c for c in header if c.startswith("loss/") and c != "loss/diffusion"]
    row.update({f"final_{c.replace('/', '_')}": val for c, val in _last_values(train_rows, aux).items()})
    row.update(_last_values(train_rows, routing_columns(header)))
    if v.reference is not None:
        row["reference"] = v.reference
    return row


def _fingerprint_changes(saved: dict, now: dict) -> list[str]:
    """What differs between a done.json fingerprint and the current one, as "key: then -> now" strings.

    Config fields added to racedit after the variant finished are ignored while they hold their default
    value, and fields since removed are ignored, so a library upgrade does not invalidate finished work.
    """
    then = _flatten(yaml.safe_load(saved.get("config") or "{}") or {})
    current = _flatten(yaml.safe_load(now["config"]))
    default = _flatten(yaml.safe_load(to_yaml(Config())))
    out = [f"{k}: {then[k]!r} -> {current[k]!r}" for k in sorted(set(then) & set(current)) if then[k] != current[k]]
    out += [f"{k}: (absent) -> {current[k]!r}" for k in sorted(set(current) - set(then))
            if current[k] != default.get(k)]
    ev_then, ev_now = saved.get("eval") or {}, now["eval"]
    out += [f"eval.{k}: {ev_then.get(k)!r} -> {ev_now.get(k)!r}" for k in sorted(set(ev_then) | set(ev_now))
            if k in ev_then and k in ev_now and ev_then[k] != ev_now[k]]
    return out


def _step_of(checkpoint: Path | None) -> int:
    m = re.fullmatch(r"step_(\d+)", checkpoint.name) if checkpoint is not None else None
    return int(m.group(1)) if m else 0


def _finished_row(grid: Grid, v: Variant, accounting: dict, run_dir: Path, results: dict) -> dict:
    """A finished variant's row: recomputed from its metrics.csv (so report changes need no retraining) plus
    the evaluation results stored in done.json."""
    row = _variant_row(grid, v, accounting, run_dir)
    row.update(results)
    row["wall_seconds"] = row["train_seconds"] + float(results.get("eval_seconds") or 0.0)
    return {k: _jsonable(x) for k, x in row.items()}


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def run_grid(grid: Grid | str | Path, out_dir: str | Path | None = None, extra: list[str] | None = None,
             only: list[str] | None = None, stop_after: int | None = None, device: str | None = None,
             command: str | None = None, report: bool = True, log=print) -> GridResult:
    """Train and evaluate every variant of `grid` (a Grid or a grid file) and write the report.

    out_dir: default the grid's out_dir. extra: `a.b=c` overrides for every variant (command-line `--set`).
    only: run just these variants (the report covers every finished one). stop_after: train each variant
    for at most this many steps in this call (an interruption, for tests). device: for evaluation
    (default cuda when available). command: the command line, quoted in results.md.
    Raises ComputeMismatchError before training anything when the grid is not at equal compute.
    """
    import torch

    from racedit.training.checkpoint import latest_checkpoint
    from racedit.training.loop import TrainingDiverged, train

    if not isinstance(grid, Grid):
        grid = load_grid(grid)
    out = Path(out_dir) if out_dir is not None else grid.out_dir
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
            f"({' '.join(v.overrides) or 'base'})")
        t0 = time.perf_counter()
        train_cfg = replace(cfg, train=replace(cfg.train, eval_samples_per_class=0))  # the runner evaluates
        try:
            result = train(train_cfg, resume=True, stop_after=stop_after)
        except TrainingDiverged as e:
            message = str(e).splitlines()[0]
            status[v.name], diverged[v.name] = "diverged", message
            log(f"[{grid.name}] {v.name}: diverged ({message}); going on with the next variant")
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(marker, json.dumps({"fingerprint": fingerprint, "message": message}, indent=1))
            continue
        if result.step < cfg.train.steps:
            status[v.name] = "incomplete"
            log(f"[{grid.name}] {v.name}: stopped at step {result.step} of {cfg.train.steps}; run again to resume")
            continue
        t_train = time.perf_counter() - t0
        results = _evaluate(grid, cfg, result.checkpoint, run_dir, device)
        results["resumed_from_step"] = _step_of(previous)
        results["this_call_seconds"] = time.perf_counter() - t0
        results = {k: _jsonable(x) for k, x in results.items()}
        row = _finished_row(grid, v, accounting[v.name], run_dir, results)
        log(f"[{grid.name}] {v.name}: {grid.metric}={_fmt(row.get(grid.metric))} "
            f"final loss {row['final_loss']:.4f} train {t_train:.0f}s")
        atomic_write_text(done, json.dumps({"fingerprint": fingerprint, "results": results, "row": row}, indent=1))
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


# ----------------------------------------------------------------------------------------------- report


def _sort_rows(grid: Grid, rows: list[dict]) -> list[dict]:
    def key(r):
        m = r.get(grid.metric)
        if m is None or not math.isfinite(m):
            return (1, 0.0)
        return (0, -m if grid.higher_is_better else m)

    return sorted(rows, key=key)


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _short(col: str) -> str:
    return col.split("/", 1)[-1] if col.startswith("routing/") else col


def write_report(grid: Grid, rows: list[dict], out_dir: str | Path, configs: dict[str, Config] | None = None,
                 command: str | None = None, pending: list[str] | None = None,
                 diverged: dict[str, str] | None = None) -> dict[str, Path]:
    """results.csv, results.md and the two PNGs for the finished `rows` (results.md also names the
    `pending` variants and the `diverged` ones with their reason); returns their paths."""
    out = Path(out_dir)
    rows = _sort_rows(grid, rows)
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    csv_path = out / "results.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows([{k: ("" if r.get(k) is None else r.get(k)) for k in columns} for r in rows])
    files = {"csv": csv_path}
    files["loss_png"] = plot_loss_curves(grid, [r["variant"] for r in rows], out)
    files["macs_png"] = plot_metric_vs_macs(grid, rows, out)
    md = out / "results.md"
    md.write_text(_markdown(grid, rows, configs, command, pending or [], diverged or {}))
    files["md"] = md
    return files


def _markdown(grid: Grid, rows: list[dict], configs: dict[str, Config] | None, command: str | None,
              pending: list[str], diverged: dict[str, str]) -> str:
    base = next((r for r in rows if r["variant"] == grid.baseline), None)
    m = grid.metric
    better = "higher is better" if grid.higher_is_better else "lower is better"
    extra_metrics = [c for c in ("sample_class_accuracy", "digits_fd", "fid", "inception_score", "precision",
                                 "recall") if c != m and any(c in r for r in rows)]
    routing = [c for c in dict.fromkeys(c for r in rows for c in r)
               if _ROUTING_NAME.search(c) and not c.startswith(("loss", "final_", "paper_", "overrides"))
               and c not in ("variant",)]
    has_ref = any(r.get("reference") is not None for r in rows)
    head = ["#", "variant", f"**{m}** ({better})", f"Δ vs {grid.baseline}", *extra_metrics,
            "final loss (smoothed)", "activated / total params", "paper-convention act. / total", "MACs/img",
            "train s", *[_short(c) for c in routing]]
    if has_ref:
        head.append(grid.reference_label)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows, 1):
        delta = "–"
        if base is not None and r.get(m) is not None and base.get(m) is not None and r is not base:
            d = r[m] - base[m]
            rel = f" ({100 * d / base[m]:+.1f}%)" if base[m] else ""
            delta = f"{d:+.3g}{rel}"
        elif r is base:
            delta = "baseline"
        cells = [str(i), f"`{r['variant']}`", f"**{_fmt(r.get(m))}**", delta,
                 *[_fmt(r.get(c)) for c in extra_metrics], _fmt(r.get("final_loss_smoothed")),
                 f"{_human(r['params_activated'])} / {_human(r['params_total'])}",
                 f"{_human(r['paper_params_activated'])} / {_human(r['paper_params_total'])}",
                 _human(r["macs"]), f"{r.get('train_seconds', 0):.0f}", *[_fmt(r.get(c), 3) for c in routing]]
        if has_ref:
            cells.append(_fmt(r.get("reference")))
        lines.append("| " + " | ".join(cells) + " |")
    any_cfg = next(iter(configs.values())) if configs else None
    setup = []
    if any_cfg is not None:
        tc = any_cfg.train
        setup.append(f"{len(grid.variants)} variants, each {tc.steps} steps × batch {tc.global_batch}, seed "
                     f"{tc.seed}, lr {tc.lr:g}, EMA {tc.ema_decay:g}; evaluation: {grid.eval.describe()} "
                     f"({any_cfg.sample.sampler} {any_cfg.sample.steps} steps, CFG {any_cfg.sample.cfg_scale:g}, "
                     "EMA weights)")
    total_wall = sum(float(r.get("wall_seconds") or 0) for r in rows)
    text = [f"# Ablation grid `{grid.name}`", ""]
    if grid.description:
        text += [grid.description.strip(), ""]
    if command:
        text += ["```", command, "```", ""]
    text += [*setup, "",
             f"Sorted by `{m}` ({better}). Final loss: the diffusion loss (auxiliary terms excluded), smoothed "
             f"(EMA {grid.smoothing:g} over the logged rows). Params: racedit's count / Race-DiT's convention (block "
             f"weight matrices only); activated = what one token uses on average. MACs per image at mean k.",
             "", *lines, "",
             f"Grid time (train + eval, summed over variants): {total_wall / 60:.1f} min on {_machine()}.",
             "", "![training loss](loss_curves.png)", "", f"![{m} vs activated MACs](metric_vs_macs.png)", ""]
    if pending:
        text += [f"Not in this table (not run yet, or unfinished): {', '.join(pending)}.", ""]
    if diverged:
        text += ["Diverged, so not in this table (delete the run's `diverged.json` to retry):", "",
                 *[f"- `{name}`: {why}" for name, why in diverged.items()], ""]
    return "\n".join(text)


def _machine() -> str:
    import torch

    return (f"{platform.machine()} {os.cpu_count()} cores ({platform.processor() or platform.system()}), "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(grid: Grid, names: list[str], out_dir: str | Path) -> Path:
    """loss_curves.png: the smoothed diffusion loss of every variant against the step, on one (log) axis, with
    an inset zooming on the last 40% of training (where variants separate)."""
    plt = _pyplot()
    from matplotlib.ticker import FormatStrFormatter

    out = Path(out_dir)
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    inset = ax.inset_axes([0.42, 0.42, 0.56, 0.48])
    colors = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors
    last_lo, last_hi = math.inf, -math.inf
    for i, name in enumerate(names):
        header, rows = read_metrics(out / name)
        rows = [r for r in rows if "steps_per_s" in r]
        steps, values = loss_curve(rows, loss_column(header))
        if not steps:
            continue
        sm = smooth(values, grid.smoothing)
        color = colors[i % len(colors)]
        ax.plot(steps, sm, label=name, linewidth=1.2, color=color)
        tail = [(s, v) for s, v in zip(steps, sm) if s >= 0.6 * steps[-1]]
        inset.plot([t[0] for t in tail], [t[1] for t in tail], linewidth=1.0, color=color)
        last_lo, last_hi = min(last_lo, *(t[1] for t in tail)), max(last_hi, *(t[1] for t in tail))
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
    ax.tick_params(axis="y", which="minor", labelsize=6)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"diffusion loss (EMA-smoothed, {grid.smoothing:g})")
    ax.set_title(f"{grid.name}: training loss (inset: last 40% of steps, linear)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncol=2 if len(names) > 6 else 1)
    if math.isfinite(last_lo):
        pad = 0.05 * (last_hi - last_lo) or 1e-3
        inset.set_ylim(last_lo - pad, last_hi + pad)
    inset.tick_params(labelsize=6)
    inset.grid(True, alpha=0.3)
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_metric_vs_macs(grid: Grid, rows: list[dict], out_dir: str | Path) -> Path:
    """metric_vs_macs.png: the main metric of every variant against its activated MACs per image."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    pts = [(r["macs"] / 1e6, r.get(grid.metric), r["variant"]) for r in rows
           if r.get(grid.metric) is not None and math.isfinite(r[grid.metric])]
    colors = plt.get_cmap("tab10" if len(pts) <= 10 else "tab20").colors
    markers = "osD^vP*Xhp<>"
    for i, (x, y, name) in enumerate(pts):  # a legend, not annotations: equal-compute variants share one x
        ax.scatter([x], [y], s=30, color=colors[i % len(colors)], marker=markers[i % len(markers)],
                   label=f"{name} ({y:.4g})")
    ax.set_xlabel("activated MACs per image (M)")
    ax.set_ylabel(f"{grid.metric} ({'higher' if grid.higher_is_better else 'lower'} is better)")
    ax.set_title(f"{grid.name}: {grid.metric} vs compute")
    ax.ticklabel_format(useOffset=False)
    ax.grid(True, alpha=0.3)
    if pts:
        xs = [p[0] for p in pts]
        span = max(xs) - min(xs)
        pad = span * 0.15 if span > 0 else max(xs) * 0.05
        ax.set_xlim(min(xs) - pad, max(xs) + pad)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    path = Path(out_dir) / "metric_vs_macs.png"
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eval/ablate.py", description="Train and compare the variants of an ablation "
                                "grid; writes results.csv, results.md and PNG plots.")
    p.add_argument("--grid", required=True, help="grid YAML (configs/ablations/*.yaml)")
    p.add_argument("--out", default=None, help="output directory (default: the grid's out_dir)")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every variant (repeatable), e.g. --set data.latents=latents/in256")
    p.add_argument("--only", nargs="+", default=None, help="run only these variants")
    p.add_argument("--fid-ref", default=None, help="FID reference (overrides the grid's eval.ref)")
    p.add_argument("--device", default=None, help="evaluation device (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 is fastest for tiny "
                   "models on a busy CPU)")
    p.add_argument("--list", action="store_true", help="print the variants, their overrides and MACs; train nothing")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        grid = load_grid(args.grid)
        if args.fid_ref:
            grid.eval = replace(grid.eval, ref=args.fid_ref)
        if args.list:
            configs = resolve_variants(grid, args.out, args.extra)
            for name, cfg in configs.items():
                acc = variant_accounting(cfg)
                print(f"{name:28s} MACs {_human(acc['macs']):>7s}  act. params {_human(acc['params_activated']):>7s}"
                      f"  {' '.join(grid.variant(name).overrides)}")
            check_compute(grid, {n: variant_accounting(c) for n, c in configs.items()})
            return 0
        command = "python eval/ablate.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                               else sys.argv[1:]))
        result = run_grid(grid, args.out, args.extra, only=args.only, device=args.device, command=command)
    except (GridError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done = sum(s in ("skipped", "trained", "resumed") for s in result.status.values())
    lost = f", {len(result.diverged)} diverged ({', '.join(result.diverged)})" if result.diverged else ""
    print(f"{grid.name}: {done} of {len(grid.variants)} variants finished{lost} in {result.seconds / 60:.1f} min "
          f"-> {result.out_dir}")
    return 0
