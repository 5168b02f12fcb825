"""``python -m otguard.report results.json --out DIR``."""

import sys

from otguard.report.cli import main

sys.exit(main())
