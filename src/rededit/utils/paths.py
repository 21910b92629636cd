"""Where rededit's own files live (the one place that knows the repository layout)."""

from __future__ import annotations

from pathlib import Path

# The Hydra config tree ships inside the package (``rededit/conf``, package data), so a wheel install finds it
# as an editable one does; ``conf`` at the repository root is a symlink to it for readers of the tree.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
