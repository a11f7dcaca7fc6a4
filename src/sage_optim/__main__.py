"""``python -m sage_optim``: the same as the ``sage-optim`` console script."""
import sys

from .cli import main

sys.exit(main())
