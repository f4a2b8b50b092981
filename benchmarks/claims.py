"""Decide the paper's five claims on the counting task: ``python benchmarks/claims.py [--quick] [options]``.

The launcher of ``benchmarks/reproduce/claims.py`` (its docstring describes the grid, the statistics and the
outputs; ``--help`` lists the options).
"""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from reproduce.claims import main

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
