"""`json_safe`: one rule for every JSON file racedit writes (non-finite -> null), and the readers that show it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from racedit.evaluation.fid import format_report
from racedit.experiments.ablation.report import format_number
from racedit.fileio import json_safe


def test_json_safe_makes_strict_json_that_round_trips():
    value = {
        "nan": math.nan, "inf": math.inf, "-inf": -math.inf, "finite": 1.5, "int": 3, "none": None, "s": "x",
        "np_float": np.float32(0.25), "np_nan": np.float64("nan"), "np_int": np.int64(7), "np_bool": np.bool_(True),
        "array": np.array([[1.0, np.inf], [2.0, 3.0]]), "tensor": torch.tensor([0.5, float("nan")]),
        "scalar_tensor": torch.tensor(4), "path": Path("/a/b.npz"), 5: "int key",
        "nested": [(1, math.nan), {"deeper": [np.float16(2.0), Path("c")]}],
    }
    expected = {
        "nan": None, "inf": None, "-inf": None, "finite": 1.5, "int": 3, "none": None, "s": "x",
        "np_float": 0.25, "np_nan": None, "np_int": 7, "np_bool": True,
        "array": [[1.0, None], [2.0, 3.0]], "tensor": [0.5, None],
        "scalar_tensor": 4, "path": "/a/b.npz", "5": "int key",
        "nested": [[1, None], {"deeper": [2.0, "c"]}],
    }
    safe = json_safe(value)
    assert safe == expected
    assert type(safe["np_int"]) is int and type(safe["np_bool"]) is bool and type(safe["np_float"]) is float
    text = json.dumps(safe, allow_nan=False)  # strict JSON: would raise on a NaN left behind
    assert json.loads(text) == expected


def test_non_finite_values_read_back_print_as_missing_or_nan():
    # the ablation table shows a missing and a non-finite number the same way
    assert format_number(json.loads(json.dumps(json_safe(math.nan)))) == format_number(math.nan) == "–"
    report = {
        "label": "FID-4", "metrics": {"fid": math.nan, "inception_score": 1.0, "inception_score_std": math.inf},
        "settings": {"isc_splits": 1}, "reference": None, "sampling": None, "notes": [],
        "samples": {"path": "s.npz", "format": "npz", "count": 4, "available": 4, "image_size": [8, 8]},
        "feature_extractor": {"torch_fidelity_version": "0", "resize": "bilinear", "dtype": "float32",
                              "weights": {"path": "w.pth", "sha256": "0" * 64, "verified": True,
                                          "is_torch_fidelity_weights": True}},
    }
    read_back = json.loads(json.dumps(json_safe(report), allow_nan=False))
    assert read_back["metrics"]["fid"] is None
    assert format_report(read_back) == format_report(report).replace("inf", "nan")
    assert "FID        nan" in format_report(read_back)
