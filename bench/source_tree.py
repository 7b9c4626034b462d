"""Import `dalle_pipeline` from this checkout where it is not installed (the GPU machine).

Installed, `dalle_pipeline.components` and `dalle_pipeline.flows` are the top-level `components/`
and `flows/` folders (pyproject's package-dir). Without an install, this module makes
`dalle_pipeline` a namespace package over the checkout, so the same imports resolve to the same
folders. Benchmarks import it (through `common`); pytest loads it with `-p source_tree`.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

if importlib.util.find_spec("dalle_pipeline") is None:
    package = types.ModuleType("dalle_pipeline")
    package.__path__ = [str(REPO)]  # dalle_pipeline.components -> REPO/components, .flows -> REPO/flows
    sys.modules["dalle_pipeline"] = package
