"""``python -m sage_optim``: the same as the ``sage-optim`` console script."""
from .cli import console_main

console_main()
