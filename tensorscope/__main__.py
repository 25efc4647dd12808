"""``python -m tensorscope`` (and ``torchrun -m tensorscope``): the command line."""

import sys

from .cli import main

sys.exit(main())
