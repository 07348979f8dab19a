#!/usr/bin/env python
"""FID / sFID / IS / precision / recall against the ADM reference batch (see docs/fid.md):

    python eval/fid.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz [--inception-weights PATH]
"""
import sys

from racedit.evaluation.fid import main

if __name__ == "__main__":
    sys.exit(main())
