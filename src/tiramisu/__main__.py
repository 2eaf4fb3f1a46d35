"""``python -m tiramisu``: the console script without installing the package (PYTHONPATH=src)."""

import sys

from .cli import main

sys.exit(main())
