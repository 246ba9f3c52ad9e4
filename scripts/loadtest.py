#!/usr/bin/env python3
"""Load-test a running chatd (or one this script starts) over real WebSockets.

``python scripts/loadtest.py --help`` for the scenarios and options; the
code is in ``scripts/loadgen/`` (its ``__init__`` maps the modules, one
module per scenario in ``scripts/loadgen/scenarios/``).
"""

import sys
from pathlib import Path

# The repository root, for chatd's own modules (chatd.tokens).
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from loadgen.cli import main  # noqa: E402  (scripts/ is on sys.path when run as a script)

if __name__ == "__main__":
    sys.exit(main())
