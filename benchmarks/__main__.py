"""``python -m benchmarks [--smoke] [--only SECTION] [--output DIR]``.

``--only soak [--soak-seconds N]`` runs the ten-minute soak (``make soak``), which the
default run leaves out.
"""

from __future__ import annotations

import sys

from benchmarks.runner import main

sys.exit(main())
