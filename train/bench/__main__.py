"""``python -m train.bench``: runs :func:`train.bench.cli.main` with the command's flags."""

import sys

from train.bench.cli import main

if __name__ == "__main__":
  sys.exit(main())
