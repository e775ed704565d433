"""``python -m benchmarks [--smoke] [--only SECTION] [--output DIR]``."""

from __future__ import annotations

import sys

from benchmarks.runner import main

sys.exit(main())
