"""``python -m composekit_export`` runs ``composekit-export``."""

import sys

from .cli import main

sys.exit(main())
