"""Loaded at start-up only when bench/soak.py --memwatch puts this folder on PYTHONPATH."""

import os
import sys

if os.environ.get("PRSCD_MEMWATCH"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    from bench import memwatch

    memwatch.start()
