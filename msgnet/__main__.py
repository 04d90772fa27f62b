"""``python -m msgnet``: the same as the ``msgnet`` command."""

from __future__ import annotations

import sys

from ._cli import main

sys.exit(main())
