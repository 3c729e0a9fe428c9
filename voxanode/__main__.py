"""Run the daemon with `python -m voxanode`, the same as the `voxanode` command."""

import sys

from voxanode.daemon import main

if __name__ == "__main__":
    sys.exit(main())
