"""`python -m racedit ...`: the same as the `racedit` command."""

import sys

from racedit.cli import main

if __name__ == "__main__":
    sys.exit(main())
