"""``python -m lnstd``."""

import sys

from .cli import main

sys.exit(main())
