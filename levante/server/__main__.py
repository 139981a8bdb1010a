"""`python -m levante.server ...` is `levante serve ...`."""

import sys

from levante.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
