#!/usr/bin/env python
"""Train and compare the variants of an ablation grid: the same as `racedit ablate` (see
docs/ablations.md), e.g.

    python eval/ablate.py --grid configs/ablations/routing.yaml [--out DIR] [--threads 1]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's racedit, not one installed elsewhere
from racedit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["ablate", *sys.argv[1:]]))
