"""``python -m klime.cli``: the ``klime`` command."""

import sys

from ._main import main

sys.exit(main())
