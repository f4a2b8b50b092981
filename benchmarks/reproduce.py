"""Reproduce DDPO's comparative findings on tiny-shapes: ``python benchmarks/reproduce.py [options]``.

The launcher of the package ``benchmarks/reproduce/`` (its docstring describes the grid, the outputs and the
commands; ``--help`` lists the options). Run as a script, this folder is first on ``sys.path``, where the
package ``reproduce/`` takes precedence over this file's name.
"""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when started from another working directory
    from reproduce.cli import main

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
