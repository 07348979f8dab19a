#!/usr/bin/env python
"""Encode an ImageFolder into sharded VAE latents for `data.kind=latents`: the same as
`racedit extract-latents`, e.g.

    python eval/extract_latents.py --data /imagenet/train --vae stabilityai/sd-vae-ft-ema --out latents/in256
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's racedit, not one installed elsewhere
from racedit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["extract-latents", *sys.argv[1:]]))
