"""``python -m dualwrite`` runs the CLI."""

import sys

from dualwrite.cli import main

sys.exit(main())
