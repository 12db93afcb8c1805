"""Shared fixtures: small configs composed from conf/ with test overrides."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The config's default (``deterministic: true``) for this whole process before any test can
# start CUDA: tests that bypass the ClientApp and ServerApp (which apply the run's key
# themselves) then run deterministic too, whatever device ``auto`` picks.
from task.core.device import apply_determinism  # noqa: E402

apply_determinism(True)
