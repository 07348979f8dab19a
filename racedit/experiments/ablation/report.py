"""The ablation report: results.csv, results.md (the table sorted by the main metric, with comparison
columns) and the plots (loss curves, main metric against activated MACs).
"""

from __future__ import annotations

import csv
import math
import os
import platform
import re
from pathlib import Path
from typing import Any

from racedit.config import Config
from racedit.experiments.ablation.grid import Grid
from racedit.training.metrics import loss_column, read_metrics

# metrics.csv columns that look like routing diagnostics (names vary: read from the header).
REPORT_FILES = ("results.csv", "results.md", "loss_curves.png", "metric_vs_macs.png")  # what write_report writes
_ROUTING_NAME = re.compile(r"routing|router|maxvio|comb|expert|threshold|tau|load|balance", re.IGNORECASE)
_PER_LAYER = re.compile(r"block_?\d+|t_bin|layer_?\d+", re.IGNORECASE)


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


def last_values(rows: list[dict], columns: list[str]) -> dict[str, float]:
    out = {}
    for c in columns:
        for r in reversed(rows):
            if c in r:
                out[c] = r[c]
                break
    return out


def train_seconds(rows: list[dict]) -> float:
    """Training time from the logged throughput: sum over rows of steps since the previous row / steps_per_s
    (survives interruptions: the rows of a resumed run describe one continuous run)."""
    total, prev = 0.0, 0.0
    for r in rows:
        if "steps_per_s" in r and "step" in r and r["steps_per_s"] > 0:
            total += (r["step"] - prev) / r["steps_per_s"]
            prev = r["step"]
    return total

# ----------------------------------------------------------------------------------------------- report


def _sort_rows(grid: Grid, rows: list[dict]) -> list[dict]:
    def key(r):
        m = r.get(grid.metric)
        if m is None or not math.isfinite(m):
            return (1, 0.0)
        return (0, -m if grid.higher_is_better else m)

    return sorted(rows, key=key)


def format_number(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def human_count(n: float) -> str:
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
        cells = [str(i), f"`{r['variant']}`", f"**{format_number(r.get(m))}**", delta,
                 *[format_number(r.get(c)) for c in extra_metrics], format_number(r.get("final_loss_smoothed")),
                 f"{human_count(r['params_activated'])} / {human_count(r['params_total'])}",
                 f"{human_count(r['paper_params_activated'])} / {human_count(r['paper_params_total'])}",
                 human_count(r["macs"]), f"{r.get('train_seconds', 0):.0f}", *[format_number(r.get(c), 3) for c in routing]]
        if has_ref:
            cells.append(format_number(r.get("reference")))
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


