"""``python -m symconv`` is the ``symconv`` command."""

import sys

from .cli import main

sys.exit(main())
