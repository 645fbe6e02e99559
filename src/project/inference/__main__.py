"""``python -m project.inference EXPORT_DIR INPUT --out OUTPUT``; see ``project.predict.cli``."""

import sys

from project.predict.cli import main

sys.exit(main())
