"""``python -m qkdd`` is the ``qkdd`` command."""

import sys

from qkdd.cli import main

sys.exit(main())
