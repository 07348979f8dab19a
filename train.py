#!/usr/bin/env python
"""Train a (Race-)DiT: python train.py --config configs/demo.yaml [a.b=c ...]"""
import sys

from racedit.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
