"""GPU acceptance and benchmark in one run: correctness on the device first, then speed, within a time budget.

    make gpu-wheels && make gpu-check            # on the GPU machine: bench/gpu_check.sh installs, then this
    python bench/gpu_check.py --smoke            # every stage on CPU with tiny models (part of make test)

Stages, in order (bench/gpu_correctness.py, bench/gpu_speed.py):
1. environment: versions, the device, which dispatch kernel and SDPA backends this torch offers.
2. correctness (a failure stops the run after these checks, before any speed row, unless --keep-going): MoE dispatch against the float64 reference loop
   (float32 < 1e-5, bf16 < 1e-2, forward and backward, empty experts, skewed loads); the six strategies select
   on the device exactly what the CPU selects; threshold routing is batch-independent; no device-to-host
   synchronisation in the MoE training forward/backward; 300-step bf16 digits runs, eager and compiled.
3. speed, most important rows first: ceilings (bf16 matmul, copy), bf16 training img/s, MFU and peak memory,
   sampling img/s, Inception features img/s, expert-parallel training against data-parallel (several GPUs; a
   skip note on one). A row whose estimate does not fit what is left of --budget-s
   (default 420 s, counted from the start) is skipped with a note; a row that fails is noted and the run goes on.
4. results: DIR/gpu_check.json (everything) and DIR/gpu_check.md (the table), written after every stage, so
   a run cut short still leaves what it measured; the table is printed last. DIR is --out, else $OUT, else
   runs/gpu-check.

--smoke runs on CPU with tiny models and 2-3 timed calls per row; torch.compile there uses the aot_eager backend
(the same graph capture; inductor's C++ build takes minutes on a shared CPU), which the notes say.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 420.0

# Speed rows, most important first, with a rough GPU cost in seconds (model build, compile, timed steps); the
# compiled rows' estimates follow the measured time of the first compiled row of their size (`run_speed`).
TRAIN_FIRST = [("DiT-XL/2", 64, False, 15), ("RaceDiT-XL/2-4in32", 64, False, 20)]
SAMPLING = [("DiT-XL/2", 15), ("RaceDiT-XL/2-4in32", 20)]
TRAIN_COMPILED_FIRST = [("DiT-XL/2", 64, True, 90), ("RaceDiT-XL/2-4in32", 64, True, 120)]
TRAIN_LATER = [(m, b, c, est) for c, est_b, est_xl in ((False, 10, 20), (True, 50, 100))
               for b in (64, 32) for m, est in (("DiT-B/2", est_b), ("RaceDiT-B/2-2in8", est_b),
                                                ("RaceDiT-B/2-4in32", est_b), ("DiT-XL/2", est_xl),
                                                ("RaceDiT-XL/2-4in32", est_xl))
               if (m, b, c) not in {p[:3] for p in TRAIN_FIRST + TRAIN_COMPILED_FIRST}]
TRAIN_MODELS = ["DiT-B/2", "RaceDiT-B/2-2in8", "RaceDiT-B/2-4in32", "DiT-XL/2", "RaceDiT-XL/2-4in32"]


class RowTimeout(Exception):
    pass


def plan(smoke: bool) -> list[dict]:
    """The speed rows in the order they run: {"kind", "name", "estimate_s", ...}. --smoke: every kind, tiny rows."""
    from gpu_speed import TrainRow

    rows = [{"kind": "ceilings", "name": "ceilings", "estimate_s": 10}]

    def train(specs):
        return [{"kind": "train", "name": TrainRow(m, b, c).name, "row": TrainRow(m, b, c), "estimate_s": est}
                for m, b, c, est in specs]

    def sample(specs):
        return [{"kind": "sampling", "name": f"sample {m} b{2 if smoke else 256} DDPM CFG", "model": m,
                 "estimate_s": est} for m, est in specs]

    if smoke:
        rows += train([(m, 2, False, 1) for m in TRAIN_MODELS])
        rows += sample([(m, 1) for m, _ in SAMPLING])
        rows += train([("RaceDiT-B/2-2in8", 2, True, 5)])  # one compiled row: tracing costs ~10 s on a CPU
        rows.append({"kind": "inception", "name": "inception features", "estimate_s": 2})
        return rows + [expert_parallel(smoke, 30)]  # 30 s: mostly the imports of 2 spawned processes
    rows += train(TRAIN_FIRST) + sample(SAMPLING) + train(TRAIN_COMPILED_FIRST)
    rows.append({"kind": "inception", "name": "inception features", "estimate_s": 15})
    rows.append(expert_parallel(smoke, 60))
    return rows + train(TRAIN_LATER)


def expert_parallel(smoke: bool, estimate_s: float) -> dict:
    """The expert-parallel row (gpu_speed.expert_parallel_row): run on 2+ GPUs, a skip note on fewer."""
    from gpu_speed import EXPERT_PARALLEL_BATCH, EXPERT_PARALLEL_MODEL

    name = f"expert-parallel {EXPERT_PARALLEL_MODEL} b{2 if smoke else EXPERT_PARALLEL_BATCH}/process vs data-parallel"
    return {"kind": "expert_parallel", "name": name, "estimate_s": estimate_s}


def fits(row: dict, elapsed: float, budget: float) -> str | None:
    """None when the row's estimate fits what is left of the budget, else the skip note."""
    left = budget - elapsed
    if row["estimate_s"] > left:
        return f"skipped: needs about {row['estimate_s']:.0f}s, {max(left, 0):.0f}s of the {budget:.0f}s budget left"
    return None


class Report:
    """Stage results and speed rows, written to DIR/gpu_check.json and .md after every change."""

    def __init__(self, out: Path, args, scratch: Path):
        self.out, self.scratch, self.t0 = out, scratch, time.perf_counter()
        self.data = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "smoke": args.smoke,
                     "budget_s": args.budget_s, "correctness": [], "speed": [], "status": "running"}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def stage(self, name: str, fn, *args) -> bool:
        """Run a correctness or environment stage; record pass/fail; True when it passed."""
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        entry = {"name": name}
        try:
            entry.update(fn(*args))
            entry["status"] = "pass"
        except Exception as e:  # the first failure stops the correctness stages; its text is the report
            entry.update(status="FAIL", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        entry["seconds"] = time.perf_counter() - t
        self.data["correctness"].append(entry)
        for note in entry.get("notes", []):
            print(f"   {note}", flush=True)
        print(f"   {entry['status']} ({entry['seconds']:.1f}s){': ' + entry['error'] if 'error' in entry else ''}",
              flush=True)
        self.write()
        return entry["status"] == "pass"

    def speed(self, entry: dict) -> None:
        self.data["speed"].append(entry)
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = self.elapsed()
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        (self.out / "gpu_check.md").write_text(self.markdown() + "\n")

    def markdown(self) -> str:
        d = self.data
        env = next((c for c in d["correctness"] if c["name"] == "environment"), {})
        lines = [f"`{d['command']}` on {env.get('device_name', '?')} ({env.get('torch', '?')}), "
                 f"{d['elapsed_s']:.0f}s of a {d['budget_s']:.0f}s budget", "",
                 "| check | result | s |", "|---|---|---:|"]
        for c in d["correctness"]:
            detail = c.get("error") or "; ".join(c.get("notes", []))
            lines.append(f"| {c['name']} | {c['status']}: {detail.replace('|', '/')} | {c['seconds']:.1f} |")
        lines += ["", "| row | img/s | MFU | peak mem GiB | vs dense | notes |", "|---|---:|---:|---:|---:|---|"]
        by_name = {r["name"]: r for r in d["speed"]}
        for r in sorted(d["speed"], key=_table_order):
            if r["kind"] == "ceilings" and r.get("status") == "ok":
                lines.append(f"| bf16 matmul {r['matmul_n']}^3 | | {r['matmul_tflops']:.1f} TFLOP/s | | | ceiling |")
                lines.append(f"| device copy {r['copy_bytes'] / 2**20:.0f} MiB | | {r['copy_gbps']:.1f} GB/s | | | "
                             f"read + write |")
                continue
            ratio = ""
            dense = by_name.get(r.get("dense", ""))
            if r.get("status") == "ok" and dense and dense.get("status") == "ok":
                ratio = f"{r['img_per_s'] / dense['img_per_s']:.2f}x"
            notes = list(r.get("notes", []))
            if "compile_s" in r:
                notes.insert(0, f"compile {r['compile_s']:.0f}s")
            if r.get("status") != "ok":
                notes.insert(0, r.get("status", "?"))
            mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else ""
            img = f"{r['img_per_s']:.1f}" if "img_per_s" in r else ""
            mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else ""
            lines.append(f"| {r['name']} | {img} | {mfu} | {mem} | {ratio} | {'; '.join(notes).replace('|', '/')} |")
        lines += ["", "MFU: count_macs x 6 FLOPs per trained image (x 2 per generated forward row, CFG doubling the "
                  "rows) over the bf16 matmul ceiling above. Sampling img/s is for 250 DDPM steps. Targets (issue 17, "
                  "read, not asserted): DiT-XL/2 training >= 550 img/s, RaceDiT-XL/2-4in32 >= 0.85x DiT-XL/2, "
                  "sampling >= 40% MFU."]
        return "\n".join(lines)


def _table_order(r: dict):
    kinds = ["ceilings", "train", "sampling", "inception", "expert_parallel"]
    if r["kind"] == "train":
        model, batch, mode = r["name"].split()[1:4]
        size = "XL" if "XL" in model else "B"
        return (1, size != "B", int(batch[1:]), mode != "eager", TRAIN_MODELS.index(model))
    return (kinds.index(r["kind"]), r["name"])


def environment(device: torch.device) -> dict:
    import importlib

    from racedit.models.moe_dispatch import grouped_mm_supported, resolve_implementation

    versions = {}
    for name in ("racedit", "diffusers", "omegaconf", "torch_fidelity", "accelerate", "timm", "numpy", "einops"):
        try:
            m = importlib.import_module(name)
            versions[name] = f"{getattr(m, '__version__', '?')} ({Path(m.__file__).parent})"
        except Exception as e:
            versions[name] = f"missing: {type(e).__name__}: {e}"
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
           "versions": versions, "device": str(device),
           # inductor's GPU kernels need triton, and triton a C compiler for its launcher stub
           "c_compiler": shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as e:  # no triton: torch.compile's inductor cannot build GPU kernels
        out["triton"] = f"missing: {type(e).__name__}"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        out.update(device_name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=p.total_memory / 2**30,
                   cuda=torch.version.cuda, sdpa={name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")()
                                                  for name in ("flash", "mem_efficient", "cudnn", "math")
                                                  if hasattr(torch.backends.cuda, f"{name}_sdp_enabled")})
    else:
        out.update(device_name=f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    out["grouped_mm"] = {f"{dt}{' traced' if traced else ''}": grouped_mm_supported(device.type, dt, 1152, 1152, traced)
                         for dt in (torch.bfloat16, torch.float32) for traced in (False, True)}
    out["moe_kernel_eager_bf16"] = resolve_implementation("auto", device, torch.bfloat16, 1152, 1152)
    out["notes"] = [f"torch {torch.__version__}, {out['device_name']}, grouped_mm {out['grouped_mm']}, "
                    f"eager bf16 MoE kernel {out['moe_kernel_eager_bf16']}, triton {out['triton']}, "
                    f"C compiler {out['c_compiler']}"]
    missing = [n for n, v in versions.items() if v.startswith("missing")]
    if missing:
        raise RuntimeError(f"cannot import {missing}: {[versions[n] for n in missing]}")
    return out


def run_speed(report: Report, rows: list[dict], device: torch.device, smoke: bool, budget: float) -> None:
    import gpu_speed as S

    peak = None
    for row in rows:
        entry = {"kind": row["kind"], "name": row["name"], "estimate_s": row["estimate_s"]}
        if row["kind"] == "train" and "RaceDiT" in row["name"]:
            entry["dense"] = row["row"].dense_name
        skip = fits(row, report.elapsed(), budget)
        if row["kind"] != "ceilings" and peak is None:
            skip = "skipped: no matmul ceiling measured (MFU has no denominator)"
        if row["kind"] == "expert_parallel" and S.expert_parallel_size(device, smoke) < 2:
            skip = (f"skipped: needs 2 or more GPUs, torch.cuda.device_count() is {torch.cuda.device_count()} "
                    f"(expert parallelism runs the experts on several processes)")
        if skip:
            entry["status"] = skip
            print(f"-- {row['name']}: {skip}", flush=True)
            report.speed(entry)
            continue
        print(f"-- {row['name']}", flush=True)
        t = time.perf_counter()
        # a hung compile must not take the rest of the window: stop the row at 3x its estimate (or the budget)
        limit = max(1, int(min(3 * row["estimate_s"] + 30, budget + 60 - report.elapsed())))
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(limit)
        try:
            if row["kind"] == "ceilings":
                entry.update(S.ceilings(device, smoke))
                peak = entry["matmul_tflops"]
            elif row["kind"] == "train":
                entry.update(S.train_row(row["row"], device, smoke, peak, iters=2 if smoke else 10))
            elif row["kind"] == "sampling":
                entry.update(S.sampling_row(row["model"], device, smoke, peak, batch=2 if smoke else 256))
            elif row["kind"] == "expert_parallel":
                entry.update(S.expert_parallel_row(device, smoke, S.expert_parallel_size(device, smoke)))
            else:
                entry.update(S.inception_row(device, smoke, report.scratch))
            entry["status"] = "ok"
        except RowTimeout:
            entry["status"] = f"stopped after {limit}s (3x the estimate)"
        except torch.cuda.OutOfMemoryError:
            entry["status"] = "out of memory"
        except Exception as e:  # a speed row that fails is reported; the others still run
            entry.update(status=f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                         traceback=traceback.format_exc())
        finally:
            signal.alarm(0)
        entry["seconds"] = time.perf_counter() - t
        if row["kind"] == "train" and row["row"].compiled and entry["status"] == "ok":
            _follow_compile_time(rows, row, entry["seconds"])
        if device.type == "cuda":
            torch.cuda.empty_cache()
        summary = {k: round(v, 3) if isinstance(v, float) else v for k, v in entry.items()
                   if k in ("img_per_s", "mfu", "peak_mem_gib", "compile_s", "matmul_tflops", "copy_gbps",
                            "ep_over_dp")}
        print(f"   {entry['status']} ({entry['seconds']:.1f}s) {summary}", flush=True)
        report.speed(entry)


def _follow_compile_time(rows: list[dict], done: dict, seconds: float) -> None:
    """Later compiled rows of the same size take the measured time (x1.3 for a RaceDiT: its dispatch adds graph)."""
    size = done["row"].model.split("-")[1]  # "XL/2" of DiT-XL/2 and RaceDiT-XL/2-4in32
    for r in rows:
        if r["kind"] == "train" and r["row"].compiled and r["row"].model.split("-")[1] == size:
            r["estimate_s"] = seconds * (1.3 if r["row"].model.startswith("RaceDiT") else 1.0)


def _alarm(signum, frame):
    raise RowTimeout()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="results folder (default $OUT, else runs/gpu-check)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="seconds for the whole run (default 420)")
    parser.add_argument("--smoke", action="store_true", help="every stage on CPU with tiny models (< 1 min)")
    parser.add_argument("--device", default=None, help="default cuda (cpu with --smoke)")
    parser.add_argument("--keep-going", action="store_true", help="measure speed even after a correctness failure")
    args = parser.parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or "runs/gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (torch.cuda.is_available() is False); --smoke runs on CPU", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_correctness as C

    if args.smoke:
        torch.set_num_threads(1)  # tiny models: one thread avoids wake-ups on every small op (as the demo does)
        torch.compile = functools.partial(torch.compile, backend="aot_eager")
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))  # runs and weights files: large, not results
    report = Report(out, args, scratch)
    ok = report.stage("environment", environment, device)
    checks = [("dispatch vs reference (fwd+bwd, float32 and bf16)", C.check_dispatch, device, args.smoke),
              ("six strategies: device selection == CPU selection", C.check_selection, device, args.smoke),
              ("threshold routing: alone == in a batch of 16", C.check_threshold_batch_independence, device,
               args.smoke),
              ("no device-to-host sync in MoE training fwd+bwd", C.check_no_host_sync, device, args.smoke),
              ("digits bf16 runs, eager and train.compile=true", C.check_digits_runs, device, args.smoke, out, ROOT,
               scratch)]
    if ok:  # every check runs (one window shows every failure); any failure stops the run before the speed rows
        ok = all([report.stage(name, fn, *fn_args) for name, fn, *fn_args in checks])
    if ok or (args.keep_going and report.data["correctness"][0]["status"] == "pass"):
        run_speed(report, plan(args.smoke), device, args.smoke, args.budget_s)
    else:
        print("correctness failed: speed stages not run (--keep-going runs them anyway)", flush=True)
    report.data["status"] = "pass" if ok else "FAIL"
    report.write()
    print("\n" + report.markdown(), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nresults: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
