#!/usr/bin/env python
"""Expert-usage figures and a markdown summary of a MoE checkpoint's routing: the same as
`racedit routing-report` (see docs/routing/), e.g.

    python eval/routing_report.py --ckpt runs/x/checkpoints/last [--out dir]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's racedit, not one installed elsewhere
from racedit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["routing-report", *sys.argv[1:]]))
