#!/usr/bin/env python
"""Sample from a checkpoint: python sample.py --ckpt runs/demo/checkpoints/last --out grid.png"""
import sys

from racedit.cli import sample_main

if __name__ == "__main__":
    sys.exit(sample_main())
