#!/usr/bin/env python
"""Expert-usage figures and a markdown summary of a MoE checkpoint's routing (see docs/routing/):

    python eval/routing_report.py --ckpt runs/x/checkpoints/last [--out dir]
"""
import sys

from racedit.evaluation.routing_report import main

if __name__ == "__main__":
    sys.exit(main())
