"""`make demo`: every stage on the synthetic world with tiny models (see vlpost/demo.py; same as `vlpost demo`)."""

import sys

from vlpost.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
