#!/usr/bin/env python
"""Train a (Race-)DiT: the same as `racedit train`, e.g.

    python train.py --config configs/demo.yaml --set train.steps=500
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this checkout's racedit, not one installed elsewhere
from racedit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
