"""Create a new analysis project from this template: ``python scripts/new_analysis.py``.

Standard library and git only, so it runs before any environment is installed. ``create``
builds and publishes; ``rename`` holds the token rules that rename the package and the scan
proving none is left; ``imports`` keeps import blocks sorted; ``examples`` decides which
example configs stay; ``metadata`` writes the new names into ``pyproject.toml`` and the
README; ``repo`` lists the tracked files and makes the first commit; ``names`` validates;
``cli`` asks and reports. See ``docs/new-analysis.md``.
"""

from tools.new_analysis.create import AnalysisReport, AnalysisSpec, create_analysis
from tools.new_analysis.errors import ForkError

__all__ = ["AnalysisReport", "AnalysisSpec", "ForkError", "create_analysis"]
