"""``python -m worker [options]``: the same as ``python -m engine worker [options]``."""

import sys

from worker.cli import main

raise SystemExit(main(["worker", *sys.argv[1:]]))
