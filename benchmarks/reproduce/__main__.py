"""``python benchmarks/reproduce [options]``: the reproduction's command line (as ``benchmarks/reproduce.py``)."""

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a folder: make the package importable under its name
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from reproduce.cli import main
else:
    from .cli import main

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
