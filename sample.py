#!/usr/bin/env python
"""Sample from a checkpoint: the same as `racedit sample`, e.g.

    python sample.py --ckpt runs/demo/checkpoints/last --out grid.png
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this checkout's racedit, not one installed elsewhere
from racedit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
