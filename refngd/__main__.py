"""``python -m refngd compare``: the same as the ``refngd`` console script."""
import sys

from .cli import main

sys.exit(main())
