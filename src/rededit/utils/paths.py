"""Where rededit's own files live (the one place that knows the repository layout)."""

from __future__ import annotations

from pathlib import Path

# The Hydra config tree shipped with rededit (``conf/`` at the repository root; editable installs).
CONF_DIR = Path(__file__).resolve().parents[3] / "conf"
