#!/usr/bin/env python
"""Train and compare the variants of an ablation grid (see docs/ablations.md):

    python eval/ablate.py --grid configs/ablations/routing.yaml [--out DIR] [--threads 1]
"""
import sys

from racedit.experiments.ablation.run import main

if __name__ == "__main__":
    sys.exit(main())
