"""``python -m project.inference EXPORT_DIR INPUT --out OUTPUT``; see ``project.inference.cli``."""

import sys

from project.inference.cli import main

sys.exit(main())
