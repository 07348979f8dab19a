"""The `racedit` command (also `python -m racedit`, and the wrappers train.py, sample.py and eval/*.py):
`racedit.cli.parser` builds every subcommand's parser with one flag vocabulary, `racedit.cli.commands` runs
them. `main(["sample", "--ckpt", ...])` is the same as the command line `racedit sample --ckpt ...`."""

from racedit.cli.commands import main

__all__ = ["main"]
