"""``python -m composekit`` runs the CLI."""

import sys

from composekit.apps.cli import main

sys.exit(main())
