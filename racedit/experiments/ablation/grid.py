"""Ablation grids: the grid file, its variants, and the equal-compute check (the runner is
`racedit.experiments.ablation.run`, the table and plots `...report`).

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

import itertools
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from racedit.config import Config, ConfigError, load_config, parse_override, yaml_error_text
from racedit.models import count_macs, count_params, create_model, resolve_model_config
from racedit.models.routing import group_layout


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
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")

Overrides = list[tuple[str, Any]]  # (dotted config key, typed value) pairs, applied in order


def overrides_text(overrides: Overrides) -> str:
    """Overrides as `a.b=c` words, for tables and logs (values that are not strings in YAML/JSON form)."""
    return " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides)


@dataclass
class Variant:
    """One named set of overrides and the paper's number for it, if the grid gives one."""

    name: str
    overrides: Overrides
    reference: float | None = None


@dataclass
class EvalSpec:
    """How every variant is evaluated.

    kind: digits (sample class accuracy + digits FD, racedit.evaluation.digits) | fid (FID of latent models via
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
    overrides: Overrides
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


# ----------------------------------------------------------------------------------------------- grid files


def _override_list(value: Any, where: str) -> Overrides:
    """A mapping {a.b: c} (values kept as YAML typed them) or a list of "a.b=c" strings -> [(a.b, c), ...]."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [(str(k), v) for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(x, str) and "=" in x for x in value):
        try:
            return [parse_override(x) for x in value]
        except ConfigError as e:
            raise GridError(f"{where}: {e}") from None
    raise GridError(f"{where}: overrides must be a mapping of config keys to values or a list of 'a.b=c' "
                    f"strings, got {value!r}")


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
            out.append(Variant(_check_name(value, f"{where}, axis {axis!r}"), [(axis, value)]))
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
        fixed = [k for k, _ in v.overrides if any(k == f or (f.endswith(".") and k.startswith(f)) for f in FIXED_KEYS)]
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
    text = path.read_text()
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise GridError(yaml_error_text(e, str(path), text)) from None
    return parse_grid(spec, path)


def resolve_variants(grid: Grid, out_dir: str | Path | None = None, extra: list[str] | None = None
                     ) -> dict[str, Config]:
    """Variant name -> its validated Config: base file, grid overrides, `extra` (command-line `--set`
    `a.b=c` strings), the variant's overrides, then train.out_dir = <out>/<variant> and the grid's digits
    sample count."""
    out = Path(out_dir) if out_dir is not None else grid.out_dir
    common = [*grid.overrides, *(extra or [])]
    resolved = {}
    for v in grid.variants:
        own = [("train.out_dir", str(out / v.name))]
        if grid.eval.kind == "digits" and grid.eval.samples_per_class is not None:
            own.append(("train.eval_samples_per_class", grid.eval.samples_per_class))
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
    m = resolve_model_config(cfg.model)
    if not m.moe_experts:
        return
    tokens = (m.input_size // m.patch_size) ** 2
    micro = cfg.train.global_batch // cfg.train.grad_accum
    try:
        group_layout(m.routing, micro, tokens, m.moe_experts, m.moe_k)
    except ValueError as e:
        raise GridError(f"variant {name!r}: {e}") from None


# ----------------------------------------------------------------------------------------------- accounting


def variant_accounting(cfg: Config) -> dict[str, int]:
    """Parameter counts (racedit's "all" and Race-DiT's "paper" convention) and MACs per image of a variant."""
    import torch

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


