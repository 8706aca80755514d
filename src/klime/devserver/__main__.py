"""``python -m klime.devserver``: runs :func:`klime.devserver.main` (see ``--help``)."""

import sys

from ._cli import main

sys.exit(main())
