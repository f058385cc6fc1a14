"""Puts tests/ on sys.path, so ``python -m tests.demo`` and ``python -m tests.bench.run`` import
the helpers (``support``, ``stackfix``) under the same names pytest does: one module, not two."""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
