#!/usr/bin/env python
"""Convert pretrained DiT weights to racedit checkpoints and back, and upcycle a dense DiT into a
Race-DiT: the same as `racedit convert` (see docs/interop.md), e.g.

    python eval/convert.py from-dit DiT-XL-2-256x256.pt --out ckpt/dit-xl2-256
    python eval/convert.py upcycle --ckpt ckpt/dit-xl2-256 --to RaceDiT-XL/2-4in32 --out ckpt/race-xl2
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's racedit, not one installed elsewhere
from racedit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
