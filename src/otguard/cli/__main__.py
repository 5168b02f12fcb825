"""``python -m otguard.cli ...``: the ``otguard`` command."""

import sys

from otguard.cli import main

sys.exit(main())
