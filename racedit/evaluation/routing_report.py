"""Routing report of a checkpoint: expert-usage figures and a markdown summary (`racedit routing-report`).

    racedit routing-report --ckpt runs/x/checkpoints/last [--out dir]

The model (EMA weights by default, eval mode, so Expert Race selects with the learned per-layer threshold
and every sample is routed independently of its batch) runs over a fixed set of noised inputs: `per_class`
training examples of each of up to 10 classes, each noised with one fixed noise draw at `timesteps` evenly
spaced diffusion timesteps, with their class labels (no guidance). From the routing masks and the block
output norms in the side channel it writes:

| file | shows |
|---|---|
| `experts_per_token_vs_timestep.png` | mean experts per token against timestep, one line per layer group |
| `expert_load_heatmap.png` | load of each expert (relative to the layer's mean load) for each MoE layer |
| `allocation_per_class.png` | mean experts per token per class and MoE layer |
| `allocation_per_position.png` | mean experts per token per patch position, in timestep ranges |
| `block_output_norms.png` | norm of what each block's attention / feed-forward branch adds to the residual, against depth |
| `combination_usage.png` | cumulative share of expert-pair co-activations against the share of pairs (the Comb curve) |
| `summary.md` | the settings, a per-layer table (tau, experts/token, MaxVio, Comb, ...) and the figures |

Letters (docs/method/README.md): n_t report timesteps, B images, L tokens per image, E experts,
n_moe MoE layers.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from racedit.checkpoint import step_of
from racedit.config import ConfigError
from racedit.data.factory import build_training_data
from racedit.fileio import atomic_write_text
from racedit.models.records import ForwardRecord
from racedit.models.routing_stats import (
    co_activation,
    combination_curve,
    combination_usage_from_counts,
    expert_load,
    max_violation_from_load,
    timestep_fraction,
)
from racedit.outputs import check_output_dir, refuse_existing
from racedit.sampling import load_for_sampling

FIGURES = {
    "timestep": "experts_per_token_vs_timestep.png",
    "load": "expert_load_heatmap.png",
    "class": "allocation_per_class.png",
    "position": "allocation_per_position.png",
    "norms": "block_output_norms.png",
    "comb": "combination_usage.png",
}
SUMMARY = "summary.md"
REPORT_JOB = "report.json"  # the job a report was made for: checkpoint, weights, settings
REPORT_FORMAT = "racedit-routing-report/1"


@dataclass
class RoutingStats:
    """What the report's forward passes measured (numpy arrays)."""

    timesteps: np.ndarray  # (n_t,) objective times the inputs were noised at (ddpm: int steps; flow: [0, 1])
    t_frac: np.ndarray  # (n_t,) normalised timesteps in [0, 1], 0 = clean
    labels: np.ndarray  # (B,) class of each image
    counts: np.ndarray  # (n_t, n_moe, B, L) experts per token
    load: np.ndarray  # (n_moe, E) tokens per expert, summed over all passes
    co: np.ndarray  # (n_moe, E, E) co-activation counts, summed over all passes
    norms: np.ndarray  # (n_t, depth, 2) mean per-token norm of the attention / feed-forward branch output
    moe_blocks: list[int]  # block index of each MoE layer
    tau: np.ndarray  # (n_moe,) inference thresholds
    k: int  # experts per token on average in training
    num_experts: int
    grid: int  # tokens per image side (L = grid**2)
    time_label: str  # axis label for the timesteps
    input_source: str = ""  # where x0 came from
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------
# Inputs and forward passes
# --------------------------------------------------------------------------------------------------------


def report_classes(num_classes: int, max_classes: int = 10) -> list[int]:
    """All classes when there are at most `max_classes`, else `max_classes` evenly spaced ones."""
    if num_classes <= max_classes:
        return list(range(num_classes))
    return [int(round(i * (num_classes - 1) / (max_classes - 1))) for i in range(max_classes)]


def reference_inputs(cfg, classes: list[int], per_class: int, seed: int = 0) -> tuple[torch.Tensor | None, torch.Tensor, str]:
    """Clean inputs x0 (B, C, H, W) and labels (B,) from the run's training data: `per_class` examples of each
    class, chosen by a seeded permutation. When the data is not available here (latents not extracted on
    this machine), x0 is None and the caller uses zeros; the third item says which."""
    labels_out = torch.tensor([c for c in classes for _ in range(per_class)], dtype=torch.long)
    try:
        data = build_training_data(cfg)
    except (ConfigError, OSError) as e:
        warnings.warn(f"routing report: training data not available ({e}); using x0 = 0 (pure scaled noise)",
                      stacklevel=2)
        return None, labels_out, "zeros (training data not available)"
    all_labels = data.labels
    source = f"latents {cfg.data.latents}" if cfg.data.kind == "latents" else f"{cfg.data.kind} training split"
    g = torch.Generator().manual_seed(seed)
    chosen, labels = [], []
    for c in classes:
        members = (all_labels == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=g)][:per_class]
        chosen.append(members)
        labels += [c] * len(members)
    idx = torch.cat(chosen)
    if len(idx) == 0:
        return None, labels_out, "zeros (no training examples of the chosen classes)"
    return data.read(idx).float(), torch.tensor(labels, dtype=torch.long), source


def report_timesteps(objective, num: int) -> tuple[torch.Tensor, np.ndarray, str]:
    """`num` evenly spaced timesteps at bin centres: (objective times (n_t,), normalised (n_t,), axis label)."""
    centres = (np.arange(num) + 0.5) / num
    steps = getattr(objective, "num_timesteps", None)
    if steps:
        t = torch.tensor(np.minimum(np.round(centres * steps), steps - 1), dtype=torch.long)
        return t, timestep_fraction(objective, t).numpy(), f"DDPM timestep t (0 = clean, {steps - 1} = pure noise)"
    return torch.tensor(centres, dtype=torch.float32), centres, "flow time t (0 = clean, 1 = pure noise)"


@torch.no_grad()
def collect_routing_stats(model, objective, x0: torch.Tensor, labels: torch.Tensor, num_timesteps: int = 10,
                          seed: int = 0, batch_size: int = 64, progress: bool = False) -> RoutingStats:
    """Run `model` (put in eval mode) over x0 (B, C, H, W) noised at `num_timesteps` timesteps; one fixed
    noise draw per image, shared by all timesteps. Raises ValueError for a model without MoE layers."""
    model.eval()
    device = next(model.parameters()).device
    n = x0.shape[0]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    timesteps, t_frac, time_label = report_timesteps(objective, num_timesteps)
    counts, norms = [], []
    load = co = None
    blocks: list[int] = []
    for t in tqdm(timesteps, desc="routing report", disable=not progress):
        step_counts, step_norms = [], []
        for lo in range(0, n, batch_size):
            xb, nb = x0[lo:lo + batch_size].to(device), noise[lo:lo + batch_size].to(device)
            tb = t.repeat(len(xb)).to(device)
            record = ForwardRecord(diagnostics=True)
            model(objective.add_noise(xb, tb, nb.to(xb.dtype)), objective.model_time(tb), labels[lo:lo + len(xb)].to(device),
                  record=record)
            blocks = sorted(record.moe)
            if not blocks:
                raise ValueError("the model has no MoE layer: a routing report needs a MoE model (RaceDiT-*)")
            masks = [record.moe[i].mask for i in blocks]
            step_counts.append(torch.stack([m.sum(-1).view(len(xb), -1) for m in masks]).cpu())  # (n_moe, len(xb), L)
            batch_load = torch.stack([expert_load(m) for m in masks]).cpu()
            batch_co = torch.stack([co_activation(m) for m in masks]).cpu()
            load = batch_load if load is None else load + batch_load
            co = batch_co if co is None else co + batch_co
            step_norms.append(torch.stack([record.block_output_norms[i].float().cpu()
                                           for i in sorted(record.block_output_norms)]) * len(xb))
        counts.append(torch.cat(step_counts, dim=1))
        norms.append(torch.stack(step_norms).sum(0) / n)
    layers = [model.blocks[i].mlp for i in blocks]
    tau = np.array([float(getattr(m, "tau", math.nan)) for m in layers])
    L = counts[0].shape[-1]
    return RoutingStats(
        timesteps=timesteps.numpy(), t_frac=np.asarray(t_frac, dtype=np.float64), labels=labels.numpy(),
        counts=torch.stack(counts).double().numpy(), load=load.numpy(), co=co.numpy(),
        norms=torch.stack(norms).double().numpy(), moe_blocks=blocks, tau=tau, k=int(layers[0].k),
        num_experts=int(layers[0].num_experts), grid=int(round(L ** 0.5)), time_label=time_label)


# --------------------------------------------------------------------------------------------------------
# Figures (matplotlib's object API with the Agg canvas: no pyplot state, no display needed)
# --------------------------------------------------------------------------------------------------------


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def layer_groups(blocks: list[int], max_groups: int = 6) -> list[tuple[str, list[int]]]:
    """Consecutive MoE layers grouped into at most `max_groups` lines: [(label, positions in `blocks`)]."""
    n_moe = len(blocks)
    if n_moe <= max_groups:
        return [(f"block {b}", [i]) for i, b in enumerate(blocks)]
    edges = np.linspace(0, n_moe, max_groups + 1).round().astype(int)
    return [(f"blocks {blocks[a]}-{blocks[b - 1]}", list(range(a, b))) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def plot_experts_vs_timestep(stats: RoutingStats, path: Path) -> Path:
    fig, (ax,) = _figure(6.4, 4.2)
    per_layer = stats.counts.mean(axis=(2, 3))  # (n_t, n_moe)
    x = stats.timesteps
    for label, members in layer_groups(stats.moe_blocks):
        ax.plot(x, per_layer[:, members].mean(axis=1), marker="o", ms=3, label=label)
    ax.plot(x, per_layer.mean(axis=1), color="black", lw=2.2, label="mean over layers")
    ax.axhline(stats.k, color="grey", ls="--", lw=1, label=f"k = {stats.k} (training mean)")
    ax.set_xlabel(stats.time_label)
    ax.set_ylabel("experts per token (mean)")
    ax.set_title("Experts per token vs timestep (eval-mode routing)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path)
    return path


def plot_expert_load(stats: RoutingStats, path: Path) -> Path:
    relative = stats.load / np.maximum(stats.load.mean(axis=1, keepdims=True), 1e-12)  # (n_moe, E)
    n_moe, E = relative.shape
    fig, (ax,) = _figure(max(4.5, 0.35 * E + 2.5), max(3.0, 0.3 * n_moe + 1.8))
    im = ax.imshow(relative, aspect="auto", cmap="magma", vmin=0, interpolation="nearest")
    maxvio = max_violation_from_load(torch.from_numpy(stats.load)).numpy()
    ax.set_yticks(range(n_moe), [f"block {b} (MaxVio {v:.2f})" for b, v in zip(stats.moe_blocks, maxvio)], fontsize=7)
    ax.set_xticks(range(E), [str(e) for e in range(E)], fontsize=7 if E <= 32 else 5)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title("Expert load per layer\n(all timesteps, classes and tokens)")
    fig.colorbar(im, ax=ax, label="tokens routed / mean over experts")
    fig.savefig(path)
    return path


def plot_allocation_per_class(stats: RoutingStats, path: Path) -> Path:
    classes = sorted(set(stats.labels.tolist()))
    per_image = stats.counts.mean(axis=(0, 3))  # (n_moe, B)
    table = np.stack([per_image[:, stats.labels == c].mean(axis=1) for c in classes])  # (classes, n_moe)
    fig, (ax,) = _figure(max(4.5, 0.4 * len(stats.moe_blocks) + 2.5), max(3.0, 0.3 * len(classes) + 1.6))
    im = ax.imshow(table, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(classes)), [str(c) for c in classes], fontsize=7)
    ax.set_xticks(range(len(stats.moe_blocks)), [str(b) for b in stats.moe_blocks], fontsize=7)
    ax.set_xlabel("MoE block")
    ax.set_ylabel("class")
    ax.set_title("Experts per token by class and layer\n(mean over timesteps, images, tokens)")
    fig.colorbar(im, ax=ax, label="experts per token")
    fig.savefig(path)
    return path


def plot_allocation_per_position(stats: RoutingStats, path: Path, panels: int = 3) -> Path:
    n_t = len(stats.timesteps)
    parts = [p for p in np.array_split(np.arange(n_t), min(panels, n_t)) if len(p)]
    maps = [stats.counts[p].mean(axis=(0, 1, 2)).reshape(stats.grid, stats.grid) for p in parts]
    overall = stats.counts.mean(axis=(0, 1, 2)).reshape(stats.grid, stats.grid)
    maps.append(overall)
    titles = [f"t {stats.timesteps[p[0]]:.3g} to {stats.timesteps[p[-1]]:.3g}" for p in parts] + ["all timesteps"]
    vmin, vmax = min(m.min() for m in maps), max(m.max() for m in maps)
    fig, axes = _figure(3.0 * len(maps) + 1.0, 3.4, ncols=len(maps))
    for ax, m, title in zip(axes, maps, titles):
        im = ax.imshow(m, cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("patch column")
        ax.set_ylabel("patch row")
    fig.suptitle("Experts per token by patch position (mean over layers and images)")
    fig.colorbar(im, ax=list(axes), label="experts per token", shrink=0.85)
    fig.savefig(path)
    return path


def plot_block_norms(stats: RoutingStats, path: Path) -> Path:
    mean = stats.norms.mean(axis=0)  # (depth, 2)
    depth = np.arange(mean.shape[0])
    fig, (ax,) = _figure(6.4, 4.0)
    ax.plot(depth, mean[:, 0], marker="o", label="attention branch")
    ax.plot(depth, mean[:, 1], marker="s", label="feed-forward (MoE) branch")
    lo, hi = stats.norms[0, :, 1], stats.norms[-1, :, 1]
    ax.plot(depth, lo, ls=":", color="C1", label=f"feed-forward at t = {stats.timesteps[0]:.3g}")
    ax.plot(depth, hi, ls="--", color="C1", label=f"feed-forward at t = {stats.timesteps[-1]:.3g}")
    ax.set_xlabel("block (depth)")
    ax.set_ylabel("mean per-token L2 norm (gate included)")
    ax.set_title("Block branch output norms before the residual add")
    ax.set_xticks(depth)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path)
    return path


def plot_combination_usage(stats: RoutingStats, path: Path) -> Path:
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    fig, (ax,) = _figure(6.4, 4.4)
    n_moe = len(stats.moe_blocks)
    cmap, norm = colormaps["viridis"], Normalize(vmin=min(stats.moe_blocks), vmax=max(max(stats.moe_blocks), 1))
    for i, b in enumerate(stats.moe_blocks):
        x, y = combination_curve(torch.from_numpy(stats.co[i]))
        comb = float(combination_usage_from_counts(torch.from_numpy(stats.co[i])))
        ax.plot(x.numpy(), y.numpy(), color=cmap(norm(b)), lw=1.2, label=f"block {b}: Comb {comb:.1f}%" if n_moe <= 8 else None)
    ax.plot([0, 100], [0, 1], color="grey", ls=":", lw=1, label="all pairs equally used")
    ax.axhline(0.95, color="red", ls="--", lw=1, label="95% of co-activations")
    ax.set_xlabel("expert pairs, most co-activated first (% of E(E-1)/2)")
    ax.set_ylabel("cumulative share of co-activations")
    ax.set_title("Combination usage: pairs needed for 95% of co-activations")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    if n_moe > 8:
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="MoE block")
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------------------------------------
# Summary and entry point
# --------------------------------------------------------------------------------------------------------


def layer_table(stats: RoutingStats) -> list[dict]:
    """Per MoE layer: block, tau, experts/token, zero-expert fraction, MaxVio, Comb, branch norms."""
    rows = []
    for i, b in enumerate(stats.moe_blocks):
        load = stats.load[i]
        counts = stats.counts[:, i]
        rows.append({
            "block": b, "tau": stats.tau[i], "experts_per_token": counts.mean(),
            "zero_expert_frac": (counts == 0).mean(),
            "maxvio": float(max_violation_from_load(torch.from_numpy(load))),
            "comb": float(combination_usage_from_counts(torch.from_numpy(stats.co[i]))),
            "norm_attn": stats.norms[:, b, 0].mean(), "norm_ff": stats.norms[:, b, 1].mean(),
        })
    return rows


def _times(timesteps: np.ndarray) -> str:
    return ", ".join(f"{float(t):.3g}" for t in timesteps)


def _fmt(v: float, digits: int = 3) -> str:
    return "nan" if not math.isfinite(float(v)) else f"{float(v):.{digits}f}"


def write_summary(stats: RoutingStats, path: Path, header: dict[str, str]) -> Path:
    rows = layer_table(stats)
    n = len(stats.labels)
    lines = ["# Routing report", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += [
        f"- inputs: {n} images ({n // max(len(set(stats.labels.tolist())), 1)} per class of classes "
        f"{sorted(set(stats.labels.tolist()))}) from {stats.input_source or 'the caller'}, each noised with one "
        f"fixed noise draw at {len(stats.timesteps)} timesteps {_times(stats.timesteps)}; "
        "conditional labels, no guidance; eval-mode routing",
        f"- experts: E = {stats.num_experts}, training mean k = {stats.k}", "",
        "## Per MoE layer", "",
        "| block | tau | experts/token | zero-expert tokens | MaxVio | Comb (%) | attn norm | ff norm |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['block']} | {_fmt(r['tau'])} | {_fmt(r['experts_per_token'], 2)} | "
                     f"{_fmt(100 * r['zero_expert_frac'], 1)}% | {_fmt(r['maxvio'])} | {_fmt(r['comb'], 1)} | "
                     f"{_fmt(r['norm_attn'])} | {_fmt(r['norm_ff'])} |")
    mean = {k: np.mean([r[k] for r in rows]) for k in rows[0] if k != "block"}
    lines.append(f"| mean | {_fmt(mean['tau'])} | {_fmt(mean['experts_per_token'], 2)} | "
                 f"{_fmt(100 * mean['zero_expert_frac'], 1)}% | {_fmt(mean['maxvio'])} | {_fmt(mean['comb'], 1)} | "
                 f"{_fmt(mean['norm_attn'])} | {_fmt(mean['norm_ff'])} |")
    per_t = stats.counts.mean(axis=(1, 2, 3))
    lines += ["", "## Experts per token by timestep (mean over MoE layers, images and tokens)", "",
              "| t | " + " | ".join(f"{float(t):.3g}" for t in stats.timesteps) + " |",
              "|---" * (len(per_t) + 1) + "|",
              "| experts/token | " + " | ".join(f"{v:.2f}" for v in per_t) + " |", "",
              "## Figures", ""]
    captions = {
        "timestep": "Experts per token against timestep, one line per layer group.",
        "load": "Load of each expert relative to its layer's mean load (MaxVio in the row labels).",
        "class": "Experts per token by class and MoE layer.",
        "position": "Experts per token by patch position, in timestep ranges and overall.",
        "norms": "Norm of what each block's attention and feed-forward branches add to the residual.",
        "comb": "Cumulative share of expert-pair co-activations; Comb = share of pairs at the 95% line.",
    }
    for key, name in FIGURES.items():
        lines += [f"### {captions[key]}", "", f"![{key}]({name})", ""]
    path.write_text("\n".join(lines))
    return path


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (summaries that get committed)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _check_out_dir(out: Path, job: dict, overwrite: bool) -> None:
    """Refuse (OutputExists) an `out` holding anything but a routing report of `job`, unless `overwrite`."""
    check_output_dir(out, [*FIGURES.values(), SUMMARY, REPORT_JOB], overwrite=overwrite, what="a routing report")
    if overwrite or not out.is_dir() or not any(out.iterdir()):
        return
    try:
        saved = json.loads((out / REPORT_JOB).read_text())
    except (OSError, ValueError):
        saved = None
    if saved != job:
        differ = sorted(k for k in job if not isinstance(saved, dict) or saved.get(k) != job[k])
        refuse_existing(out, f"holds a routing report of another checkpoint or settings (differs in: "
                             f"{', '.join(differ)})")


def default_out_dir(ckpt: Path) -> Path:
    """`<run dir>/routing_report/<checkpoint name>` for a checkpoint under `<run dir>/checkpoints/`."""
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent / "routing_report" / ckpt.name
    return Path("routing_report") / ckpt.name


def routing_report(ckpt: str | Path, out_dir: str | Path | None = None, *, timesteps: int = 10,
                   classes: list[int] | None = None, per_class: int = 4, seed: int = 0, batch_size: int = 64,
                   device: str | torch.device = "cpu", use_ema: bool = True, calibrate_threshold: int = 0,
                   calibration_batch: int | None = None, progress: bool = False,
                   overwrite: bool = False) -> dict[str, Path]:
    """Write the figures and `summary.md` of a checkpoint's routing into `out_dir`; returns {key: path}
    (keys of FIGURES plus "summary"). `calibrate_threshold` > 0 first recalibrates tau of the loaded
    weights on that many training batches (see `load_for_sampling`).

    `out_dir` is written only if it is absent, empty, or holds a report of this same job (the checkpoint, its
    weights and these settings, recorded first in its `report.json`), else OutputExists; `overwrite` writes
    into it anyway (files of the report's names are replaced, others kept)."""
    loaded = load_for_sampling(ckpt, use_ema=use_ema, device=device, calibrate_threshold=calibrate_threshold,
                               calibration_batch=calibration_batch, progress=progress)
    model, cfg = loaded.model, loaded.config
    if not model.config.moe_experts:  # refused before any output: no progress bar, no empty directory
        raise ValueError(f"{loaded.path} is a dense model ({cfg.model.name}): a routing report needs a MoE model "
                         "(RaceDiT-*)")
    classes = list(classes) if classes else report_classes(model.num_classes)
    bad = [c for c in classes if not 0 <= c < model.num_classes]
    if bad:
        raise ValueError(f"classes {bad} are outside [0, {model.num_classes})")
    out = Path(out_dir) if out_dir is not None else default_out_dir(loaded.path)
    job = {"format": REPORT_FORMAT, "checkpoint": str(loaded.path.resolve()), "weights": loaded.weights,
           "timesteps": timesteps, "classes": classes, "per_class": per_class, "seed": seed,
           "calibrate_threshold": calibrate_threshold, "calibration_batch": calibration_batch}
    _check_out_dir(out, job, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / REPORT_JOB, json.dumps(job, indent=1) + "\n")  # first: a report cut short stays ours
    x0, labels, source = reference_inputs(cfg, classes, per_class, seed)
    if x0 is None:
        x0 = torch.zeros(len(labels), model.in_channels, model.input_size, model.input_size)
    stats = collect_routing_stats(model, loaded.objective, x0, labels, timesteps, seed, batch_size, progress)
    stats.input_source = source
    paths = {
        "timestep": plot_experts_vs_timestep(stats, out / FIGURES["timestep"]),
        "load": plot_expert_load(stats, out / FIGURES["load"]),
        "class": plot_allocation_per_class(stats, out / FIGURES["class"]),
        "position": plot_allocation_per_position(stats, out / FIGURES["position"]),
        "norms": plot_block_norms(stats, out / FIGURES["norms"]),
        "comb": plot_combination_usage(stats, out / FIGURES["comb"]),
    }
    step = step_of(loaded.path)
    mc = model.config
    header = {
        "checkpoint": f"`{_shown(loaded.path)}` ({loaded.weights} weights"
                      + (f", step {step})" if step is not None else ")"),
        "model": f"{cfg.model.name}: depth {mc.depth}, width {mc.hidden_size}, routing {mc.routing}, gating "
                 f"{mc.gating}, inference routing {mc.inference_routing}",
        "objective": cfg.diffusion.objective,
    }
    if loaded.threshold_calibration is not None:
        header["threshold"] = loaded.threshold_calibration.summary()
    paths["summary"] = write_summary(stats, out / SUMMARY, header)
    return paths
