"""bench/gpu_check.py never rots: its --smoke run (every stage on CPU, tiny models) passes, and the offline install
of bench/gpu_check.sh (the pure-Python wheels of `make gpu-wheels`, then racedit, --no-index --no-deps into a venv
with --system-site-packages) gives a venv that imports the wheels and racedit from itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402


def test_smoke_runs_every_stage_on_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["status"] == "pass"
    checks = {c["name"]: c for c in result["correctness"]}
    assert len(checks) == 6 and all(c["status"] == "pass" for c in checks.values())
    # no CUDA-only assertion passes silently on CPU: each check says what it ran there
    for name, c in checks.items():
        if name != "environment":
            assert any("on CPU" in n for n in c["notes"]), name
    kinds = {r["kind"] for r in result["speed"]}
    assert kinds == {"ceilings", "train", "sampling", "inception", "expert_parallel"}
    assert all(r["status"] == "ok" for r in result["speed"]), [(r["name"], r["status"]) for r in result["speed"]]
    assert any("compiled" in r["name"] for r in result["speed"])
    # the table is printed last and names every row
    table = proc.stdout[proc.stdout.rindex("| row |"):]
    assert all(r["name"] in table for r in result["speed"] if r["kind"] != "ceilings")
    assert (tmp_path / "gpu_check.md").read_text().count("| train ") == 6
    # what travels back from the GPU machine stays small: results, metrics and grids, no checkpoints or weights
    assert sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) < 2**20


def test_budget_skips_what_does_not_fit_with_a_note():
    rows = gpu_check.plan(smoke=False)
    assert rows[0]["kind"] == "ceilings" and rows[1]["name"] == "train DiT-XL/2 b64 eager"
    names = [r["name"] for r in rows]
    # ceilings, 5 models x 2 batches x 2 modes, 2 sampling, inception, expert-parallel
    assert len(names) == len(set(names)) == 1 + 20 + 2 + 1 + 1
    assert [r["kind"] for r in rows[3:6]] == ["sampling", "sampling", "train"]  # sampling before compiling
    assert gpu_check.fits(rows[1], elapsed=0, budget=420) is None
    note = gpu_check.fits(rows[1], elapsed=410, budget=420)
    assert note.startswith("skipped") and "10s of the 420s budget left" in note
    compiled_xl = [r for r in rows if r["kind"] == "train" and r["row"].compiled and "XL" in r["name"]]
    gpu_check._follow_compile_time(rows, compiled_xl[0], 40.0)  # the first compiled XL row took 40 s
    assert {r["name"]: r["estimate_s"] for r in compiled_xl[1:]} == {
        "train RaceDiT-XL/2-4in32 b64 compiled": 52.0, "train DiT-XL/2 b32 compiled": 40.0,
        "train RaceDiT-XL/2-4in32 b32 compiled": 52.0}


def test_offline_install_into_a_system_site_packages_venv(tmp_path):
    """`make gpu-wheels`, then the script's install step with PYTHON=this (venv) interpreter: the scratch venv's
    --system-site-packages then reach the base Python only, so the script adds this environment's site-packages
    after its own (the GPU image's torch & co.). The wheels and racedit must come from the scratch venv itself."""
    subprocess.run(["make", "-s", "gpu-wheels", f"PY={sys.executable}"], cwd=ROOT, check=True, timeout=300)
    wheels = sorted(p.name for p in (ROOT / ".gpu" / "wheels").glob("*.whl"))
    assert {w.split("-")[0] for w in wheels} >= {"diffusers", "omegaconf", "antlr4_python3_runtime", "torch_fidelity"}
    assert all(w.endswith("-none-any.whl") for w in wheels)
    assert sum(p.stat().st_size for p in (ROOT / ".gpu" / "wheels").glob("*.whl")) < 16 * 2**20
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # PYTHON is this environment's interpreter, a venv's like many GPU images': the script must reach its torch
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--install", str(venv)], cwd=tmp_path,
                          env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    site = next(venv.glob("lib/python*/site-packages"))
    probe = ("import torch, racedit, diffusers, omegaconf, torch_fidelity, antlr4, racedit.models, racedit.diffusion.samplers;"
             "print('\\n'.join(m.__file__ for m in (racedit, diffusers, omegaconf, torch_fidelity, antlr4)))")
    files = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert files.returncode == 0, files.stderr
    assert all(line.startswith(str(site)) for line in files.stdout.split()), files.stdout
    assert not list(ROOT.glob("build")), "the install left a build/ folder in the working tree"


@pytest.mark.parametrize("row, dense", [(("RaceDiT-XL/2-4in32", 64, True), "train DiT-XL/2 b64 compiled"),
                                        (("RaceDiT-B/2-2in8", 32, False), "train DiT-B/2 b32 eager")])
def test_moe_rows_compare_with_the_dense_row_of_their_size(row, dense):
    from gpu_speed import TrainRow

    assert TrainRow(*row).dense_name == dense


def test_a_failed_check_is_reported_and_stops_the_speed_rows(tmp_path, monkeypatch, capsys):
    import gpu_correctness as C

    def wrong(device, smoke):
        raise C.CheckFailed("expert_race on cpu selects 3 pairs differently from the CPU")

    monkeypatch.setattr(C, "check_selection", wrong)
    monkeypatch.setattr(C, "check_digits_runs", lambda *a: {"notes": ["ran on CPU (smoke): stubbed"]})
    assert gpu_check.main(["--smoke", "--out", str(tmp_path)]) == 1
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {c["name"]: c["status"] for c in result["correctness"]}
    assert len(statuses) == 6 and list(statuses.values()).count("FAIL") == 1  # the others still ran
    assert result["status"] == "FAIL" and result["speed"] == []
    assert "selects 3 pairs differently" in capsys.readouterr().out.rsplit("| check |", 1)[1]


@pytest.mark.parametrize("count, n", [(0, 1), (1, 1), (2, 2), (3, 2), (4, 4), (16, 8)])
def test_expert_parallel_row_runs_on_several_gpus_and_is_skipped_with_a_note_on_one(tmp_path, monkeypatch, count, n):
    import types

    import gpu_speed

    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    cuda = torch.device("cuda")
    assert gpu_speed.expert_parallel_size(cuda, smoke=False) == n
    if n > 1:
        return
    ran = []
    monkeypatch.setattr(gpu_speed, "expert_parallel_row", lambda *a: ran.append(a) or {})
    report = gpu_check.Report(tmp_path, types.SimpleNamespace(smoke=False, budget_s=420.0), tmp_path)
    gpu_check.run_speed(report, [gpu_check.expert_parallel(False, 60)], cuda, smoke=False, budget=420.0)
    (entry,) = report.data["speed"]
    assert not ran and entry["status"].startswith(f"skipped: needs 2 or more GPUs, torch.cuda.device_count() is {count}")
    assert "needs 2 or more GPUs" in (tmp_path / "gpu_check.md").read_text()
