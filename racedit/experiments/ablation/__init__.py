"""The ablation runner: one grid file -> trained variants at equal compute, a table and plots (the grid file
format is documented in `racedit.experiments.ablation.grid`)."""

from racedit.experiments.ablation.grid import (
    FIXED_KEYS,
    ComputeMismatchError,
    EvalSpec,
    Grid,
    GridError,
    Variant,
    check_compute,
    load_grid,
    overrides_text,
    resolve_variants,
    variant_accounting,
)
from racedit.experiments.ablation.report import routing_columns, smooth, write_report
from racedit.experiments.ablation.run import GridResult, run_grid

__all__ = [
    "GridError", "ComputeMismatchError", "Variant", "EvalSpec", "Grid", "GridResult", "FIXED_KEYS", "load_grid",
    "overrides_text", "resolve_variants", "variant_accounting", "check_compute", "smooth", "routing_columns",
    "run_grid", "write_report",
]
