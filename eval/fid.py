#!/usr/bin/env python
"""FID / sFID / IS / precision / recall against the ADM reference batch: the same as `racedit fid`
(see docs/fid.md), e.g.

    python eval/fid.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz [--inception-weights PATH]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's racedit, not one installed elsewhere
from racedit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["fid", *sys.argv[1:]]))
