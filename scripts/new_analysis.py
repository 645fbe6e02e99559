"""Create a new analysis from this template in a new folder, with its own package name.

    python scripts/new_analysis.py --name "ttH classifier" --package tthml \
        --author "A. Physicist <a.physicist@example.org>" --dest ../tthml

``--help`` lists the options (which example data and models to keep, ...). Standard library
only, so any Python >= 3.10 runs it before an environment exists; the logic lives in
``tools.new_analysis``.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.new_analysis.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(template_root=ROOT))
