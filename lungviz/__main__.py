"""``python -m lungviz``: see :mod:`lungviz.cli.main`."""

import sys

from lungviz.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
